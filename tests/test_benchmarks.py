"""Every benchmark script runs on a tiny setting and prints one JSON line of figures.
(Nothing here asserts a time: speed is the benchmarks' business, not the tests'.)"""

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPTS = ["schedule_efficiency", "overhead", "real_compute", "memory", "search_overhead", "channel",
           "scaling", "planner", "large_network", "callbacks", "async_pipelines",
           "async_convergence", "parallel_memory"]


@pytest.mark.distributed
@pytest.mark.parametrize("name", SCRIPTS)
def test_benchmark_runs_quick(name):
    out = subprocess.run([sys.executable, str(ROOT / "benchmarks" / f"{name}.py"), "--quick"],
                         capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert out.returncode == 0, out.stderr[-3000:]
    lines = [line for line in out.stdout.splitlines() if line.startswith("{")]
    assert len(lines) == 1
    record = json.loads(lines[0])
    assert record["benchmark"] == name
    numbers = [v for v in record.values() if isinstance(v, (int, float))]
    assert numbers and all(v == v for v in numbers)  # figures, no NaN
