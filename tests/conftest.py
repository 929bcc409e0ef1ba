import os
import time

import numpy as np
import pytest


def worker_pids(parent: int | None = None) -> list[int]:
    """Live skpipe stage workers started by ``parent`` (default: this process), found in /proc."""
    parent = os.getpid() if parent is None else parent
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/cmdline", "rb") as f:
                cmd = f.read()
            if b"skpipe.engine.workers._worker_main" not in cmd:
                continue
            with open(f"/proc/{entry}/environ", "rb") as f:
                env = f.read().split(b"\0")
            with open(f"/proc/{entry}/stat") as f:
                state = f.read().rsplit(")", 1)[1].split()[0]
        except OSError:
            continue
        if state == "Z":
            continue
        if f"SKPIPE_PARENT_PID={parent}".encode() in env:
            found.append(int(entry))
    return found


def wait_no_workers(parent: int | None = None, timeout: float = 10.0) -> list[int]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        left = worker_pids(parent)
        if not left:
            return []
        time.sleep(0.1)
    return worker_pids(parent)


def assert_same_weights(est, ref, atol):
    """Two fitted estimators' networks hold the same tensors, by name, to ``atol``."""
    import torch

    state, ref_state = est.module_.state_dict(), ref.module_.state_dict()
    assert state.keys() == ref_state.keys()
    for key in state:
        torch.testing.assert_close(state[key], ref_state[key], atol=atol, rtol=0, msg=key)


def pipeline_config(**overrides):
    """A PipelineConfig for engine tests: two CPU stages, 1F1B, 4 micro-batches of a 16-row batch
    in this process; each test overrides what it is about."""
    from skpipe.engine.plan._config import make_config

    base = dict(
        n_stages=2, n_microbatches=4, schedule="1f1b", chunks_per_stage="auto",
        balance="uniform", checkpoint="never", launcher="local", devices=("cpu", "cpu"),
        batch_size=16, precision="float32", max_grad_norm=None, timeout=10.0,
    )
    base.update(overrides)
    return make_config(**base)


@pytest.fixture
def classification_data():
    rng = np.random.RandomState(0)
    X = rng.normal(size=(90, 6)).astype(np.float64)
    w = rng.normal(size=(6, 3))
    y = np.argmax(X @ w + 0.1 * rng.normal(size=(90, 3)), axis=1)
    return X, y


@pytest.fixture
def regression_data():
    rng = np.random.RandomState(1)
    X = rng.normal(size=(80, 5))
    y = X @ rng.normal(size=5) + 0.05 * rng.normal(size=80)
    return X, y
