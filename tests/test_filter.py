"""titok-filter on hand-made scored records: exact kept sets for each scope, ties, k=1, keep=1.0."""
import orjson
import pytest
from click.testing import CliRunner

from conftest import read_jsonl, run_pipe, write_jsonl
from titok_tools.filter import main


def scored(id, excess):
    return {"id": id, "prompt": "p", "completion": "c" * len(excess), "note": id * 2,
            "titok": {"source": {"excess": excess, "mean_excess": sum(excess) / len(excess)}}}


# mean excess: a 0.25, b 2.0, c 0.5 (tie with e), d -1.0, e 0.5
RECORDS = [scored("a", [1.0, -1.0, 0.5, 0.5]), scored("b", [2.0, 2.0]), scored("c", [0.5, 0.5, 0.5]),
           scored("d", [-1.0]), scored("e", [3.0, -2.0])]


def run(records, *args, tmp_path):
    data = write_jsonl(tmp_path / "in.jsonl", records)
    result = CliRunner().invoke(main, [*args, data])
    assert result.exit_code == 0, result.output
    return read_jsonl(result.stdout_bytes), result.stderr


def masks(out):
    return {r["id"]: r["titok"]["source"]["mask"] for r in out}


def test_keep_top_samples_stable_in_input_order(tmp_path):
    out, err = run(RECORDS, "--keep", "3", "-k", "0.5", tmp_path=tmp_path)
    # b first, then the tie c/e keeps input order: c before e; output stays in input order.
    assert [r["id"] for r in out] == ["b", "c", "e"]
    assert [r["titok"]["filter"]["rank"] for r in out] == [1, 2, 3]
    assert out[0]["titok"]["filter"] == {"k": 0.5, "keep": 3, "scope": "sample", "rank": 1, "kept": True}
    assert out[1]["note"] == "cc" and out[1]["prompt"] == "p"  # fields it does not own pass through
    assert "kept 3 of 5 samples" in err


def test_scope_sample_ties_go_to_earlier_tokens(tmp_path):
    out, _ = run(RECORDS, "--keep", "1.0", "-k", "0.5", tmp_path=tmp_path)
    # floor(0.5*n), at least 1: a 2 of 4, b 1 of 2 (tie: first), c 1 of 3 (tie: first), d 1, e 1.
    assert masks(out) == {"a": [1, 0, 1, 0], "b": [1, 0], "c": [1, 0, 0], "d": [1], "e": [1, 0]}


def test_scope_batch_selects_over_groups_of_four_kept_records(tmp_path):
    out, _ = run(RECORDS, "--keep", "1.0", "-k", "0.5", "--scope", "batch", tmp_path=tmp_path)
    # Group 1 = a, b, c, d (10 tokens, keep 5): 2.0, 2.0, 1.0, then the three 0.5s of a, a, c
    # in order -> a's two 0.5s. Group 2 = e alone (keep 1).
    assert masks(out) == {"a": [1, 0, 1, 1], "b": [1, 1], "c": [0, 0, 0], "d": [0], "e": [1, 0]}


def test_scope_global_one_threshold(tmp_path):
    out, _ = run(RECORDS, "--keep", "4", "-k", "0.4", "--scope", "global", tmp_path=tmp_path)
    # kept: b, c, e, a (d is last). 11 tokens, keep 4: 3.0 (e), 2.0, 2.0 (b), 1.0 (a).
    assert masks(out) == {"a": [1, 0, 0, 0], "b": [1, 1], "c": [0, 0, 0], "e": [1, 0]}


def test_k_one_keep_all_is_every_token(tmp_path):
    out, _ = run(RECORDS, "-k", "1", "--keep", "1.0", tmp_path=tmp_path)
    assert [r["id"] for r in out] == ["a", "b", "c", "d", "e"]
    assert all(all(m) for m in masks(out).values())


def test_keep_fraction_and_integer(tmp_path):
    assert len(run(RECORDS, "--keep", "0.5", tmp_path=tmp_path)[0]) == 2  # floor(2.5)
    assert len(run(RECORDS, "--keep", "1", tmp_path=tmp_path)[0]) == 1  # a count, not 100%


def test_keep_larger_than_input_is_clamped_with_a_warning(tmp_path):
    out, err = run(RECORDS, "--keep", "50", tmp_path=tmp_path)
    assert len(out) == 5 and "more than the 5 input records" in err


def test_mark_only_writes_everything(tmp_path):
    out, _ = run(RECORDS, "--keep", "2", "--mark-only", tmp_path=tmp_path)
    assert [(r["id"], r["titok"]["filter"]["kept"]) for r in out] == [
        ("a", False), ("b", True), ("c", True), ("d", False), ("e", False)]
    assert "mask" not in out[0]["titok"]["source"] and "mask" in out[1]["titok"]["source"]


def test_reads_stdin_through_a_pipe(tmp_path):
    data = b"".join(orjson.dumps(r) + b"\n" for r in RECORDS)
    out, _, err = run_pipe(["titok-filter", "-k", "0.5", "--keep", "2", "-"], input=data)
    assert [r["id"] for r in read_jsonl(out)] == ["b", "c"] and "kept 2 of 5" in err


def test_empty_input(tmp_path):
    assert run([], tmp_path=tmp_path)[0] == []


@pytest.mark.parametrize("args, message", [
    (["-k", "0"], "0.0 is outside (0, 1]"),
    (["-k", "1.5"], "1.5 is outside (0, 1]"),
    (["--keep", "0"], "count 0 must be at least 1"),
    (["--keep", "1.5"], "fraction 1.5 is outside (0, 1]"),
    (["--keep", "half"], "neither a count nor a fraction"),
])
def test_bad_options(tmp_path, args, message):
    data = write_jsonl(tmp_path / "in.jsonl", RECORDS)
    result = CliRunner().invoke(main, [*args, data])
    assert result.exit_code == 2 and message in result.output


def test_unscored_records_say_run_titok_score_first(tmp_path):
    out = tmp_path / "out.jsonl"
    data = write_jsonl(tmp_path / "in.jsonl", RECORDS[:2] + [{"id": "x", "prompt": "p", "completion": "c"}])
    result = CliRunner().invoke(main, ["-o", str(out), data])
    assert result.exit_code == 1 and "in.jsonl:3: titok.source: missing: run titok-score first" in result.output
    assert not out.exists()


def test_rank_by_random_is_seeded(tmp_path):
    ids = {seed: [r["id"] for r in run(RECORDS, "--rank-by", "random", "--seed", str(seed), "--keep", "2",
                                       tmp_path=tmp_path)[0]] for seed in range(6)}
    again = [r["id"] for r in run(RECORDS, "--rank-by", "random", "--seed", "0", "--keep", "2", tmp_path=tmp_path)[0]]
    assert again == ids[0] and all(len(v) == 2 for v in ids.values())
    assert len({tuple(v) for v in ids.values()}) > 1  # the seed matters, not the excess
    out = run(RECORDS, "--rank-by", "random", "--seed", "3", "--keep", "1.0", "-k", "1", tmp_path=tmp_path)[0]
    assert sorted(r["titok"]["filter"]["rank"] for r in out) == [1, 2, 3, 4, 5]
    assert out[0]["titok"]["filter"]["rank_by"] == "random" and out[0]["titok"]["filter"]["seed"] == 3
