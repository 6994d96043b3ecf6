"""What decides a scored pool's sample ranking: its answers, or the token that closes them?

    python bench/closing_rank.py results/study-bbh/*/scored.jsonl --keep 250

TiTok ranks samples by mean excess over every completion token, the closing token included. On
answers of one to three tokens that token (the expert's certainty, over its base's, that the answer
ends there) can decide the rank alone. For each titok-score output file: its samples, the median
completion length in tokens, the rank correlation (Spearman) of the mean excess with the closing
token's excess and with the answer tokens' mean excess (titok-filter --rank-by answer-excess), and
how many of the top --keep samples the two rankings share.
"""
import argparse
import os
import statistics
import sys

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from titok_tools.errors import TitokError  # noqa: E402
from titok_tools.filter import answer_excess, rank_records  # noqa: E402
from titok_tools.records import source_scores, read_records  # noqa: E402
from titok_tools.select import budget_scores  # noqa: E402


def ranks(values):
    """1-based ranks, ties sharing their mean rank (as Spearman's rho wants them)."""
    values = np.asarray(values, dtype=np.float64)
    order = np.argsort(values, kind="stable")
    ranked = np.empty(len(values))
    ranked[order] = np.arange(1, len(values) + 1)
    for value in np.unique(values):
        tied = values == value
        ranked[tied] = ranked[tied].mean()
    return ranked


def spearman(a, b):
    """Spearman's rank correlation of two equal-length lists (None when either is constant)."""
    ra, rb = ranks(a), ranks(b)
    if ra.std() == 0 or rb.std() == 0:
        return None
    return float(np.corrcoef(ra, rb)[0, 1])


def closing_share(pairs, keep):
    """{samples, median tokens, rho closing, rho answer, shared of top keep} over the pool's
    (where, record) pairs whose completion ends in a closing token with at least one answer token
    before it."""
    pairs = list(pairs)
    means, closing, answer, lengths, usable = [], [], [], [], []
    for where, record in pairs:
        source = source_scores(record, where)
        excess = source["excess"]
        if len(excess) < 2 or budget_scores(excess, source.get("offsets"))[-1] is not None:
            continue  # no closing token (cut at --max-length), or nothing before it
        usable.append((where, record))
        means.append(source["mean_excess"])
        closing.append(excess[-1])
        answer.append(answer_excess(source))
        lengths.append(len(excess))
    keep = min(keep, len(usable))
    top_mean = {i for i, r in enumerate(rank_records(usable, "excess")) if r <= keep}
    top_answer = {i for i, r in enumerate(rank_records(usable, "answer-excess")) if r <= keep}
    return {"samples": len(usable), "of": len(pairs),
            "median_tokens": statistics.median(lengths) if lengths else None,
            "rho_closing": spearman(means, closing) if usable else None,
            "rho_answer": spearman(means, answer) if usable else None,
            "keep": keep, "shared": len(top_mean & top_answer)}


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("files", nargs="+", help="titok-score output files")
    parser.add_argument("--keep", type=int, default=250, help="M, the samples a ranking keeps")
    args = parser.parse_args(argv)
    print("| pool | samples | median tokens | rho(mean excess, closing token's) | "
          "rho(mean excess, answer tokens') | top-M shared |\n|---|---:|---:|---:|---:|---:|")
    fmt = lambda x: "n/a" if x is None else f"{x:.2f}"  # noqa: E731
    for path in args.files:
        try:
            s = closing_share(read_records(path), args.keep)
        except TitokError as e:
            sys.exit(f"closing_rank: {e}")
        print(f"| {path} | {s['samples']} of {s['of']} | {s['median_tokens']} | {fmt(s['rho_closing'])} | "
              f"{fmt(s['rho_answer'])} | {s['shared']} of {s['keep']} |")


if __name__ == "__main__":
    main()
