"""Every rank of a torchrun (or cluster-launched) job holds its own stage; all ranks run the same
loop over the same data, so each sees the same history and ends with the whole network."""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any, ClassVar

import torch
import torch.distributed as dist
from torch import nn

from ._config import TrainSpec
from ._groups import broadcast_object, job_world
from ._plan import Plan
from ._runner import Runner
from ._timeline import Span


class TorchrunRunner(Runner):
    # the job's launcher gave each process its device: nothing to lease
    leases_devices: ClassVar[bool] = False

    def __init__(self, plan: Plan, module: nn.Module, spec: TrainSpec, seed: int = 0) -> None:
        super().__init__(plan, module, spec, seed)
        cfg = self.config
        group = job_world(cfg.devices[0], cfg.n_stages)
        self.rank = dist.get_rank()
        device = cfg.devices[self.rank] if cfg.devices[0] != "cpu" else "cpu"
        if device.startswith("cuda"):
            device = f"cuda:{int(os.environ.get('LOCAL_RANK', self.rank))}"
            torch.cuda.set_device(device)
        self.device = device
        self.host = self._host(plan, module, spec, group)
        self.last = cfg.owner(cfg.n_chunks - 1)

    def _host(self, plan: Plan, module: nn.Module, spec: TrainSpec, group: Any) -> Any:
        from ._stage import StageHost

        return StageHost(
            plan.chunks(module, self.rank),
            self.config,
            spec,
            plan.shapes,
            rank=self.rank,
            device=self.device,
            group=group,
        )

    @staticmethod
    def agree_seed(seed: int) -> int:
        """Rank 0's seed on every rank, so that all ranks build the same network and batches."""
        return int(broadcast_object(seed))  # type: ignore[call-overload]

    @property
    def optimizer(self) -> torch.optim.Optimizer:
        return self.host.optimizer

    def _share(self, t: torch.Tensor | None, shape: tuple[int, ...]) -> torch.Tensor:
        """Broadcast a tensor from the rank holding the last chunk to every rank."""
        buf = t.contiguous() if t is not None else torch.empty(shape, device=self.device)
        dist.broadcast(buf, group_src=self.last)
        return buf.cpu()

    def train_step(
        self, x: torch.Tensor, y: torch.Tensor, w: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        n = x.shape[0]
        loss, out = self.host.train_step(x, y, n, w)
        shared_loss = self._share(None if loss is None else loss.reshape(()).to(self.device), ())
        return shared_loss, self._share(out, (n,) + self.plan.shapes[-1])

    def predict(self, x: torch.Tensor) -> torch.Tensor:
        n = x.shape[0]
        return self._share(self.host.forward(x, n), (n,) + self.plan.shapes[-1])

    def _everyone(self, mine: Any) -> list[Any]:
        everyone: list[Any] = [None] * dist.get_world_size()
        dist.all_gather_object(everyone, mine)
        return everyone

    def record_timeline(self, steps: int) -> None:
        self.host.record_timeline(steps)

    def spans(self) -> list[Span]:
        return [s for spans in self._everyone(self.host.spans()) for s in spans]

    def track_memory(self, on: bool = True) -> None:
        self.host.track_memory(on)

    def stats(self) -> list[dict[str, float]]:
        return self._everyone(self.host.stats())

    def _rank_states(self, optimizers: bool) -> list[tuple[dict[int, Any], dict[str, Any] | None]]:
        mine = (self.host.state_dicts(), self.host.optimizer_state() if optimizers else None)
        return self._everyone(mine)

    def _load_rank_states(self, states: Sequence[tuple[dict[int, Any], dict[str, Any]]]) -> None:
        chunks, optimizer = states[self.rank]
        self.host.load_state(chunks, optimizer)

    def close(self, keep_warm: bool = False) -> None:
        self.host.close()
