"""The installed package (a wheel, not the source tree) carries what the commands read."""
import glob
import os
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
    code = ("from titok_tools.gen import load_template; "
            "print(load_template('default').path); print(load_template('multiple-choice').path)")
    done = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True,
                          env=dict(os.environ, PYTHONPATH=str(tmp_path / "site")))
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == [str(tmp_path / "site" / "titok_tools" / "templates" / f"query-{n}.txt")
                                   for n in ("default", "multiple-choice")]
