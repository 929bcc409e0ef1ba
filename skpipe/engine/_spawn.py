"""One worker process per pipeline rank, started (or taken warm) from the user's process; the
training loop stays in this process and every step is one message to each worker."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, ClassVar

import torch
from torch import nn

from . import _protocol as P
from ._config import TrainSpec
from ._plan import Plan
from ._pool import STARTUP_TIMEOUT, acquire_group, release_group
from ._runner import Runner
from ._timeline import Span


class SpawnRunner(Runner):
    """Drives one worker per pipeline rank."""

    optimizer_in_driver: ClassVar[bool] = False

    def __init__(self, plan: Plan, module: nn.Module, spec: TrainSpec, seed: int = 0) -> None:
        super().__init__(plan, module, spec, seed)
        cfg = self.config
        self.first = cfg.owner(0)
        self.last = cfg.owner(cfg.n_chunks - 1)
        self.group = acquire_group(cfg.n_stages, cfg.devices, cfg.timeout)
        try:
            setups = [
                P.Setup(
                    chunks=plan.chunks(module, rank),
                    config=cfg,
                    spec=spec,
                    shapes=list(plan.shapes),
                    device=cfg.devices[rank],
                    seed=seed,
                )
                for rank in range(cfg.n_stages)
            ]
            self.group.ask_all(setups, timeout=max(cfg.timeout, STARTUP_TIMEOUT))
        except BaseException:
            self.group.close()
            raise

    def _to(self, rank: int, holder: int, t: torch.Tensor) -> Any:
        """A tensor as numpy for the rank that needs it; None for the others."""
        return t.numpy() if rank == holder else None

    def train_step(
        self, x: torch.Tensor, y: torch.Tensor, w: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        n = x.shape[0]
        replies = self.group.ask_all(
            [
                P.Step(
                    self._to(r, self.first, x),
                    self._to(r, self.last, y),
                    n,
                    None if w is None else self._to(r, self.last, w),
                )
                for r in range(self.config.n_stages)
            ]
        )
        loss, out = replies[self.last]
        return torch.from_numpy(loss), torch.from_numpy(out)

    def predict(self, x: torch.Tensor) -> torch.Tensor:
        n = x.shape[0]
        replies = self.group.ask_all(
            [P.Forward(self._to(r, self.first, x), n) for r in range(self.config.n_stages)]
        )
        return torch.from_numpy(replies[self.last])

    def record_timeline(self, steps: int) -> None:
        self.group.ask_all(P.RecordTimeline(steps))

    def spans(self) -> list[Span]:
        return [s for spans in self.group.ask_all(P.Spans()) for s in spans]

    def track_memory(self, on: bool = True) -> None:
        self.group.ask_all(P.TrackMemory(on))

    def stats(self) -> list[dict[str, float]]:
        return list(self.group.ask_all(P.Stats()))

    def _rank_states(self, optimizers: bool) -> list[tuple[dict[int, Any], dict[str, Any] | None]]:
        if optimizers:
            return list(self.group.ask_all(P.GetState()))
        return [(chunks, None) for chunks in self.group.ask_all(P.Collect())]

    def _load_rank_states(self, states: Sequence[tuple[dict[int, Any], dict[str, Any]]]) -> None:
        self.group.ask_all([P.SetState(chunks, opt) for chunks, opt in states])

    def close(self, keep_warm: bool = False) -> None:
        """Healthy workers go back warm when asked; any other end stops them."""
        if keep_warm and self.group.alive():
            release_group(self.group)
        else:
            self.group.close()
