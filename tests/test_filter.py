"""titok-filter on hand-made scored records: exact kept sets for each scope, ties, k=1, keep=1.0."""
import math

import orjson
import pytest
from click.testing import CliRunner
from hypothesis import given, settings, strategies as st

from conftest import read_jsonl, run_pipe, write_jsonl
from titok_tools.filter import main
from titok_tools.select import select_stream, topk_mask, topk_masks_each


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


def test_mark_only_drops_the_mask_of_an_earlier_run(tmp_path):
    every = write_jsonl(tmp_path / "every.jsonl", run(RECORDS, "-k", "1", "--keep", "1.0", tmp_path=tmp_path)[0])
    result = CliRunner().invoke(main, ["-k", "0.5", "--keep", "1", "--mark-only", every])
    out = read_jsonl(result.stdout_bytes)
    assert [(r["id"], "mask" in r["titok"]["source"]) for r in out] == [
        ("a", False), ("b", True), ("c", False), ("d", False), ("e", False)]


def test_a_target_aligned_under_an_earlier_selection_is_removed(tmp_path):
    """Re-filtering aligned records: titok.target's mask came from the earlier k and keep, and
    titok-train prefers titok.target.mask, so it goes (titok-align must run again) and the
    summary says so; the other records and fields are untouched."""
    import copy
    aligned = copy.deepcopy(RECORDS)
    for record in aligned[:3]:
        record["titok"]["target"] = {"mask": [1], "score": [0.5]}
    out, stderr = run(aligned, "-k", "1", "--keep", "1.0", tmp_path=tmp_path)
    assert [sorted(r["titok"]) for r in out] == [["filter", "source"]] * 5
    assert [{k: v for k, v in r.items() if k != "titok"} for r in out] == [
        {k: v for k, v in r.items() if k != "titok"} for r in RECORDS]
    assert "removed titok.target from 3 records (aligned under an earlier selection: run titok-align again)" in stderr


@pytest.mark.parametrize("path", ["-", "/dev/stdin"])
def test_reads_stdin_through_a_pipe(tmp_path, path):
    # /dev/stdin (or a shell's <(...)) is a pipe too: read once, so it is spooled like '-'.
    data = b"".join(orjson.dumps(r) + b"\n" for r in RECORDS)
    out, _, err = run_pipe(["titok-filter", "-k", "0.5", "--keep", "2", path], input=data)
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


def test_a_repeated_id_names_both_lines(tmp_path):
    out = tmp_path / "out.jsonl"
    data = write_jsonl(tmp_path / "in.jsonl", RECORDS[:3] + [dict(RECORDS[3], id="b")])
    result = CliRunner().invoke(main, ["-o", str(out), data])
    assert result.exit_code == 1 and not out.exists()
    assert result.output.strip().splitlines() == [f'Error: {data}:4: id: "b" repeats the id of line 2: ids must be unique']


@pytest.mark.parametrize("titok", [[1, 2], "scored", {"source": "scored"}, {"source": [1.0]}])
def test_a_titok_field_that_is_not_an_object_is_a_one_line_error(tmp_path, titok):
    data = write_jsonl(tmp_path / "in.jsonl", RECORDS[:1] + [{"id": "x", "prompt": "p", "completion": "c", "titok": titok}])
    result = CliRunner().invoke(main, [data])
    assert result.exit_code == 1 and "in.jsonl:2: titok.source: missing: run titok-score first" in result.output


@pytest.mark.parametrize("excess, field, shown", [([1.0, "x"], "titok.source.excess[1]", '"x"'),
                                                  ([True], "titok.source.excess[0]", "true"),
                                                  ([0.5, None], "titok.source.excess[1]", "null")])
def test_excess_values_must_be_numbers(tmp_path, excess, field, shown):
    bad = dict(scored("x", [1.0]), titok={"source": {"excess": excess, "mean_excess": 1.0}})
    data = write_jsonl(tmp_path / "in.jsonl", RECORDS[:1] + [bad])
    result = CliRunner().invoke(main, [data])
    assert result.exit_code == 1 and f"in.jsonl:2: {field}: must be a number, not {shown}" in result.output


def test_rank_by_random_is_seeded(tmp_path):
    ids = {seed: [r["id"] for r in run(RECORDS, "--rank-by", "random", "--seed", str(seed), "--keep", "2",
                                       tmp_path=tmp_path)[0]] for seed in range(6)}
    again = [r["id"] for r in run(RECORDS, "--rank-by", "random", "--seed", "0", "--keep", "2", tmp_path=tmp_path)[0]]
    assert again == ids[0] and all(len(v) == 2 for v in ids.values())
    assert len({tuple(v) for v in ids.values()}) > 1  # the seed matters, not the excess
    out = run(RECORDS, "--rank-by", "random", "--seed", "3", "--keep", "1.0", "-k", "1", tmp_path=tmp_path)[0]
    assert sorted(r["titok"]["filter"]["rank"] for r in out) == [1, 2, 3, 4, 5]
    assert out[0]["titok"]["filter"]["rank_by"] == "random" and out[0]["titok"]["filter"]["seed"] == 3


def test_rank_by_confidence_keeps_what_the_expert_is_surest_of(tmp_path):
    # mean log p_expert: a -0.5, b -2.0, c -0.1, d -1.0, e -0.5 (a tie with a: input order);
    # by excess the order would be b, c, e, a, d
    logp = {"a": [-0.25, -0.75], "b": [-2.0], "c": [-0.1, -0.1, -0.1], "d": [-1.0], "e": [0.0, -1.0]}
    records = [dict(r, titok={"source": dict(r["titok"]["source"], logp_expert=logp[r["id"]])}) for r in RECORDS]
    out, _ = run(records, "--rank-by", "confidence", "--keep", "3", "-k", "1", tmp_path=tmp_path)
    assert [(r["id"], r["titok"]["filter"]["rank"]) for r in out] == [("a", 2), ("c", 1), ("e", 3)]
    assert out[0]["titok"]["filter"]["rank_by"] == "confidence" and "seed" not in out[0]["titok"]["filter"]
    assert masks(out) == {"a": [1, 1, 1, 1], "c": [1, 1, 1], "e": [1, 1]}  # the token rule is unchanged
    records[3]["titok"]["source"].pop("logp_expert")
    result = CliRunner().invoke(main, ["--rank-by", "confidence", write_jsonl(tmp_path / "in.jsonl", records)])
    assert result.exit_code == 1 and "in.jsonl:4: titok.source.logp_expert: must be a non-empty list" in result.output



def test_rank_by_answer_excess_leaves_the_closing_token_out(tmp_path):
    """Short answers: the closing token (empty span at the end) decides the mean excess, so
    --rank-by answer-excess ranks by the answer's tokens alone (docs/design.md, Selection)."""
    def closed(id, answer, closing):
        record = scored(id, [*answer, closing])
        record["titok"]["source"]["offsets"] = [[i, i + 1] for i in range(len(answer))] + [[len(answer)] * 2]
        record["completion"] = "c" * len(answer)
        return record
    # mean excess (closing included): x 4.0, y 1.0, z 3.0, w 9.0; answer tokens only: x 1.0, y 2.0,
    # z 1.0 (a tie with x: input order), w none (only the closing token: ranked last)
    records = [closed("x", [1.0], 7.0), closed("y", [2.0, 2.0], -1.0), closed("z", [0.0, 2.0], 7.0),
               closed("w", [], 9.0)]
    by_mean = {r["id"]: r["titok"]["filter"]["rank"] for r in run(records, "--keep", "1.0", tmp_path=tmp_path)[0]}
    assert by_mean == {"w": 1, "x": 2, "z": 3, "y": 4}
    out, _ = run(records, "--rank-by", "answer-excess", "--keep", "2", "-k", "0.5", tmp_path=tmp_path)
    assert [(r["id"], r["titok"]["filter"]["rank"]) for r in out] == [("x", 2), ("y", 1)]
    assert out[0]["titok"]["filter"]["rank_by"] == "answer-excess"
    assert masks(out) == {"x": [1, 0], "y": [1, 0, 0]}  # the token rule is unchanged: closing outside k
    every = run(records, "--rank-by", "answer-excess", "--keep", "1.0", tmp_path=tmp_path)[0]
    assert {r["id"]: r["titok"]["filter"]["rank"] for r in every} == {"y": 1, "x": 2, "z": 3, "w": 4}

# -k auto. Kept a..e (--keep 1.0), scope sample: positive excess a 2.0, b 4.0, c 1.5, d 0, e 3.0
# = 10.5. Every sample's best token is always kept: 1 + 2 + 0.5 + 0 + 3 = 6.5 (61.9%). Then the
# breakpoints j/n add: a's 2nd 0.5 at k = 2/4, c's 2nd 0.5 at 2/3, a's 3rd 0.5 at 3/4, and at
# k = 1 b's 2nd 2.0 + c's 3rd 0.5: 7.0 (66.7%), 7.5 (71.4%), 8.0 (76.2%), 10.5 (100%).
@pytest.mark.parametrize("mass, k, held", [
    ("0.6", 1 / 4, 6.5), ("0.7", 2 / 3, 7.5), ("0.75", 3 / 4, 8.0), ("0.8", 1.0, 10.5), ("1", 1.0, 10.5)])
def test_k_auto_sample_scope_by_hand(tmp_path, mass, k, held):
    out, err = run(RECORDS, "-k", "auto", "--mass", mass, "--keep", "1.0", tmp_path=tmp_path)
    assert out[0]["titok"]["filter"]["k"] == k
    assert out[0]["titok"]["filter"]["k_auto"] == {"mass": float(mass), "share": pytest.approx(held / 10.5)}
    assert f"chose k = {k:.6g}" in err
    # the recorded k reproduces the masks, and they hold the share said
    kept_mass = sum(max(v, 0) for r in out for v, m in zip(r["titok"]["source"]["excess"], r["titok"]["source"]["mask"]) if m)
    assert kept_mass == pytest.approx(held)
    fixed, _ = run(RECORDS, "-k", str(k), "--keep", "1.0", tmp_path=tmp_path)
    assert masks(fixed) == masks(out)


def test_k_auto_takes_a_smaller_k_that_holds_the_mass_exactly(tmp_path):
    # positive excess 0.1 + 0.1 + 0.1 + 0.7 = 1.0; the best token of each, 0.1 + 0.7, is 80% of it
    # in exact arithmetic (0.7999999999999999 in floats): k = 1/2 holds --mass 0.8, not only k = 1.
    records = [scored("x", [0.1, 0.1]), scored("y", [0.1, 0.7])]
    out, _ = run(records, "-k", "auto", "--mass", "0.8", "--keep", "1.0", tmp_path=tmp_path)
    assert out[0]["titok"]["filter"]["k"] == 0.5 and masks(out) == {"x": [1, 0], "y": [0, 1]}


def test_k_auto_counts_only_kept_samples_and_global_scope(tmp_path):
    # --keep 4 drops d; global: 11 tokens 3, 2, 2, 1, 0.5 x5, -1, -2 (positive 10.5). 90% = 9.45
    # needs 3+2+2+1+0.5+0.5+0.5 = 9.5: the top 7 of 11 -> k = 7/11.
    out, err = run(RECORDS, "-k", "auto", "--keep", "4", "--scope", "global", tmp_path=tmp_path)
    assert {r["titok"]["filter"]["k"] for r in out} == {7 / 11}
    assert sum(sum(r["titok"]["source"]["mask"]) for r in out) == 7
    # batch: the 4 kept records make one group of 4, the same 11 tokens
    out, _ = run(RECORDS, "-k", "auto", "--keep", "4", "--scope", "batch", tmp_path=tmp_path)
    assert out[0]["titok"]["filter"]["k"] == 7 / 11


def test_k_auto_without_positive_excess_takes_one_token_per_sample(tmp_path):
    records = [scored("x", [-1.0, -2.0]), scored("y", [0.0, -3.0, -1.0])]
    out, err = run(records, "-k", "auto", "--keep", "1.0", tmp_path=tmp_path)
    assert out[0]["titok"]["filter"]["k"] == 1 / 3 and out[0]["titok"]["filter"]["k_auto"]["share"] is None
    assert masks(out) == {"x": [1, 0], "y": [1, 0, 0]}
    assert "no kept token has a positive excess" in err


def test_k_auto_on_empty_input(tmp_path):
    assert run([], "-k", "auto", tmp_path=tmp_path)[0] == []


@pytest.mark.parametrize("args, message", [
    (["-k", "auto", "--mass", "0"], "0<x<=1"),
    (["-k", "auto", "--mass", "1.01"], "0<x<=1"),
    (["-k", "half"], "'half' is not a number in (0, 1] nor auto"),
])
def test_k_auto_bad_options(tmp_path, args, message):
    data = write_jsonl(tmp_path / "in.jsonl", RECORDS)
    result = CliRunner().invoke(main, [*args, data])
    assert result.exit_code == 2 and message in result.output


def test_align_rejects_k_auto_and_help_shows_it(tmp_path):
    from titok_tools.align import main as align_main
    data = write_jsonl(tmp_path / "in.jsonl", RECORDS)
    result = CliRunner().invoke(align_main, ["--target-model", "unused", "-k", "auto", data])
    assert result.exit_code == 2 and "leave -k out here to use that k" in result.output
    assert "FLOAT|auto" in CliRunner().invoke(main, ["--help"]).output
    assert "--mass" in CliRunner().invoke(main, ["--help"]).output


# --- the selection rule itself, against a plain-Python reference ----------------------------------

def reference_mask(scores, k):
    """docs/design.md, Selection, by hand: max(1, floor(k*n)) of the n scored tokens, highest first, ties
    to the earlier token; unscored (None) tokens never."""
    ranked = sorted((-s, i) for i, s in enumerate(scores) if s is not None)
    n = max(1, math.floor(k * len(ranked) + 1e-9)) if ranked else 0
    keep = {i for _, i in ranked[:n]}
    return [int(i in keep) for i in range(len(scores))]


@settings(max_examples=200, deadline=None)
@given(score_lists=st.lists(st.lists(st.one_of(st.none(), st.integers(-3, 3).map(float),
                                               st.floats(-1e6, 1e6, allow_nan=False)), max_size=30), max_size=12),
       k=st.sampled_from([0.01, 0.1, 0.3, 1 / 3, 0.5, 0.7, 0.999, 1.0]))
def test_per_record_selection_in_one_pass_matches_the_rule(score_lists, k):
    """topk_masks_each (titok-filter's and titok-align's sample scope, many records per numpy
    pass) selects exactly what the rule selects record by record: ties, None, empty records."""
    expected = [reference_mask(scores, k) for scores in score_lists]
    assert topk_masks_each(score_lists, k) == expected
    assert [topk_mask(scores, k) for scores in score_lists] == expected
    # select_stream's sample scope goes SAMPLE_CHUNK records at a time: chunk borders change nothing
    stream = list(select_stream(iter(score_lists * 30), lambda s: s, k, "sample"))
    assert [mask for _, mask in stream] == expected * 30


@settings(max_examples=100, deadline=None)
@given(score_lists=st.lists(st.lists(st.floats(-5, 5, allow_nan=False), min_size=1, max_size=6), max_size=14),
       outside=st.lists(st.integers(0, 14), max_size=6), scope=st.sampled_from(["sample", "batch", "global"]))
def test_items_outside_the_selection_change_nothing(score_lists, outside, scope):
    """Items whose scores_of is None (titok-align's records titok-filter did not keep) come out in
    their place with mask None, and the others get the masks they get without them: they take
    no place in a batch group, and no share of a global threshold."""
    alone = [mask for _, mask in select_stream(score_lists, lambda s: s, 0.5, scope, rereader=lambda: iter(score_lists))]
    items = [("in", i, s) for i, s in enumerate(score_lists)]
    for n, at in enumerate(sorted(outside, reverse=True)):
        items.insert(min(at, len(items)), ("out", n, None))
    got = list(select_stream(items, lambda item: item[2], 0.5, scope, rereader=lambda: iter(items)))
    assert [item for item, _ in got] == items
    assert [mask for item, mask in got if item[0] == "out"] == [None] * len(outside)
    assert [mask for item, mask in got if item[0] == "in"] == alone


def test_batch_scope_hands_out_items_outside_at_once_when_no_group_waits():
    """A run of records titok-filter did not keep between two batch groups is not held in memory
    until the next group fills: each comes out before the next item is read."""
    read = []

    def items():
        for item in [[1.0]] * 4 + [None] * 3 + [[2.0]] + [None] * 2:
            read.append(item)
            yield item

    stream = select_stream(items(), lambda s: s, 0.5, "batch")
    assert [next(stream) for _ in range(7)] == [([1.0], [1])] * 2 + [([1.0], [0])] * 2 + [(None, None)] * 3
    assert len(read) == 7
    assert list(stream) == [([2.0], [1]), (None, None), (None, None)]


@pytest.mark.parametrize("mean, shown", [(True, "true"), ("1.0", '"1.0"'), (None, "null")])
def test_mean_excess_must_be_a_number(tmp_path, mean, shown):
    # true was ranked as 1.0: a bool is not a score
    bad = dict(scored("x", [1.0]), titok={"source": {"excess": [1.0], "mean_excess": mean}})
    data = write_jsonl(tmp_path / "in.jsonl", RECORDS[:1] + [bad])
    result = CliRunner().invoke(main, [data])
    assert result.exit_code == 1 and f"in.jsonl:2: titok.source.mean_excess: must be a number, not {shown}" in result.output


def test_defaults_are_the_papers_k_and_a_2x_pool(tmp_path):
    # docs/design.md, Selection: k = 0.7, M = 0.5 of the input (the 2x pool), per sample
    records = [scored(f"r{i}", [float(j % 5) - i for j in range(10)]) for i in range(5)]  # 0.5 of 5: 2
    out, _ = run(records, tmp_path=tmp_path)
    assert [r["id"] for r in out] == ["r0", "r1"]
    assert all(r["titok"]["filter"] == {"k": 0.7, "keep": 2, "scope": "sample", "rank": rank, "kept": True}
               for rank, r in enumerate(out, 1))
    assert [sum(r["titok"]["source"]["mask"]) for r in out] == [7, 7]


@pytest.mark.parametrize("keep, kept", [("0.5", 3), ("0.3", 2), ("0.1", 1), ("10", 7), ("7", 7)])
def test_keep_fraction_rounds_down_and_a_count_caps_at_the_input(tmp_path, keep, kept):
    # M = max(1, floor(f * n)), the rule of the tokens: 0.5 of 7 is 3 (not round's or ceil's 4);
    # a count beyond the input keeps all and records how many it kept
    records = [scored(f"r{i}", [float(-i)]) for i in range(7)]
    out, _ = run(records, "--keep", keep, tmp_path=tmp_path)
    assert [r["id"] for r in out] == [f"r{i}" for i in range(kept)]
    assert {r["titok"]["filter"]["keep"] for r in out} == {kept}


def test_the_closing_token_is_outside_the_k_budget(tmp_path):
    """docs/design.md, Selection: the closing token (the empty span at the completion's end) does
    not compete for the top-k share; titok-train trains it anyway (--train-closing). Here it has
    the highest excess: with it in the budget, -k 0.5 of 3 tokens would keep it alone."""
    closing_best = {"id": "a", "prompt": "p", "completion": "ab",
                    "titok": {"source": {"excess": [0.5, 0.1, 3.0], "mean_excess": 1.2,
                                         "offsets": [[0, 1], [1, 2], [2, 2]]}}}
    truncated = {"id": "b", "prompt": "p", "completion": "abc",  # no closing token: every token competes
                 "titok": {"source": {"excess": [0.5, 0.1, 3.0], "mean_excess": 1.2,
                                      "offsets": [[0, 1], [1, 2], [2, 3]]}}}
    out, _ = run([closing_best, truncated], "-k", "0.5", "--keep", "2", tmp_path=tmp_path)
    # a: 2 tokens compete, floor(0.5 * 2) = 1: the better answer token; b: floor(0.5 * 3) = 1: the 3.0
    assert [r["titok"]["source"]["mask"] for r in out] == [[1, 0, 0], [0, 0, 1]]
    out, _ = run([closing_best], "-k", "auto", "--mass", "0.5", "--keep", "1", tmp_path=tmp_path)
    assert out[0]["titok"]["source"]["mask"] == [1, 0, 0] and out[0]["titok"]["filter"]["k"] == 0.5
