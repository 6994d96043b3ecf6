"""python -m titok_tools.report: the Markdown table of a run, from titok-eval's metrics files."""
import json

from click.testing import CliRunner

from titok_tools.report import main


def test_table_rows_and_a_run_with_no_records(tmp_path):
    done = tmp_path / "a.json"
    done.write_text(json.dumps({"records": 100, "exact_match": 0.08, "rouge1": 0.0812, "rougeL": 0.0799}))
    empty = tmp_path / "b.json"  # titok-eval with --limit 0, or every record skipped
    empty.write_text(json.dumps({"records": 0, "exact_match": None, "rouge1": None, "rougeL": None}))
    out = tmp_path / "report.md"
    result = CliRunner().invoke(main, ["-o", str(out), "--setting", "M=100", f"titok={done}", f"none={empty}"])
    assert result.exit_code == 0, result.output
    text = out.read_text()
    assert "| titok | 100 | 8.0% | 0.081 | 0.080 |" in text and "| none | 0 | n/a | n/a | n/a |" in text
    assert "- M: `100`" in text


def test_a_row_of_several_runs_shows_their_mean_and_spread(tmp_path):
    paths = []
    for i, (em, choice) in enumerate([(0.69, 0.69), (0.71, 0.65), (0.73, None)]):
        p = tmp_path / f"s{i}.json"
        metrics = {"records": 100, "exact_match": em, "rouge1": em, "rougeL": em}
        if choice is not None:
            metrics.update(choice_accuracy=choice, choice_accuracy_norm=choice)
        p.write_text(json.dumps(metrics))
        paths.append(str(p))
    out = tmp_path / "report.md"
    result = CliRunner().invoke(main, ["-o", str(out), f"kd={','.join(paths)}", f"one={paths[0]}"])
    assert result.exit_code == 0, result.output
    text = out.read_text()
    # mean 0.71, sample standard deviation 0.02; the third run has no choice numbers, so that column is n/a
    assert "| kd (n=3) | 100 | 71.0 ± 2.0% | 0.710 ± 0.020 | 0.710 ± 0.020 | n/a | n/a |" in text
    assert "| one | 100 | 69.0% | 0.690 | 0.690 | 69.0% | 69.0% |" in text


def test_runs_of_one_row_must_cover_the_same_records(tmp_path):
    a, b = tmp_path / "a.json", tmp_path / "b.json"
    a.write_text(json.dumps({"records": 100, "exact_match": 0.5, "rouge1": 0.5, "rougeL": 0.5}))
    b.write_text(json.dumps({"records": 50, "exact_match": 0.5, "rouge1": 0.5, "rougeL": 0.5}))
    result = CliRunner().invoke(main, ["-o", str(tmp_path / "r.md"), f"kd={a},{b}"])
    assert result.exit_code != 0 and "different record counts: [100, 50]" in result.output
    assert not (tmp_path / "r.md").exists()
