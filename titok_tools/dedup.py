"""Fast ROUGE-L dedup for titok-gen: rouge-score's decisions, without its all-pairs loop
(docs/design.md, Generation; bench/bench_dedup.py measures it)."""
from array import array

import numpy as np


class RougeDedup:
    """ROUGE-L F (rouge-score's tokenizer with Porter stemming) of a text against a growing pool.

    The scores are rouge-score's exactly (same tokens, same float formula), but each text is
    tokenized once, and a pair gets its LCS computed only when an upper bound on its F reaches
    the threshold: F = 2*LCS/(a+b) with LCS <= min(a, b) (the length ratio) and LCS <= the
    multiset overlap of the two token lists (an inverted index gives the overlap with every
    pooled text at once). The LCS itself is bit-parallel (Allison-Dix) on Python ints.
    """

    def __init__(self, threshold):
        from rouge_score.tokenizers import DefaultTokenizer

        self.threshold = threshold
        self.tokenizer = DefaultTokenizer(use_stemmer=True)
        self.vocab = {}           # token -> int
        self.features = {}        # (token id, occurrence number) -> int
        self.postings = []        # feature -> array of pooled indices holding it
        self.lengths = array("l")
        self.masks = []           # per pooled text: {token id: bitmask of its positions}
        self.stats = {"pairs": 0, "length_pruned": 0, "overlap_pruned": 0, "lcs": 0}

    def __len__(self):
        return len(self.lengths)

    def tokens(self, text):
        vocab = self.vocab
        return [vocab.setdefault(t, len(vocab)) for t in self.tokenizer.tokenize(text)]

    def _feature_ids(self, tokens, create):
        # The k-th occurrence of a token is feature (token, k): the dot product of two texts'
        # feature sets is then sum over tokens of min(count_a, count_b), the multiset overlap.
        seen, ids = {}, []
        for t in tokens:
            k = seen.get(t, 0)
            seen[t] = k + 1
            f = self.features.get((t, k))
            if f is None and create:
                f = self.features[(t, k)] = len(self.postings)
                self.postings.append(array("l"))
            if f is not None:
                ids.append(f)
        return ids

    def add(self, text):
        tokens = self.tokens(text)
        index = len(self.lengths)
        for f in self._feature_ids(tokens, create=True):
            self.postings[f].append(index)
        masks = {}
        for i, t in enumerate(tokens):
            masks[t] = masks.get(t, 0) | (1 << i)
        self.lengths.append(len(tokens))
        self.masks.append(masks)

    def best(self, text):
        """(F, index) of the pooled text most similar to `text` if that F >= threshold, else
        (below-threshold F or 0.0, None). Only candidates that can reach the threshold are scored."""
        tokens = self.tokens(text)
        n, b = len(self.lengths), len(tokens)
        self.stats["pairs"] += n
        if not n or not b:
            return 0.0, None
        lengths = np.frombuffer(self.lengths, dtype=np.int64) if n else np.zeros(0, np.int64)
        margin = 1e-9  # the bounds are exact maths; never prune a pair rouge-score would flag on rounding
        total = lengths + b
        reachable = 2 * np.minimum(lengths, b) >= (self.threshold - margin) * total
        reachable &= lengths > 0
        self.stats["length_pruned"] += n - int(reachable.sum())
        feats = self._feature_ids(tokens, create=False)
        if feats:
            hits = np.concatenate([np.frombuffer(self.postings[f], dtype=np.int64) for f in feats])
            overlap = np.bincount(hits, minlength=n)
        else:
            overlap = np.zeros(n, np.int64)
        bound = 2 * overlap >= (self.threshold - margin) * total
        candidates = np.flatnonzero(reachable & bound)
        self.stats["overlap_pruned"] += int(reachable.sum()) - len(candidates)
        # Most promising first: the first pair at or over the threshold settles it.
        order = candidates[np.argsort(-(overlap[candidates] / total[candidates]), kind="stable")]
        best = 0.0
        for i in order.tolist():
            self.stats["lcs"] += 1
            f = rouge_f(lcs_length(self.masks[i], int(lengths[i]), tokens), int(lengths[i]), b)
            if f >= self.threshold:
                return f, i
            best = max(best, f)
        return best, None


def lcs_length(masks, length, tokens):
    """Length of the longest common subsequence of a pooled text (its position bitmasks per
    token, and its length) and a token list: the bit-parallel algorithm of Allison and Dix
    (1986), one addition per token of `tokens`."""
    full = (1 << length) - 1
    v = full
    for t in tokens:
        u = v & masks.get(t, 0)
        v = ((v + u) | (v - u)) & full
    return length - v.bit_count()


def rouge_f(lcs, target_len, prediction_len):
    """rouge-score's F for an LCS length, computed with its very float operations."""
    if not lcs:
        return 0.0
    precision, recall = lcs / prediction_len, lcs / target_len
    return 2 * precision * recall / (precision + recall)
