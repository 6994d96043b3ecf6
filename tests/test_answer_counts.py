"""bench/answer_counts.py counts answers as exact match compares them."""
import json
import os
import sys

from conftest import ROOT

sys.path.insert(0, os.path.join(ROOT, "bench"))
import answer_counts  # noqa: E402


def test_answers_count_after_normalization_first_spelling_shown(tmp_path, capsys):
    predictions = ["True.", "false", "true", " True", "12", "False", "(A)", "a"]
    assert answer_counts.answer_counts(predictions, 3) == [("True.", 3), ("false", 2), ("(A)", 2)]
    path = tmp_path / "eval.jsonl"
    path.write_text("".join(json.dumps({"id": i, "prediction": p}) + "\n" for i, p in enumerate(predictions)))
    answer_counts.main([str(path), "--top", "1"])
    assert capsys.readouterr().out.splitlines()[-1] == f'| {path} | 8 | "True." 3 |'


def test_a_file_without_predictions_is_a_one_line_error(tmp_path):
    import subprocess
    path = tmp_path / "test.jsonl"
    path.write_text('{"prompt": "p", "completion": "c"}\n')
    for target, message in ((path, f"answer_counts: {path}:1: prediction: missing or not a string"),
                            (tmp_path / "nope.jsonl", f"answer_counts: {tmp_path / 'nope.jsonl'}: cannot read")):
        run = subprocess.run([sys.executable, os.path.join(ROOT, "bench", "answer_counts.py"), str(target)],
                             capture_output=True, text=True)
        assert run.returncode == 1 and run.stderr.startswith(message) and len(run.stderr.splitlines()) == 1
