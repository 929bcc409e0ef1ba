"""Every stage inside the user's process (world size 1): torch's multi-stage runtime, no workers."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import torch
from torch import nn

from ..parallel._groups import local_world
from ..plan._config import TrainSpec
from ..plan._plan import Plan
from ..plan._timeline import Span
from ..split._construct import materialize
from ..workers._stage import StageHost
from ._runner import InProcessState, Runner


class LocalRunner(InProcessState, Runner):
    """The chunks share their layers with ``module``, so training updates it in place."""

    def __init__(self, plan: Plan, module: nn.Module, spec: TrainSpec, seed: int = 0) -> None:
        super().__init__(plan, module, spec, seed)
        device = self.config.devices[0]
        materialize(module)  # built on meta (planned for other homes): its values, here
        self.host = StageHost(
            plan.chunks(module),
            self.config,
            # the callbacks clip the gradients themselves here (on_grad_computed)
            dataclasses.replace(spec, grad_clips=()),
            plan.shapes,
            rank=0,
            device=device,
            group=local_world(device),
        )

    @property
    def optimizer(self) -> torch.optim.Optimizer:
        return self.host.optimizer

    def train_step(
        self,
        x: torch.Tensor,
        y: torch.Tensor,
        w: torch.Tensor | None = None,
        on_grads: Callable[[], None] | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        loss, out = self.host.train_step(x, y, x.shape[0], w, on_grads=on_grads)
        if loss is None or out is None:  # pragma: no cover - the one process holds the last chunk
            raise RuntimeError("the local pipeline returned no loss")
        return loss.cpu(), out.cpu()

    def predict(self, x: torch.Tensor) -> torch.Tensor:
        out = self.host.forward(x, x.shape[0])
        if out is None:  # pragma: no cover - the one process holds the last chunk
            raise RuntimeError("the local pipeline returned no output")
        return out.cpu()

    def record_timeline(self, steps: int) -> None:
        self.host.record_timeline(steps)

    def spans(self) -> list[Span]:
        return self.host.spans()

    def track_memory(self, on: bool = True) -> None:
        self.host.track_memory(on)

    def stats(self) -> list[dict[str, float]]:
        return [self.host.stats()]

    def close(self, keep_warm: bool = False) -> None:
        self.host.close()
