"""Process groups in one place: a world of one for 'local', a job's world only when it is one."""

import pytest
import torch.distributed as dist

from skpipe.engine.parallel import _groups


def test_a_local_world_is_one_process_and_is_not_a_jobs_world(monkeypatch):
    group = _groups.local_world("cpu")
    assert dist.get_world_size(group) == 1
    assert _groups.local_world("cpu") is group  # made once, reused
    assert not _groups.job_active()
    monkeypatch.setenv("RANK", "0")  # even inside what looks like a job
    with pytest.raises(RuntimeError, match=r"A one-process group made for launcher='local' is not one"):
        _groups.job_world("cpu", 2)


def test_broadcast_outside_a_job_is_the_value_itself():
    assert _groups.broadcast_object(1234) == 1234


def test_backends():
    assert _groups.backend_for("cuda:1") == "nccl"
    assert _groups.backend_for("cpu") == "gloo"


@pytest.mark.parametrize("world,n_stages,n_replicas,message", [
    (4, 2, 1, r"n_stages \(2\) must equal the torchrun world size \(4\) .*or n_replicas=2 to run that many pipelines"),
    (6, 2, 2, r"n_replicas \(2\) x n_stages \(2\) = 4 processes, but the torchrun world size is 6.*: n_replicas=3 fits this job"),
    (5, 2, 2, r"world size is 5.*5 processes cannot be split into pipelines of 2\."),
])
def test_a_jobs_world_must_be_replicas_times_stages(monkeypatch, world, n_stages, n_replicas, message):
    monkeypatch.setattr(_groups, "_made_local_world", False)
    monkeypatch.setattr(dist, "is_initialized", lambda: True)
    monkeypatch.setattr(dist, "get_world_size", lambda group=None: world)
    with pytest.raises(ValueError, match=message):
        _groups.job_world("cpu", n_stages, n_replicas)


@pytest.mark.parametrize("world,n_stages,n_replicas,message", [
    (8, 2, 1, r"n_replicas \(1\) x n_stages \(2\) x tensor_parallel \(2\) = 4 processes, but the "
              r"torchrun world size is 8; .*one tensor shard of one stage of one replica: "
              r"n_replicas=2 fits this job\."),
    (6, 2, 2, r"= 8 processes, but the torchrun world size is 6; .*6 processes cannot be split "
              r"into pipelines of 2 stages x 2 tensor shards\."),
])
def test_a_jobs_world_must_factor_with_tensor_shards(monkeypatch, world, n_stages, n_replicas, message):
    monkeypatch.setattr(_groups, "_made_local_world", False)
    monkeypatch.setattr(dist, "is_initialized", lambda: True)
    monkeypatch.setattr(dist, "get_world_size", lambda group=None: world)
    with pytest.raises(ValueError, match=message):
        _groups.job_world("cpu", n_stages, n_replicas, tensor_parallel=2)
