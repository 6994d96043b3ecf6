"""titok-filter: keep the top-M samples by mean excess, then the top-k tokens inside them.

docs/design.md, Selection. Ranking needs every sample's mean excess before the first record can be
written, so the input is read twice (stdin is spooled to a temp file): pass one keeps only one
float per record, pass two streams the records out in input order with their token masks.
"""
import logging
import random

import click

from . import cli
from .errors import TitokError
from .records import (RecordError, check_numbers, read_records, record_writer, source_scores, spooled, titok,
                      unique_ids)
from .select import auto_k, budget_scores, n_select, select_stream

log = logging.getLogger("titok.filter")


def keep_value(value):
    """M as given: an int is a count, a float a fraction of the input; text ("250", "0.5") is
    read as one of them. Raises TitokError when it is neither or out of range."""
    if isinstance(value, str):
        try:
            value = float(value) if any(c in value for c in ".eE") else int(value)
        except ValueError:
            raise TitokError(f"--keep: {value!r} is neither a count nor a fraction")
    if isinstance(value, float) and not 0 < value <= 1:
        raise TitokError(f"--keep: fraction {value} is outside (0, 1]")
    if isinstance(value, int) and value < 1:
        raise TitokError(f"--keep: count {value} must be at least 1")
    return value


def parse_keep(value, n):
    """M out of n records, from a count or a fraction (keep_value)."""
    number = keep_value(value)
    if isinstance(number, float):
        return n_select(n, number)
    if number > n:
        log.warning("--keep %d is more than the %d input records: keeping all", number, n)
    return min(number, n)


def _keep_option(ctx, param, value):
    try:
        return keep_value(value)
    except TitokError as e:
        raise click.BadParameter(str(e).removeprefix("--keep: "))


def confidence(source, where):
    """The expert's mean log-probability of its own completion (titok.source.logp_expert)."""
    logp = source.get("logp_expert")
    if not isinstance(logp, list) or not logp:
        raise RecordError(where, "titok.source.logp_expert",
                          "must be a non-empty list of numbers (titok-score writes it)")
    check_numbers(logp, where, "titok.source.logp_expert")
    return sum(logp) / len(logp)


def _budget(source):
    return budget_scores(source["excess"], source.get("offsets"))


def answer_excess(source):
    """The mean excess of the answer's tokens: those that compete for the k budget, so not the
    closing token (select.budget_scores). With one or two answer tokens the closing token's excess,
    the expert's certainty that a short answer ends there, otherwise decides the sample's rank
    (docs/design.md, Selection). A completion with no answer token ranks last."""
    scored = [s for s in _budget(source) if s is not None]
    return sum(scored) / len(scored) if scored else float("-inf")


def rank_records(pairs, rank_by="excess", seed=0):
    """Pass one: 1-based rank of each record by mean excess (stable sort, descending), by the
    mean excess of its answer tokens alone (answer_excess), by the expert's confidence (its mean
    log-probability of the completion: a baseline that trusts the expert's certainty rather than
    its excess over the base), or in a seeded random order (the paper's "without sample
    filtering" ablation: M random samples)."""
    if rank_by == "confidence":
        means = [confidence(source_scores(record, where), where) for where, record in pairs]
    elif rank_by == "answer-excess":
        means = [answer_excess(source_scores(record, where)) for where, record in pairs]
    else:
        means = [source_scores(record, where)["mean_excess"] for where, record in pairs]
    if rank_by == "random":
        order = list(range(len(means)))
        random.Random(seed).shuffle(order)
    else:
        order = sorted(range(len(means)), key=lambda i: -means[i])
    ranks = [0] * len(means)
    for rank, i in enumerate(order, 1):
        ranks[i] = rank
    return ranks


def choose_k(kept_records, mass, scope):
    """-k auto: the smallest k whose selection over the kept records holds `mass` of their
    positive excess (select.auto_k, same scope rule as the masks). One pass, floats only."""
    k, share = auto_k((_budget(r["titok"]["source"]) for r in kept_records), mass, scope)
    if k is None:
        log.info("-k auto: no kept tokens to choose k from")
    elif share is None:
        log.warning("-k auto: no kept token has a positive excess; chose the smallest k, %.6g "
                    "(one token per %s)", k, "sample" if scope == "sample" else scope)
    else:
        log.info("-k auto: chose k = %.6g, which holds %.1f%% of the kept samples' positive excess "
                 "(--mass %g, scope %s)", k, 100 * share, mass, scope)
    return k, share


def filter_records(read, k, keep, scope, mark_only=False, counts=None, rank_by="excess", seed=0, mass=0.9):
    """Yield the kept records (all records with mark_only) in input order, with their masks.

    `read()` returns a fresh iterator of (where, record) pairs; it is called two to four times.
    k="auto" chooses k from the kept records first (choose_k, with `mass`).
    """
    counts = {} if counts is None else counts
    ranks = rank_records(unique_ids(read()), rank_by, seed)
    m = parse_keep(keep, len(ranks)) if ranks else 0

    def kept():
        return (r for i, (_, r) in enumerate(read()) if ranks[i] <= m)

    auto = None
    if k == "auto":
        k, share = choose_k(kept(), mass, scope)
        auto = {"mass": mass, "share": share}
        counts["k"] = k
    settings = {"k": k, "keep": m, "scope": scope}
    if auto:
        settings["k_auto"] = auto
    if rank_by != "excess":
        settings["rank_by"] = rank_by
        if rank_by == "random":
            settings["seed"] = seed

    masked = select_stream(kept(), lambda record: _budget(record["titok"]["source"]), k, scope, rereader=kept)
    for i, (where, record) in enumerate(read()):
        source = record["titok"]["source"]
        is_kept = ranks[i] <= m
        if is_kept:
            item, mask = next(masked)
            assert item["id"] == record["id"]
            source["mask"] = mask
            counts["kept"] = counts.get("kept", 0) + 1
            counts["tokens"] = counts.get("tokens", 0) + len(mask)
            counts["tokens_kept"] = counts.get("tokens_kept", 0) + sum(mask)
        else:
            source.pop("mask", None)  # a mask from an earlier titok-filter run no longer holds
        key = "kept" if is_kept else "dropped"
        counts[f"sum_{key}"] = counts.get(f"sum_{key}", 0.0) + source["mean_excess"]
        counts[f"n_{key}"] = counts.get(f"n_{key}", 0) + 1
        if is_kept or mark_only:
            titok(record)["filter"] = dict(settings, rank=ranks[i], kept=is_kept)
            if titok(record).pop("target", None) is not None:  # aligned under an earlier selection
                counts["stale_target"] = counts.get("stale_target", 0) + 1
            yield record


def summary(counts):
    kept, dropped = counts.get("n_kept", 0), counts.get("n_dropped", 0)
    line = f"kept {kept} of {kept + dropped} samples"
    if kept:
        line += (f", {counts['tokens_kept']} of their {counts['tokens']} tokens; "
                 f"mean excess kept {counts['sum_kept'] / kept:+.4f}")
    if dropped:
        line += f" vs dropped {counts['sum_dropped'] / dropped:+.4f}"
    if counts.get("stale_target"):
        line += (f"; removed titok.target from {counts['stale_target']} records (aligned under an earlier "
                 f"selection: run titok-align again)")
    return line


@click.command()
@cli.input_argument
@cli.selection_options(0.7, auto=True)
@click.option("--mass", type=cli.Finite(0, 1, min_open=True), default=0.9, show_default=True,
              help="With -k auto: the share of the kept samples' positive excess the selected tokens must hold.")
@click.option("-M", "--keep", default="0.5", show_default=True, callback=_keep_option,
              help="Samples to keep, by mean excess: a count (250) or a fraction of the input (0.5 = the paper's 2x pool).")
@click.option("--rank-by", type=click.Choice(["excess", "answer-excess", "confidence", "random"]), default="excess",
              show_default=True,
              help="Rank samples by mean excess (TiTok); by the mean excess of the answer's tokens, the closing "
                   "token left out as from the k budget (answer-excess: an ablation for answers of a few tokens, "
                   "where the closing token's excess decides the mean; it picked no better samples, README); by "
                   "the expert's mean log-probability of "
                   "its completion (confidence: a baseline that keeps what the expert is surest of); or at "
                   "random with --seed (the ablation baseline).")
@cli.seed_option
@click.option("--mark-only", is_flag=True, help="Write every record; dropped ones get titok.filter.kept = false and no mask.")
@cli.output_option
@cli.command
def main(input, k, scope, keep, rank_by, seed, mark_only, output, mass):
    """Keep the best samples and mark their most informative tokens.

    Reads records scored by titok-score. Keeps the top --keep samples by mean excess, then
    sets titok.source.mask (0/1 per token) to the top -k share of tokens by excess. Adds
    titok.filter = {k, keep, scope, rank, kept}; drops a titok.target from an earlier titok-align
    (its mask came from the earlier selection). `-k 1 --keep 1.0` keeps every token of every
    sample: the all-token (SFT/KD) baseline from the same tool.

    -k auto picks k from the data: the smallest k whose selection (same --scope rule) holds at
    least --mass of the kept samples' positive excess. It prints k on stderr and records it in
    titok.filter.k, with titok.filter.k_auto = {mass, share held}. With no positive excess at
    all it takes the smallest k (one token per sample, or per scope group) and share null.

    \b
    Example:
      titok-score --model BASE --adapter LORA data.jsonl | titok-filter -k 0.3 --keep 0.5 > kept.jsonl
      titok-filter -k auto --mass 0.9 scored.jsonl > kept.jsonl
    """
    counts = {}
    cli.streaming_gc()
    with spooled(input) as path, record_writer(output) as writer:
        name = "<stdin>" if input == "-" else input
        for record in filter_records(lambda: read_records(path, name=name), k, keep, scope, mark_only, counts,
                                     rank_by, seed, mass):
            writer.write(record)
    log.info(summary(counts))
