"""The frozen configuration of one fit: every cross-parameter rule is checked here, once."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from numbers import Integral
from typing import Any

import torch
from torch import nn

from . import _schedules
from ._microbatch import step_rows

LAUNCHERS = ("auto", "spawn", "local", "torchrun")
CHECKPOINTS = ("never", "except_last", "always")
PRECISIONS = ("float32", "bf16")


@dataclass(frozen=True, kw_only=True)
class PipelineConfig:
    """How a fit is laid out: stages, micro-batches, schedule, placement and launcher.

    ``launcher`` here is resolved ('single', 'local', 'spawn' or 'torchrun'); ``devices`` has one
    entry per pipeline rank (one entry when ``n_stages == 1``).
    """

    n_stages: int
    n_microbatches: int
    schedule: str
    chunks_per_stage: int
    balance: str | tuple[int, ...]
    checkpoint: str
    launcher: str
    devices: tuple[str, ...]
    batch_size: int  # rows of a full batch, as the user asked
    batch_rows: int  # rows of every step: batch_size padded to a multiple of n_microbatches
    precision: str = "float32"
    max_grad_norm: float | None = None
    timeout: float = 300.0

    @property
    def n_chunks(self) -> int:
        return self.n_stages * self.chunks_per_stage

    @property
    def placement(self) -> _schedules.Placement:
        return _schedules.SCHEDULES[self.schedule].placement

    def owner(self, chunk: int) -> int:
        return _schedules.chunk_owner(chunk, self.n_stages, self.chunks_per_stage, self.placement)

    def chunks_of(self, rank: int) -> list[int]:
        return _schedules.chunks_of_rank(rank, self.n_stages, self.chunks_per_stage, self.placement)

    @property
    def microbatch_rows(self) -> int:
        return self.batch_rows // self.n_microbatches


@dataclass(frozen=True, kw_only=True)
class TrainSpec:
    """What every stage needs to train: the optimizer recipe and the criterion."""

    optimizer: Callable[..., torch.optim.Optimizer]
    optimizer_kwargs: dict[str, Any] = field(default_factory=dict)
    criterion: nn.Module


def make_config(
    *,
    n_stages: int,
    n_microbatches: int | str,
    schedule: str,
    chunks_per_stage: int | str,
    balance: str | tuple[int, ...],
    checkpoint: str,
    launcher: str,
    devices: tuple[str, ...],
    batch_size: int,
    precision: str,
    max_grad_norm: float | None,
    timeout: float,
) -> PipelineConfig:
    """Resolve the 'auto' values and check the combination; messages name the values."""
    if schedule not in _schedules.SCHEDULES:
        raise ValueError(f"schedule {schedule!r} is not one of {list(_schedules.SCHEDULE_NAMES)}.")
    chunks = 1 if n_stages == 1 else _schedules.resolve_chunks(schedule, chunks_per_stage)
    n_stages, batch_size = _count("n_stages", n_stages), _count("batch_size", batch_size)
    if n_microbatches == "auto":
        m = _schedules.auto_microbatches(schedule, n_stages, chunks, batch_size)
    else:
        m = _count("n_microbatches", n_microbatches)
    _schedules.check_microbatches(schedule, n_stages, m, chunks, batch_size)
    if not isinstance(balance, str):
        balance = tuple(int(b) if isinstance(b, Integral) else b for b in balance)
    if not isinstance(balance, str) and len(balance) != n_stages * chunks:
        raise ValueError(
            f"balance {list(balance)} has {len(balance)} entries but the pipeline has "
            f"{n_stages * chunks} chunks (n_stages={n_stages} x chunks_per_stage={chunks}); "
            "give one layer count per chunk."
        )
    return PipelineConfig(
        n_stages=n_stages,
        n_microbatches=m,
        schedule=schedule,
        chunks_per_stage=chunks,
        balance=balance,
        checkpoint=checkpoint,
        launcher=launcher,
        devices=devices,
        batch_size=batch_size,
        batch_rows=step_rows(batch_size, m),
        precision=precision,
        max_grad_norm=max_grad_norm,
        timeout=timeout,
    )


def _count(name: str, value: Any) -> int:
    """A positive whole number as a plain int: Python's and numpy's integers alike."""
    if isinstance(value, bool) or not isinstance(value, Integral) or value < 1:
        raise ValueError(f"{name} must be a positive int; got {value!r}.")
    return int(value)
