"""titok-merge: shards of a real titok-score run merged back equal one unsharded run."""
import pytest
from click.testing import CliRunner

from conftest import read_jsonl, run_pipe, write_jsonl
from titok_tools import merge, score

PROMPTS = ["What is 2+2?", "Name a color.", "Say hi.", "Count to three.", "What is the capital of France?",
           "Spell cat.", "Is ice cold?", "Give me a fruit.", "What day follows Monday?", "Name a planet."]
ANSWERS = ["4", "Blue.", "Hi!", "One, two, three.", "Paris.", "C-A-T", "Yes, it is.", "An apple.", "Tuesday.", "Mars"]


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("merge")
    records = [{"id": f"r{i}", "prompt": p, "completion": c} for i, (p, c) in enumerate(zip(PROMPTS, ANSWERS))]
    return tmp, write_jsonl(tmp / "data.jsonl", records)


def titok_score(tiny_llama, tiny_llama_lora, input, output, *extra):
    # One record per batch: batch composition then cannot change a float, sharded or not.
    result = CliRunner().invoke(score.main, ["--model", tiny_llama, "--adapter", tiny_llama_lora, "--dtype", "float32",
                                             "--batch-tokens", "1", "-o", str(output), *extra, str(input)])
    assert result.exit_code == 0, result.output
    return str(output)


def test_three_score_shards_merge_into_one_run(tiny_llama, tiny_llama_lora, data):
    tmp, path = data
    whole = read_jsonl(titok_score(tiny_llama, tiny_llama_lora, path, tmp / "whole.jsonl"))
    shards = [titok_score(tiny_llama, tiny_llama_lora, path, tmp / f"shard{i}.jsonl", "--shard", f"{i}/3")
              for i in range(3)]
    assert [len(read_jsonl(s)) for s in shards] == [4, 3, 3]
    assert [r["id"] for r in read_jsonl(shards[1])] == ["r1", "r4", "r7"]
    # The installed command, in a real pipe, to stdout.
    out, _, stderr = run_pipe(["titok-merge", *shards])
    assert read_jsonl(out) == whole
    assert "merged 10 records from 3 shards" in stderr
    # -o writes the file; --by-id gives the same order when nothing was dropped.
    result = CliRunner().invoke(merge.main, ["-o", str(tmp / "merged.jsonl"), "--by-id", path, *shards])
    assert result.exit_code == 0, result.output
    assert read_jsonl(tmp / "merged.jsonl") == whole


def test_by_id_merges_shards_with_dropped_records(tiny_llama, tiny_llama_lora, data, tmp_path):
    _, path = data
    records = read_jsonl(path)
    records[4]["completion"] = ""  # titok-score --skip-invalid drops records 4 and 8
    del records[8]["completion"]
    bad = write_jsonl(tmp_path / "bad.jsonl", records)
    whole = read_jsonl(titok_score(tiny_llama, tiny_llama_lora, bad, tmp_path / "whole.jsonl", "--skip-invalid"))
    assert len(whole) == 8
    shards = [titok_score(tiny_llama, tiny_llama_lora, bad, tmp_path / f"s{i}.jsonl", "--skip-invalid", "--shard", f"{i}/3")
              for i in range(3)]
    result = CliRunner().invoke(merge.main, ["--by-id", bad, *shards])
    assert result.exit_code == 0, result.output
    assert read_jsonl(result.stdout_bytes) == whole
    # Without --by-id the counts do not line up, and the error names the short shard.
    result = CliRunner().invoke(merge.main, ["-o", str(tmp_path / "out.jsonl"), *shards])
    assert result.exit_code == 1
    assert f"shard 1 ({shards[1]}) has 2 records, expected 3" in result.output
    assert "--by-id INPUT" in result.output
    assert not (tmp_path / "out.jsonl").exists() and not (tmp_path / "out.jsonl.partial").exists()  # no --resume here


def shard_files(tmp_path, sizes):
    """Shards of an input 0..T-1 whose shard i holds `sizes[i]` records of index i, i+N, ..."""
    n = len(sizes)
    return [write_jsonl(tmp_path / f"p{i}.jsonl", [{"id": i + j * n} for j in range(size)]) for i, size in enumerate(sizes)]


@pytest.mark.parametrize("sizes, short", [
    ([3, 2, 3], ["shard 1 (p1.jsonl) has 2 records, expected 3"]),       # a middle shard ends early
    ([2, 3, 3], ["shard 0 (p0.jsonl) has 2 records, expected 3"]),       # the first shard ends early
    ([4, 3, 2], ["shard 2 (p2.jsonl) has 2 records, expected 3"]),       # the last shard is two behind
    ([1, 0, 3], ["shard 0 (p0.jsonl) has 1 records, expected 3", "shard 1 (p1.jsonl) has 0 records, expected 3"]),
])
def test_inconsistent_counts_name_the_short_shard(tmp_path, monkeypatch, sizes, short):
    monkeypatch.chdir(tmp_path)
    paths = [p.rsplit("/", 1)[1] for p in shard_files(tmp_path, sizes)]
    result = CliRunner().invoke(merge.main, paths)
    assert result.exit_code == 1
    for message in short:
        assert message in result.output
    assert f"Shard sizes: {sizes}" in result.output


@pytest.mark.parametrize("sizes", [[0, 0, 0], [1, 0, 0], [2, 2, 1], [3, 3, 3], [5]])
def test_consistent_counts_interleave(tmp_path, sizes):
    result = CliRunner().invoke(merge.main, shard_files(tmp_path, sizes))
    assert result.exit_code == 0, result.output
    assert [r["id"] for r in read_jsonl(result.stdout_bytes)] == list(range(sum(sizes)))


def test_by_id_rejects_shards_that_do_not_match_the_input(tmp_path):
    input = write_jsonl(tmp_path / "in.jsonl", [{"id": i} for i in range(6)])
    shards = shard_files(tmp_path, [2, 2, 2])
    result = CliRunner().invoke(merge.main, ["--by-id", input, shards[1], shards[0], shards[2]])  # wrong order
    assert result.exit_code == 1
    assert f"{shards[1]}:1: id 1 does not follow the input's order for shard 0/3" in result.output
    assert CliRunner().invoke(merge.main, []).exit_code == 2  # no shard files


def test_by_id_refuses_an_input_that_repeats_an_id(tmp_path):
    """Input 0 and 2 share an id in shard 0: had the stage dropped record 0, record 2 would take its
    place, silently out of order."""
    input = write_jsonl(tmp_path / "in.jsonl", [{"id": "x"}, {"id": "y"}, {"id": "x"}, {"id": "z"}])
    shards = [write_jsonl(tmp_path / "s0.jsonl", [{"id": "x"}]), write_jsonl(tmp_path / "s1.jsonl", [{"id": "y"}, {"id": "z"}])]
    result = CliRunner().invoke(merge.main, ["--by-id", input, "-o", str(tmp_path / "out.jsonl"), *shards])
    assert result.exit_code == 1 and not (tmp_path / "out.jsonl").exists()
    assert result.output.strip().splitlines() == [f'Error: {input}:3: id: "x" repeats the id of line 1: ids must be unique']


def test_stdin_stands_for_one_shard_or_the_input(tmp_path):
    shards = shard_files(tmp_path, [2, 2, 1])
    with open(shards[1], "rb") as f:
        result = CliRunner().invoke(merge.main, [shards[0], "-", shards[2]], input=f.read())
    assert result.exit_code == 0 and [r["id"] for r in read_jsonl(result.stdout_bytes)] == list(range(5))
    input = write_jsonl(tmp_path / "in.jsonl", [{"id": i} for i in range(5)])
    with open(input, "rb") as f:
        result = CliRunner().invoke(merge.main, ["--by-id", "-", *shards], input=f.read())
    assert result.exit_code == 0 and [r["id"] for r in read_jsonl(result.stdout_bytes)] == list(range(5))
    with open(shards[2], "rb") as f:  # a short shard on stdin is named as such
        result = CliRunner().invoke(merge.main, ["-", shards[0], shards[1]], input=f.read())
    assert result.exit_code == 1 and "shard 0 (<stdin>) has 1 records, expected 2" in result.output
    result = CliRunner().invoke(merge.main, ["--by-id", "-", "-", shards[1], shards[2]], input=b"")
    assert result.exit_code == 2 and "stdin ('-') can stand for one file only" in result.output


def test_records_without_ids_merge_as_they_are(tmp_path):
    # A user's own stage may write records without "id": the merge must not number a shard's lines.
    shards = [write_jsonl(tmp_path / f"s{i}.jsonl", [{"x": i}, {"x": i + 2}]) for i in range(2)]
    result = CliRunner().invoke(merge.main, shards)
    assert result.exit_code == 0 and read_jsonl(result.stdout_bytes) == [{"x": 0}, {"x": 1}, {"x": 2}, {"x": 3}]
