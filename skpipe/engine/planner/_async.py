"""The step of skpipe's asynchronous schedules ('2bw', 'pipedream'), predicted by replaying
the executor's own order of work (``asyncpipe._ticks.async_order``: 1F1B across batch
boundaries, an update after each batch or each micro-batch) with the measured costs.

Their pipeline fills and drains once per epoch, so a step is what a batch adds in the steady
state: the replay of 2N batches less that of N (N = 2 x stages, past the fill), divided by N.
An update costs the stage's optimizer step, the copy of its weights kept as the new version,
and with replicas the gradients' all-reduce, which the stage waits for (its ring, at the
measured message cost). The driver's messages go ahead of the batch they carry and are not
waited for.
"""

from __future__ import annotations

import dataclasses

from ..asyncpipe._ticks import async_order
from ..plan._config import PipelineConfig
from ._costs import ring_seconds, stage_sums
from ._measure import LayerProfile, MessageCost, OptimizerCost
from ._simulate import Action, ChunkCost, Simulation, simulate


def async_actions(schedule: str, n_stages: int, m: int, n_batches: int) -> list[list[Action]]:
    """Per stage, the executor's actions for ``n_batches`` batches, as the replay takes them
    (the stage is the chunk; micro-batches counted over the batches)."""
    return [[(t.kind, t.stage, t.mb) for t in ticks]
            for ticks in async_order(schedule, n_stages, m, n_batches)]


def update_seconds(
    profile: LayerProfile,
    config: PipelineConfig,
    bounds: list[tuple[int, int]],
    owners: list[int],
    message: MessageCost,
    optimizer: OptimizerCost | None,
) -> list[float]:
    """What each stage's update costs: optimizer step, weight copy, replicas' all-reduce."""
    nbytes = stage_sums(profile.parameter_bytes, bounds, owners, config.n_stages)
    tensors = stage_sums(profile.parameter_tensors, bounds, owners, config.n_stages)
    k = config.n_replicas
    out = []
    for b, t in zip(nbytes, tensors, strict=True):
        seconds = 0.0 if optimizer is None else (
            optimizer.seconds(b, int(t)) + optimizer.copy_per_byte * b
        )
        if k > 1:  # a ring all-reduce of the stage's gradients, waited for
            seconds += ring_seconds(b, k, message)
        out.append(seconds)
    return out


def predict_async(
    profile: LayerProfile,
    config: PipelineConfig,
    schedule: str,
    m: int,
    costs: list[ChunkCost],
    messages: list[float],
    bounds: list[tuple[int, int]],
    owners: list[int],
    message: MessageCost,
    optimizer: OptimizerCost | None,
) -> tuple[float, list[float], list[float]]:
    """(seconds a batch adds in the steady state, each stage's busy seconds per batch, each
    stage's peak activation bytes) of an asynchronous schedule with ``costs`` per stage and
    ``messages`` seconds from each stage to the next."""
    updates = update_seconds(profile, config, bounds, owners, message, optimizer)
    staged = [dataclasses.replace(c, update=u) for c, u in zip(costs, updates, strict=True)]
    n = 2 * config.n_stages

    def replay(batches: int) -> Simulation:
        return simulate(async_actions(schedule, config.n_stages, m, batches), staged, messages)

    short, long = replay(n), replay(2 * n)
    step = (long.step_seconds - short.step_seconds) / n
    busy = [(b2 - b1) / n for b1, b2 in zip(short.busy_seconds, long.busy_seconds, strict=True)]
    return step, busy, list(long.peak_activation_bytes)
