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
SHARDS = ("none", "optimizer", "full")

# Whether a spawned synchronous step's next batch goes along with it (``P.SyncStep``): the
# stages then compute its forward and backward while the driver runs the step's callbacks and
# makes the next message, instead of waiting for them (nothing of the step's update is needed
# before it). Read by the spawn runner and by the planner, which then counts no driver round
# trip in the step. Measured in benchmarks/scaling.py --only ahead. False only to measure what
# it saves.
STEP_AHEAD = True


@dataclass(frozen=True, kw_only=True)
class PipelineConfig:
    """How a fit is laid out: stages, micro-batches, schedule, placement and launcher.

    ``launcher`` here is resolved ('single', 'local', 'spawn' or 'torchrun'); ``devices`` has one
    entry per rank (one entry with one stage and one replica).

    With ``n_replicas`` > 1 the fit runs that many copies of the pipeline on a (replica x stage)
    mesh: rank ``replica * n_stages + stage`` (a pipeline's stages are neighbouring ranks, so a
    job that fills whole machines keeps each pipeline inside one). Each replica trains on its
    share of every batch (``share_rows`` rows of a full one) and the replicas' gradients are
    summed, so the step is the one-device step.

    With ``tensor_parallel`` = t > 1 each (replica, stage) position is t ranks that hold the
    stage's layers sharded (``parallel._tensor``): the mesh is (replica x stage x tensor), the
    tensor dimension innermost, rank ``(replica * n_stages + stage) * t + tensor``. ``shard``:
    how the replicas hold their state ('none': each a whole copy; 'optimizer' and 'full':
    sharded over the replicas with torch's FSDP2, see ``parallel._sharding``).
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
    batch_rows: int  # rows of every step of a replica: its share padded to a multiple of m
    precision: str = "float32"
    max_grad_norm: float | None = None
    # whether the fit clips by the global gradient norm (max_grad_norm or a callback): a
    # '2bw' stage then holds a batch's gradient until the norm is summed
    clips_gradients: bool = False
    timeout: float = 300.0
    n_replicas: int = 1
    tensor_parallel: int = 1
    shard: str = "none"
    # the checked tensor-parallel plan, (submodule pattern, style) pairs (parallel._tensor)
    tp_plan: tuple[tuple[str, Any], ...] = ()

    @property
    def world_size(self) -> int:
        """Processes (ranks) of the fit: one per (replica, stage, tensor shard)."""
        return self.n_replicas * self.n_stages * self.tensor_parallel

    @property
    def share_rows(self) -> int:
        """Rows each replica takes of a full batch (the first replicas one more when uneven)."""
        return -(-self.batch_size // self.n_replicas)

    def stage_of(self, rank: int) -> int:
        """The pipeline stage a rank of the (replica x stage x tensor) mesh holds."""
        return (rank // self.tensor_parallel) % self.n_stages

    def replica_of(self, rank: int) -> int:
        return rank // (self.tensor_parallel * self.n_stages)

    def tensor_of(self, rank: int) -> int:
        """Which of its stage's tensor shards a rank holds."""
        return rank % self.tensor_parallel

    def rank_of(self, replica: int, stage: int, tensor: int = 0) -> int:
        return (replica * self.n_stages + stage) * self.tensor_parallel + tensor

    @property
    def collective_state(self) -> bool:
        """Whether reading a stage's state takes every rank that holds a part of it (tensor
        shards; replicas' shards): then every rank is asked, and the owner's answer kept."""
        return self.tensor_parallel > 1 or self.shard != "none"

    def state_ranks(self) -> list[int]:
        """The ranks asked for the stages' state: replica 0's, or all where it is sharded."""
        if self.shard != "none":
            return list(range(self.world_size))
        return list(range(self.n_stages * self.tensor_parallel))

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
    """What every stage needs to train: the optimizer recipe, the criterion, and the
    global-norm gradient clips the fit's callbacks ask for ((max_norm, norm_type), in order;
    ``max_grad_norm`` comes after them)."""

    optimizer: Callable[..., torch.optim.Optimizer]
    optimizer_kwargs: dict[str, Any] = field(default_factory=dict)
    criterion: nn.Module
    grad_clips: tuple[tuple[float, float], ...] = ()


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
    clips_gradients: bool = False,
    timeout: float,
    n_replicas: int = 1,
    tensor_parallel: int = 1,
    shard: str = "none",
) -> PipelineConfig:
    """Resolve the 'auto' values and check the combination; messages name the values."""
    n_replicas = _count("n_replicas", n_replicas)
    tensor_parallel = _count("tensor_parallel", tensor_parallel)
    if shard not in SHARDS:
        raise ValueError(f"shard must be one of {list(SHARDS)}; got {shard!r}.")
    if shard != "none" and n_replicas == 1:
        raise ValueError(
            f"shard={shard!r} shards the state over the replicas, but n_replicas=1: there is "
            "nothing to shard it over; set n_replicas >= 2, or shard='none'."
        )
    for name, value, default in (("tensor_parallel", tensor_parallel, 1), ("shard", shard, "none")):
        if value != default and launcher in ("local", "single"):
            raise ValueError(
                f"{name}={value!r} needs one process per rank of the (replica x stage x tensor) "
                f"mesh, but launcher={launcher!r} runs everything in this process; use "
                f"launcher='spawn' (or 'torchrun', or 'auto'), or {name}={default!r}."
            )
    if n_replicas > 1 and launcher in ("local", "single"):
        raise ValueError(
            f"n_replicas={n_replicas} needs one process per (replica, stage), but "
            f"launcher={launcher!r} runs everything in this process; use launcher='spawn' "
            "(or 'torchrun', or 'auto'), or n_replicas=1."
        )
    if schedule not in _schedules.SCHEDULES:
        raise ValueError(f"schedule {schedule!r} is not one of {list(_schedules.SCHEDULES)}.")
    _check_parallel(schedule, tensor_parallel, shard, n_stages)
    chunks = 1 if n_stages == 1 else _schedules.resolve_chunks(schedule, chunks_per_stage)
    n_stages, batch_size = _count("n_stages", n_stages), _count("batch_size", batch_size)
    if n_replicas > batch_size:
        raise ValueError(
            f"n_replicas ({n_replicas}) must be <= batch_size ({batch_size}): every replica "
            "takes at least one row of a full batch; lower n_replicas or raise batch_size."
        )
    share = -(-batch_size // n_replicas)  # the rows the largest replica share holds
    if n_microbatches == "auto":
        m = _schedules.auto_microbatches(schedule, n_stages, chunks, share)
    else:
        m = _count("n_microbatches", n_microbatches)
    if n_replicas > 1 and m > share:
        raise ValueError(
            f"n_microbatches ({m}) must be <= the rows each replica takes of a batch "
            f"({share}: batch_size={batch_size} over n_replicas={n_replicas}); lower "
            "n_microbatches or n_replicas, or raise batch_size."
        )
    _schedules.check_microbatches(schedule, n_stages, m, chunks, share)
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
        batch_rows=step_rows(share, m),
        precision=precision,
        max_grad_norm=max_grad_norm,
        clips_gradients=clips_gradients or max_grad_norm is not None,
        timeout=timeout,
        n_replicas=n_replicas,
        tensor_parallel=tensor_parallel,
        shard=shard,
    )


def _check_parallel(schedule: str, tensor_parallel: int, shard: str, n_stages: Any) -> None:
    """Refuse, by name, the schedules tensor shards or sharded replicas do not run under."""
    row = _schedules.SCHEDULES[schedule]
    for name, value, default in (("tensor_parallel", tensor_parallel, 1), ("shard", shard, "none")):
        if value != default and row.asynchronous:
            raise ValueError(
                f"schedule={schedule!r} is skpipe's own asynchronous executor, which keeps "
                f"whole weight versions per stage and does not run {name}={value!r}; use a "
                f"synchronous schedule (e.g. '1f1b'), or {name}={default!r}."
            )
    if row.zero_bubble and n_stages != 1:
        for name, value, default, why in (
            ("shard", shard, "none", "FSDP2 reduces each layer's gradients when its backward "
             "is done, before the weight part"),
            ("tensor_parallel", tensor_parallel, 1, "torch's split backward cannot detach a "
             "tensor shard's gradients (RuntimeError: Can't detach views in-place, torch "
             "2.13)"),
        ):
            if value != default:
                raise ValueError(
                    f"{name}={value!r} does not run under schedule={schedule!r}, which splits "
                    f"the backward into input and weight parts: {why}. Use '1f1b', 'gpipe', "
                    f"'interleaved_1f1b' or 'looped_bfs', or {name}={default!r}."
                )


def _count(name: str, value: Any) -> int:
    """A positive whole number as a plain int: Python's and numpy's integers alike."""
    if isinstance(value, bool) or not isinstance(value, Integral) or value < 1:
        raise ValueError(f"{name} must be a positive int; got {value!r}.")
    return int(value)
