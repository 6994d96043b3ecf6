"""The installed package (a wheel, not the source tree) carries what the commands read; the source
tree's citations of the design notes (docs/design.md) name sections that exist."""
import glob
import os
import re
import shutil
import subprocess
import sys
import zipfile

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def can_build_wheels():
    try:
        from setuptools.command.bdist_wheel import bdist_wheel  # noqa: F401  (setuptools >= 70.1)
        return True
    except ImportError:
        import importlib.util
        return importlib.util.find_spec("wheel") is not None


@pytest.mark.skipif(not can_build_wheels(), reason="no bdist_wheel here (setuptools < 70.1 and no wheel package)")
def test_wheel_ships_the_templates_and_finds_them(tmp_path):
    # Built from a copy (titok_tools/templates is a link to data/templates): setuptools reuses a
    # build/ dir, and the checkout's could hold an old build.
    source = shutil.copytree(ROOT, tmp_path / "src", ignore=shutil.ignore_patterns(
        "models", "work", "results", "build", "*.egg-info", ".*", "__pycache__"))
    subprocess.run([sys.executable, "-m", "pip", "wheel", str(source), "--no-deps", "--no-build-isolation", "-q",
                    "-w", str(tmp_path / "wheel")], check=True, capture_output=True)
    (wheel,) = glob.glob(str(tmp_path / "wheel" / "*.whl"))
    names = set(zipfile.ZipFile(wheel).namelist())
    shipped = {f"titok_tools/templates/{name}" for name in os.listdir(os.path.join(ROOT, "data", "templates"))}
    assert shipped <= names and "titok_tools/templates/query-default.txt" in shipped
    # installed alone, away from the source tree, titok-gen finds its bundled query templates there
    zipfile.ZipFile(wheel).extractall(tmp_path / "site")
    code = ("from titok_tools.queries import load_template; "
            "print(load_template('default').path); print(load_template('multiple-choice').path)")
    done = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True,
                          env=dict(os.environ, PYTHONPATH=str(tmp_path / "site")))
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == [str(tmp_path / "site" / "titok_tools" / "templates" / f"query-{n}.txt")
                                   for n in ("default", "multiple-choice")]


DESIGN_SECTIONS = ["Formatting", "Completion tokens", "Excess", "Selection", "Alignment", "Target loss", "Defaults",
                   "Generation", "Query shape", "Evaluation", "Records"]
DESIGN_SUBSECTIONS = ["The stored top-N", "Vocabulary map", "Logit distillation"]  # ### headings, citable too
CITATION = re.compile(r"docs/design\.md, ([^).,;:\n]*)")  # one section, or several joined by " and "
OLD_REFERENCES = re.compile(r"\bS" r"PEC\b|(/work|\.\.)/sh" r"ared/")  # spelled apart: this file must not match itself
UNTRACKED = {"models", "work", "build", "__pycache__"}  # downloads and outputs (.gitignore), not the source


def source_text_files():
    for top, dirs, files in os.walk(ROOT):
        dirs[:] = [d for d in dirs if not d.startswith(".") and d not in UNTRACKED and not d.endswith(".egg-info")
                   and os.path.join(top, d) != os.path.join(ROOT, "data", "bigbench")]
        for name in files:
            if name.endswith((".py", ".md", ".txt", ".jinja", ".ini", ".cfg", ".toml")) or name == "Makefile" \
                    or os.path.basename(top) == "bin":
                yield os.path.join(top, name)


def test_the_design_notes_have_their_sections():
    text = open(os.path.join(ROOT, "docs", "design.md"), encoding="utf-8").read()
    assert re.findall(r"^## (.+?)\s*$", text, re.M) == DESIGN_SECTIONS
    assert re.findall(r"^### (.+?)\s*$", text, re.M) == DESIGN_SUBSECTIONS


def test_citations_name_sections_of_the_design_notes_and_nothing_else():
    """Every citation of a section of docs/design.md names one that exists, and no file cites the
    design reference the notes replaced or points outside the repository."""
    cited, wrong, old = set(), [], []
    for path in source_text_files():
        where = os.path.relpath(path, ROOT)
        for number, line in enumerate(open(path, encoding="utf-8", errors="replace"), 1):
            for match in CITATION.finditer(line):
                for name in match.group(1).strip().split(" and "):
                    if name in DESIGN_SECTIONS or name in DESIGN_SUBSECTIONS:
                        cited.add(name)
                    else:
                        wrong.append(f"{where}:{number}: {name!r}")
            if OLD_REFERENCES.search(line):
                old.append(f"{where}:{number}: {line.strip()}")
    assert wrong == []
    assert old == []
    # the scan reaches the package, the tests and the notes' own citations
    assert {"Formatting", "Completion tokens", "Selection", "Alignment", "Target loss", "Records"} <= cited
