"""The one interface the estimator talks to, and the choice of the home that runs the stages."""

from __future__ import annotations

import os
from abc import ABC, abstractmethod
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from ._config import PipelineConfig, TrainSpec


class Runner(ABC):
    """Trains ``module`` one batch at a time; the caller owns the loop.

    ``train_step`` returns the batch loss and the outputs of the real rows (on the CPU),
    ``predict`` runs forward only in eval mode, ``finish`` leaves the trained weights in
    ``module`` on the CPU, ``close`` releases workers and devices (always safe to call).
    """

    config: PipelineConfig
    module: nn.Module
    optimizer: torch.optim.Optimizer | None = None
    # the split the stages were built from (None with one stage), and the layers it indexes
    plan = None
    layers: list[nn.Module] = []

    @abstractmethod
    def train_step(self, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]: ...

    @abstractmethod
    def predict(self, x: torch.Tensor) -> torch.Tensor: ...

    @abstractmethod
    def finish(self) -> None: ...

    def close(self) -> None:  # noqa: B027 - optional hook
        pass

    # -- checkpoints: the whole network and every stage's optimizer state ------------------------
    def get_state(self) -> dict[str, Any]:
        """``{'module': state dict of the whole network (CPU), 'optimizers': [per rank]}``."""
        assert self.optimizer is not None
        return {"module": _cpu(self.module.state_dict()), "optimizers": [_cpu(self.optimizer.state_dict())]}

    def _load_chunks(self, chunk_states: Any) -> None:
        """Copy chunk parameters gathered from the ranks (``{chunk: state}`` per rank) into the
        layers of ``module``, which the chunks of this process's plan share."""
        for states in chunk_states:
            for c, state in states.items():
                self.plan.chunk_layers(self.layers, c).load_state_dict(state)

    def set_state(self, state: dict[str, Any]) -> None:
        assert self.optimizer is not None
        self.module.load_state_dict(state["module"])
        self.optimizer.load_state_dict(state["optimizers"][0])

    def __enter__(self) -> Runner:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def torchrun_active() -> bool:
    """True when a process group exists or torchrun's environment says one should."""
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        return True
    return "TORCHELASTIC_RUN_ID" in os.environ and int(os.environ.get("WORLD_SIZE", "1")) > 1


def resolve_launcher(launcher: str, n_stages: int) -> str:
    if n_stages == 1:
        return "single"
    if launcher == "auto":
        return "torchrun" if torchrun_active() else "spawn"
    return launcher


def make_runner(
    module: nn.Module,
    config: PipelineConfig,
    spec: TrainSpec,
    sample: torch.Tensor,
    seed: int = 0,
) -> Runner:
    """Build the runner for ``config.launcher``; ``sample`` is a few rows of X."""
    if config.launcher == "single":
        from ._single import SingleRunner

        return SingleRunner(module, config, spec)
    if config.launcher == "local":
        from ._local import LocalRunner

        return LocalRunner(module, config, spec, sample)
    if config.launcher == "spawn":
        from ._workers import SpawnRunner

        return SpawnRunner(module, config, spec, sample, seed)
    if config.launcher == "torchrun":
        from ._torchrun import TorchrunRunner

        return TorchrunRunner(module, config, spec, sample)
    raise ValueError(f"launcher {config.launcher!r} is not known")


def _cpu(obj: Any) -> Any:
    """A copy of a (nested) state dict with every tensor on the CPU."""
    if isinstance(obj, torch.Tensor):
        return obj.detach().cpu().clone()
    if isinstance(obj, dict):
        return {k: _cpu(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(_cpu(v) for v in obj)
    return obj
