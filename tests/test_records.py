"""records.text_output: the one atomic text writer (titok-show pages, metrics, reports)."""
import os

import pytest

from titok_tools.records import text_output


def test_text_output_appears_only_on_success(tmp_path):
    path = tmp_path / "sub" / "out.json"
    with text_output(str(path)) as f:
        f.write("{}")
        assert not path.exists()  # still a temp file beside it
    assert path.read_text() == "{}"
    with pytest.raises(RuntimeError):
        with text_output(str(path)) as f:
            f.write("half")
            raise RuntimeError("killed")
    assert path.read_text() == "{}"  # the old file stands, no temp file is left
    assert os.listdir(path.parent) == ["out.json"]


def test_text_output_dash_is_stdout(capsys):
    with text_output("-") as f:
        f.write("page")
    assert capsys.readouterr().out == "page"
