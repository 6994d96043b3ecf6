"""bench/bbh_records.py: BBH task files as train/test records, with "options" where the answer is
one of a closed set, so `titok-eval --choices` has something to score on BBH."""
import json
import os
import sys

from conftest import ROOT

sys.path.insert(0, os.path.join(ROOT, "bench"))
import bbh_records  # noqa: E402


def convert(tmp_path, task, examples):
    path = tmp_path / f"{task}.jsonl"
    path.write_text("".join(json.dumps(e) + "\n" for e in examples))
    bbh_records.main([str(path), "--out", str(tmp_path / "out"), "--test-size", "1", "--seed", "0"])
    return sorted((json.loads(line) for name in ("train", "test")
                   for line in open(tmp_path / "out" / task / f"{name}.jsonl")), key=lambda r: r["id"])


def test_a_multiple_choice_input_offers_the_letters_of_its_options_block(tmp_path):
    question = ("On the desk, I see a red pen. What color is the pen?\nOptions:\n(A) red\n(B) blue\n(C) green\n"
                "(D) a (sic) colour")
    records = convert(tmp_path, "colors", [{"input": question, "target": "(A)"},
                                           {"input": "Options:\nno block here", "target": "(A)"},
                                           {"input": "Which?\nOptions:\n(A) x\n(B) y", "target": "(C)"}])
    assert records[0]["options"] == ["(A)", "(B)", "(C)", "(D)"]
    assert records[0]["completion"] == "(A)" and records[0]["references"] == ["(A)"]
    assert "options" not in records[1]  # "Options:" opens no block: no newline before it
    assert "options" not in records[2]  # its target is not one of its options: nothing to choose right
    unlabelled = convert(tmp_path, "navigate", [{"input": f"Take {i} steps.\nOptions:\n- Yes\n- No", "target": t}
                                                for i, t in enumerate(["No", "Yes", "No"])])
    assert [r["options"] for r in unlabelled] == [["Yes", "No"]] * 3  # the block's own order


def test_a_two_answer_task_offers_both_answers_and_an_open_task_none(tmp_path):
    binary = convert(tmp_path, "sports", [{"input": f"Is claim {i} plausible?", "target": t}
                                          for i, t in enumerate(["yes", "no", "yes"])])
    assert [r["options"] for r in binary] == [["no", "yes"]] * 3
    counting = convert(tmp_path, "counting", [{"input": f"How many? {i}", "target": str(i)} for i in range(3)])
    assert not any("options" in r for r in counting)
    single = convert(tmp_path, "single", [{"input": f"q{i}", "target": "True"} for i in range(3)])
    assert not any("options" in r for r in single)
