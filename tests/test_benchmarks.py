"""Every benchmark script runs on a tiny setting and prints one JSON line of figures.
(Nothing here asserts a time: speed is the benchmarks' business, not the tests'.)"""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPTS = ["schedule_efficiency", "overhead", "real_compute", "memory", "search_overhead", "channel",
           "scaling", "planner", "large_network", "callbacks", "async_pipelines",
           "async_convergence", "parallel_memory"]
LIMIT_S = 500  # below pytest's own timeout, so that a hang is reported with its stacks


def run_quick(name: str) -> tuple[int, str, str]:
    """Run a benchmark's quick setting; one that hangs gets SIGABRT (every process of it prints
    its Python stacks: PYTHONFAULTHANDLER), then SIGKILL, and the test fails with the stacks."""
    env = dict(os.environ, PYTHONFAULTHANDLER="1")
    proc = subprocess.Popen([sys.executable, str(ROOT / "benchmarks" / f"{name}.py"), "--quick"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT,
                            env=env)
    try:
        out, err = proc.communicate(timeout=LIMIT_S)
    except subprocess.TimeoutExpired:
        family = [psutil.Process(proc.pid), *psutil.Process(proc.pid).children(recursive=True)]
        for member in family:
            try:
                member.send_signal(signal.SIGABRT)
            except psutil.NoSuchProcess:
                pass
        time.sleep(3.0)
        for member in family:
            try:
                member.kill()
            except psutil.NoSuchProcess:
                pass
        out, err = proc.communicate()
        err = "\n".join(line for line in err.splitlines()
                        if not line.startswith("Extension modules"))
        pytest.fail(f"benchmarks/{name}.py --quick hung for {LIMIT_S} s; the stacks of its "
                    f"processes:\n{err[-20000:]}")
    return proc.returncode, out, err


@pytest.mark.distributed
@pytest.mark.parametrize("name", SCRIPTS)
def test_benchmark_runs_quick(name):
    code, out, err = run_quick(name)
    assert code == 0, err[-3000:]
    lines = [line for line in out.splitlines() if line.startswith("{")]
    assert len(lines) == 1
    record = json.loads(lines[0])
    assert record["benchmark"] == name
    numbers = [v for v in record.values() if isinstance(v, (int, float))]
    assert numbers and all(v == v for v in numbers)  # figures, no NaN
