"""bench/closing_rank.py: how much of a pool's sample ranking the closing token decides."""
import json
import os
import subprocess
import sys

import pytest

from conftest import ROOT

sys.path.insert(0, os.path.join(ROOT, "bench"))
import closing_rank  # noqa: E402


def scored(id, answer, closing=None):
    """A scored record: one token per answer character, then the closing token (empty span)."""
    excess = [*answer, *([] if closing is None else [closing])]
    offsets = [[i, i + 1] for i in range(len(answer))] + ([] if closing is None else [[len(answer)] * 2])
    return {"id": id, "prompt": "p", "completion": "c" * len(answer),
            "titok": {"source": {"excess": excess, "offsets": offsets, "mean_excess": sum(excess) / len(excess)}}}


def test_ranks_share_ties_as_spearman_wants():
    assert closing_rank.ranks([1.0, 2.0, 2.0, 3.0]).tolist() == [1.0, 2.5, 2.5, 4.0]
    assert closing_rank.ranks([0.3, -1.0, 7.0]).tolist() == [2.0, 1.0, 3.0]
    # By hand: ranks (1, 2, 3) against (2, 1, 3): 1 - 6 * (1 + 1 + 0) / (3 * 8) = 0.5
    assert closing_rank.spearman([1.0, 2.0, 3.0], [5.0, 4.0, 6.0]) == pytest.approx(0.5)
    assert closing_rank.spearman([1.0, 2.0], [3.0, 3.0]) is None


def test_a_pool_ranked_by_its_closing_tokens(tmp_path, capsys):
    # mean excess 15.5, 11.0, 6.5 follows the closing tokens (30, 20, 10), against the answers (1, 2, 3);
    # "cut" has no closing token (cut at --max-length) and is left out.
    records = [scored("a", [1.0], 30.0), scored("b", [2.0], 20.0), scored("c", [3.0], 10.0), scored("cut", [5.0, 5.0])]
    share = closing_rank.closing_share(((f"f:{i}", r) for i, r in enumerate(records, 1)), keep=1)
    assert share == {"samples": 3, "of": 4, "median_tokens": 2, "rho_closing": pytest.approx(1.0),
                     "rho_answer": pytest.approx(-1.0), "keep": 1, "shared": 0}
    path = tmp_path / "scored.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    closing_rank.main([str(path), "--keep", "2"])  # top 2: a, b by mean excess; c, b by the answers
    assert capsys.readouterr().out.splitlines()[-1] == f"| {path} | 3 of 4 | 2 | 1.00 | -1.00 | 1 of 2 |"


def test_an_unscored_record_is_a_one_line_error(tmp_path):
    path = tmp_path / "synthetic.jsonl"
    path.write_text('{"id": "x", "prompt": "p", "completion": "c"}\n')
    run = subprocess.run([sys.executable, os.path.join(ROOT, "bench", "closing_rank.py"), str(path)],
                         capture_output=True, text=True)
    assert run.returncode == 1 and run.stderr.startswith(f"closing_rank: {path}:1: titok.source")
    assert len(run.stderr.splitlines()) == 1
