"""records: reading records and JSON lines, the atomic text writer (titok-show pages, metrics, reports), the
resumable record writer, splicing a member into a JSON line."""
import os
import signal
import stat
import time

import numpy as np
import orjson
import pytest

from titok_tools.errors import TitokError
from titok_tools import records
from titok_tools.records import (RecordError, insert_member, is_done, parse_line, prompt_field, read_records,
                                 record_writer, text_output, unique_ids)


def test_text_output_appears_only_on_success(tmp_path):
    path = tmp_path / "sub" / "out.json"
    with text_output(str(path)) as f:
        f.write("{}")
        assert not path.exists()  # still a temp file beside it
    assert path.read_text() == "{}"
    with pytest.raises(RuntimeError):
        with text_output(str(path)) as f:
            f.write("half")
            raise RuntimeError("killed")
    assert path.read_text() == "{}"  # the old file stands, no temp file is left
    assert os.listdir(path.parent) == ["out.json"]


def test_text_output_dash_is_stdout(capsys):
    with text_output("-") as f:
        f.write("page")
    assert capsys.readouterr().out == "page"


def test_text_output_to_stdout_is_utf8_whatever_the_locale(tmp_path):
    # A page declares charset utf-8: written through a latin-1 stdout it must still be UTF-8.
    import subprocess
    import sys
    code = "from titok_tools.records import text_output\nwith text_output('-') as f:\n    f.write('caf\\u00e9 \\U0001f44d')"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, env=dict(os.environ, PYTHONIOENCODING="latin-1"))
    assert done.returncode == 0, done.stderr
    assert done.stdout == "café 👍".encode()


def test_text_output_gets_the_usual_permissions(tmp_path):
    umask = os.umask(0o022)
    try:
        with text_output(str(tmp_path / "page.html")) as f:
            f.write("<p>")
    finally:
        os.umask(umask)
    assert stat.S_IMODE(os.stat(tmp_path / "page.html").st_mode) == 0o644  # not a temp file's 0600


def _lines(*records):
    return b"".join(orjson.dumps(r) + b"\n" for r in records)


def test_resume_keeps_complete_lines_and_appends_after_them(tmp_path):
    out = tmp_path / "out.jsonl"
    (tmp_path / "out.jsonl.partial").write_bytes(_lines({"id": 0}, {"id": 1}) + b'{"id": 2, "compl')  # killed mid-line
    with record_writer(str(out), resume=True) as writer:
        todo = [r for r in ({"id": i} for i in range(4)) if not is_done(writer, r)]
        for record in todo:
            writer.write(record)
    assert todo == [{"id": 2}, {"id": 3}] and out.read_bytes() == _lines(*({"id": i} for i in range(4)))


def test_resume_from_a_finished_file_leaves_it_until_the_rename(tmp_path):
    out = tmp_path / "out.jsonl"
    out.write_bytes(_lines({"id": 0}))
    with pytest.raises(RuntimeError):
        with record_writer(str(out), resume=True) as writer:
            writer.write({"id": 1})
            raise RuntimeError("killed")
    assert out.read_bytes() == _lines({"id": 0})
    assert (tmp_path / "out.jsonl.partial").read_bytes() == _lines({"id": 0}, {"id": 1})


def test_resume_does_not_rewrite_what_was_written(tmp_path, monkeypatch):
    # The disk fills up as soon as the resumed run writes: what the interrupted run wrote stays.
    class DiskFull:
        def __init__(self, f):
            self.f = f

        def write(self, data):
            raise OSError(28, "No space left on device")

        def __getattr__(self, name):
            return getattr(self.f, name)

        def __iter__(self):
            return iter(self.f)

    monkeypatch.setattr(records, "open", lambda *a, **k: DiskFull(open(*a, **k)), raising=False)
    partial = tmp_path / "out.jsonl.partial"
    partial.write_bytes(_lines({"id": 0}, {"id": 1}))
    with pytest.raises(OSError, match="No space"):
        with record_writer(str(tmp_path / "out.jsonl"), resume=True) as writer:
            writer.write({"id": 2})
    assert partial.read_bytes() == _lines({"id": 0}, {"id": 1})


def test_resume_counts_records_that_share_an_id(tmp_path):
    # inputs x, y, x; the interrupted run wrote the first x only: y and the second x are still to do
    (tmp_path / "out.jsonl.partial").write_bytes(_lines({"id": "x", "n": 0}))
    with record_writer(str(tmp_path / "out.jsonl"), resume=True) as writer:
        todo = [r for r in ({"id": "x", "n": 0}, {"id": "y", "n": 1}, {"id": "x", "n": 2}) if not is_done(writer, r)]
    assert [r["n"] for r in todo] == [1, 2]


def test_a_repeated_id_names_both_lines(tmp_path):
    path = tmp_path / "in.jsonl"
    path.write_bytes(_lines({"id": "q1"}, {"id": "q3"}) + b"\n" + _lines({"id": 1}, {}, {"id": "1"}, {"id": "q3"}))
    seen = []
    with pytest.raises(RecordError) as error:
        for where, record in unique_ids(read_records(str(path))):
            seen.append(record["id"])
    # 1 and "1" are two ids; a record without one gets its 0-based line number (4 here, not 1)
    assert seen == ["q1", "q3", 1, 4, "1"]
    assert str(error.value.message) == f'{path}:7: id: "q3" repeats the id of line 2: ids must be unique'


def test_the_ids_kept_take_little_memory(tmp_path):
    """unique_ids and a resumed writer keep every id: about 100 bytes each, not the 4 KiB buffer
    each of orjson's own bytes objects holds on to (4 GB for a million records)."""
    import tracemalloc
    n = 20_000
    (tmp_path / "out.jsonl.partial").write_bytes(_lines(*({"id": f"q{i}"} for i in range(n))))
    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        ids = unique_ids((f"in.jsonl:{i + 1}", {"id": f"q{i}"}) for i in range(n))
        assert sum(1 for _ in ids) == n
        held = tracemalloc.get_traced_memory()[0] - before  # the generator is done: what it kept is freed
        peak = tracemalloc.get_traced_memory()[1] - before
        tracemalloc.reset_peak()
        before = tracemalloc.get_traced_memory()[0]
        writer = records.RecordWriter(str(tmp_path / "out.jsonl"), resume=True)
        resumed = tracemalloc.get_traced_memory()[0] - before
        writer.close()
    finally:
        tracemalloc.stop()
    assert held < 1000 and peak < 300 * n and resumed < 300 * n


def test_the_field_that_holds_a_prompt_message():
    assert prompt_field({"prompt": "p", "completion": "c"}, 0) == "prompt"
    assert prompt_field({"prompt": [{"role": "user", "content": "p"}], "completion": "c"}, 0) == "prompt[0].content"
    assert prompt_field({"messages": []}, 2) == "messages[2].content"
    assert prompt_field({"prompt": "p"}, 0) == "prompt"  # a prompt still to answer (titok-gen --label)


def test_resume_names_a_line_that_is_not_a_record(tmp_path):
    (tmp_path / "out.jsonl.partial").write_bytes(_lines({"id": 0}) + b"[1, 2]\n")
    with pytest.raises(RecordError, match=r"out.jsonl.partial:2: not a JSON record"):
        record_writer(str(tmp_path / "out.jsonl"), resume=True).__enter__()


def test_records_finished_out_of_order_are_kept_on_ctrl_c_and_take_their_place_on_resume(tmp_path):
    out = tmp_path / "out.jsonl"
    partial, ahead = tmp_path / "out.jsonl.partial", tmp_path / "out.jsonl.partial.ahead"
    with pytest.raises(records.Interrupted) as interrupted:
        with record_writer(str(out), keep_partial=True) as writer:
            for position in (1, 0, 4, 2, 6):  # 3 and 5 still running
                writer.write_at(position, {"id": position})
            assert ahead.read_bytes() == b'4\t{"id":4}\n6\t{"id":6}\n'  # on disk already: a SIGKILL keeps them too
            raise KeyboardInterrupt
    assert str(interrupted.value) == (f"{partial} keeps 5 finished records; the same command with --resume "
                                      f"continues from there")
    assert interrupted.value.signum == signal.SIGINT and not out.exists()
    assert partial.read_bytes() == _lines({"id": 0}, {"id": 1}, {"id": 2})
    assert ahead.read_bytes() == b'4\t{"id":4}\n6\t{"id":6}\n'
    with record_writer(str(out), resume=True) as writer:
        todo = [i for i in range(8) if not writer.done_at(i, {"id": i})]
        for position in reversed(todo):
            writer.write_at(position, {"id": position})
    assert todo == [3, 5, 7]
    assert out.read_bytes() == _lines(*({"id": i} for i in range(8)))
    assert not partial.exists() and not ahead.exists()


def test_resume_cuts_a_half_written_ahead_line_and_drops_what_the_partial_file_holds(tmp_path):
    out = tmp_path / "out.jsonl"
    partial, ahead = tmp_path / "out.jsonl.partial", tmp_path / "out.jsonl.partial.ahead"
    partial.write_bytes(_lines({"id": 0}, {"id": 1}))
    # killed after it wrote 1 into FILE.partial, before the sidecar let it go, and in the middle of 5
    ahead.write_bytes(b'1\t{"id":1}\n3\t{"id":3}\n5\t{"id"')
    with pytest.raises(records.Interrupted, match=r"keeps 4 finished records"):
        with record_writer(str(out), resume=True) as writer:
            assert [i for i in range(6) if not writer.done_at(i, {"id": i})] == [2, 4, 5]
            writer.write_at(4, {"id": 4})
            raise KeyboardInterrupt
    assert ahead.read_bytes() == b'1\t{"id":1}\n3\t{"id":3}\n4\t{"id":4}\n'
    with record_writer(str(out), resume=True) as writer:
        todo = [i for i in range(6) if not writer.done_at(i, {"id": i})]
        for position in todo:
            writer.write_at(position, {"id": position})
    assert todo == [2, 5] and out.read_bytes() == _lines(*({"id": i} for i in range(6)))


def test_a_fresh_run_drops_an_earlier_runs_ahead_file(tmp_path):
    (tmp_path / "out.jsonl.partial.ahead").write_bytes(b'1\t{"id":"old"}\n')
    with record_writer(str(tmp_path / "out.jsonl")) as writer:
        assert not writer.done_at(1, {"id": 1})
        writer.write_at(1, {"id": 1})
        writer.write_at(0, {"id": 0})
    assert (tmp_path / "out.jsonl").read_bytes() == _lines({"id": 0}, {"id": 1})
    assert os.listdir(tmp_path) == ["out.jsonl"]


def test_sigterm_keeps_the_partial_file_as_ctrl_c_does(tmp_path):
    if signal.getsignal(signal.SIGTERM) != signal.SIG_DFL:
        pytest.skip("something else handles SIGTERM in this process")
    out = tmp_path / "out.jsonl"
    with pytest.raises(records.Interrupted, match=r"out.jsonl.partial keeps 1 finished records") as interrupted:
        with record_writer(str(out), keep_partial=True) as writer:
            writer.write({"id": 0})
            os.kill(os.getpid(), signal.SIGTERM)
            for _ in range(500):  # the handler runs between two bytecodes of this thread
                time.sleep(0.01)
    assert interrupted.value.signum == signal.SIGTERM
    assert (tmp_path / "out.jsonl.partial").read_bytes() == _lines({"id": 0})
    assert signal.getsignal(signal.SIGTERM) == signal.SIG_DFL  # as it was
    # an output that cannot resume (titok-filter, -align, -merge) lets Ctrl-C through and leaves nothing
    with pytest.raises(KeyboardInterrupt) as interrupted:
        with record_writer(str(out)) as writer:
            writer.write({"id": 0})
            raise KeyboardInterrupt
    assert type(interrupted.value) is KeyboardInterrupt and os.listdir(tmp_path) == []


def test_outputs_that_cannot_be_written_fail_before_the_work(tmp_path):
    """One line naming the path and why, from check_writable (every -o, --metrics, titok-train's
    --output), not a traceback after the work."""
    a_file = tmp_path / "a.jsonl"
    a_file.write_text("")
    records.check_writable("-")
    records.check_writable(str(tmp_path / "new" / "dirs" / "out.jsonl"))  # creates nothing: the writer will
    assert not (tmp_path / "new").exists()
    with record_writer(str(tmp_path / "new" / "dirs" / "out.jsonl")) as writer:
        writer.write({"id": 0})
    assert (tmp_path / "new" / "dirs" / "out.jsonl").read_bytes() == _lines({"id": 0})
    for path, why in ((a_file / "out.jsonl", f"{a_file} is not a directory"), (tmp_path, "it is a directory"),
                      (a_file / "sub" / "out.jsonl", f"{a_file} is not a directory"),
                      ("/proc/titok-out.jsonl", "No such file or directory")):
        with pytest.raises(TitokError, match=f"^{path}: cannot write: {why}$"):
            records.check_writable(str(path))
    with pytest.raises(TitokError, match="not a directory"):
        records.check_writable(str(a_file), is_dir=True)
    records.check_writable(str(tmp_path), is_dir=True)


def test_a_failed_run_leaves_no_partial_file_unless_it_can_resume(tmp_path):
    for keep_partial in (False, True):
        out = tmp_path / f"out-{keep_partial}.jsonl"
        with pytest.raises(RuntimeError):
            with record_writer(str(out), keep_partial=keep_partial) as writer:
                writer.write({"id": 0})
                raise RuntimeError("bad record")
        assert not out.exists()
        assert (tmp_path / f"out-{keep_partial}.jsonl.partial").exists() == keep_partial


def test_records_as_json_lines(tmp_path):
    """parse=False hands out each non-blank line as it is, with its 0-based number; parse_line
    gives the dict read_records would have (the number as the id of a record without one), or
    its one-line error."""
    path = tmp_path / "in.jsonl"
    path.write_bytes(b'{"id": "a", "x": 1.0e5}\n\n  \n{"x": 2}\r\n[1]\n{"x": \n')
    pairs = list(read_records(str(path), parse=False))
    assert [(where, line.lineno) for where, line in pairs] == [(f"{path}:1", 0), (f"{path}:4", 3), (f"{path}:5", 4),
                                                              (f"{path}:6", 5)]
    assert pairs[0][1].text == b'{"id": "a", "x": 1.0e5}\n'
    assert parse_line(*pairs[0]) == {"id": "a", "x": 100000.0}
    assert parse_line(*pairs[1]) == {"x": 2, "id": 3} and parse_line(*pairs[1], default_id=False) == {"x": 2}
    with pytest.raises(RecordError, match=r"in.jsonl:5: a record must be a JSON object$"):
        parse_line(*pairs[2])
    with pytest.raises(RecordError, match=r"in.jsonl:6: invalid JSON \("):
        parse_line(*pairs[3])
    # the parsed reading is parse_line over the same lines
    assert [r for _, r in read_records(str(path), skip_invalid=True)] == [parse_line(*pairs[0]), parse_line(*pairs[1])]


@pytest.mark.parametrize("line, depth, expected", [
    (b'{"a": 1}\n', 1, b'{"a": 1,"k":[1,2]}\n'),
    (b'{"a": 1, "t": {"s": 2}}', 2, b'{"a": 1, "t": {"s": 2,"k":[1,2]}}\n'),
    (b'{"a":1,"t":{"s":2,"f":{"x":0}}}\r\n', 3, b'{"a":1,"t":{"s":2,"f":{"x":0,"k":[1,2]}}}\n'),
    (b'{ "t" : { "s" : 2 }  }  \n', 2, b'{ "t" : { "s" : 2,"k":[1,2]}  }\n'),   # whitespace before each brace
    (b'{"a": "}", "t": {}}\n', 2, b'{"a": "}", "t": {"k":[1,2]}}\n'),          # an empty object: no comma
    (b'{"t": {\n}}', 2, b'{"t": {"k":[1,2]}}\n'),
])
def test_insert_member(line, depth, expected):
    out = insert_member(line, "k", np.array([1, 2]), depth)
    assert out == expected.replace(b"[1,2]", orjson.dumps([1, 2])) and orjson.loads(out) is not None


def test_the_writer_writes_json_lines_as_they_are(tmp_path):
    with record_writer(str(tmp_path / "out.jsonl")) as writer:
        writer.write({"id": 1})
        writer.write(b'{"id": 2,  "x": 1.0e5}\n')
    assert (tmp_path / "out.jsonl").read_bytes() == records.dumps({"id": 1}) + b'{"id": 2,  "x": 1.0e5}\n'
