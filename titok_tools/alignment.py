"""Score alignment across tokenizers, as plain functions over character offsets and values
(docs/design.md, Alignment): which source tokens overlap each target token, the per-token
scores carried over (mean of the overlapping source tokens), and the checks offsets must pass.
titok-align and titok-show both use them; nothing here reads records or loads a tokenizer."""
from itertools import chain

import numpy as np

from .select import split_by_counts


def overlap_ranges(source_offsets, target_offsets, length):
    """For each target span, the range [lo, hi) of the source tokens whose spans overlap it.

    Spans are [start, end) character offsets into a text of `length` characters, both starts
    and ends in non-decreasing order (as tokenizers produce them; byte pieces of one character
    share its span), so the source tokens overlapping a span are a contiguous run: those ending
    after its start (a suffix) and starting before its end (a prefix). Counting starts and ends
    per character gives every run in O(n + m + length). An empty span (a closing token, [x, x])
    overlaps only the empty source spans at the same place: those starting at x or later (not
    before it) and ending at x or earlier.
    """
    src = np.asarray(source_offsets, dtype=np.int64).reshape(-1, 2)
    tgt = np.asarray(target_offsets, dtype=np.int64).reshape(-1, 2)
    # starts_before[x]: source tokens starting before char x; ends_by[x]: ending at or before x.
    starts_before = np.concatenate(([0], np.cumsum(np.bincount(src[:, 0], minlength=length + 1))))
    ends_by = np.cumsum(np.bincount(src[:, 1], minlength=length + 1))
    start, end = tgt[:, 0], tgt[:, 1]
    empty = start == end
    lo = np.where(empty, starts_before[start], ends_by[start])
    hi = np.where(empty, ends_by[end], starts_before[end])
    return lo, np.maximum(hi, lo)


def align_values(source_offsets, values, target_offsets, length, groups=False):
    """The source values carried onto the target spans; None where no source token overlaps.

    Default (docs/design.md, Alignment): each target token gets the mean of the source values whose
    spans overlap it. groups=True (the paper's alignment, used for --from mask): overlapping
    tokens chain into groups that end where both tokenizations share a boundary (the paper
    grows both spans until their texts match), and every target token of a group gets the mean
    over the group's source tokens: right|eou|sness (1, 0, 1) onto righteous|ness is 2/3, 2/3.
    Sums run left to right, so a one-to-one token keeps its value bit for bit.
    """
    lo, hi = overlap_ranges(source_offsets, target_offsets, length)
    values = np.asarray(values, dtype=np.float64)
    if not groups:
        return _range_means(values, lo, hi)
    # Consecutive target tokens are in one group when their source runs share a token.
    joined = (hi[:-1] > lo[1:]) & (hi[:-1] > lo[:-1]) & (hi[1:] > lo[1:])
    group = np.concatenate(([0], np.cumsum(~joined)))
    first = np.flatnonzero(np.concatenate(([True], ~joined)))
    last = np.concatenate((first[1:], [len(lo)])) - 1
    # a group's source run: from its first token's first source to its last token's last
    means = _range_means(values, lo[first], np.maximum(hi[last], lo[first]))
    return [means[g] for g in group.tolist()]


def _range_means(values, lo, hi):
    """Mean of values[lo[j]:hi[j]] for each j, None for an empty run."""
    count = hi - lo
    total = np.zeros(len(lo))
    rows, step = np.flatnonzero(count > 0), 0
    with np.errstate(invalid="ignore", over="ignore"):
        while rows.size:  # one pass per position inside the runs: sum(count) additions in all
            total[rows] += values[lo[rows] + step]
            step += 1
            rows = rows[count[rows] > step]
        means = total / count
        for j in np.flatnonzero(np.isinf(means)):  # the sum passed float64's range (values near 1e308):
            run = values[lo[j]:hi[j]]              # divide first; rounding can still pass the largest value,
            means[j] = min(max((run / count[j]).sum(), run.min()), run.max())  # which a mean never does
    means = means.tolist()
    if count.all():  # the usual case: every target token overlaps a source token
        return means
    return [None if c == 0 else m for m, c in zip(means, count.tolist())]


def align_many(sources, values, targets, lengths, groups=False):
    """align_values for several records in one pass, one score list per record.

    The records' spans are laid end to end, each record's characters shifted one past the
    previous record's end, so no span reaches into another record and the closing spans
    ([length, length]) stay apart: at a few hundred tokens a record numpy's per-call cost
    outweighs the work, and a chunk of records costs what one record did. `sources` and
    `targets` are (n, 2) arrays of all the records' spans concatenated, `values` the source
    values concatenated, `lengths` numpy arrays of (completion length, source tokens, target
    tokens) per record."""
    length, n_source, n_target = lengths
    shift = np.cumsum(length + 1) - (length + 1)
    src = sources + np.repeat(shift, n_source)[:, None]
    tgt = targets + np.repeat(shift, n_target)[:, None]
    return split_by_counts(align_values(src, values, tgt, int(shift[-1] + length[-1]), groups), n_target.tolist())


def spans_problems(spans, lengths, counts):
    """Which records of a chunk offsets_problem would reject, for all of them at once.

    `spans` holds every record's (n, 2) spans concatenated, `counts` the tokens of each record,
    `lengths` the characters of each completion."""
    nonempty = counts > 0
    last = (np.cumsum(counts) - 1)[nonempty]
    is_first, is_last = np.zeros(len(spans), dtype=bool), np.zeros(len(spans), dtype=bool)
    is_first[last - counts[nonempty] + 1] = True
    is_last[last] = True
    starts, ends, length = spans[:, 0], spans[:, 1], np.repeat(lengths, counts)
    bad = (starts < 0) | (ends > length) | (starts > ends)
    bad[1:] |= ~is_first[1:] & ((np.diff(starts) < 0) | (np.diff(ends) < 0))  # out of order in its record
    bad |= (starts == ends) & ~(is_last & (ends == length))  # only the closing token is empty, at the end
    record = np.repeat(np.arange(len(counts)), counts)
    return (np.bincount(record, weights=bad, minlength=len(counts)) > 0) | ~nonempty


def only_types(items, types):
    """Whether every item's type is one of `types` (numpy would turn 1.5 or "2" into an int
    without a word); a C-speed pass, a few percent of a record's time."""
    return set(map(type, items)) <= types


def as_spans(offsets):
    """offsets as an (n, 2) integer array, or None if they are not a non-empty list of integer pairs."""
    try:
        if not only_types(chain.from_iterable(offsets), {int}):
            return None
        spans = np.asarray(offsets, dtype=np.int64)
    except (TypeError, ValueError, OverflowError):
        return None
    return spans if spans.ndim == 2 and spans.shape[1] == 2 and len(spans) else None


def offsets_problem(offsets, length):
    """Why `offsets` (a list, or as_spans' array) cannot be the spans of the tokens of a completion
    of `length` characters, or None."""
    spans = offsets if isinstance(offsets, np.ndarray) else as_spans(offsets)
    if spans is None:
        return "are not a non-empty list of [start, end] integer pairs"
    starts, ends = spans[:, 0], spans[:, 1]
    if starts.min() < 0 or ends.max() > length:
        return f"reach outside the completion (length {length}): was it edited after scoring?"
    if (np.diff(starts) < 0).any() or (np.diff(ends) < 0).any():
        return "are not in order"
    nonempty = starts[:-1] < ends[:-1]
    if not nonempty.all() or starts[-1] > ends[-1]:
        return "hold an empty span other than the closing token's [length, length]"
    if starts[-1] == ends[-1] != length:
        return f"close at {ends[-1]}, not at the completion's end ({length}): was it edited after scoring?"
    return None




def one_to_one(source_offsets, target_offsets, length):
    """For each target span, the index of the one source span it pairs with, or -1.

    A pair is a mutually unique overlap: the target token overlaps exactly one source token, and
    that source token overlaps only this target token (overlap_ranges both ways, so the closing
    tokens, both empty at the end, pair with each other). Only such a target token stands for the
    same text as a source token and predicts from the same place: titok-align gives it the source's
    top-N distribution (docs/design.md, Vocabulary map)."""
    lo, hi = overlap_ranges(source_offsets, target_offsets, length)
    back_lo, back_hi = overlap_ranges(target_offsets, source_offsets, length)
    single = hi - lo == 1
    source = np.where(single, lo, 0)
    mutual = single & (back_hi[source] - back_lo[source] == 1) & (back_lo[source] == np.arange(len(lo)))
    return np.where(mutual, lo, -1)
