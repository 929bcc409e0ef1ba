"""Device leases, with CPU "devices" (cpu:0, cpu:1, ...) standing in for GPUs."""

import multiprocessing as mp
import time

import numpy as np
import pytest
import torch

from skpipe import PipeNetClassifier
from skpipe.engine.parallel._leases import lease_devices


@pytest.fixture(autouse=True)
def private_lease_dir(tmp_path, monkeypatch):
    monkeypatch.setenv("SKPIPE_LEASE_DIR", str(tmp_path))


def test_a_leased_device_is_not_given_twice():
    with lease_devices(["cpu:0", "cpu:1"], 1.0):
        with pytest.raises(TimeoutError, match=r"could not lease 2 device\(s\) within 0.2 s: \['cpu:0', 'cpu:1'\]"):
            lease_devices(["cpu:0", "cpu:1"], 0.2)
        with lease_devices(["cpu:2"], 0.2) as other:
            assert other.devices == ("cpu:2",)
    with lease_devices(["cpu:0", "cpu:1"], 0.2):
        pass  # released on exit


def test_auto_choice_picks_free_devices():
    pool = ["cuda:0", "cuda:1", "cuda:2", "cuda:3"]
    with lease_devices(["cuda:0", "cuda:1"], 1.0, choose_from=pool) as first:
        with lease_devices(["cuda:0", "cuda:1"], 1.0, choose_from=pool) as second:
            assert set(first.devices).isdisjoint(second.devices)
            with pytest.raises(TimeoutError):
                lease_devices(["cuda:0"], 0.1, choose_from=pool)


def _hold(path, device, seconds, started):
    import os

    os.environ["SKPIPE_LEASE_DIR"] = path
    with lease_devices([device], 5.0):
        started.set()
        time.sleep(seconds)


def test_waits_for_a_device_held_by_another_process_and_survives_its_death(tmp_path):
    ctx = mp.get_context("spawn")
    started = ctx.Event()
    holder = ctx.Process(target=_hold, args=(str(tmp_path), "cpu:5", 60, started))
    holder.start()
    assert started.wait(30)
    with pytest.raises(TimeoutError):
        lease_devices(["cpu:5"], 0.3)
    holder.kill()  # a crashed fit: the kernel drops its lock
    holder.join()
    with lease_devices(["cpu:5"], 2.0):
        pass


def test_fits_on_cpu_stand_in_devices_hold_their_lease(classification_data):
    X, y = classification_data
    seen = []

    from skorch.callbacks import Callback

    class Probe(Callback):
        def on_epoch_end(self, net, **kw):
            try:
                lease_devices(["cpu:0"], 0.05)
                seen.append("free")
            except TimeoutError:
                seen.append("held")

    PipeNetClassifier(max_epochs=2, n_stages=2, launcher="local", n_microbatches=2,
                      devices=["cpu:0", "cpu:1"], callbacks=[Probe()]).fit(X, y)
    assert seen == ["held", "held"]
    with lease_devices(["cpu:0", "cpu:1"], 0.1):
        pass  # released after the fit


def test_forward_pipelined_holds_the_devices_like_a_fit(classification_data):
    """Forward-only runs on the fit's devices: it must not share them with a concurrent fit."""
    X, y = classification_data
    est = PipeNetClassifier(max_epochs=1, n_stages=2, launcher="local", n_microbatches=2,
                            devices=["cpu:0", "cpu:1"], timeout=0.5).fit(X, y)
    with lease_devices(["cpu:1"], 0.1):  # another fit holds one of the stages' devices
        with pytest.raises(TimeoutError, match=r"could not lease 2 device\(s\) within 0.5 s: \['cpu:1'\]"):
            est.forward_pipelined(X)
    with torch.no_grad():
        whole = est.module_(torch.as_tensor(X, dtype=torch.float32)).numpy()
    np.testing.assert_allclose(est.forward_pipelined(X), whole, atol=1e-5)
    with pytest.raises(ValueError, match=r"Found array with 0 sample\(s\)"):
        est.forward_pipelined(X[:0])  # empty X: the same clear error as predict
