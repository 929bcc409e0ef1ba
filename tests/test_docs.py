"""The documentation builds without warnings, and every Examples section runs as a doctest."""

import doctest
import importlib
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
MODULES = ["skpipe.modules", "skpipe.datasets", "skpipe.estimators._classifier",
           "skpipe.estimators._regressor", "skpipe.callbacks"]


@pytest.mark.parametrize("name", MODULES)
def test_docstring_examples(name, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # examples that write files write here
    result = doctest.testmod(importlib.import_module(name), optionflags=doctest.ELLIPSIS)
    assert result.failed == 0
    assert result.attempted > 0


@pytest.mark.parametrize("builder", ["html", "doctest"])
def test_sphinx_builds_clean(tmp_path, builder):
    pytest.importorskip("sphinx")
    pytest.importorskip("numpydoc")
    pytest.importorskip("myst_parser")
    out = subprocess.run(
        [sys.executable, "-m", "sphinx", "-W", "--keep-going", "-b", builder, str(ROOT / "docs"),
         str(tmp_path / builder), "-q"],
        capture_output=True, text=True, timeout=600,
    )
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]


def test_readme_example_imports_only_public_names():
    import ast
    import re
    from pathlib import Path

    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    code = re.search(r"```python\n(.*?)```", readme, re.S).group(1)
    for node in ast.walk(ast.parse(code)):
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            module = getattr(node, "module", "") or ""
            names = [a.name for a in node.names]
            assert not any(part.startswith("_") for part in module.split(".")), module
            assert not any(n.startswith("_") for n in names), names


# -- pages that show output: their code runs and the output is compared (the doctest habit) ----
def fenced_doctests(page: Path) -> list[tuple[int, str]]:
    """The fenced code blocks of a Markdown page written as doctests (``>>>`` lines), with the
    line each starts on."""
    import re

    text = page.read_text()
    return [(text[:m.start()].count("\n") + 2, m.group(1))
            for m in re.finditer(r"```(?:python)?\n(>>> .*?)```", text, re.S)]


MARKDOWN_WITH_OUTPUT = [p.name for p in sorted((ROOT / "docs").glob("*.md")) if fenced_doctests(p)]


def test_pages_that_show_output_are_found():
    assert "large_networks.md" in MARKDOWN_WITH_OUTPUT


@pytest.mark.parametrize("name", MARKDOWN_WITH_OUTPUT)
def test_markdown_pages_print_what_they_show(name, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    page = ROOT / "docs" / name
    parser, runner = doctest.DocTestParser(), doctest.DocTestRunner(optionflags=doctest.ELLIPSIS)
    globs: dict = {}
    for line, block in fenced_doctests(page):
        test = parser.get_doctest(block, globs, f"{name}:{line}", str(page), line)
        runner.run(test)
    result = runner.summarize(verbose=False)
    assert result.attempted > 0
    assert result.failed == 0, f"{name} shows output its code no longer prints (see above)"


def line_form(line: str) -> str:
    """A report line with what is measured or chosen masked: numbers, schedule and balance
    names, yes/no, a chunk's first..last layer and the chosen-plan mark."""
    import re

    from skpipe.engine.plan._schedules import SCHEDULE_NAMES

    # names first: '1f1b' holds digits
    line = re.sub(r"\b(" + "|".join(sorted(SCHEDULE_NAMES, key=len, reverse=True)) + r")\b",
                  "S", line.strip())
    line = re.sub(r"\d[\d,.]*", "N", line)
    line = re.sub(r"\b(uniform|parameters|time|yes|no)\b", "W", line)
    line = re.sub(r"\b\w+\.\.\w+\b", "L..L", line)  # the layers of a chunk: first..last
    return re.sub(r"\s+", " ", line.removeprefix("* ").removeprefix("*"))


@pytest.mark.distributed
def test_the_user_guide_shows_the_forms_plan_prints():
    import numpy as np

    from skpipe import PipeNetClassifier

    text = (ROOT / "docs" / "user_guide.rst").read_text()
    block = text.split("(``tests/test_docs.py`` runs this example", 1)[1].split("::\n\n", 1)[1]
    shown = []
    for line in block.splitlines():
        if line and not line.startswith("    "):
            break
        if line:
            shown.append(line)
    rng = np.random.RandomState(0)
    X, y = rng.randn(512, 32).astype(np.float32), rng.randint(0, 3, 512)
    est = PipeNetClassifier(module__hidden_layer_sizes=(128,) * 6, n_stages=2, schedule="auto",
                            batch_size=128)
    printed = [line for line in str(est.plan(X, y)).splitlines() if line.strip()]
    advice = "one stage would be faster here"
    # the advice is measured too: compared when both say it
    if not any(line.startswith(advice) for line in printed):
        shown = [line for line in shown if not line.strip().startswith(advice)]
    # a run of rows of one form (chunks, candidates) counts once: the chosen plan may have
    # another number of chunks where the measurements differ
    def forms(lines):
        out = [line_form(line) for line in lines]
        return [f for i, f in enumerate(out) if i == 0 or f != out[i - 1]]

    assert forms(shown) == forms(printed)
