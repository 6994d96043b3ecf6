"""The BIG-bench converter on a fake sdist: the same member layout as bigbench-1.0.0.tar.gz,
task.json files written here (free text, multiple choice, a task made of subtasks)."""
import io
import json
import os
import tarfile

import pytest
from click.testing import CliRunner

from conftest import read_jsonl
from titok_tools import bigbench
from titok_tools.answers import exact_match

COUNT = {  # free text: target as a list and as a string; one example without an answer
    "name": "count_things", "description": "Count the objects",
    "examples": [
        {"input": "I have a pen and a cup. How many objects do I have?", "target": ["two", "2"]},
        {"input": "I have a dog. How many animals do I have?", "target": "one"},
        {"input": "I have nothing.", "target": []},
    ] + [{"input": f"I have {i} apples. How many apples do I have?", "target": str(i)} for i in range(3, 20)],
}
PICK = {  # multiple choice with BIG-bench's prefixes; the correct option is listed first, as in date_understanding
    "name": "pick_color", "description": "Pick the color",
    "task_prefix": "Answer the question.\n\n", "example_input_prefix": "\nQ: ", "example_output_prefix": "\nA: ",
    "examples": [{"input": f"What color is thing {i}?",
                  "target_scores": {"red": 1, "green": 0, "blue": 0, "black": 0, "white": 0}} for i in range(10)]
               + [{"input": "Which are warm?", "target_scores": {"red": 1, "blue": 0, "orange": 1}}],
}
DEDUCE = {"name": "deduce", "description": "Deduce the order"}  # no examples: they are in its subtasks
DEDUCE_TWO = {"name": "two", "description": "Two objects", "task_prefix": "Two objects.",
              "examples": [{"input": "A is left of B. Which is leftmost?", "target_scores": {"A": 1, "B": 0}}]}
DEDUCE_THREE = {"name": "three", "description": "Three objects",
                "examples": [{"input": "C is left of A.", "target": "C"}, {"input": "B is left of C.", "target": "B"}]}


def write_sdist(path):
    members = {"count_things/task.json": COUNT, "pick_color/task.json": PICK, "deduce/task.json": DEDUCE,
               "deduce/two/task.json": DEDUCE_TWO, "deduce/three/task.json": DEDUCE_THREE,
               "object_counting/task.json": COUNT, "object_counting/generate_task.py": "print()",
               "programmatic/task.py": "class Task: pass", "programmatic/README.md": "# p"}
    with tarfile.open(path, "w:gz") as tar:
        for rel, content in members.items():
            data = (content if isinstance(content, str) else json.dumps(content)).encode()
            info = tarfile.TarInfo(f"bigbench-1.0.0/bigbench/benchmark_tasks/{rel}")
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
        info = tarfile.TarInfo("bigbench-1.0.0/setup.py")
        tar.addfile(info, io.BytesIO(b""))
    return str(path)


@pytest.fixture(scope="module")
def sdist(tmp_path_factory):
    return write_sdist(tmp_path_factory.mktemp("sdist") / "bigbench-1.0.0.tar.gz")


def run(args, **kwargs):
    result = CliRunner().invoke(bigbench.main, args, **kwargs)
    return result


def records(out, task):
    return read_jsonl(os.path.join(out, task, "train.jsonl")), read_jsonl(os.path.join(out, task, "test.jsonl"))


def test_free_text_records(sdist, tmp_path):
    out = str(tmp_path / "bb")
    result = run(["--tasks", "count_things", "--out", out, "--sdist", sdist, "--test-size", "0"])
    assert result.exit_code == 0, result.output
    train, test = records(out, "count_things")
    assert test == []
    assert train[0] == {"id": "count_things:0", "task": "count_things",
                        "prompt": "I have a pen and a cup. How many objects do I have?",
                        "completion": "two", "references": ["two", "2"], "task_description": "Count the objects"}
    assert train[1]["completion"] == "one" and train[1]["references"] == ["one"]
    # The example without an answer is skipped, the others keep their file order and index.
    assert [r["id"] for r in train] == ["count_things:0", "count_things:1"] + [f"count_things:{i}" for i in range(3, 20)]


def test_multiple_choice_records(sdist, tmp_path):
    out = str(tmp_path / "bb")
    assert run(["--tasks", "pick_color", "--out", out, "--sdist", sdist, "--test-fraction", "0"]).exit_code == 0
    train, test = records(out, "pick_color")
    assert test == [] and len(train) == 11
    for r in train:
        assert sorted(r["options"]) == sorted(PICK["examples"][int(r["id"].split(":")[1])]["target_scores"])
        listed = "\n".join(f"({chr(65 + i)}) {text}" for i, text in enumerate(r["options"]))
        question = PICK["examples"][int(r["id"].split(":")[1])]["input"]
        assert r["prompt"] == f"Answer the question.\n\nQ: {question}\n\nOptions:\n{listed}\nA:"
        assert r["task_description"] == "Pick the color"
    assert {r["completion"] for r in train[:10]} == {"red"}
    # The correct option is first in every task.json example; the prompts must not give that away.
    assert len({r["options"].index("red") for r in train[:10]}) > 1
    # Ties for the best score: every top option is a reference, the first in the file is the completion.
    assert train[10]["completion"] == "red" and train[10]["references"] == ["red", "orange"]


def test_option_order_follows_the_seed(sdist, tmp_path):
    orders = {}
    for seed in (0, 0, 1):
        out = str(tmp_path / f"bb{seed}")
        assert run(["--tasks", "pick_color", "--out", out, "--sdist", sdist, "--test-size", "0",
                    "--seed", str(seed)]).exit_code == 0
        orders.setdefault(seed, []).append([r["options"] for r in records(out, "pick_color")[0]])
    assert orders[0][0] == orders[0][1]
    assert orders[0][0] != orders[1][0]


def test_subtasks_merged_or_one_by_name(sdist, tmp_path):
    out = str(tmp_path / "bb")
    assert run(["--tasks", "deduce,deduce/two", "--out", out, "--sdist", sdist, "--test-size", "0"]).exit_code == 0
    merged, _ = records(out, "deduce")
    # Subtasks in name order, each record names its subtask and carries the subtask's description.
    assert [(r["id"], r["task"], r["task_description"]) for r in merged] == [
        ("deduce/three:0", "deduce/three", "Three objects"), ("deduce/three:1", "deduce/three", "Three objects"),
        ("deduce/two:0", "deduce/two", "Two objects")]
    # Options that are letters themselves are listed unlabelled (see test_letter_options_...).
    assert merged[2]["prompt"] in ("Two objects.\n\nA is left of B. Which is leftmost?\n\nOptions:\n- A\n- B",
                                   "Two objects.\n\nA is left of B. Which is leftmost?\n\nOptions:\n- B\n- A")
    assert merged[2]["completion"] == "A"
    one, _ = records(out, "deduce/two")
    assert one == merged[2:]


def test_letter_options_are_listed_without_labels():
    # hyperbaton's inputs name their sentences a and b, and its options are "a"/"b" (snarks: "(a)"/"(b)").
    # Labelled, a shuffled list read "(A) b / (B) a": exact match then credited the answer "(A)"
    # (the label of the wrong option) for the completion "a", and refused "(B)".
    task = {"examples": [{"input": 'Which order is right? a "big red ball" b "red big ball"',
                          "target_scores": {"a": 1, "b": 0}}]}
    for seed in range(8):  # both orders come up
        record = bigbench.example_record(task, task["examples"][0], "hyperbaton:0", "hyperbaton", seed)
        options = record["prompt"].split("Options:\n")[1].splitlines()
        assert sorted(options) == ["- a", "- b"] and record["completion"] == "a"
        assert exact_match("a", record["completion"]) and not exact_match("b", record["completion"])
    snark = {"examples": [{"input": "Which is sarcastic? (a) x (b) y", "target_scores": {"(a)": 0, "(b)": 1}}]}
    record = bigbench.example_record(snark, snark["examples"][0], "snarks:0", "snarks", 0)
    assert sorted(record["prompt"].split("Options:\n")[1].splitlines()) == ["- (a)", "- (b)"]
    # Only a letter the labels use collides: misconceptions' T/F and a pronoun "I" among two
    # options keep their labels (A, B); "C" among three does not.
    assert bigbench.option_lines(["Yes", "No"]) == ["(A) Yes", "(B) No"]
    assert bigbench.option_lines(["T", "F"]) == ["(A) T", "(B) F"]
    assert bigbench.option_lines(["I", "you"]) == ["(A) I", "(B) you"]
    assert bigbench.option_lines(["x", "y", "C"]) == ["- x", "- y", "- C"]
    assert bigbench.option_lines(["x", "C"]) == ["(A) x", "(B) C"]


def test_split_is_seeded_and_sized(sdist, tmp_path):
    def split(*args):
        out = str(tmp_path / "_".join(args))
        assert run(["--tasks", "count_things", "--out", out, "--sdist", sdist, *args]).exit_code == 0
        return [[r["id"] for r in part] for part in records(out, "count_things")]

    train, test = split("--seed", "3")
    assert (len(train), len(test)) == (15, 4)  # 19 usable examples, 20% test
    assert set(train).isdisjoint(test) and len(set(train + test)) == 19
    # Both parts keep the file order.
    assert train == sorted(train, key=lambda i: int(i.split(":")[1])) and test == sorted(test, key=lambda i: int(i.split(":")[1]))
    assert split("--seed", "3") == [train, test]
    assert split("--seed", "4") != [train, test]
    assert [len(p) for p in split("--test-size", "7")] == [12, 7]
    assert [len(p) for p in split("--test-fraction", "0.5")] == [9, 10]  # round(9.5) = 10 (to even)
    # --train-size: a seeded subset of the train part; the test part does not change.
    small_train, same_test = split("--seed", "3", "--train-size", "5")
    assert same_test == test and len(small_train) == 5 and set(small_train) <= set(train)
    assert small_train == sorted(small_train, key=lambda i: int(i.split(":")[1]))
    assert split("--seed", "3", "--train-size", "50")[0] == train


def test_unknown_and_programmatic_tasks(sdist, tmp_path):
    out = tmp_path / "bb"
    result = run(["--tasks", "count_things,object_count", "--out", str(out), "--sdist", sdist])
    assert result.exit_code == 1
    assert "object_count is not a BIG-bench JSON task; close names: object_counting" in result.output
    assert not out.exists()  # every name is checked before anything is written
    result = run(["--tasks", "programmatic", "--out", str(out), "--sdist", sdist])
    assert result.exit_code == 1 and "programmatic BIG-bench task (task.py)" in result.output
    result = run(["--tasks", "count_things", "--out", str(out), "--sdist", sdist, "--test-size", "50"])
    assert result.exit_code == 1 and "more than the 19 examples" in result.output
    result = run(["--tasks", "count_things,deduce", "--out", str(out), "--sdist", sdist, "--test-size", "5"])
    assert result.exit_code == 1 and "more than the 3 examples" in result.output
    assert not out.exists()  # count_things could be split, but nothing is written when one task cannot
    assert run(["--tasks", " , ", "--sdist", sdist]).exit_code == 2


def test_sdist_is_downloaded_once_into_the_cache(sdist, tmp_path, monkeypatch):
    calls = []

    def fake_pip(argv, **kwargs):  # stands in for `pip download`: puts the file where it was asked to
        calls.append(argv)
        directory = argv[argv.index("-d") + 1]
        with open(sdist, "rb") as src, open(os.path.join(directory, bigbench.SDIST_FILE), "wb") as dst:
            dst.write(src.read())
        return type("Done", (), {"returncode": 0})()

    monkeypatch.setattr(bigbench.subprocess, "run", fake_pip)
    cache, out = tmp_path / "cache", str(tmp_path / "bb")
    for _ in range(2):
        result = run(["--tasks", "count_things", "--out", out, "--cache", str(cache)])
        assert result.exit_code == 0, result.output
    assert len(calls) == 1 and calls[0][1:6] == ["-m", "pip", "download", "--no-deps", "--no-binary"]
    assert calls[0][-1] == "bigbench==1.0.0"
    assert os.listdir(cache) == [bigbench.SDIST_FILE]  # no temp dir left behind
    # The default cache is $TITOK_CACHE.
    monkeypatch.setenv("TITOK_CACHE", str(cache))
    assert run(["--tasks", "pick_color", "--out", out]).exit_code == 0 and len(calls) == 1

    monkeypatch.setattr(bigbench.subprocess, "run", lambda argv, **kw: type("Done", (), {"returncode": 1})())
    result = run(["--tasks", "count_things", "--out", out, "--cache", str(tmp_path / "empty")])
    assert result.exit_code == 1 and "pip download bigbench==1.0.0 failed" in result.output
    assert os.listdir(tmp_path / "empty") == []
