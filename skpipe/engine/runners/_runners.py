"""Which runner hosts the stages: one table row per launcher, and the devices it runs on."""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator, Sequence
from contextlib import contextmanager

from torch import nn

from ..parallel._devices import auto_gpu_pool, execution_devices
from ..parallel._groups import job_active
from ..parallel._leases import lease_devices
from ..plan._config import PipelineConfig, TrainSpec
from ..plan._plan import Plan
from ._local import LocalRunner
from ._runner import Runner
from ._single import SingleRunner
from ._spawn import SpawnRunner
from ._torchrun import TorchrunRunner

RUNNERS: dict[str, type[Runner]] = {
    "single": SingleRunner,  # n_stages=1: this process, one device
    "local": LocalRunner,  # every stage in this process (world size 1)
    "spawn": SpawnRunner,  # one worker process per (replica, stage), started here (kept warm)
    "torchrun": TorchrunRunner,  # one rank of a torchrun job per (replica, stage)
}


def resolve_launcher(launcher: str, n_stages: int, n_replicas: int = 1) -> str:
    """The runner's row for a ``launcher`` parameter ('auto': torchrun inside a job, else spawn).

    One stage and one replica run here ('single'); replicas need a process each, so 'local'
    stays 'local' (and is refused with them by the configuration)."""
    if n_stages == 1 and n_replicas == 1:
        return "single"
    if n_stages == 1 and launcher == "local":
        return "local"
    if launcher == "auto":
        return "torchrun" if job_active() else "spawn"
    return launcher


def runner_class(launcher: str) -> type[Runner]:
    if launcher not in RUNNERS:
        raise ValueError(f"launcher {launcher!r} is not one of {sorted(RUNNERS)}")
    return RUNNERS[launcher]


def make_runner(plan: Plan, module: nn.Module, spec: TrainSpec, seed: int = 0) -> Runner:
    """The runner of ``plan.config.launcher``, with its stages built from ``plan``."""
    return runner_class(plan.config.launcher)(plan, module, spec, seed)


@contextmanager
def held_devices(
    config: PipelineConfig, requested: str | Sequence[str]
) -> Iterator[PipelineConfig]:
    """The configuration on the devices this fit holds for as long as the block runs.

    Concurrent fits on one machine (GridSearchCV(n_jobs>1)) never share a device: a lease is
    taken where the runner's row says so (with ``devices='auto'`` on several GPUs it may choose
    other free GPUs, and the configuration names those).
    """
    if not runner_class(config.launcher).leases_devices:
        yield config
        return
    pool = auto_gpu_pool(requested, config.devices)
    with lease_devices(config.devices, config.timeout, choose_from=pool) as lease:
        yield dataclasses.replace(config, devices=execution_devices(lease.devices))
