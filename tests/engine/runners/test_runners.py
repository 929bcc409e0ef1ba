"""The runner table: one row per launcher, every row the whole interface, devices held per row."""

import inspect

import pytest

from skpipe.engine.plan._config import LAUNCHERS
from skpipe.engine.parallel._leases import lease_devices
from skpipe.engine.runners._runner import Runner
from skpipe.engine.runners._runners import RUNNERS, held_devices, resolve_launcher
from tests.conftest import pipeline_config


def test_every_launcher_has_a_row_with_the_whole_interface():
    assert set(RUNNERS) == (set(LAUNCHERS) - {"auto"}) | {"single"}
    for cls in RUNNERS.values():
        assert issubclass(cls, Runner) and not inspect.isabstract(cls), cls.__name__


def test_resolve_launcher():
    assert resolve_launcher("spawn", 1) == "single"
    assert resolve_launcher("auto", 2) == "spawn"  # no job here
    assert resolve_launcher("local", 3) == "local"
    # replicas need a process each: one stage with replicas is not 'single'
    assert resolve_launcher("auto", 1, n_replicas=2) == "spawn"
    assert resolve_launcher("local", 1, n_replicas=2) == "local"  # refused by the config


def config(launcher, devices):
    return pipeline_config(n_microbatches=2, launcher=launcher, devices=devices, batch_size=8,
                           timeout=0.2)


def test_held_devices_lease_for_the_block_and_name_where_tensors_go():
    with held_devices(config("spawn", ("cpu:0", "cpu:1")), ["cpu:0", "cpu:1"]) as held:
        assert held.devices == ("cpu", "cpu")
        with pytest.raises(TimeoutError, match="could not lease"):
            lease_devices(["cpu:1"], 0.05)
    with lease_devices(["cpu:0", "cpu:1"], 0.05):
        pass  # given back


def test_a_torchrun_job_owns_its_devices():
    cfg = config("torchrun", ("cpu:0", "cpu:1"))
    with lease_devices(["cpu:0"], 0.05):
        with held_devices(cfg, "auto") as held:  # no lease asked for: no wait
            assert held is cfg
