"""The linters the code assumes run clean: ruff with the rules its noqa comments name, and mypy
over the package (both configured in pyproject.toml); the version is written in one place."""

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def run(*args):
    return subprocess.run([sys.executable, "-m", *args], capture_output=True, text=True, cwd=ROOT,
                          timeout=600)


def test_ruff_is_clean():
    out = run("ruff", "check", "skpipe", "benchmarks", "examples", "tests")
    assert out.returncode == 0, out.stdout[-4000:] + out.stderr[-2000:]


def test_mypy_is_clean():
    out = run("mypy")
    assert out.returncode == 0, out.stdout[-4000:] + out.stderr[-2000:]


def test_the_version_is_written_once():
    """pyproject.toml and the docs read skpipe.__version__; the installed metadata agrees."""
    import importlib.metadata
    import runpy
    import tomllib

    import skpipe

    root = Path(__file__).resolve().parents[1]
    project = tomllib.loads((root / "pyproject.toml").read_text())
    assert "version" not in project["project"] and "version" in project["project"]["dynamic"]
    assert project["tool"]["setuptools"]["dynamic"]["version"] == {"attr": "skpipe.__version__"}
    conf = runpy.run_path(str(root / "docs" / "conf.py"))
    assert conf["release"] == conf["version"] == skpipe.__version__
    assert importlib.metadata.version("skpipe") == skpipe.__version__
