"""Top-k selection, the one rule used by titok-filter and titok-align (SPEC Part A item 4).

Keep max(1, floor(k * n)) of the n scored tokens with the highest score; ties go to the earlier
token. Tokens whose score is None (no source token overlaps them) are never selected and do not
count in n. Scope "sample" selects inside each record (the paper), "batch" over groups of
BATCH_GROUP consecutive records (the official code), "global" over all records at once.
"""
import math
from array import array

import numpy as np

SCOPES = ("sample", "batch", "global")
BATCH_GROUP = 4


def n_select(n, k):
    return max(1, math.floor(k * n + 1e-9)) if n else 0


def topk_masks(score_lists, k):
    """One selection over the concatenation of several records' scores; returns one 0/1 list
    per record. Order of concatenation decides ties (earlier record, earlier token first)."""
    flat = np.array([np.nan if s is None else s for scores in score_lists for s in scores], dtype=np.float64)
    keep = _topk_keep(flat, k)
    masks, i = [], 0
    for scores in score_lists:
        masks.append(keep[i:i + len(scores)].tolist())
        i += len(scores)
    return masks


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


def select_stream(items, scores_of, k, scope, rereader=None):
    """Yield (item, mask) for a stream of items, selecting with `scope`.

    `scores_of(item)` gives the item's score list. "sample" and "batch" stream with memory
    bounded by one group; "global" needs every score first: it runs one pass to collect them
    (scores only, not the records), and takes `rereader()`, a fresh iterator over the items, for
    the second pass.
    """
    if scope == "sample":
        for item in items:
            yield item, topk_mask(scores_of(item), k)
    elif scope == "batch":
        group = []
        for item in items:
            group.append(item)
            if len(group) == BATCH_GROUP:
                yield from zip(group, topk_masks([scores_of(g) for g in group], k))
                group = []
        if group:
            yield from zip(group, topk_masks([scores_of(g) for g in group], k))
    elif scope == "global":
        lengths, flat = array("l"), array("d")  # 8 bytes a token, not the records
        for item in items:
            scores = scores_of(item)
            lengths.append(len(scores))
            flat.extend(math.nan if s is None else s for s in scores)
        keep = _topk_keep(np.frombuffer(flat, dtype=np.float64), k) if len(flat) else []
        start = 0
        for item, n in zip(rereader(), lengths):
            yield item, keep[start:start + n].tolist()
            start += n
    else:
        raise ValueError(f"unknown scope {scope!r}")
