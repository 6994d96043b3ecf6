"""Scored records read lazily from their JSON lines (simdjson), for titok-align.

titok-align reads a few fields of each record and writes the line back with titok.target
spliced in (records.insert_member). Parsing a whole scored line into Python lists costs more
than the alignment itself, so this reader turns only the fields alignment reads into Python
objects and hands the source's per-token arrays to numpy straight from the line. Any line it
cannot read exactly as the full parse would goes to the full parse (records.parse_line).
"""
import numpy as np
import orjson
import simdjson

from .records import in_shard, not_kept


def read_lazily(parser, text, use, fingerprint):
    """The fast path for a record still as its JSON line: (record, spans, values), where `record`
    holds only what alignment reads (id, prompt, completion, messages, titok.filter and the
    source's tokenizer) and the source's offsets and values go from the line to arrays
    (simdjson) without becoming Python lists; (record, None, None) for a record titok-filter did
    not keep. The output is the line itself with titok.target spliced in (records.insert_member).
    None when the line needs the full parse: a line simdjson refuses (say an integer past 64
    bits), a key repeated in the record, titok or titok.source (simdjson would read the first,
    orjson reads the last), no id, titok not the record's last member or holding a target of an
    earlier run, the target's own tokenizer (its token ids are compared), top-N distributions, offsets and values that
    are not integer pairs and numbers, one per token (the full parse's checks then say why).
    Their order and range are checked a chunk at a time."""
    if not text.lstrip().startswith(b"{"):  # simdjson skips a byte-order mark, as other stages' orjson does not
        return None
    try:
        doc = parser.parse(text)
        keys = list(doc.keys())
        if not keys or keys[-1] != "titok" or "id" not in keys or len(set(keys)) < len(keys):
            return None
        part = doc["titok"]
        parts = list(part.keys())
        if "target" in parts or len(set(parts)) < len(parts):
            return None
        record = {key: _plain(doc[key]) for key in ("id", "prompt", "completion", "messages") if key in keys}
        record["titok"] = {"filter": _plain(part["filter"])} if "filter" in parts else {}
        if not_kept(record):
            return record, None, None
        source = part["source"]
        members = list(source.keys())
        if len(set(members)) < len(members) or "topk_ids" in members or "topk_logp" in members:
            return None  # top-N distributions: read whole (their checks and token ids are the full parse's)
        tokenizer = _plain(source.get("tokenizer"))
        if tokenizer == fingerprint:
            return None
        offsets, numbers = source["offsets"], source[use]
        n = len(offsets)
        # as_buffer flattens any nesting: the arrays' text without its digits shows their shape
        if (not n or len(numbers) != n or numbers.mini.count(b"[") != 1
                or offsets.mini.translate(None, b"-0123456789") != b"[" + b"[,]," * (n - 1) + b"[,]]"):
            return None
        spans = np.frombuffer(offsets.as_buffer(of_type="i"), dtype=np.int64).reshape(n, 2)
        values = np.frombuffer(numbers.as_buffer(of_type="d"), dtype=np.float64)
    except (ValueError, TypeError, KeyError, AttributeError, RuntimeError):  # RuntimeError: BIGINT_ERROR, DEPTH_ERROR
        # (and a parser still in use: nothing here outlives the call, and the tests check that
        # every line that can take this path does, so a leak would not go unnoticed)
        return None
    record["titok"]["source"] = {"tokenizer": tokenizer}
    return record, spans, values


def shard_lines(pairs, shard):
    """The (where, JsonLine) pairs of --shard I/N: the records whose index counting only the lines
    that are JSON objects (as every stage counts its records) is I modulo N, and every line that is
    not one (align_records reports it, or counts it with --skip-invalid, as every shard did)."""
    parser, index = simdjson.Parser(), 0
    for where, line in pairs:
        if not _is_object(parser, line.text):
            yield where, line
            continue
        if in_shard(index, shard):
            yield where, line
        index += 1


def _is_object(parser, text):
    """Whether parse_line takes this line: simdjson's parse first, orjson's where simdjson refuses
    (an integer past 64 bits)."""
    if text.lstrip().startswith(b"{"):  # not a byte-order mark either
        try:
            parser.parse(text)
            return True
        except (ValueError, RuntimeError):  # RuntimeError: BIGINT_ERROR, DEPTH_ERROR
            pass
    try:
        return isinstance(orjson.loads(text), dict)
    except orjson.JSONDecodeError:
        return False


def _plain(value):
    """A simdjson value as plain Python (objects and arrays are views into the parser's buffer)."""
    if isinstance(value, simdjson.Object):
        return value.as_dict()
    if isinstance(value, simdjson.Array):
        return value.as_list()
    return value
