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
def test_torchrun_example_two_processes():
    cmd = [
        sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2",
        "--master-addr", "127.0.0.1", "--master-port", str(free_port()),
        str(ROOT / "examples" / "torchrun_pipeline.py"), "--max-epochs", "5",
    ]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert out.returncode == 0, out.stderr[-3000:]
    lines = [line for line in out.stdout.splitlines() if line.startswith("rank ")]
    assert len(lines) == 2
    # every rank saw the same losses and holds the same whole network
    assert lines[0].split(":", 1)[1] == lines[1].split(":", 1)[1]
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
