"""The plan of a fit as a user reads it: per stage and chunk, what it holds and costs."""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass

import torch
from torch import nn

from . import _schedules
from ._config import PipelineConfig
from ._memory import ActivationMeter
from ._plan import Plan


@dataclass
class ChunkReport:
    stage: int
    chunk: int
    layers: str
    n_layers: int
    parameters: int
    parameter_MiB: float
    activation_MiB_per_microbatch: float
    fwd_bwd_ms: float | None


@dataclass
class PlanReport:
    """What a fit will do (``est.plan(X, y)``) or did (``est.plan_``).

    ``chunks`` lists each chunk's stage, layers, parameter count and memory, the activation
    memory held for backward per micro-batch (measured on a micro-batch of the data), and its
    measured forward+backward time when ``balance='time'``. ``bubble`` is the schedule's
    theoretical idle fraction and ``predicted_step_ms`` the step time it implies from the
    slowest stage's measured time (when measured).
    """

    schedule: str
    n_stages: int
    chunks_per_stage: int
    n_microbatches: int
    microbatch_rows: int
    batch_rows: int
    launcher: str
    devices: tuple[str, ...]
    chunks: list[ChunkReport]
    bubble: float
    predicted_step_ms: float | None

    def to_dict(self) -> dict:
        return asdict(self)

    def to_frame(self):  # noqa: ANN201 - pandas is imported on demand
        import pandas as pd

        return pd.DataFrame([asdict(c) for c in self.chunks])

    def __str__(self) -> str:
        head = (
            f"schedule {self.schedule!r}: {self.n_stages} stage(s) x {self.chunks_per_stage} "
            f"chunk(s), {self.n_microbatches} micro-batch(es) of {self.microbatch_rows} rows "
            f"(batch padded to {self.batch_rows}), launcher {self.launcher!r} on {list(self.devices)}"
        )
        cols = ["stage", "chunk", "layers", "params", "param MiB", "act MiB/mb", "f+b ms"]
        rows = [
            [
                str(c.stage),
                str(c.chunk),
                c.layers,
                f"{c.parameters:,}",
                f"{c.parameter_MiB:.3f}",
                f"{c.activation_MiB_per_microbatch:.3f}",
                "-" if c.fwd_bwd_ms is None else f"{c.fwd_bwd_ms:.3f}",
            ]
            for c in self.chunks
        ]
        widths = [max(len(h), *(len(r[i]) for r in rows)) for i, h in enumerate(cols)]
        line = lambda r: "  ".join(v.rjust(w) if i != 2 else v.ljust(w) for i, (v, w) in enumerate(zip(r, widths)))  # noqa: E731
        tail = f"expected bubble: {self.bubble:.1%}"
        if self.predicted_step_ms is not None:
            tail += f"; predicted step time: {self.predicted_step_ms:.2f} ms"
        return "\n".join([head, line(cols), *[line(r) for r in rows], tail])

    def _repr_pretty_(self, p, cycle) -> None:  # noqa: ANN001 - IPython hook
        p.text(str(self))


def _measure_chunk(chunk: nn.Module, x: torch.Tensor) -> tuple[float, float, torch.Tensor]:
    """Activation bytes held for backward and forward+backward seconds on one micro-batch."""
    meter = ActivationMeter(chunk.parameters())
    inp = x.detach().requires_grad_(x.is_floating_point())
    t0 = time.perf_counter()
    with meter.track():
        out = chunk(inp)
    if out.requires_grad:
        out.float().sum().backward()
    seconds = time.perf_counter() - t0
    chunk.zero_grad(set_to_none=True)
    return float(meter.peak), seconds, out.detach()


def build_report(
    plan: Plan, layers: list[nn.Module], config: PipelineConfig, sample: torch.Tensor
) -> PlanReport:
    """Measure each chunk on one micro-batch of ``sample`` (CPU) and assemble the report."""
    mb = config.microbatch_rows
    x = sample[:mb]
    if x.shape[0] < mb:  # too few rows given: repeat them to a full micro-batch
        reps = -(-mb // max(1, x.shape[0]))
        x = x.repeat((reps,) + (1,) * (x.dim() - 1))[:mb]
    reports = []
    measured = plan.layer_costs is not None
    per_rank_seconds = [0.0] * config.n_stages
    for c, (s, e) in enumerate(plan.bounds):
        chunk = plan.chunk_layers(layers, c)
        was_training = chunk.training
        chunk.train()
        act, seconds, x = _measure_chunk(chunk, x)
        chunk.train(was_training)
        cost = sum(plan.layer_costs[s:e]) if measured else None
        per_rank_seconds[plan.owners[c]] += cost if cost is not None else seconds
        names = [plan.layer_names[i] for i in range(s, e)]
        label = f"{s}-{e - 1} " + ",".join(names) if len(names) <= 4 else f"{s}-{e - 1} {names[0]}..{names[-1]}"
        param_bytes = sum(p.numel() * p.element_size() for p in chunk.parameters())
        reports.append(
            ChunkReport(
                stage=plan.owners[c],
                chunk=c,
                layers=label,
                n_layers=e - s,
                parameters=plan.parameters[c],
                parameter_MiB=param_bytes / 2**20,
                activation_MiB_per_microbatch=act / 2**20,
                fwd_bwd_ms=None if cost is None else cost * 1e3,
            )
        )
    bubble = _schedules.bubble_fraction(
        config.schedule, config.n_stages, config.n_microbatches, config.chunks_per_stage
    )
    predicted = None
    if measured:
        slowest = max(per_rank_seconds)
        predicted = 1e3 * _schedules.theoretical_step_time(
            config.schedule, config.n_stages, config.n_microbatches, config.chunks_per_stage,
            slowest / 3, 2 * slowest / 3,
        )
    return PlanReport(
        schedule=config.schedule,
        n_stages=config.n_stages,
        chunks_per_stage=config.chunks_per_stage,
        n_microbatches=config.n_microbatches,
        microbatch_rows=mb,
        batch_rows=config.batch_rows,
        launcher=config.launcher,
        devices=config.devices,
        chunks=reports,
        bubble=bubble,
        predicted_step_ms=predicted,
    )
