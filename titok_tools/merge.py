"""titok-merge: put the outputs of sharded runs back into input order.

`--shard I/N` on titok-gen (--label), titok-score, titok-align and titok-eval keeps the records whose
0-based input index i has i % N == I, in input order. So record j of shard I is input record
j*N + I, and merging is a round-robin over the shard files: one record from each in turn.

When a stage dropped records (--skip-invalid), the round-robin no longer lines up: `--by-id INPUT`
walks the input file instead, and takes the next record of shard i % N when its id is the input
record's id (a dropped record is simply absent). Both ways hold one record per shard in memory.
"""
import logging

import click
import orjson

from .errors import TitokError
from . import cli
from .records import read_records, record_writer, shown_name, unique_ids

log = logging.getLogger("titok.merge")


def _expected_counts(counts):
    """Shard sizes for the smallest input that explains the largest shard index seen."""
    n = len(counts)
    total = max(((c - 1) * n + i + 1 for i, c in enumerate(counts) if c), default=0)
    return [(total - i + n - 1) // n for i in range(n)]


def _count_error(paths, counts):
    expected = _expected_counts(counts)
    short = [f"shard {i} ({shown_name(paths[i])}) has {c} records, expected {e}"
             for i, (c, e) in enumerate(zip(counts, expected)) if c < e]
    return TitokError(
        f"{'; '.join(short)}: records are missing (an interrupted run, or one with --skip-invalid: "
        f"then merge with --by-id INPUT). Shard sizes: {counts}")


def merge_round_robin(paths):
    """Yield the records of shard files 0..N-1 in input order (record j of shard I is input record j*N+I)."""
    readers = [read_records(p, default_id=False) for p in paths]
    counts = [0] * len(paths)
    while True:
        for i, reader in enumerate(readers):
            item = next(reader, None)
            if item is None:
                # Shard i ran out in this round: the later shards must run out in this round
                # too, the earlier ones (which gave one more record) at the start of the next.
                extra = [sum(1 for _ in reader) for reader in readers]
                if any(extra):
                    raise _count_error(paths, [c + e for c, e in zip(counts, extra)])
                return
            counts[i] += 1
            yield item[1]


def _key(record):
    return orjson.dumps(record.get("id"))


def merge_by_id(paths, input_path, counts=None):
    """Yield the shards' records in the order of input_path's ids; records absent from their shard
    (dropped by the stage) are skipped and counted in counts["dropped"]."""
    counts = {} if counts is None else counts
    readers = [read_records(p, default_id=False) for p in paths]
    heads = [next(reader, None) for reader in readers]
    n = len(paths)
    # The stages index the records they read, with invalid JSON lines skipped under --skip-invalid.
    for i, (_, record) in enumerate(unique_ids(read_records(input_path, skip_invalid=True))):
        shard = i % n
        head = heads[shard]
        if head is not None and _key(head[1]) == _key(record):
            yield head[1]
            heads[shard] = next(readers[shard], None)
        else:
            counts["dropped"] = counts.get("dropped", 0) + 1
    for shard, head in enumerate(heads):
        if head is not None:
            where, record = head
            raise TitokError(
                f"{where}: id {_key(record).decode()} does not follow the input's order for shard {shard}/{n} "
                f"(index i % {n} == {shard}): are these the shards of {shown_name(input_path)}, given in shard order?")


@click.command()
@click.argument("shards", nargs=-1, required=True, type=click.Path(exists=True, dir_okay=False, allow_dash=True))
@cli.output_option
@click.option("--by-id", "by_id", type=click.Path(exists=True, dir_okay=False, allow_dash=True), metavar="INPUT",
              help="Order by the ids of INPUT, the file the shards were made from: for stages that dropped records "
                   "(--skip-invalid). A shard or INPUT may be '-' (stdin), one of them.")
@cli.command
def main(shards, output, by_id):
    """Merge the outputs of `--shard 0/N ... --shard N-1/N` runs, given in shard order, into input order.

    Without --by-id the shards are interleaved by position, which is input order only when no
    stage dropped a record: shard sizes no round-robin can give are an error, but a dropped record
    can leave sizes that look whole. After --skip-invalid, merge with --by-id INPUT.

    \b
    Example:
      for i in 0 1 2; do titok-score ... --shard $i/3 -o scored.$i.jsonl data.jsonl; done
      titok-merge -o scored.jsonl scored.0.jsonl scored.1.jsonl scored.2.jsonl
    """
    if [*shards, by_id].count("-") > 1:
        raise click.UsageError("stdin ('-') can stand for one file only")
    counts = {}
    records = merge_by_id(shards, by_id, counts) if by_id else merge_round_robin(shards)
    n = 0
    with record_writer(output) as writer:
        for record in records:
            writer.write(record)
            n += 1
    dropped = f"; {counts['dropped']} input records absent (dropped by the stage)" if counts.get("dropped") else ""
    log.info("merged %d records from %d shards%s", n, len(shards), dropped)
