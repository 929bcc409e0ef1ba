"""The linters the code assumes run clean: ruff with the rules its noqa comments name, and mypy
over the package (both configured in pyproject.toml)."""

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
