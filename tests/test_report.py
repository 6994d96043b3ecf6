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
