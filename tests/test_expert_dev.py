"""bench/expert_dev.py's split: the dev examples come out of the train split (never the test split),
disjoint from what the expert is fitted on, the same for the same seed."""
import json
import os
import sys

from conftest import ROOT

sys.path.insert(0, os.path.join(ROOT, "bench"))
import expert_dev  # noqa: E402


def test_dev_split_is_a_seeded_disjoint_part_of_train(tmp_path):
    train = tmp_path / "train.jsonl"
    train.write_text("".join(json.dumps({"id": i, "completion": str(i)}) + "\n" for i in range(30)) + "\n")
    fit, dev = expert_dev.split(str(train), str(tmp_path / "a"), 10, seed=0)
    ids = {name: [json.loads(line)["id"] for line in open(path)] for name, path in (("fit", fit), ("dev", dev))}
    assert len(ids["dev"]) == 10 and len(ids["fit"]) == 20
    assert sorted(ids["fit"] + ids["dev"]) == list(range(30))
    assert ids["fit"] == sorted(ids["fit"])  # the fit part keeps the train file's order
    again = expert_dev.split(str(train), str(tmp_path / "b"), 10, seed=0)[1]
    other = expert_dev.split(str(train), str(tmp_path / "c"), 10, seed=1)[1]
    assert open(again).read() == open(dev).read() != open(other).read()


def test_the_floor_is_the_fit_parts_most_common_answer_scored_on_dev(tmp_path):
    def records(name, answers):
        path = tmp_path / f"{name}.jsonl"
        path.write_text("".join(json.dumps({"prompt": f"q{i}", "completion": a}) + "\n" for i, a in enumerate(answers)))
        return str(path)

    fit = records("fit", ["11", "3", "11", "(B)", "3", "11"])
    assert expert_dev.majority_floor(fit, records("dev", ["11", "11.", "4", "3"])) == 0.5  # "11." normalizes to 11
    assert expert_dev.majority_floor(records("tie", ["3", "11", "11", "3"]), records("d", ["3", "11", "3"])) == 2 / 3
    assert expert_dev.majority_floor(fit, str(tmp_path / "missing.jsonl")) is None
