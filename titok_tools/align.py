"""titok-align: carry token scores from the source tokenizer onto the target's (docs/design.md, Alignment).

Both tokenizations cover the same completion string, and both store each token's character span
in it. A target token's score is the mean of the source excess values of the source tokens whose
spans overlap it: many-to-one averages, one-to-many replicates, the closing tokens (empty span at
the end) map to each other. With --from mask the source's 0/1 mask is carried the paper's way
instead: averaged over aligned groups (spans grown until both tokenizations share a boundary),
giving its fractional masks. A target token that overlaps no source token gets no score (null)
and is never selected. Then the target grid gets its own top-k mask with the same rule as
titok-filter.

Only the target's tokenizer is loaded, never its weights. The command reads each record's JSON
line lazily (lazy_records): only the fields it reads become Python objects (the source's
per-token arrays go straight into numpy), and it writes the line back with titok.target spliced
in, so the fields it does not own keep their bytes and are not serialized again. The maths of
spans and overlaps is in alignment.py; this module is the stage around it.
"""
import logging
from concurrent.futures import ThreadPoolExecutor
from functools import partial
import tempfile
import time
from itertools import chain
from typing import NamedTuple

import click
import numpy as np
import orjson
import simdjson
from tqdm import tqdm

from . import cli
from .alignment import align_many, as_spans, offsets_problem, one_to_one, only_types, spans_problems
from .errors import TitokError
from .formatting import FormatError, encode_later, record_error
from .lazy_records import read_lazily, shard_lines
from .models import load_tokenizer, tokenizer_fingerprint
from .records import (NUMBER_TYPES, JsonLine, RecordError, check_numbers, checked, dumps, filter_settings, insert_member,
                      not_kept, parse_line, prompt_and_completion, read_records, record_writer, titok, titok_part)
from .select import budget_scores, select_stream
from .vocab_map import carry_topk, token_map

log = logging.getLogger("titok.align")

SOURCE_VALUES = {"excess": "run titok-score first", "mask": "run titok-filter first"}
CHUNK_TOKENS = 8192  # source tokens per tokenizer call and per alignment pass (~40 records of 200 tokens):
                     # enough to amortize numpy's per-call cost and the hand-over between threads, and
                     # memory bounded by tokens, not by records


def batched(items, tokens, size):
    """Lists of consecutive items, each closed once its items' size(item) reach `tokens`. An
    error while reading an item comes after the chunk of the items before it, so that a caller
    checking them reports errors in input order."""
    chunk, total = [], 0
    try:
        for item in items:
            chunk.append(item)
            total += size(item)
            if total >= tokens:
                yield chunk
                chunk, total = [], 0
    except Exception:
        if chunk:
            yield chunk
        raise
    if chunk:
        yield chunk


def one_ahead(start, items):
    """(item, finish()) for each item, in order, where finish = start(item): the next item is
    started before this one is finished and handed out. An error while reading the next item
    is raised after this one is handed out (it comes later in the input)."""
    items, pending = iter(items), None
    while True:
        try:
            item = next(items)
        except StopIteration:
            break
        except Exception:
            if pending is not None:
                yield pending[0], pending[1]()
            raise
        started = (item, start(item))
        if pending is not None:
            yield pending[0], pending[1]()
        pending = started
    if pending is not None:
        yield pending[0], pending[1]()


# --- target tokenizer --------------------------------------------------------------------------

def _text_normalizer(tokenizer):
    """The target's normalizer minus what only marks spaces (Prepend "▁", Replace " " by "▁"), or None
    if nothing else is left.

    What is left may change the text (Lowercase, NFKC, Strip...): then tokens no longer stand
    for the completion's own characters, and `unreproducible` finds which.
    """
    from tokenizers import Tokenizer

    normalizer = tokenizer.backend_tokenizer.normalizer
    spec = orjson.loads(normalizer.__getstate__()) if normalizer is not None else None  # its JSON form
    steps = spec["normalizers"] if spec and spec.get("type") == "Sequence" else [spec] if spec else []
    steps = [s for s in steps if s.get("type") != "Prepend" and not _marks_spaces(s)]
    if not steps:
        return None
    # tokenizers builds normalizers from JSON only as part of a tokenizer: give it an empty one.
    carrier = {"version": "1.0", "truncation": None, "padding": None, "added_tokens": [],
               "normalizer": {"type": "Sequence", "normalizers": steps}, "pre_tokenizer": None,
               "post_processor": None, "decoder": None,
               "model": {"type": "WordLevel", "vocab": {"[UNK]": 0}, "unk_token": "[UNK]"}}
    return Tokenizer.from_str(orjson.dumps(carrier).decode()).normalizer


def _marks_spaces(step):
    return step.get("type") == "Replace" and step.get("pattern") == {"String": " "} and step.get("content") == "\u2581"


def _same_text(normalizer, text):
    # SentencePiece normalizers write spaces as "▁": that is a spelling, not a change of text.
    return normalizer.normalize_str(text).replace("\u2581", " ") == text.replace("\u2581", " ")


def unreproducible(normalizer, completion, offsets):
    """Indices of target tokens whose text the normalizer changes (they must get no score).

    None when the normalizer leaves the whole completion as it is (the usual case: one check).
    """
    if normalizer is None or _same_text(normalizer, completion):
        return None
    return [i for i, (a, b) in enumerate(offsets) if a < b and not _same_text(normalizer, completion[a:b])]


# --- records -------------------------------------------------------------------------------------

class SourceFields(NamedTuple):
    """What alignment reads of a scored record's source side."""
    messages: list
    completion: str
    source: dict          # titok.source
    spans: np.ndarray     # the source tokens' [start, end) offsets, n x 2
    values: np.ndarray    # the values carried over (excess or 0/1 mask), one per source token
    topk: tuple = None    # (ids, logp), n x N arrays of the source's top-N distributions, if it has them


class Item(NamedTuple):
    """A record on its way through alignment."""
    where: str
    record: dict
    line: JsonLine        # the line its output is spliced into; None for a dict
    fields: SourceFields  # None for a record passed through (titok-filter did not keep it)
    enc: object = None    # the target's encoding (or the FormatError it raised)


class RunK:
    """The k of a run: the one given, or the one titok-filter recorded, the same in every record."""

    def __init__(self, k):
        self.k, self.given = k, k is not None

    def check(self, record, where):
        if self.given:
            return
        k = recorded_k(record, where)
        if self.k is None:
            self.k = k
        elif k != self.k:
            raise RecordError(where, "titok.filter.k", f"{k} differs from the k of earlier records ({self.k}); pass -k")


def source_values(record, where, use):
    """The source's offsets and the values to carry (excess or 0/1 mask), checked against the
    completion; raises a one-line RecordError naming file:line, field and record id."""
    messages, completion = prompt_and_completion(record, where)
    source = titok_part(record, "source")
    if source is None:
        raise RecordError(where, "titok.source", f"missing: {SOURCE_VALUES['excess']}")
    values = source.get(use)
    if not isinstance(values, list):
        problem = f"missing: {SOURCE_VALUES[use]}" if values is None else "must be a list of numbers, one per token"
        raise RecordError(where, f"titok.source.{use}", problem)
    spans = as_spans(source.get("offsets"))
    problem = offsets_problem(spans, len(completion))
    if problem:
        raise RecordError(where, "titok.source.offsets", f"record {record.get('id')!r}: the offsets {problem}")
    if len(values) != len(spans):
        raise RecordError(where, f"titok.source.{use}", f"record {record.get('id')!r}: {len(values)} values "
                                                        f"for {len(spans)} tokens")
    check_numbers(values, where, f"titok.source.{use}", prefix=f"record {record.get('id')!r}: ")
    return SourceFields(messages, completion, source, spans, np.asarray(values, dtype=np.float64),
                        source_topk(record, source, len(spans), where))


TOPK_FIELDS = ("topk_ids", "topk_logp")


def source_topk(record, source, n, where):
    """The source's top-N distributions as (ids, logp) n x N arrays, or None if it has none;
    raises a one-line RecordError when they are not n lists of N ids and N numbers."""
    present = [name for name in TOPK_FIELDS if name in source]
    if not present:
        return None
    prefix = f"record {record.get('id')!r}: "
    if len(present) == 1:
        missing = next(name for name in TOPK_FIELDS if name not in present)
        raise RecordError(where, f"titok.source.{missing}", f"{prefix}missing, but titok.source.{present[0]} is there")
    arrays = []
    for name, types, dtype in (("topk_ids", {int}, np.int64), ("topk_logp", NUMBER_TYPES, np.float64)):
        rows = source[name]
        field = f"titok.source.{name}"
        if not isinstance(rows, list) or len(rows) != n or not only_types(rows, {list}):
            raise RecordError(where, field, f"{prefix}must be {n} lists, one per token")
        width = len(rows[0])
        if any(len(row) != width for row in rows) or not only_types(chain.from_iterable(rows), types):
            raise RecordError(where, field, f"{prefix}must hold the same number of "
                                            f"{'token ids' if dtype is np.int64 else 'numbers'} for every token")
        try:
            arrays.append(np.asarray(rows, dtype=dtype).reshape(n, width))
        except OverflowError:
            raise RecordError(where, field, f"{prefix}holds an id past 64 bits") from None
    ids, logp = arrays
    if ids.shape != logp.shape:
        raise RecordError(where, "titok.source.topk_logp", f"{prefix}{logp.shape[1]} log-probs a token, "
                                                           f"for {ids.shape[1]} ids")
    if not np.isfinite(logp).all():
        raise RecordError(where, "titok.source.topk_logp", f"{prefix}must be finite log-probs")
    return ids, logp


def target_problem(where, record, completion, enc):
    """The RecordError for a record the target tokenizer cannot encode (or encodes with offsets
    that do not fit), or None."""
    if isinstance(enc, FormatError):
        return record_error(where, record, enc, prefix="target tokenizer: ")
    problem = offsets_problem(enc.offsets, len(completion))
    if problem:  # cannot happen with a sane tokenizer; never align on broken offsets
        return RecordError(where, "completion", f"record {record.get('id')!r}: the target tokenizer's offsets {problem}")
    return None


def chunk_arrays(fields, encodings):
    """(source spans, source values, target spans, lengths) of a chunk for align_many, or None
    when any record fails a check (the per-record checks then find which, and why)."""
    if any(isinstance(enc, FormatError) for enc in encodings):
        return None
    n_source = np.fromiter((len(f.spans) for f in fields), dtype=np.int64, count=len(fields))
    n_target = np.fromiter((len(enc.offsets) for enc in encodings), dtype=np.int64, count=len(fields))
    length = np.fromiter((len(f.completion) for f in fields), dtype=np.int64, count=len(fields))
    sources = np.concatenate([f.spans for f in fields])
    values = np.concatenate([f.values for f in fields])
    # the target's spans are the shared encode's, integer pairs from the tokenizer: only their
    # order and range are checked (spans_problems), not their types
    targets = np.fromiter(chain.from_iterable(chain.from_iterable(enc.offsets for enc in encodings)), dtype=np.int64,
                          count=2 * int(n_target.sum())).reshape(-1, 2)
    if (not np.isfinite(values).all()
            or spans_problems(sources, length, n_source).any() or spans_problems(targets, length, n_target).any()):
        return None
    return sources, values, targets, (length, n_source, n_target)


def finish_record(where, record, fields, enc, scores, fingerprint, text_normalizer, *, model, use, counts,
                  mapping_for=None):
    """Add titok.target (all but the mask) to one record, given its aligned scores. `mapping_for`
    gives the token map for a record's source (needed only for records with top-N distributions)."""
    completion, source = fields.completion, fields.source
    token_ids, offsets = enc.token_ids, enc.offsets
    same_tokens = (source.get("tokenizer") == fingerprint and source.get("token_ids") == token_ids
                   and source["offsets"] == offsets)
    changed = None
    if same_tokens:
        scores = list(source[use])  # same tokenizer, same tokens: the source's own numbers, untouched
        counts["same_tokens"] = counts.get("same_tokens", 0) + 1
    else:
        changed = unreproducible(text_normalizer, completion, offsets)
        if changed is not None:
            for i in changed:
                scores[i] = None
            counts["normalized_records"] = counts.get("normalized_records", 0) + 1
            counts["normalized_tokens"] = counts.get("normalized_tokens", 0) + len(changed)
            log.warning("%s: record %r: the target tokenizer's normalizer changes the completion's text; "
                        "%d of %d target tokens get no score", where, record.get("id"), len(changed), len(offsets))
    scored = len(scores) - scores.count(None)
    target = {"model": model, "tokenizer": fingerprint, "token_ids": token_ids, "offsets": offsets,
              "score": scores, "coverage": scored / len(scores), "truncated": enc.truncated}
    if fields.topk is not None:
        target.update(target_topk(where, record, fields, enc, mapping_for, same_tokens, changed, counts))
    titok(record)["target"] = target
    counts["records"] = counts.get("records", 0) + 1
    counts["tokens"] = counts.get("tokens", 0) + len(scores)
    counts["scored"] = counts.get("scored", 0) + scored
    counts["min_coverage"] = min(counts.get("min_coverage", 1.0), scored / len(scores))
    counts["truncated"] = counts.get("truncated", 0) + int(enc.truncated)


def target_topk(where, record, fields, enc, mapping_for, same_tokens, changed, counts):
    """titok.target's topk_ids, topk_logp and topk_coverage: the source's top-N distributions on the
    target tokens that pair one-to-one with a source token (alignment.one_to_one), their ids mapped
    onto the target vocabulary (vocab_map.carry_topk); the source's own lists with the same tokens."""
    source = fields.source
    if same_tokens:
        ids, logp = list(source["topk_ids"]), list(source["topk_logp"])
    else:
        mapping = mapping_for(where, record, source)
        paired = one_to_one(fields.spans, enc.offsets, len(fields.completion))
        for i in changed or ():  # text the target's normalizer changes: no score, no distribution
            paired[i] = -1
        carried = carry_topk(paired, *fields.topk, mapping, closing_pair(source, enc, len(fields.completion)))
        ids = [None if c is None else c[0] for c in carried]
        logp = [None if c is None else c[1] for c in carried]
    covered = len(ids) - ids.count(None)
    counts["topk_tokens"] = counts.get("topk_tokens", 0) + len(ids)
    counts["topk_covered"] = counts.get("topk_covered", 0) + covered
    return {"topk_ids": ids, "topk_logp": logp, "topk_coverage": covered / len(ids)}


def closing_pair(source, enc, length):
    """(source closing token id, target closing token id) when both tokenizations end with a closing
    token (an empty span at the completion's end), else None: whatever the token map says, the
    source's closing token stands for the target's (docs/design.md, Alignment)."""
    source_ids, source_offsets = source.get("token_ids"), source.get("offsets")
    if not isinstance(source_ids, list) or not source_ids or type(source_ids[-1]) is not int:
        return None
    if list(source_offsets[-1]) != [length, length] or list(enc.offsets[-1]) != [length, length]:
        return None
    return source_ids[-1], enc.token_ids[-1]


def recorded_k(record, where):
    k = filter_settings(record).get("k")
    if k is None:
        raise RecordError(where, "titok.filter.k", "missing: pass -k, or run titok-filter first")
    if type(k) not in NUMBER_TYPES or not 0 < k <= 1:
        raise RecordError(where, "titok.filter.k", f"must be a number in (0, 1], not {orjson.dumps(k).decode()}: pass -k")
    return k


class Alignment:
    """One run of align_records, flat: the target tokenizer and what the run carries from record
    to record (its k, counts and progress), and the steps a record takes: read and checked
    (`check`), tokenized a chunk ahead in a thread (`aligned`), aligned a chunk at a time
    (`aligned_chunk`), or one by one when a chunk holds a bad record (`recheck`)."""

    def __init__(self, tokenizer, *, model, k, use, chat_template, max_length, skip_invalid, counts, progress,
                 source_model=None):
        self.tokenizer, self.model, self.use = tokenizer, model, use
        self.source_model, self.maps = source_model, {}  # source fingerprint -> token map (vocab_map)
        self.chat_template, self.max_length, self.skip_invalid = chat_template, max_length, skip_invalid
        self.counts, self.progress = counts, progress
        self.fingerprint = tokenizer_fingerprint(tokenizer)
        self.text_normalizer = _text_normalizer(tokenizer)
        self.parser = simdjson.Parser()
        self.run_k = RunK(k)

    def check(self, where, record):
        """(record, line, fields): the record as a dict (for a line read lazily, only the fields
        alignment reads), the JsonLine its output is spliced into (None for a dict), and its
        SourceFields (None for a record passed through)."""
        line, lazy = None, None
        if isinstance(record, JsonLine):
            line, lazy = record, read_lazily(self.parser, record.text, self.use, self.fingerprint)
            record = parse_line(where, line) if lazy is None else lazy[0]
        self.run_k.check(record, where)
        if not_kept(record):
            fields = None
            titok(record).pop("target", None)  # from an earlier run: it no longer holds
        elif lazy is None:
            fields = source_values(record, where, self.use)
        else:
            _, spans, values = lazy
            fields = SourceFields(*prompt_and_completion(record, where), record["titok"]["source"], spans, values)
        if fields is not None and fields.topk is not None:
            self.check_topk_ids(where, record, fields)
        if line is not None and lazy is None:  # parsed whole: the line to splice into has titok last, no target
            record["titok"] = record.pop("titok")
            record["titok"].pop("target", None)
            line = JsonLine(dumps(record), line.lineno)
        return record, line, fields

    def aligned(self, pairs):
        """(record, line) of each record in input order, titok.target added (all but the mask).
        A chunk of records at a time: one tokenizer call, one set of array operations. The next
        chunk is tokenized in a thread while this one is aligned and written: the tokenizer
        releases the GIL."""
        items = (Item(where, *value) for where, _, value in checked(pairs, self.check, self.skip_invalid, self.counts))
        with ThreadPoolExecutor(1, thread_name_prefix="titok-align-tokenize") as pool:
            def start(chunk):  # render now, tokenize in the pool's thread
                return encode_later(self.tokenizer, [(item.fields.messages, item.fields.completion) for item in chunk
                                                     if item.fields is not None],
                                    self.chat_template, self.max_length, pool.submit)

            for chunk, encodings in one_ahead(start, batched(items, CHUNK_TOKENS, weight)):
                to_align = [item for item in chunk if item.fields is not None]
                done = iter(self.aligned_chunk(to_align, encodings) if to_align else ())
                head = next(done, None)
                for item in chunk:  # in input order; --skip-invalid may have dropped some
                    if item.fields is None:
                        self.count("not_kept")
                        yield item.record, item.line
                    elif head is not None and item.record is head[0]:
                        yield head
                        head = next(done, None)

    def aligned_chunk(self, chunk, encodings):
        items = [item._replace(enc=enc) for item, enc in zip(chunk, encodings)]
        arrays = chunk_arrays([item.fields for item in items], encodings)
        if arrays is None:  # some record is bad: check each, raise or skip (--skip-invalid)
            items = [item for _, _, item in checked(((item.where, item) for item in items), self.recheck,
                                                    self.skip_invalid, self.counts)]
            if not items:
                return
            arrays = chunk_arrays([item.fields for item in items], [item.enc for item in items])
        for item, scores in zip(items, align_many(*arrays, groups=self.use == "mask")):
            finish_record(item.where, item.record, item.fields, item.enc, scores, self.fingerprint,
                          self.text_normalizer, model=self.model, use=self.use, counts=self.counts,
                          mapping_for=self.mapping_for)
            self.count(None)
            yield item.record, item.line

    def recheck(self, where, item):
        """The item with its fields checked one by one (raises the record's one-line error). A
        line read lazily is parsed whole here: the checks' precise errors, and the record is then
        aligned with the numbers they checked."""
        fields = source_values(item.record if item.line is None else parse_line(where, item.line), where, self.use)
        problem = target_problem(where, item.record, fields.completion, item.enc)
        if problem:
            raise problem
        return item._replace(fields=fields)

    def mapping_for(self, where, record, source):
        """The token map from the record's source tokenizer onto the target's (vocab_map.token_map),
        one per source tokenizer in the run. The source tokenizer is loaded from --source-model, else
        the record's titok.source.model, and must have the fingerprint the record names."""
        fingerprint = source.get("tokenizer")
        if fingerprint not in self.maps:
            if fingerprint == self.fingerprint:
                self.maps[fingerprint] = np.arange(len(self.tokenizer), dtype=np.int64)
            else:
                self.maps[fingerprint] = token_map(self.source_tokenizer(where, record, source), self.tokenizer)
        return self.maps[fingerprint]

    def check_topk_ids(self, where, record, fields):
        """The top-N ids must be ids of the source vocabulary (the token map's length)."""
        ids, size = fields.topk[0], len(self.mapping_for(where, record, fields.source))
        if ids.size and (ids.min() < 0 or ids.max() >= size):
            raise RecordError(where, "titok.source.topk_ids", f"record {record.get('id')!r}: ids must lie in "
                                                              f"[0, {size}), the source vocabulary")

    def source_tokenizer(self, where, record, source):
        model = self.source_model or source.get("model")
        if not isinstance(model, str):
            raise RecordError(where, "titok.source.model", f"record {record.get('id')!r}: not a model name: "
                                                           f"pass --source-model (the top-N ids need its tokenizer)")
        tokenizer = load_tokenizer(model)
        if tokenizer_fingerprint(tokenizer) != source.get("tokenizer"):
            raise TitokError(f"{where}: the tokenizer of {model} is not the one titok.source.tokenizer names "
                             f"({source.get('tokenizer')}): pass the scoring model as --source-model")
        return tokenizer

    def count(self, name):
        """One record done: counted under `name` (if any), and shown in the progress bar."""
        if name is not None:
            self.counts[name] = self.counts.get(name, 0) + 1
        if self.progress is not None:
            self.progress.update(1)


def weight(item):
    """An item's share of a chunk: its source tokens; a record passed through holds its line or
    lists too: it weighs about as many."""
    if item.fields is not None:
        return len(item.fields.spans)
    if item.line is not None:
        return 1 + len(item.line.text) // 64  # a scored record's line: about 64 bytes a token
    offsets = (titok_part(item.record, "source") or {}).get("offsets")
    return max(1, len(offsets)) if isinstance(offsets, list) else 1


def selection_scores(aligned_item):
    """The scores a (record, line) competes with for the top-k budget, or None for a record passed
    through: not kept, it stays outside the selection (with --scope batch or global it would
    change the kept records' masks: a batch group is BATCH_GROUP kept records)."""
    target = titok_part(aligned_item[0], "target")
    return None if target is None else budget_scores(target["score"], target["offsets"])


def align_records(pairs, tokenizer, *, model, k=None, scope="sample", use="excess", chat_template=True,
                  max_length=768, skip_invalid=False, counts=None, progress=None, source_model=None):
    """Align (where, record) pairs onto `tokenizer` (a loaded tokenizer); yield the records, in
    input order, with titok.target = {model, tokenizer, token_ids, offsets, score, coverage,
    truncated, mask}, plus topk_ids, topk_logp and topk_coverage when the source has top-N
    distributions (their ids mapped with the token map from the source's tokenizer: source_model,
    else the records' titok.source.model). A record is a dict, or a records.JsonLine (read_records(parse=False), as
    titok-align reads): it then comes out as its JSON line (bytes) with titok.target spliced in.
    k=None takes the k recorded by titok-filter (one k for the whole run). Records titok-filter
    --mark-only did not keep pass through without titok.target, outside the selection.
    """
    run = Alignment(tokenizer, model=model, k=k, use=use, chat_template=chat_template, max_length=max_length,
                    skip_invalid=skip_invalid, counts={} if counts is None else counts, progress=progress,
                    source_model=source_model)
    stream = run.aligned(pairs)
    first = next(stream, None)  # the first record fixes the run's k (RunK) before the selection starts
    if first is None:
        return
    stream = chain([first], stream)
    with tempfile.TemporaryFile(prefix="titok-align-") as spool:
        rereader = None
        if scope == "global":
            # One threshold over every record: keep the aligned records on disk, not in memory.
            stream = _spooled(stream, spool)
            rereader = partial(_unspooled, spool)
        for (record, line), mask in select_stream(stream, selection_scores, run.run_k.k, scope, rereader):
            if mask is not None:
                record["titok"]["target"]["mask"] = mask
            if line is None:
                yield record
                continue
            target = titok_part(record, "target")
            if target is not None:  # added as titok's last part; the rest of the line stays as it came
                yield insert_member(line.text, "target", target, 2)
            else:  # passed through as it came
                yield line.text.rstrip() + b"\n"


def _spooled(items, spool):
    """The (record, line) items, written to `spool` as they pass, for _unspooled to read again:
    a dict as "d" + its JSON; a line as "l" + the line, then its target part on a line of its own."""
    for record, line in items:
        if line is None:
            spool.write(b"d" + dumps(record))
        else:
            spool.write(b"l" + line.text.rstrip() + b"\n" + dumps(titok_part(record, "target")))
        yield record, line


def _unspooled(spool):
    spool.seek(0)
    for text in spool:
        if text.startswith(b"d"):
            yield orjson.loads(text[1:]), None
        else:
            target = orjson.loads(next(spool))
            yield {"titok": {"target": target}}, JsonLine(text[1:], 0)  # target None: passed through


def summary(counts):
    n, tokens = counts.get("records", 0), counts.get("tokens", 0)
    line = f"aligned {n} records, {tokens} target tokens"
    if tokens:
        line += f", coverage {counts['scored'] / tokens:.2%} (lowest record {counts['min_coverage']:.2%})"
    if counts.get("topk_tokens"):
        line += f", top-N distributions on {counts['topk_covered'] / counts['topk_tokens']:.2%} of them"
    if counts.get("not_kept"):
        line += f", {counts['not_kept']} records titok-filter did not keep passed through"
    if counts.get("same_tokens"):
        line += f", {counts['same_tokens']} records with the source's own tokens (scores taken over)"
    if counts.get("normalized_records"):
        line += (f", {counts['normalized_records']} records whose text the target normalizer changes "
                 f"({counts['normalized_tokens']} tokens left unscored)")
    return line + cli.counted_suffix(counts)


@click.command()
@cli.input_argument
@click.option("--target-model", required=True,
              help="The target model whose tokens get the scores: a Hugging Face id, a local dir or a .gguf file. "
                   "Only its tokenizer is loaded.")
@cli.tokenizer_options
@click.option("--from", "use", type=click.Choice(sorted(SOURCE_VALUES)), default="excess", show_default=True,
              help="Carry the source's excess, per overlapping token (the target ranks real scores), or its 0/1 "
                   "mask from titok-filter, averaged over aligned groups (the paper's fractional masks).")
@click.option("--source-model", help="The model that scored the records (default: their titok.source.model): its "
                                    "tokenizer maps the top-N ids of titok-score --topk onto the target's vocabulary.")
@cli.selection_options(None)
@cli.output_option
@cli.shard_option
@cli.skip_invalid_option
@cli.command
def main(input, target_model, chat_template, no_chat_template, max_length, source_model, use, k, scope, output, shard,
         skip_invalid):
    """Carry per-token source scores onto the target tokenizer's tokens and select top-k there.

    Each record is formatted with the TARGET's chat template; each target completion token
    scores the mean of the source values whose character spans overlap it (null where none
    does; never selected). Adds record["titok"]["target"] = {model, tokenizer, token_ids,
    offsets, score, coverage, truncated, mask}; with the source's top-N distributions (titok-score
    --topk) also topk_ids, topk_logp, topk_coverage: on each target token that pairs one-to-one
    with a source token, the source ids mapped onto the target vocabulary (MinED, cached under
    $TITOK_CACHE). Default -k: the k titok-filter recorded.
    Records titok-filter --mark-only did not keep pass through without a target, outside
    the selection. --shard goes with --scope sample (batch and global select over all records).

    \b
    Example:
      titok-score ... | titok-filter -k 0.7 \\
        | titok-align --target-model gemma-3-270m.gguf --chat-template gemma3-chat.jinja > aligned.jsonl
    """
    if shard is not None and shard[1] > 1 and scope != "sample":  # 0/1 is the whole input (titok-slurm)
        raise click.UsageError(f"--shard selects per shard: use --scope sample, or align --scope {scope} in one run")
    tokenizer = load_tokenizer(target_model, chat_template)
    cli.streaming_gc()  # the tokenizer's ~300k objects and each record's lists: see there
    counts = {}
    started = time.time()
    with record_writer(output) as writer, tqdm(desc="titok-align", unit="rec", mininterval=1) as progress:
        pairs = read_records(input, parse=False)  # parsed lazily: align_records
        if shard is not None and shard[1] > 1:  # 0/1 (titok-slurm) is every record: no pass to count them
            pairs = shard_lines(pairs, shard)
        for record in align_records(pairs, tokenizer, model=target_model, k=k, scope=scope, use=use,
                                    chat_template=not no_chat_template, max_length=max_length,
                                    skip_invalid=skip_invalid, counts=counts, progress=progress,
                                    source_model=source_model):
            writer.write(record)
    elapsed = time.time() - started
    log.info("%s, %.0f records/s", summary(counts), counts.get("records", 0) / max(elapsed, 1e-9))
