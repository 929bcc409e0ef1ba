"""The examples and the command line run as users run them."""

import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.distributed
@pytest.mark.parametrize("procs,replicas", [(2, 1), (4, 2)], ids=["2-stages", "2-replicas"])
def test_torchrun_example(procs, replicas):
    cmd = [
        sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(procs),
        "--master-addr", "127.0.0.1", "--master-port", str(free_port()),
        str(ROOT / "examples" / "torchrun_pipeline.py"), "--max-epochs", "5",
        "--replicas", str(replicas),
    ]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=ROOT,
                         env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert out.returncode == 0, out.stderr[-3000:]
    lines = [line for line in out.stdout.splitlines() if line.startswith("rank ")]
    assert len(lines) == procs
    # every rank saw the same losses and holds the same whole network
    assert len({line.split(":", 1)[1] for line in lines}) == 1
    accuracy = float(lines[0].rsplit(" ", 1)[1])
    assert accuracy > 0.9


def test_cli_help():
    out = subprocess.run([sys.executable, "-m", "skpipe", "--help"], capture_output=True, text=True)
    assert out.returncode == 0
    assert "demo" in out.stdout


def test_cli_demo_small():
    out = subprocess.run(
        [sys.executable, "-m", "skpipe", "demo", "--n-stages", "2", "--launcher", "local",
         "--max-epochs", "3", "--quiet"],
        capture_output=True, text=True, timeout=300,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    assert "best parameters:" in out.stdout
    assert "best cross-validated accuracy:" in out.stdout


EXAMPLES = ["quick_start.py", "mixed_types_pipeline.py", "choose_schedule.py", "large_network.py",
            "split_points.py"]


@pytest.mark.distributed
@pytest.mark.parametrize("name", EXAMPLES)
def test_example_runs(name, tmp_path):
    env = {**os.environ, "SKPIPE_EXAMPLE_QUICK": "1", "SKPIPE_EXAMPLE_OUT": str(tmp_path / "out.png"),
           "MPLBACKEND": "Agg"}
    out = subprocess.run([sys.executable, str(ROOT / "examples" / name)], capture_output=True,
                         text=True, timeout=600, cwd=tmp_path, env=env)
    assert out.returncode == 0, out.stderr[-3000:]
    if name == "choose_schedule.py":
        assert (tmp_path / "out.png").stat().st_size > 1000


@pytest.mark.distributed
def test_notebook_cells_run_in_order(tmp_path):
    """Each code cell runs in one namespace whose module is __main__, as in a kernel."""
    import json

    nb = json.loads((ROOT / "examples" / "notebook.ipynb").read_text())
    code = "\n\n".join("".join(c["source"]) for c in nb["cells"] if c["cell_type"] == "code")
    env = {**os.environ, "SKPIPE_EXAMPLE_QUICK": "1", "MPLBACKEND": "Agg"}
    out = subprocess.run([sys.executable, "-"], input=code, capture_output=True, text=True,
                         timeout=600, cwd=tmp_path, env=env)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "expected bubble" in out.stdout
