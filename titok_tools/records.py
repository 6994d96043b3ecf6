"""JSONL records: reading (path or '-'), field access, and atomic, resumable writing.

Every stage reads and writes records through this module, so errors always name
file:line and field, and an interrupted run never leaves a half-written output.
"""
import functools
import io
import math
import os
import shutil
import signal
import stat
import sys
import tempfile
import threading
from collections import Counter
from contextlib import contextmanager, nullcontext
from typing import NamedTuple

import orjson

from .errors import TitokError

DUMP_OPTIONS = orjson.OPT_APPEND_NEWLINE | orjson.OPT_SERIALIZE_NUMPY


class RecordError(TitokError):
    """A bad record: one line naming file:line and the field at fault."""

    def __init__(self, where, field, message):
        super().__init__(f"{where}: {field}: {message}" if field else f"{where}: {message}")


def _open_input(path):
    if path == "-":
        return sys.stdin.buffer
    try:
        return open(path, "rb")
    except OSError as e:
        raise TitokError(f"{path}: cannot read: {e.strerror}")


def shown_name(path):
    """How messages name an input: its path, or <stdin> for '-'."""
    return "<stdin>" if path == "-" else path


def read_text(path, option):
    """A UTF-8 text file an option names (a template), or a one-line error naming the option."""
    try:
        with open(path, encoding="utf-8") as f:
            return f.read()
    except UnicodeDecodeError as e:
        raise TitokError(f"{option} {path}: not UTF-8 text ({e.reason} at byte {e.start})")
    except OSError as e:
        raise TitokError(f"{option} {path}: cannot read: {e.strerror}")


class JsonLine(NamedTuple):
    """A record still as its JSON line (read_records with parse=False), for a stage that reads a
    few fields of big records and writes them back with a part added (titok-align): the rest is
    neither turned into Python objects nor serialized again. parse_line makes it a dict."""
    text: bytes
    lineno: int  # 0-based, the id of a record that has none


def read_records(path, skip_invalid=False, counts=None, name=None, default_id=True, parse=True):
    """Yield (where, record) for every non-blank line of a JSONL file or '-' (stdin).

    `where` is "file:line" for error messages. A record without "id" gets its 0-based line
    number (unless default_id is False: a merge must not number a shard's lines). With
    skip_invalid, lines that are not JSON objects are skipped and counted in counts["invalid"]
    instead of raising. With parse=False the records come as JsonLines, unchecked (the
    stage parses them, and skips the invalid ones itself).
    """
    name = name or shown_name(path)
    f = _open_input(path)
    try:
        lines = ((f"{name}:{lineno + 1}", JsonLine(line, lineno)) for lineno, line in enumerate(f) if line.strip())
        if not parse:
            yield from lines
            return
        to_record = functools.partial(parse_line, default_id=default_id)
        for where, _, record in checked(lines, to_record, skip_invalid, counts):
            yield where, record
    finally:
        if f is not sys.stdin.buffer:
            f.close()


def parse_line(where, line, default_id=True):
    """The record a JsonLine holds, as a dict; a RecordError when it is not a JSON object."""
    try:
        record = orjson.loads(line.text)
    except orjson.JSONDecodeError as e:
        raise RecordError(where, None, f"invalid JSON ({e})")
    if not isinstance(record, dict):
        raise RecordError(where, None, "a record must be a JSON object")
    if default_id:
        record.setdefault("id", line.lineno)
    return record


def insert_member(line, key, value, depth):
    """A JSON line with "key": value (any JSON value) added as the last member of the object
    nested `depth` deep at its end: depth 1 is the record, 2 the object that is the record's
    last member, and so on. The caller knows (it parsed the line) that at each level the last
    member is the next object, so only whitespace and closing braces follow the innermost one:
    its closing brace is the depth-th "}" from the end. The line's other bytes are kept as they
    are."""
    end = len(line)
    for _ in range(depth):
        end = line.rindex(b"}", 0, end)
    head = line[:end].rstrip()
    comma = b"" if head.endswith(b"{") else b","
    return b"".join((head, comma, orjson.dumps(key), b":", orjson.dumps(value, option=orjson.OPT_SERIALIZE_NUMPY),
                     line[end:].rstrip(), b"\n"))


def in_shard(index, shard):
    """Whether the record at 0-based `index` belongs to --shard (I, N): index % N == I."""
    return shard is None or index % shard[1] == shard[0]


def checked(pairs, check, skip_invalid=False, counts=None):
    """Yield (where, record, check(where, record)) for each pair. A record whose check raises
    RecordError is skipped and counted in counts["invalid"] when skip_invalid, else it stops
    the command with that one-line error."""
    for where, record in pairs:
        try:
            value = check(where, record)
        except RecordError:
            if not skip_invalid:
                raise
            if counts is not None:
                counts["invalid"] = counts.get("invalid", 0) + 1
            continue
        yield where, record, value


def _as_messages(value, where, field):
    if isinstance(value, str):
        return [{"role": "user", "content": value}]
    if isinstance(value, list) and all(isinstance(m, dict) and isinstance(m.get("content"), str)
                                       and isinstance(m.get("role"), str) for m in value):
        return value
    raise RecordError(where, field, "must be a string or a list of {role, content} messages")


def prompt_and_completion(record, where):
    """Return (prompt_messages, completion_text) of a record.

    Accepts {"prompt": str | [messages], "completion": str | [assistant message]} and TRL
    conversational {"messages": [...]} whose last (assistant) message is the completion.
    """
    if "completion" in record:
        completion = record["completion"]
        if isinstance(completion, list) and len(completion) == 1 and isinstance(completion[0], dict):
            completion = completion[0].get("content")
        if not isinstance(completion, str):
            raise RecordError(where, "completion", "must be a string")
        if "prompt" not in record:
            raise RecordError(where, "prompt", "missing")
        prompt = _as_messages(record["prompt"], where, "prompt")
    elif "messages" in record:
        messages = _as_messages(record["messages"], where, "messages")
        if len(messages) < 2 or messages[-1].get("role") != "assistant":
            raise RecordError(where, "messages", "the last message must be the assistant's completion, after a prompt")
        prompt, completion = messages[:-1], messages[-1]["content"]
    else:
        raise RecordError(where, "completion", "missing (need prompt+completion or messages)")
    if not completion.strip():
        raise RecordError(where, "completion", "is empty")
    return prompt, completion


def prompt_messages(record, where):
    """The prompt of a record that may have no completion yet (generation, evaluation)."""
    if "prompt" in record:
        return _as_messages(record["prompt"], where, "prompt")
    if "messages" in record:
        messages = _as_messages(record["messages"], where, "messages")
        return messages[:-1] if messages and messages[-1].get("role") == "assistant" else messages
    raise RecordError(where, "prompt", "missing")


def prompt_field(record, index):
    """The field that holds message `index` of a record's prompt (as prompt_and_completion reads
    it), for error messages: "prompt" when it is a string, else prompt[i].content or
    messages[i].content."""
    key = "prompt" if "prompt" in record and ("completion" in record or "messages" not in record) else "messages"
    return key if isinstance(record.get(key), str) else f"{key}[{index}].content"


def unique_ids(pairs):
    """The (where, record) pairs, stopped at a record whose id an earlier one has, with a one-line
    error naming both lines: an id names one record (--resume skips the ids already written,
    titok-merge --by-id finds each record by its id). Only each id and its line are kept."""
    first = {}
    for where, record in pairs:
        key, line = _id_key(record.get("id")), int(where.rpartition(":")[2])
        seen = first.setdefault(key, line)
        if seen != line:
            raise RecordError(where, "id", f"{key.decode()} repeats the id of line {seen}: ids must be unique")
        yield where, record


def titok(record):
    """The record's "titok" namespace, created on first use."""
    return record.setdefault("titok", {})


NUMBER_TYPES = {int, float}  # not bool (true/false) nor numeric strings: titok-score writes floats


def check_number(value, where, field, prefix=""):
    """Raise a RecordError naming `field` when `value` is not a finite number."""
    if type(value) not in NUMBER_TYPES or not math.isfinite(value):
        raise RecordError(where, field, f"{prefix}must be a number, not {orjson.dumps(value).decode()}")


def check_numbers(values, where, field, prefix=""):
    """Raise a RecordError naming field[i] for the first value of a per-token list that is not a
    finite number."""
    if set(map(type, values)) <= NUMBER_TYPES and all(map(math.isfinite, values)):
        return  # the usual case, in two C-speed passes (this runs on every record)
    for i, value in enumerate(values):
        check_number(value, where, f"{field}[{i}]", prefix)


def titok_part(record, name):
    """record["titok"][name] ("source", "filter", "target"), or None when it is missing or not an
    object (as anything may be in a record another script wrote)."""
    titok_ = record.get("titok")
    part = titok_.get(name) if isinstance(titok_, dict) else None
    return part if isinstance(part, dict) else None


def filter_settings(record):
    """titok.filter of a record, {} when there is none (or it is not an object)."""
    return titok_part(record, "filter") or {}


def not_kept(record):
    """A record titok-filter --mark-only wrote but did not keep: align passes it through, train skips it."""
    return filter_settings(record).get("kept") is False


def dumps(record):
    return orjson.dumps(record, option=DUMP_OPTIONS)


def check_writable(path, is_dir=False):
    """Raise a one-line error now when PATH (a file, or a directory with is_dir) cannot be
    written: commands check their outputs before their work, not after it. '-' is stdout.
    Nothing is created: the nearest existing directory above PATH must take a new file (the
    writer makes the missing ones when it opens)."""
    if path == "-":
        return
    if not path:
        raise TitokError("cannot write to an empty path")
    if os.path.exists(path) and os.path.isdir(path) != is_dir:
        raise TitokError(f"{path}: cannot write: {'not a directory' if is_dir else 'it is a directory'}")
    existing = os.path.dirname(os.path.abspath(path))
    while not os.path.exists(existing):
        existing = os.path.dirname(existing)
    if not os.path.isdir(existing):
        raise TitokError(f"{path}: cannot write: {existing} is not a directory")
    try:
        with tempfile.TemporaryFile(dir=existing):
            pass
    except OSError as e:
        raise TitokError(f"{path}: cannot write: {e.strerror or e}")


class RecordWriter:
    """Write records to stdout or atomically to a file.

    A file is written as FILE.partial and renamed to FILE when the command succeeds, so FILE
    is never half-written; after a failure FILE.partial is removed, unless keep_partial (a
    command with --resume: it continues from there). With resume=True, the records already in
    FILE.partial (or FILE) are kept and counted by id in `done_ids`, so the command can skip
    them (is_done). Records that finish out of input order go through write_at and done_at.
    """

    def __init__(self, path, resume=False, keep_partial=False):
        self.path, self.keep_partial = path, keep_partial or resume  # a resumed file holds earlier work
        self.done_ids = Counter()
        self.first_done = None  # a resumed file's first record: what a stage checks its settings against
        self.written = 0  # records in the output
        self.waiting, self.next, self.ahead = {}, 0, None  # write_at's: position -> line, the next position
        if resume and path == "-":
            raise TitokError("resume needs an output file, not stdout")
        if path == "-":
            self.f = sys.stdout.buffer
            return
        check_writable(path)
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        self.partial = path + ".partial"
        if resume and not os.path.exists(self.partial) and os.path.exists(path):
            shutil.copyfile(path, self.partial)  # FILE itself stays as it is until the rename
        self.ahead_path = self.partial + ".ahead"
        if not (resume and os.path.exists(self.partial)):
            self.f = open(self.partial, "wb")
            if os.path.exists(self.ahead_path):
                os.unlink(self.ahead_path)  # an earlier run's, for a file now started afresh
            return
        # Resume in place: count the complete lines' ids, cut a half-written last line (a killed
        # run), append after them. Nothing already written is rewritten, and only ids are kept.
        self.f = open(self.partial, "r+b")
        complete = 0
        for lineno, line in enumerate(self.f, 1):
            if not line.endswith(b"\n"):
                break
            complete += len(line)
            if line.strip():
                self.written += 1
                try:
                    record = orjson.loads(line)
                    self.done_ids[_id_key(record.get("id"))] += 1
                    if self.first_done is None:
                        self.first_done = record
                except (orjson.JSONDecodeError, AttributeError):
                    self.f.close()
                    raise RecordError(f"{self.partial}:{lineno}", None, "not a JSON record: cannot resume from it")
        self.f.seek(complete)
        self.f.truncate()
        if os.path.exists(self.ahead_path):
            self._read_ahead()

    def write(self, record):
        """Write a record: a dict, or a JSON line (bytes ending in a newline) a stage made."""
        self.f.write(record if isinstance(record, bytes) else dumps(record))
        self.written += 1

    def write_at(self, position, record):
        """Write the record that is the run's position-th (from 0, records a resumed run skips
        included) once every one before it is written or done (done_at): for a stage whose
        records finish out of input order (titok-score's length-sorted batches). Until its turn it
        waits in memory and in FILE.partial.ahead, so an interrupted run keeps it too."""
        line = record if isinstance(record, bytes) else dumps(record)
        if position != self.next and self.path != "-":
            if self.ahead is None:
                self.ahead = open(self.ahead_path, "ab")
            self.ahead.write(b"%d\t%b" % (position, line))
            self.ahead.flush()
        self.waiting[position] = line
        self._write_ready()

    def done_at(self, position, record):
        """is_done for write_at's records: also true for one the interrupted run finished ahead of
        its turn (FILE.partial.ahead), which takes its place when the ones before it are written."""
        if position in self.waiting:
            return True
        if not is_done(self, record):
            return False
        if position >= self.next:
            self.waiting[position] = None  # in FILE.partial already: nothing to write in its place
            self._write_ready()
        return True

    def _write_ready(self):
        while self.next in self.waiting:
            line = self.waiting.pop(self.next)
            if line is not None:
                self.write(line)
            self.next += 1
        if not self.waiting and self.ahead is not None and self.ahead.tell():
            self.f.flush()  # FILE.partial holds what the sidecar held before the sidecar lets it go
            self.ahead.truncate(0)
            self.ahead.seek(0)

    def _read_ahead(self):
        """Load FILE.partial.ahead: "position<TAB>JSON line" per record; a half-written last line
        (a killed run) is cut, and a record FILE.partial already holds is dropped."""
        self.ahead = open(self.ahead_path, "r+b")
        complete = 0
        for line in self.ahead:
            position, tab, text = line.partition(b"\t")
            if not (tab and line.endswith(b"\n") and position.isdigit()):
                break
            complete += len(line)
            if int(position) >= self.written:  # FILE.partial holds positions 0 .. written - 1
                self.waiting[int(position)] = text
        self.ahead.seek(complete)
        self.ahead.truncate()

    def kept(self):
        """Records this writer's files keep: FILE.partial's and those waiting in FILE.partial.ahead."""
        return self.written + sum(line is not None for line in self.waiting.values())

    def flush(self):
        self.f.flush()

    def close(self, ok=True):
        if ok:
            for position in sorted(self.waiting):  # only when done_at and write_at disagreed (an input changed)
                if self.waiting[position] is not None:
                    self.write(self.waiting[position])
            self.waiting.clear()
        if self.path == "-":
            self.f.flush()
            return
        self.f.close()
        if self.ahead is not None:
            self.ahead.close()
        kept_ahead = not ok and self.keep_partial and self.kept() > self.written
        if os.path.exists(self.ahead_path) and not kept_ahead:
            os.unlink(self.ahead_path)
        if ok:
            os.replace(self.partial, self.path)
        elif not self.keep_partial:
            os.unlink(self.partial)


def _id_key(value):
    # a copy: the bytes orjson returns hold on to a ~4 KiB buffer each (orjson 3.13 here),
    # 4 GB for the ids of a million records
    return bytes(memoryview(orjson.dumps(value)))


def is_done(writer, record):
    """Whether a resumed run already wrote this record: one output with its id per input with
    it, in order, so inputs that share an id are each done once (not all by the first)."""
    key = _id_key(record.get("id"))
    if writer.done_ids[key] <= 0:
        return False
    writer.done_ids[key] -= 1
    return True


class Interrupted(KeyboardInterrupt):
    """Ctrl-C, or SIGTERM while a resumable output is open: the command exits 128 + signum
    with this message, what the output kept, on stderr."""

    def __init__(self, message="", signum=signal.SIGINT):
        super().__init__(message)
        self.signum = signum


def _terminated(signum, frame):
    raise Interrupted(signum=signum)


@contextmanager
def _sigterm_as_interrupt():
    """SIGTERM (kill, a Slurm time limit) raises as Ctrl-C does, so that the output keeps what is
    finished; only where Python can take it (the main thread) and nothing else handles it."""
    if threading.current_thread() is not threading.main_thread() or signal.getsignal(signal.SIGTERM) != signal.SIG_DFL:
        yield
        return
    signal.signal(signal.SIGTERM, _terminated)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, signal.SIG_DFL)


@contextmanager
def record_writer(path, resume=False, keep_partial=False):
    """Context manager around RecordWriter: renames into place only on success. An output that
    keeps its partial file (keep_partial, resume) keeps it on Ctrl-C and SIGTERM too, and the
    Interrupted raised then says how many records it holds."""
    writer = RecordWriter(path, resume=resume, keep_partial=keep_partial)
    resumable = path != "-" and writer.keep_partial
    with _sigterm_as_interrupt() if resumable else nullcontext():
        try:
            yield writer
        except KeyboardInterrupt as e:
            writer.close(ok=False)
            if not resumable:
                raise
            raise Interrupted(f"{writer.partial} keeps {writer.kept()} finished records; the same command with "
                              f"--resume continues from there", getattr(e, "signum", signal.SIGINT)) from None
        except BaseException:
            writer.close(ok=False)
            raise
    writer.close(ok=True)


@contextmanager
def spooled(path):
    """A path that can be read twice: a regular file itself, or stdin (or a pipe, /dev/stdin,
    a shell's <(...)) spooled to a temp file first."""
    if path != "-" and _is_regular_file(path):
        yield path
        return
    source = sys.stdin.buffer if path == "-" else _open_input(path)
    try:
        with tempfile.NamedTemporaryFile(prefix="titok-", suffix=".jsonl") as tmp:
            shutil.copyfileobj(source, tmp, 1 << 20)
            tmp.flush()
            yield tmp.name
    finally:
        if source is not sys.stdin.buffer:
            source.close()


def _is_regular_file(path):
    try:
        return stat.S_ISREG(os.stat(path).st_mode)
    except OSError:
        return False  # _open_input says why


@contextmanager
def text_output(path):
    """A text stream: stdout for '-', else a temp file beside PATH renamed to PATH only when the
    block succeeds (a failed run leaves no half-written file)."""
    if path == "-":
        buffer = getattr(sys.stdout, "buffer", None)
        if buffer is None:  # a stdout replaced by a text-only stream
            yield sys.stdout
            return
        sys.stdout.flush()
        # UTF-8 whatever the locale says: the page declares charset utf-8, and emoji must not fail
        stream = io.TextIOWrapper(buffer, encoding="utf-8")
        try:
            yield stream
            stream.flush()
        finally:
            stream.detach()  # leave sys.stdout open
        return
    check_writable(path)
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    tmp = tempfile.NamedTemporaryFile("w", encoding="utf-8", dir=directory, prefix=".titok-", suffix=".partial",
                                      delete=False)
    try:
        with tmp:
            yield tmp
    except BaseException:
        os.unlink(tmp.name)
        raise
    umask = os.umask(0)  # temp files are created 0600: give the output the usual permissions
    os.umask(umask)
    os.chmod(tmp.name, 0o666 & ~umask)
    os.replace(tmp.name, path)


def source_scores(record, where):
    """The scored source side of a record, checked."""
    source = titok_part(record, "source")
    if source is None or "excess" not in source:
        raise RecordError(where, "titok.source", "missing: run titok-score first")
    excess = source["excess"]
    if not isinstance(excess, list) or not excess:
        raise RecordError(where, "titok.source.excess", "must be a non-empty list of numbers")
    check_numbers(excess, where, "titok.source.excess")
    check_number(source.get("mean_excess"), where, "titok.source.mean_excess")
    return source
