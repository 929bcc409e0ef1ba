"""Every stage inside the user's process (world size 1): torch's multi-stage runtime, no workers."""

from __future__ import annotations

import torch
from torch import nn

from ._config import PipelineConfig, TrainSpec
from ._plan import make_plan
from ._runner import Runner
from ._stage import StageHost, ensure_local_group


class LocalRunner(Runner):
    """The chunks share their layers with ``module``, so training updates it in place."""

    def __init__(
        self, module: nn.Module, config: PipelineConfig, spec: TrainSpec, sample: torch.Tensor
    ) -> None:
        self.config = config
        self.module = module
        self.plan, self.layers = make_plan(module, config, sample)
        group = ensure_local_group(config.devices[0])
        chunks = {c: self.plan.chunk_layers(self.layers, c) for c in range(config.n_chunks)}
        self.host = StageHost(
            chunks, config, spec, self.plan.shapes, rank=0, device=config.devices[0], group=group
        )
        self.optimizer = self.host.optimizer

    def train_step(self, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        loss, out = self.host.train_step(x, y, x.shape[0])
        assert loss is not None and out is not None
        return loss.cpu(), out.cpu()

    def predict(self, x: torch.Tensor) -> torch.Tensor:
        out = self.host.forward(x, x.shape[0])
        assert out is not None
        return out.cpu()

    def record_timeline(self, steps: int) -> None:
        self.host.record_timeline(steps)

    def spans(self) -> list:
        return self.host.spans()

    def finish(self) -> None:
        self.module.to("cpu")

    def close(self) -> None:
        self.host.close()
