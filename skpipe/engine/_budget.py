"""``n_microbatches='auto'`` under a memory budget per stage.

Rule: start from the count the plain 'auto' rule picks (the largest of 4p, 2p, p that the
schedule accepts). If a stage would hold more than ``stage_memory_budget`` bytes, raise the
count (smaller micro-batches hold fewer activations) to the smallest accepted count that fits.
A stage's memory is estimated as

    static + in_flight(m) x rows_per_microbatch(m) x activation_bytes_per_row

where ``static`` is 4 x its parameter bytes (weights, gradients and two Adam moments: an upper
bound for SGD), ``activation_bytes_per_row`` is measured by running each chunk on a micro-batch
of the data (the tensors autograd keeps for backward), and ``in_flight`` is the number of
micro-batches a stage holds at its peak: m for GPipe and looped BFS, min(m, p x chunks) for
1F1B and the interleaved, zero-bubble and V schedules.
"""

from __future__ import annotations

import dataclasses
import math

import torch
from torch import nn

from . import _schedules
from ._config import PipelineConfig
from ._microbatch import step_rows
from ._plan import make_plan
from ._report import build_report


def in_flight(schedule: str, n_stages: int, chunks: int, m: int) -> int:
    if schedule in ("gpipe", "looped_bfs"):
        return m
    return min(m, n_stages * chunks)


def stage_bytes(config: PipelineConfig, static: list[float], per_row: list[float], m: int, batch: int) -> list[float]:
    rows = math.ceil(batch / m)
    held = in_flight(config.schedule, config.n_stages, config.chunks_per_stage, m)
    return [static[r] + held * rows * per_row[r] for r in range(config.n_stages)]


def fit_budget(
    module: nn.Module, config: PipelineConfig, sample: torch.Tensor, budget: float, batch: int
) -> PipelineConfig:
    """The configuration with the micro-batch count chosen under ``budget`` bytes per stage."""
    plan, layers = make_plan(module, config, sample)
    report = build_report(plan, layers, config, sample)
    static = [0.0] * config.n_stages
    per_row = [0.0] * config.n_stages
    for chunk in report.chunks:
        static[chunk.stage] += 4 * chunk.parameter_MiB * 2**20
        per_row[chunk.stage] += chunk.activation_MiB_per_microbatch * 2**20 / report.microbatch_rows
    candidates = [config.n_microbatches] + [
        m for m in range(config.n_microbatches + 1, batch + 1)
    ]
    for m in candidates:
        try:
            _schedules.check_microbatches(config.schedule, config.n_stages, m, config.chunks_per_stage, batch)
        except ValueError:
            continue
        need = stage_bytes(config, static, per_row, m, batch)
        if max(need) <= budget:
            return dataclasses.replace(config, n_microbatches=m, batch_rows=step_rows(batch, m))
    least = stage_bytes(config, static, per_row, batch, batch)
    worst = max(range(config.n_stages), key=lambda r: least[r])
    raise ValueError(
        f"stage_memory_budget ({budget / 2**20:.1f} MiB) is too small: even with one row per "
        f"micro-batch, stage {worst} needs about {least[worst] / 2**20:.1f} MiB (parameters, "
        f"gradients and optimizer state {static[worst] / 2**20:.1f} MiB). Raise the budget, "
        "add stages, or use checkpoint='always'."
    )
