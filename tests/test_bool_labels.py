"""bench/bool_labels.py checks a pool's labels against the value of each boolean expression:
BBH's own answers are all right by it, and malformed queries are set aside, never evaluated."""
import json
import os
import sys

from conftest import ROOT

sys.path.insert(0, os.path.join(ROOT, "bench"))
import bool_labels  # noqa: E402

# Five of BIG-Bench Hard's boolean_expressions examples with their targets (suzgunmirac/BIG-Bench-Hard).
BBH = [("not ( True ) and ( True ) is", "False"), ("True and not not ( not False ) is", "True"),
       ("not True or False or ( False ) is", "False"), ("not not not not not not not False is", "True"),
       ("( ( not ( True ) ) ) is", "False")]


def test_bbh_answers_are_the_expressions_values():
    assert [bool_labels.value(q) for q, _ in BBH] == [t == "True" for _, t in BBH]
    records = [{"prompt": q, "completion": t} for q, t in BBH]
    assert bool_labels.label_accuracy(records) == (5, 5, 5)
    flipped = [{"prompt": q, "completion": "True" if t == "False" else "False"} for q, t in BBH[:2]]
    assert bool_labels.label_accuracy(records + flipped) == (7, 7, 5)


def test_malformed_queries_are_set_aside_unevaluated(tmp_path, capsys):
    malformed = ["True or True, False is", "False is False is", "(not None) and True is", "__import__('os') is",
                 "True and", "( True is", "True ( False ) is", " is", "not ( True ) and ( True )"]
    assert [bool_labels.value(q) for q in malformed] == [None] * len(malformed)
    path = tmp_path / "pool.jsonl"
    path.write_text("".join(json.dumps({"prompt": q, "completion": "True"}) + "\n"
                            for q in malformed + ["True or False is", "not True is"]))
    bool_labels.main([str(path)])
    assert capsys.readouterr().out.splitlines()[-1] == f"| {path} | {len(malformed) + 2} | 2 | 1 (50.0%) |"


def test_seeds_add_the_queries_with_their_shape(tmp_path, capsys):
    """--seeds: titok-gen's shape check, read off BBH's expressions (a closed set of word pairs),
    passes the well-formed queries and the malformed ones made of the seeds' pairs only."""
    seeds = tmp_path / "train.jsonl"
    seeds.write_text("".join(json.dumps({"prompt": q, "completion": t}) + "\n" for q, t in BBH * 2))
    pool = tmp_path / "pool.jsonl"
    queries = ["not True is", "True or True, False is", "False is False is", "not ( True ) is", "( ( not False ) is"]
    pool.write_text("".join(json.dumps({"prompt": q, "completion": "False"}) + "\n" for q in queries))
    bool_labels.main(["--seeds", str(seeds), str(pool)])
    out = capsys.readouterr().out.splitlines()
    # 25 pairs, counted by hand: 8 in the first expression, then 7, 6, 1 ("False is") and 3 new ones
    assert out[0] == "seeds' shape: no common wording, only the seeds' 25 word pairs"
    # on shape: "not ( True ) is" and "( ( not False ) is" (pairs all seen, brackets unbalanced);
    # "not True is" is well-formed, but no seed has "True is"
    assert out[-1] == f"| {pool} | 5 | 2 (40%) | 1 | 2 | 2 (100.0%) |"


def test_auc_of_each_sample_score_over_well_formed_queries(tmp_path, capsys):
    def scored(query, label, excess, logp_expert):  # one answer token, then the closing token
        return {"prompt": query, "completion": label,
                "titok": {"source": {"excess": excess, "offsets": [[0, len(label)], [len(label)] * 2],
                                     "mean_excess": sum(excess) / 2, "logp_expert": logp_expert}}}
    records = [scored("not True is", "False", [0.5, 1.5], [-0.1, -0.1]),       # right
               scored("True or False is", "True", [3.0, 3.0], [-0.3, -0.1]),   # right
               scored("True and False is", "True", [0.0, 4.0], [-1.0, -1.0]),  # wrong
               scored("True is and", "True", [9.0, 9.0], [0.0, 0.0])]          # malformed: not counted
    # mean excess: 3 > 2 but 1 < 2, half the pairs; the answer token alone: 0.5 and 3.0 both
    # above 0.0; confidence: -0.1 and -0.2 both above -1.0
    assert bool_labels.ranking_auc(records) == {
        "mean excess (TiTok's sample rank)": 0.5,
        "answer tokens' mean excess, closing token left out (--rank-by answer-excess)": 1.0,
        "expert confidence, mean log p_expert (--rank-by confidence)": 1.0}
    assert bool_labels.auc([1.0], [1.0]) == 0.5 and bool_labels.auc([], [1.0]) is None
    path = tmp_path / "scored.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    bool_labels.main(["--auc", str(path)])
    assert capsys.readouterr().out.splitlines()[-1] == \
        f"| {path} | expert confidence, mean log p_expert (--rank-by confidence) | 1.000 |"
