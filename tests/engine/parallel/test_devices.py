"""Which device each pipeline rank uses (on a machine without GPUs, as CI's)."""

import pytest
import torch

from skpipe.engine.parallel._devices import auto_gpu_pool, execution_devices, resolve_devices

no_gpu = pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU-only answers")


@no_gpu
@pytest.mark.parametrize("launcher", ["spawn", "local", "single"])
def test_auto_is_the_cpu_without_gpus(launcher):
    assert resolve_devices("auto", 3, launcher) == ("cpu",) * 3


def test_a_list_names_devices_in_rank_order_and_one_stage_takes_the_first():
    assert resolve_devices(["cpu:0", "cpu:1", "cpu:2"], 2, "spawn") == ("cpu:0", "cpu:1")
    assert resolve_devices(["cpu:1", "cpu:0"], 1, "single") == ("cpu:1",)
    assert resolve_devices("cpu", 2, "local") == ("cpu", "cpu")


@pytest.mark.parametrize("devices,match", [
    ([], r"devices is an empty list"),
    (["abacus"], r"devices entry 'abacus' is not a torch device"),
    (["cpu", "cpu"], None),
    (["cpu"], r"n_stages \(2\) is larger than the number of devices given \(1"),
    (["cuda:7", "cpu"], r"devices entry 'cuda:7' names a GPU this machine does not have"),
])
def test_bad_device_lists_name_the_value(devices, match):
    if match is None:
        assert resolve_devices(devices, 2, "spawn") == ("cpu", "cpu")
        return
    with pytest.raises(ValueError, match=match):
        resolve_devices(devices, 2, "spawn")


def test_lease_names_run_on_the_cpu():
    assert execution_devices(("cpu:0", "cpu:1", "cpu")) == ("cpu", "cpu", "cpu")


def test_gpu_pool_only_for_auto_on_distinct_gpus():
    assert auto_gpu_pool(["cuda:0", "cuda:1"], ("cuda:0", "cuda:1")) is None
    assert auto_gpu_pool("auto", ("cpu", "cpu")) is None
    assert auto_gpu_pool("auto", ("cuda:0", "cuda:0")) is None


def test_auto_under_torchrun_uses_a_gpu_per_rank_when_the_node_has_fewer_than_the_stages(monkeypatch):
    """4 stages over 2 nodes of 2 GPUs: each node sees 2 GPUs, fewer than the 4 stages."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    assert resolve_devices("auto", 4, "torchrun") == ("cuda:0",) * 4  # mapped to LOCAL_RANK
    assert resolve_devices("auto", 4, "spawn") == ("cpu",) * 4  # one machine: not enough GPUs
    assert resolve_devices("auto", 2, "spawn") == ("cuda:0", "cuda:1")


def test_one_device_per_rank_of_the_replica_x_stage_mesh(monkeypatch):
    assert resolve_devices(["cpu:0", "cpu:1", "cpu:2", "cpu:3"], 2, "spawn", n_replicas=2) == (
        "cpu:0", "cpu:1", "cpu:2", "cpu:3")
    assert resolve_devices("auto", 1, "spawn", n_replicas=3) == ("cpu",) * 3
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 4)
    assert resolve_devices("auto", 2, "spawn", n_replicas=2) == ("cuda:0", "cuda:1", "cuda:2", "cuda:3")
    with pytest.raises(ValueError, match=r"n_replicas \(2\) x n_stages \(2\) needs 4 devices"):
        resolve_devices(["cuda:0", "cuda:1"], 2, "spawn", n_replicas=2)
