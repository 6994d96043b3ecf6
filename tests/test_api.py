"""The Python API: a stage runs from Python without its command, and bad input raises the
library's own exception, not a click one (titok_tools/__init__.py)."""
import json
import subprocess
import sys

import click
import pytest

import titok_tools
from titok_tools import RecordError, TitokError, filter_records, read_records


def scored(id, excess):
    return {"id": id, "prompt": "p", "completion": "c" * len(excess),
            "titok": {"source": {"excess": excess, "mean_excess": sum(excess) / len(excess)}}}


def test_importing_the_package_loads_no_model_library():
    code = "import sys, titok_tools; print(sorted(m for m in ('torch', 'transformers', 'peft') if m in sys.modules))"
    assert subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip() == "[]"


def test_every_name_of_the_api_resolves():
    for name in titok_tools.__all__:
        assert getattr(titok_tools, name).__name__ == name
    with pytest.raises(AttributeError):
        titok_tools.nonesuch


def test_a_stage_runs_from_python(tmp_path):
    path = tmp_path / "scored.jsonl"
    # mean excess: a 0.25, b 2.0, c 0.5, d -1.0, e 1.5
    records = [scored("a", [1.0, -1.0, 0.5, 0.5]), scored("b", [2.0, 2.0]), scored("c", [0.5, 0.5, 0.5]),
               scored("d", [-1.0]), scored("e", [3.0, 0.0])]
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    kept = list(filter_records(lambda: read_records(str(path)), k=0.5, keep=3, scope="sample"))
    assert [r["id"] for r in kept] == ["b", "c", "e"]  # the top 3 by mean excess, in input order
    # e's two tokens, top half: the 3.0
    assert kept[2]["titok"]["source"]["mask"] == [1, 0]


def test_bad_input_raises_the_library_error_not_a_click_one(tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_text(json.dumps(scored("a", [1.0])) + "\n" + json.dumps({"id": "b", "prompt": "p", "completion": "c"}) + "\n")
    with pytest.raises(RecordError) as e:
        list(filter_records(lambda: read_records(str(path)), k=0.5, keep=1, scope="sample"))
    assert isinstance(e.value, TitokError) and not isinstance(e.value, click.ClickException)
    assert str(e.value) == f"{path}:2: titok.source: missing: run titok-score first"
