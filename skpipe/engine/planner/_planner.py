"""``schedule='auto'``: from the measurements of ``_measure``, simulate every valid
(schedule, micro-batches, chunks per stage, balance) with torch's own orders (``_simulate``),
and choose the fastest plan whose stages fit the memory budget; say when one stage would be
faster.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from ..plan import _config, _schedules
from ..plan._config import PipelineConfig
from ..plan._memory import human_bytes
from ..plan._microbatch import step_rows
from ..plan._report import PlanReport
from ..split._partition import balance_sizes, chunk_bounds, split_by_costs
from ._measure import (
    LayerProfile,
    MessageCost,
    OptimizerCost,
    layer_list,
    measure,
    message_cost,
    optimizer_cost,
    rows_to_measure,
)
from ._async import predict_async
from ..plan._plan import rank_state_bytes
from ._mesh import mesh_split, rank_profile
from ._costs import (
    REPLICA_BUCKET_BYTES,
    chunk_costs,
    driver_message_seconds,
    optimizer_finish,
    replica_sum_seconds,
    stage_sums,
)
from ._simulate import action_order, simulate

__all__ = [
    "BALANCES", "Candidate", "Choice", "LayerProfile", "MessageCost", "annotated",
    "candidates", "choose", "chosen_sizes", "fits_one_device", "layer_list", "measure",
    "message_cost", "OptimizerCost", "optimizer_cost",
    "one_stage_bytes", "one_stage_ms", "predict", "rows_to_measure",
    "REPLICA_BUCKET_BYTES", "driver_message_seconds", "replica_sum_seconds",
]


@dataclass(frozen=True)
class Candidate:
    """One plan the planner considered."""

    schedule: str
    n_microbatches: int
    chunks_per_stage: int
    predicted_step_ms: float
    bubble: float
    peak_stage_MiB: float  # parameters, gradients, optimizer state and peak activations
    fits: bool
    chosen: bool = False
    balance: str = "uniform"
    sizes: tuple[int, ...] = ()  # layers per chunk: the split predicted, which the plan takes
    stage_MiB: tuple[float, ...] = ()  # each stage's peak (the largest is peak_stage_MiB)

    def to_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


def _chunk_options(schedule: str, n_stages: int, n_layers: int, fixed: int | None) -> list[int]:
    spec = _schedules.SCHEDULES[schedule]
    top = spec.max_chunks or 4
    out = [v for v in range(spec.min_chunks, top + 1) if n_stages * v <= n_layers]
    return [v for v in out if fixed is None or v == fixed]


def _microbatch_options(n_stages: int, share: int, fixed: int | None) -> list[int]:
    if fixed is not None:
        return [fixed]
    counts = {n_stages, 2 * n_stages, 4 * n_stages, 8 * n_stages, 16 * n_stages}
    return sorted(m for m in counts if m <= share) or [min(share, n_stages)]


def predict(
    profile: LayerProfile,
    config: PipelineConfig,
    schedule: str,
    m: int,
    v: int,
    message: MessageCost,
    local: bool,
    balance: str | tuple[int, ...] | None = None,
    optimizer: OptimizerCost | None = None,
) -> tuple[float, float, list[float]]:
    """(step seconds, bubble, peak bytes per stage) of one candidate (with ``balance``, or
    the configuration's); ``optimizer``: what its step costs each stage after its last
    backward (None: nothing)."""
    rows = step_rows(config.share_rows, m) // m
    sizes = split_sizes(profile, config, m, v, balance)
    bounds = chunk_bounds(sizes)
    spec = _schedules.SCHEDULES[schedule]
    owners = [_schedules.chunk_owner(c, config.n_stages, v, spec.placement)
              for c in range(len(bounds))]
    costs, rebuilt = chunk_costs(profile, config, spec, rows, bounds, owners, message, local)
    messages = [] if local else [
        message.per_byte * rows * profile.output_bytes_per_row[e - 1] for _, e in bounds[:-1]
    ]
    if spec.asynchronous:  # skpipe's own executor: its order across batches, per batch
        step, busy, activations = predict_async(profile, config, schedule, m, costs, messages,
                                                bounds, owners, message, optimizer)
    else:
        order = action_order(schedule, config.n_stages, m, v, local=local)
        sim = simulate(order, costs, messages)
        busy, activations = sim.busy_seconds, sim.peak_activation_bytes
        step = optimizer_finish(profile, config, bounds, owners, sim, optimizer)
        step += replica_sum_seconds(profile, config, bounds, owners, spec, message, busy)
        if config.launcher == "spawn" and not _config.STEP_AHEAD:
            # torchrun ranks have the data; 'local' sends nothing; spawned stages that take
            # the next batch along compute it while its message and the reply travel
            step += driver_message_seconds(profile, config, message)
    # weights, gradients, two Adam moments, and the versions an asynchronous stage keeps
    params = stage_sums(profile.parameter_bytes, bounds, owners, config.n_stages)
    largest = [0.0] * config.n_stages
    for c, (s, e) in enumerate(bounds):
        largest[owners[c]] = max([largest[owners[c]], *profile.parameter_bytes[s:e]])
    peaks = [
        rank_state_bytes(b, largest[s], config, _schedules.state_copies(schedule, config, s))
        for s, b in enumerate(params)
    ]
    if local:
        activation = activations[0]
        peaks = [p + activation / config.n_stages for p in peaks]
    else:
        peaks = [p + a for p, a in zip(peaks, activations, strict=True)]
    peaks = [p + r for p, r in zip(peaks, rebuilt, strict=True)]
    # the step's inputs on the first chunk's stage, its targets (a stand-in: the outputs'
    # bytes) on the last chunk's, whole: every micro-batch is a view of them
    whole = rows * m
    peaks[owners[0]] += whole * profile.input_bytes_per_row
    peaks[owners[-1]] += whole * (profile.output_bytes_per_row[-1] if bounds else 0.0)
    bubble = 1.0 - sum(busy) / (config.n_stages * step) if step > 0 else 0.0
    return step, bubble, peaks


def split_sizes(
    profile: LayerProfile,
    config: PipelineConfig,
    m: int,
    v: int,
    balance: str | tuple[int, ...] | None = None,
) -> tuple[int, ...]:
    """Layers per chunk of a candidate: the split its prediction is for, and the one the fit's
    plan takes (``make_plan(..., sizes=...)``): 'time' from the profile's forward + full
    backward at the candidate's micro-batch rows, 'parameters' from the parameter sizes,
    'uniform' or a list as given."""
    n_chunks = config.n_stages * v
    n_layers = len(profile.parameter_bytes)
    balance = config.balance if balance is None else balance
    if not isinstance(balance, str) and len(balance) != n_chunks:
        balance = "uniform"  # a list for another chunk count cannot apply
    if balance == "time":  # the measured times (forward + full backward), not measured again
        rows = step_rows(config.share_rows, m) // m
        sizes = split_by_costs([c[0] + c[3] for c in profile.costs(rows)], n_chunks)
    elif balance == "parameters":
        sizes = split_by_costs([float(b) + 1.0 for b in profile.parameter_bytes], n_chunks)
    else:
        sizes, _ = balance_sizes([nn.Identity()] * n_layers, n_chunks, balance)
    return tuple(sizes)


BALANCES = ("uniform", "parameters", "time")


def candidates(
    profile: LayerProfile,
    config: PipelineConfig,
    *,
    message: MessageCost,
    local: bool,
    budget: float | None = None,
    fixed_microbatches: int | None = None,
    fixed_chunks: int | None = None,
    schedules: tuple[str, ...] | None = None,
    balances: tuple[str, ...] | None = None,
    optimizer: OptimizerCost | None = None,
) -> list[Candidate]:
    """Every (schedule, m, v, balance) torch would accept, simulated; sorted fastest first, the
    fastest one that fits marked chosen. ``balances``: the rules to try (default: the
    configuration's own)."""
    n_layers = len(profile.parameter_bytes)
    own = config.balance if isinstance(config.balance, str) else "uniform"
    found = []
    for schedule in schedules or _schedules.SCHEDULE_NAMES:
        for v in _chunk_options(schedule, config.n_stages, n_layers, fixed_chunks):
            for m in _microbatch_options(config.n_stages, config.share_rows, fixed_microbatches):
                try:
                    _schedules.check_microbatches(
                        schedule, config.n_stages, m, v, config.share_rows
                    )
                except ValueError:
                    continue
                for rule in balances or (None,):
                    try:
                        sizes = split_sizes(profile, config, m, v, rule)
                        step, bubble, peaks = predict(
                            profile, config, schedule, m, v, message, local, balance=sizes,
                            optimizer=optimizer,
                        )
                    except ValueError:
                        continue
                    found.append(
                        Candidate(
                            schedule=schedule,
                            n_microbatches=m,
                            chunks_per_stage=v,
                            predicted_step_ms=step * 1e3,
                            bubble=bubble,
                            peak_stage_MiB=max(peaks) / 2**20,
                            fits=budget is None or max(peaks) <= budget,
                            balance=rule or own,
                            sizes=sizes,
                            stage_MiB=tuple(p / 2**20 for p in peaks),
                        )
                    )
    found.sort(key=lambda c: (not c.fits, c.predicted_step_ms))
    if found and found[0].fits:
        found[0] = dataclasses.replace(found[0], chosen=True)
    return found


def one_stage_ms(
    profile: LayerProfile, rows: int, optimizer: OptimizerCost | None = None
) -> float:
    """Predicted step of the whole network on one device for ``rows`` rows (one micro-batch):
    each layer's forward and full backward, then the optimizer's step over every parameter."""
    step = sum(c[0] + c[3] for c in profile.costs(rows))
    if optimizer is not None:
        step += optimizer.seconds(sum(profile.parameter_bytes), sum(profile.parameter_tensors))
    return 1e3 * step


def one_stage_bytes(profile: LayerProfile, rows: int) -> float:
    """Estimated peak of the whole network on one device: 4 x parameter bytes (weights,
    gradients, two Adam moments) and the activations of ``rows`` rows."""
    return 4.0 * sum(profile.parameter_bytes) + rows * sum(profile.activation_bytes_per_row)


def fits_one_device(
    module: nn.Module,
    sample: torch.Tensor,
    config: PipelineConfig,
    budget: float | None,
    threads: int,
) -> bool:
    """Whether the whole network's estimated peak on one device fits ``budget``."""
    if budget is None:
        return True
    rows = rows_to_measure(config.share_rows)
    profile = measure(module, sample, rows, config.devices[0], threads)
    return one_stage_bytes(profile, config.share_rows) <= budget


@dataclass(frozen=True)
class Choice:
    """What the planner chose for a fit, and why."""

    config: PipelineConfig
    candidates: tuple[Candidate, ...]
    one_stage_ms: float | None  # the whole network on one device, per step
    one_stage_fits: bool
    seconds: float  # planning time
    binding: bool = True  # False: a prediction for the configuration as given, not a choice

    @property
    def chosen(self) -> Candidate | None:
        return next((c for c in self.candidates if c.chosen), None)

    @property
    def sizes(self) -> tuple[int, ...] | None:
        """The chosen plan's layers per chunk (None where nothing was chosen, or where this
        is only a prediction: the fit splits as it was told)."""
        best = self.chosen
        return best.sizes if self.binding and best is not None and best.sizes else None

    @property
    def advice(self) -> str | None:
        """Said when one stage is predicted faster and the network fits one device."""
        best = self.chosen
        if best is None or self.one_stage_ms is None or self.config.n_stages == 1:
            return None
        if self.one_stage_fits and self.one_stage_ms < best.predicted_step_ms:
            return (
                f"one stage would be faster here: {self.one_stage_ms:.2f} ms per step predicted "
                f"on one device against {best.predicted_step_ms:.2f} ms for the best pipelined "
                f"plan ({best.schedule}, n_microbatches={best.n_microbatches}), and the network "
                "fits one device; consider n_stages=1."
            )
        return None


def chosen_sizes(choice: Choice | None) -> tuple[int, ...] | None:
    """The split the planner predicted its choice for (None: nothing was planned)."""
    return None if choice is None else choice.sizes


def choose(
    module: nn.Module,
    config: PipelineConfig,
    sample: torch.Tensor,
    *,
    threads: int,
    one_stage_threads: int,
    budget: float | None = None,
    fixed_microbatches: int | None = None,
    fixed_chunks: int | None = None,
    schedules: tuple[str, ...] | None = None,
    balances: tuple[str, ...] | None = None,
    optimizer: tuple[Callable[..., torch.optim.Optimizer], dict[str, Any]] | None = None,
) -> Choice:
    """The fastest valid (schedule, m, chunks) for ``config``'s stages whose stages fit
    ``budget``; ``config`` comes back with them. Raises ValueError when none fits.
    ``optimizer``: the fit's optimizer class and settings, whose step is timed and predicted."""
    import time

    t0 = time.perf_counter()
    device = config.devices[0]
    rows = rows_to_measure(config.share_rows)
    profile = measure(module, sample, rows, device, threads)
    local = config.launcher == "local"
    alone = config.n_stages == 1 and config.n_replicas == 1 and config.tensor_parallel == 1
    message = MessageCost(0.0, 0.0, 0.0) if local or alone else message_cost(device)
    # what one rank of the mesh computes, holds and sends (tensor shards, sharded replicas)
    ranked = rank_profile(profile, config, message, mesh_split(module, sample, config))
    found = candidates(
        ranked,
        config,
        message=message,
        local=local,
        budget=budget,
        fixed_microbatches=fixed_microbatches,
        fixed_chunks=fixed_chunks,
        schedules=schedules,
        balances=balances,
        optimizer=None if optimizer is None else optimizer_cost(*optimizer, device, threads),
    )
    single = profile if one_stage_threads == threads else measure(
        module, sample, rows, device, one_stage_threads
    )
    share = config.share_rows
    choice = Choice(
        config=config,
        candidates=tuple(found),
        one_stage_ms=one_stage_ms(
            single,
            share,
            None if optimizer is None else optimizer_cost(*optimizer, device, one_stage_threads),
        ),
        one_stage_fits=budget is None or one_stage_bytes(profile, share) <= budget,
        seconds=time.perf_counter() - t0,
    )
    best = choice.chosen
    if best is None:
        least = min((c.peak_stage_MiB for c in found), default=float("nan"))
        raise ValueError(
            f"stage_memory_budget ({human_bytes(budget or 0)}) is too small for every plan of "
            f"n_stages={config.n_stages}: the smallest stage peak found is "
            f"{human_bytes(least * 2**20)}. "
            "Raise the budget or add stages (n_stages='auto' takes the fewest that fit)."
        )
    chosen = dataclasses.replace(
        config,
        schedule=best.schedule,
        n_microbatches=best.n_microbatches,
        chunks_per_stage=best.chunks_per_stage,
        batch_rows=step_rows(config.share_rows, best.n_microbatches),
        balance=best.balance if balances else config.balance,
    )
    return dataclasses.replace(choice, config=chosen)


def annotated(report: PlanReport, choice: Choice | None) -> PlanReport:
    """The plan report with the planner's table, prediction and advice (as it was without)."""
    if choice is None:
        return report
    best = choice.chosen
    return dataclasses.replace(
        report,
        candidates=[c.to_dict() for c in choice.candidates],
        predicted_step_ms=best.predicted_step_ms if best else report.predicted_step_ms,
        bubble=best.bubble if best else report.bubble,
        # one peak figure per stage: the planner's, which it chose by
        stage_MiB=list(best.stage_MiB) if best and best.stage_MiB else report.stage_MiB,
        one_stage_step_ms=choice.one_stage_ms,
        advice=choice.advice,
        planning_seconds=choice.seconds,
    )
