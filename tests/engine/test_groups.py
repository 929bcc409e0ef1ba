"""Process groups in one place: a world of one for 'local', a job's world only when it is one."""

import pytest
import torch.distributed as dist

from skpipe.engine import _groups


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
