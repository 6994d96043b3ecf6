"""bench/shape_check.py: the shape read off some seeds, applied to the others."""
import json
import os
import sys

from conftest import ROOT

sys.path.insert(0, os.path.join(ROOT, "bench"))
import shape_check  # noqa: E402

# Their word pairs, start and end counted, by hand: 17 ("<s> true", "true and", "and false",
# "false is", "is </s>", "<s> not", "not true", "true is", "true or", "or false", "not false",
# "<s> false", "false and", "and true", "not not", "false or", "or true"); "not not" is in one only.
EXPRESSIONS = ["True and False is", "not True is", "True or False is", "not False is", "False and True is",
               "not not True is", "False or True is", "True and True is", "not True or False is"]
HELD = ["True or True is", "True nand False is", "True and False", "is True"]


def test_held_out_inputs_pass_only_inside_the_fit_pairs(tmp_path, capsys):
    path = tmp_path / "train.jsonl"
    path.write_text("".join(json.dumps({"prompt": t, "completion": "x"}) + "\n" for t in EXPRESSIONS * 2 + HELD))
    shape_check.main([str(path), "--fit", "18"])
    # twice over, every pair is in two texts: closed. Only "True or True is" keeps to the 17 pairs
    # ("nand" is no word of theirs, "False </s>" and "<s> is" no pairs).
    assert capsys.readouterr().out.splitlines()[-1] == \
        f"| {path} | no common wording, only the seeds' 17 word pairs | 1 of 4 |"


def test_a_pair_in_one_fit_text_leaves_only_the_words_closed():
    shape, passed, held = shape_check.held_out_pass(EXPRESSIONS + ["is not True"], 9)
    assert shape.closed_n == 1 and (passed, held) == (1, 1)  # its pairs are new, its words are not
