"""Determinism, property-based transparency, and where workers listen."""

import os

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

import skpipe
from skpipe import PipeNetClassifier
from skpipe.engine.plan._schedules import SCHEDULE_NAMES, check_microbatches, resolve_chunks
from tests.conftest import worker_pids


def fit(X, y, **kw):
    p = dict(module__hidden_layer_sizes=(12, 12, 12), max_epochs=3, batch_size=16, random_state=7)
    p.update(kw)
    return PipeNetClassifier(**p).fit(X, y)


def state(est):
    return [v.numpy().copy() for v in est.module_.state_dict().values()]


@pytest.mark.parametrize("launcher", ["local", pytest.param("spawn", marks=pytest.mark.distributed)])
def test_same_seed_bit_identical_run_after_run(classification_data, launcher):
    X, y = classification_data
    kw = dict(n_stages=2, n_microbatches=4, launcher=launcher, schedule="interleaved_1f1b")
    runs = [state(fit(X, y, **kw)) for _ in range(3)]
    for other in runs[1:]:
        for a, b in zip(runs[0], other):
            np.testing.assert_array_equal(a, b)
    skpipe.shutdown_workers()


def _allowed(schedule, p, m, batch):
    chunks = resolve_chunks(schedule, "auto")
    try:
        check_microbatches(schedule, p, m, chunks, batch)
    except ValueError:
        return False
    return 7 >= p * chunks  # MLP with 3 hidden layers has 7 layers


# SGD: every example now counts (assume, not return), and hypothesis found a corner (one-row
# micro-batches, gpipe p=2 m=6 batch=6 n=23) where Adam's division by the root of a near-zero
# second moment turns float32 rounding of a ~1e-8 gradient into a 1.6e-5 parameter difference.
# SGD keeps the property exact up to rounding; Adam is covered case by case in
# tests/engine/test_transparency.py. derandomize: the same examples on every run (no flaky CI).
@settings(max_examples=25, deadline=None, derandomize=True,
          suppress_health_check=[HealthCheck.too_slow])
@given(
    schedule=st.sampled_from(SCHEDULE_NAMES),
    p=st.integers(2, 3),
    m=st.integers(1, 8),
    batch=st.integers(4, 24),
    n=st.integers(10, 60),
)
def test_transparency_property(schedule, p, m, batch, n):
    assume(_allowed(schedule, p, m, min(batch, n)))  # a refused combination is no example
    rng = np.random.RandomState(n)
    X = rng.normal(size=(n, 5)).astype(np.float32)
    y = np.arange(n) % 3
    common = dict(module__activation="tanh", max_epochs=2, batch_size=batch, lr=0.1,
                  optimizer=torch.optim.SGD)
    ref = fit(X, y, **common)
    est = fit(X, y, n_stages=p, n_microbatches=m, schedule=schedule, launcher="local", **common)
    for a, b in zip(state(est), state(ref)):
        np.testing.assert_allclose(a, b, atol=1e-5, rtol=0)


def _listening(pid):
    inodes = set()
    for fd in os.listdir(f"/proc/{pid}/fd"):
        try:
            link = os.readlink(f"/proc/{pid}/fd/{fd}")
        except OSError:
            continue
        if link.startswith("socket:["):
            inodes.add(link[8:-1])
    addresses = []
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        with open(table) as f:
            for line in f.readlines()[1:]:
                cols = line.split()
                if cols[3] == "0A" and cols[9] in inodes:  # LISTEN
                    addresses.append(cols[1].split(":")[0])
    return addresses


@pytest.mark.distributed
def test_workers_listen_on_loopback_only(classification_data):
    skpipe.shutdown_workers()
    fit(*classification_data, n_stages=2, n_microbatches=2, launcher="spawn")
    pids = worker_pids()
    assert len(pids) == 2
    loopback = {"0100007F", "00000000000000000000000001000000", "0000000000000000FFFF00000100007F"}
    for pid in [os.getpid(), *pids]:
        for address in _listening(pid):
            assert address in loopback, (pid, address)
    skpipe.shutdown_workers()
