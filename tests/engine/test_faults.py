"""Faults with spawned workers: a clear error in the user's process, fast, with no process left
behind, the estimator unchanged, and the next fit working."""

import os
import signal
import subprocess
import sys
import textwrap
import time

import pytest
from skorch.callbacks import Callback
from torch import nn

from skpipe import PipeNetClassifier
from skpipe.engine.workers._pool import WorkerError
from tests.conftest import wait_no_workers, worker_pids

pytestmark = pytest.mark.distributed


@pytest.fixture(autouse=True)
def no_warm_workers():
    """Each fault test starts and ends with no worker of this process alive."""
    import skpipe

    skpipe.shutdown_workers()
    yield
    skpipe.shutdown_workers()


class FailAt(nn.Module):
    """Identity that raises (or hangs) on its n-th training forward, only in a worker."""

    def __init__(self, at: int, hang: bool = False):
        super().__init__()
        self.at, self.hang, self.calls = at, hang, 0

    def forward(self, x):
        if self.training and os.environ.get("SKPIPE_RANK"):
            self.calls += 1
            if self.calls == self.at:
                if self.hang:
                    time.sleep(3600)
                raise RuntimeError(f"boom in stage forward at call {self.at}")
        return x


def net_with(layer):
    return nn.Sequential(nn.Linear(6, 8), nn.ReLU(), layer, nn.Linear(8, 3))


def make(module, **kw):
    params = dict(module=module, max_epochs=3, batch_size=16, n_stages=2, n_microbatches=2,
                  launcher="spawn", random_state=0)
    params.update(kw)
    return PipeNetClassifier(**params)


def test_exception_in_stage_forward(classification_data):
    X, y = classification_data
    est = make(net_with(FailAt(5)))
    t0 = time.monotonic()
    with pytest.raises(WorkerError, match=r"(?s)stage worker 1 raised.*boom in stage forward at call 5"):
        est.fit(X, y)
    assert time.monotonic() - t0 < 10 + 8  # 8 s: starting the workers
    assert wait_no_workers() == []
    assert not hasattr(est, "module_") and not hasattr(est, "classes_")
    make(net_with(nn.Identity())).fit(X, y)  # the next fit works


class KillWorker(Callback):
    def __init__(self, rank, at_batch):
        self.rank, self.at_batch, self.seen = rank, at_batch, 0

    def on_batch_end(self, net, **kwargs):
        self.seen += 1
        if self.seen == self.at_batch:
            os.kill(net.runner.group.procs[self.rank].pid, signal.SIGKILL)


@pytest.mark.parametrize("rank", [0, 1])
def test_worker_killed_mid_epoch(classification_data, rank):
    X, y = classification_data
    est = make(net_with(nn.Identity()), callbacks=[KillWorker(rank, 3)])
    t0 = time.monotonic()
    with pytest.raises(WorkerError, match=rf"stage worker {rank} \(pid \d+\) stopped: it was killed by signal SIGKILL"):
        est.fit(X, y)
    assert time.monotonic() - t0 < 10 + 8
    assert wait_no_workers() == []
    assert not hasattr(est, "module_")
    make(net_with(nn.Identity())).fit(X, y)  # the next fit works


def test_hung_worker_is_bounded_by_timeout(classification_data):
    X, y = classification_data
    est = make(net_with(FailAt(3, hang=True)), timeout=3)
    t0 = time.monotonic()
    with pytest.raises(WorkerError, match=r"gave no answer within timeout=3"):
        est.fit(X, y)
    assert time.monotonic() - t0 < 3 + 10 + 8
    assert wait_no_workers() == []
    make(net_with(nn.Identity())).fit(X, y)  # the next fit works


def test_ctrl_c_in_driver_stops_workers(tmp_path):
    script = tmp_path / "driver.py"
    script.write_text(textwrap.dedent("""
        import faulthandler, signal
        faulthandler.register(signal.SIGUSR1)  # the test asks where the driver is, if it hangs
        # Ctrl-C as in a terminal: a test run started in the background inherits SIGINT ignored
        signal.signal(signal.SIGINT, signal.default_int_handler)
        import numpy as np, sys, time
        from torch import nn
        from skpipe import PipeNetClassifier

        class Slow(nn.Module):          # defined in __main__: travels by value to the workers
            def forward(self, x):
                time.sleep(0.05)
                return x

        rng = np.random.RandomState(0)
        X, y = rng.normal(size=(64, 4)), rng.randint(0, 2, 64)
        net = nn.Sequential(nn.Linear(4, 4), Slow(), nn.Linear(4, 2))
        est = PipeNetClassifier(module=net, n_stages=2, launcher="spawn", max_epochs=10_000,
                                batch_size=8, n_microbatches=2)
        print("fitting", flush=True)
        try:
            est.fit(X, y)
        except KeyboardInterrupt:
            print("interrupted", hasattr(est, "module_"), flush=True)
            sys.exit(7)
    """))
    errors = open(tmp_path / "stderr.txt", "w")  # a file: a full pipe could block the driver
    proc = subprocess.Popen([sys.executable, str(script)], stdout=subprocess.PIPE,
                            stderr=errors, text=True, cwd=os.getcwd())
    assert proc.stdout.readline().strip() == "fitting"
    deadline = time.monotonic() + 60
    while len(worker_pids(proc.pid)) < 2 and time.monotonic() < deadline:
        time.sleep(0.2)
    time.sleep(2.0)  # training is under way
    assert len(worker_pids(proc.pid)) == 2
    t0 = time.monotonic()
    proc.send_signal(signal.SIGINT)
    try:
        out, _ = proc.communicate(timeout=30)
    except subprocess.TimeoutExpired:  # say where the driver is and what its workers are
        proc.send_signal(signal.SIGUSR1)
        time.sleep(1.0)
        left = worker_pids(proc.pid)
        proc.kill()
        out, _ = proc.communicate()
        errors.close()
        err = (tmp_path / "stderr.txt").read_text()
        pytest.fail(f"the driver did not end within 30 s of Ctrl-C; workers left {left}; "
                    f"stdout:\n{out}\nstderr:\n{err[-6000:]}")
    errors.close()
    assert time.monotonic() - t0 < 5
    assert proc.returncode == 7
    assert "interrupted False" in out
    assert wait_no_workers(proc.pid, timeout=5) == []


def test_workers_die_with_a_killed_driver(tmp_path):
    script = tmp_path / "driver.py"
    script.write_text(textwrap.dedent("""
        import numpy as np
        from skpipe import PipeNetClassifier
        rng = np.random.RandomState(0)
        X, y = rng.normal(size=(64, 4)), rng.randint(0, 2, 64)
        PipeNetClassifier(n_stages=2, launcher="spawn", max_epochs=100_000, batch_size=8,
                          n_microbatches=2).fit(X, y)
    """))
    proc = subprocess.Popen([sys.executable, str(script)], cwd=os.getcwd())
    deadline = time.monotonic() + 60
    while len(worker_pids(proc.pid)) < 2 and time.monotonic() < deadline:
        time.sleep(0.2)
    time.sleep(3.0)  # training is under way
    assert len(worker_pids(proc.pid)) == 2
    proc.kill()
    proc.wait()
    assert wait_no_workers(proc.pid, timeout=5) == []
