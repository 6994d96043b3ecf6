"""Top-k selection, the one rule used by titok-filter and titok-align (docs/design.md, Selection).

Keep max(1, floor(k * n)) of the n scored tokens with the highest score; ties go to the earlier
token. Tokens whose score is None (no source token overlaps them) are never selected and do not
count in n. Scope "sample" selects inside each record (the paper), "batch" over groups of
BATCH_GROUP consecutive records (the official code), "global" over all records at once.
"""
import math
from array import array
from itertools import chain, islice

import numpy as np

SCOPES = ("sample", "batch", "global")
BATCH_GROUP = 4
SAMPLE_CHUNK = 64  # records whose per-sample selections run as one set of array operations


def budget_scores(scores, offsets):
    """The scores that compete for the k budget: the closing token's (the empty span that ends a
    completion, docs/design.md, Completion tokens) is left out, as titok-train trains it anyway
    (--train-closing): stopping is part of every answer, not what the expert adds, and with one or
    two answer tokens it would otherwise take the whole budget."""
    if scores and isinstance(offsets, list) and len(offsets) == len(scores):
        last = offsets[-1]
        if isinstance(last, (list, tuple)) and len(last) == 2 and last[0] == last[1]:
            return [*scores[:-1], None]
    return scores


def n_select(n, k):
    return max(1, math.floor(k * n + 1e-9)) if n else 0


def topk_masks(score_lists, k):
    """One selection over the concatenation of several records' scores; returns one 0/1 list
    per record. Order of concatenation decides ties (earlier record, earlier token first)."""
    flat = np.array([np.nan if s is None else s for scores in score_lists for s in scores], dtype=np.float64)
    return split_by_counts(_topk_keep(flat, k).tolist(), map(len, score_lists))


def split_by_counts(flat, counts):
    """A flat list cut back into consecutive pieces of the given lengths (one per record)."""
    pieces, start = [], 0
    for n in counts:
        pieces.append(flat[start:start + n])
        start += n
    return pieces


def _topk_keep(flat, k):
    """0/1 int8 array over a float64 array (NaN = no score)."""
    valid = ~np.isnan(flat)
    n = n_select(int(valid.sum()), k)
    keep = np.zeros(flat.shape[0], dtype=np.int8)
    if n:
        index = np.flatnonzero(valid)
        # lexsort sorts by its last key first: -score, then position (stable, deterministic).
        order = index[np.lexsort((index, -flat[index]))]
        keep[order[:n]] = 1
    return keep


def topk_mask(scores, k):
    return topk_masks([scores], k)[0]


def topk_masks_each(score_lists, k):
    """[topk_mask(scores, k) for scores in score_lists], with numpy's per-call cost paid once per
    chunk, not per record (at a few hundred tokens a record it outweighs the work): one array for
    every score, each record sorted alone (many small sorts cost less than one sort of the chunk
    by record and score), each keeping its own first n_select tokens."""
    if not score_lists:
        return []
    counts = np.fromiter(map(len, score_lists), dtype=np.int64, count=len(score_lists))
    flat = np.array(list(chain.from_iterable(score_lists)), dtype=np.float64)  # None -> NaN
    record = np.repeat(np.arange(len(counts)), counts)
    valid = ~np.isnan(flat)
    scored = np.bincount(record[valid], minlength=len(counts))
    n_keep = np.where(scored > 0, np.maximum(1, np.floor(k * scored + 1e-9)), 0)
    # Highest score first, NaN last; a stable sort keeps ties in token order.
    starts, descending = np.cumsum(counts) - counts, -flat
    order = np.concatenate([start + np.argsort(descending[start:start + n], kind="stable")
                            for start, n in zip(starts.tolist(), counts.tolist())])
    rank = np.empty(len(flat), dtype=np.int64)
    rank[order] = np.arange(len(flat)) - np.repeat(starts, counts)
    return split_by_counts(((rank < n_keep[record]) & valid).astype(np.int8).tolist(), counts.tolist())


def select_stream(items, scores_of, k, scope, rereader=None):
    """Yield (item, mask) for a stream of items, in order, selecting with `scope`.

    `scores_of(item)` gives the item's score list, or None for an item outside the selection
    (titok-align's records that titok-filter did not keep): it is yielded in its place with mask
    None and takes no place in a batch group. "sample" and "batch" stream with memory bounded by
    one group (and, in a batch group, the items outside the selection that come between its
    members: they wait for the group's masks); "global" needs every score first: it runs one
    pass to collect them (scores only, not the records), and takes `rereader()`, a fresh
    iterator over the items, for the second pass.
    """
    if scope == "sample":
        items = iter(items)
        while chunk := [(item, scores_of(item)) for item in islice(items, SAMPLE_CHUNK)]:
            yield from _with_masks(chunk, topk_masks_each([s for _, s in chunk if s is not None], k))
    elif scope == "batch":
        pending, group = [], []  # the items since the last selection; the score lists among them
        for item in items:
            scores = scores_of(item)
            if scores is None and not pending:  # outside, and nothing waits for a group before it
                yield item, None
                continue
            pending.append((item, scores))
            if scores is not None:
                group.append(scores)
            if len(group) == BATCH_GROUP:
                yield from _with_masks(pending, topk_masks(group, k))
                pending, group = [], []
        yield from _with_masks(pending, topk_masks(group, k))
    elif scope == "global":
        lengths, flat = array("l"), array("d")  # 8 bytes a token, not the records
        for item in items:
            scores = scores_of(item)
            lengths.append(-1 if scores is None else len(scores))
            flat.extend(math.nan if s is None else s for s in scores or ())
        keep = _topk_keep(np.frombuffer(flat, dtype=np.float64), k)
        start = 0
        for item, n in zip(rereader(), lengths):
            yield item, None if n < 0 else keep[start:start + n].tolist()
            start += max(n, 0)
    else:
        raise ValueError(f"unknown scope {scope!r}")


def _with_masks(pending, masks):
    """(item, mask) for (item, scores) pairs, handing out `masks` in order to the items that have scores."""
    masks = iter(masks)
    for item, scores in pending:
        yield item, None if scores is None else next(masks)


def scope_groups(score_lists, scope):
    """The score lists that one selection each runs over under `scope`: every record, every
    BATCH_GROUP consecutive records concatenated, or all records concatenated (one group)."""
    if scope not in SCOPES:
        raise ValueError(f"unknown scope {scope!r}")
    size = {"sample": 1, "batch": BATCH_GROUP, "global": math.inf}[scope]
    group, count = [], 0
    for scores in score_lists:
        group.extend(scores)
        count += 1
        if count == size:
            yield group
            group, count = [], 0
    if count:
        yield group


def auto_k(score_lists, mass, scope):
    """The smallest k whose top-k selection (the rule above, under `scope`) holds at least
    `mass` of the total positive score; returns (k, share held), or (None, None) with no scores.

    The selection only changes where floor(k*n) does, so k is one of the breakpoints j/n (n: a
    group's scored tokens, j: a rank in it): the j-th best token of a group is selected from
    k = j/n on, its best one always. Each positive token is kept as (its breakpoint, its score),
    16 bytes, not the records; negative and zero tokens add no mass. With no positive score at
    all the answer is the smallest breakpoint, 1/(largest group): one token per group, share None.
    """
    thresholds, gains = array("d"), array("d")
    always = total = 0.0
    largest = 0
    for group in scope_groups(score_lists, scope):
        values = np.array([s for s in group if s is not None], dtype=np.float64)
        n = len(values)
        if not n:
            continue
        largest = max(largest, n)
        ranked = -np.sort(-values)
        positive = ranked > 0
        always += max(float(ranked[0]), 0.0)
        total += float(ranked[positive].sum())
        ranks = np.flatnonzero(positive[1:]) + 2  # 1-based ranks from 2 on
        thresholds.extend((ranks / n).tolist())
        gains.extend(ranked[ranks - 1].tolist())
    if not largest:
        return None, None
    smallest = 1 / largest
    if total <= 0:
        return smallest, None
    target = mass * total * (1 - 1e-12)  # rounding: a sum equal to the target in exact arithmetic may fall a hair short
    if always >= target:
        return smallest, always / total
    thresholds = np.frombuffer(thresholds, dtype=np.float64)
    gains = np.frombuffer(gains, dtype=np.float64)
    order = np.argsort(thresholds, kind="stable")
    held = always + np.cumsum(gains[order])
    i = int(np.searchsorted(held, target))
    k = float(thresholds[order[min(i, len(order) - 1)]])
    # every token whose breakpoint is k itself is selected at k too
    share = (always + float(gains[thresholds <= k].sum())) / total
    return k, share
