"""The layout behind ``schedule='auto'`` and ``n_stages='auto'``: which stages, schedule,
micro-batches and chunks a fit uses, chosen by the engine's planner from measurements.

``schedule='auto'``: the fastest (schedule, n_microbatches, chunks_per_stage) predicted for the
given ``n_stages`` whose stages fit ``stage_memory_budget``; an ``n_microbatches`` or
``chunks_per_stage`` given as a number is kept. ``balance='auto'``: the planner also tries
'uniform', 'parameters' and 'time' (from its own measurements) for every candidate.
``n_stages='auto'`` (needs ``stage_memory_budget``): the fewest stages whose plan fits the
budget, then the fastest plan for that count (with the given schedule, or any with
``schedule='auto'``).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from numbers import Integral
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from ..engine.parallel._devices import resolve_devices, threads_per_worker
from ..engine.parallel._groups import broadcast_object, job_world
from ..engine.plan._config import PipelineConfig, make_config
from ..engine.plan._memory import human_bytes
from ..engine.plan._schedules import SCHEDULES
from ..engine.planner import _planner
from ..engine.runners._runners import resolve_launcher, runner_class
from ._checks import check_asynchronous, check_callbacks_fit, grad_clips


def provisional_schedule(chunks_per_stage: int | str) -> str:
    """A schedule that accepts any micro-batch count and the chunks given, to validate the
    rest of the configuration before the planner picks the real one."""
    if isinstance(chunks_per_stage, Integral) and chunks_per_stage > 1:
        return "looped_bfs"
    return "gpipe"


def _threads(config: PipelineConfig) -> int:
    """CPU threads each stage's process will compute with."""
    if config.launcher == "spawn" and config.devices[0] == "cpu":
        return threads_per_worker(config.world_size)
    return torch.get_num_threads()


def choose_layout(
    est: Any,
    module: nn.Module,
    sample: torch.Tensor,
    config_for: Callable[[int, str], PipelineConfig],
    first: PipelineConfig,
    optimizer: tuple[Callable[..., torch.optim.Optimizer], dict[str, Any]] | None = None,
    predict: bool = False,
) -> tuple[PipelineConfig, _planner.Choice | None]:
    """The configuration a fit runs with, and the planner's choice behind it (None when nothing
    was 'auto'). ``config_for(n_stages, schedule)`` makes a validated configuration;
    ``optimizer``: the fit's optimizer class and settings (its step is predicted too).
    ``predict`` (``plan()``): an asynchronous schedule's step is predicted even when nothing
    is 'auto' (the configuration stays as given)."""
    auto_schedule = est.schedule == "auto"
    auto_stages = est.n_stages == "auto"
    auto_balance = isinstance(est.balance, str) and est.balance == "auto"
    if not (auto_schedule or auto_stages or auto_balance):
        if predict and SCHEDULES[first.schedule].asynchronous:
            return first, _prediction(module, sample, first, optimizer)
        return first, None
    budget = None if est.stage_memory_budget is None else float(est.stage_memory_budget)
    if auto_stages and budget is None:
        raise ValueError(
            "n_stages='auto' takes the fewest stages whose plan fits stage_memory_budget, but "
            "stage_memory_budget is None; give a budget in bytes per stage, or set n_stages."
        )
    fixed_m = int(est.n_microbatches) if isinstance(est.n_microbatches, Integral) else None
    fixed_v = int(est.chunks_per_stage) if isinstance(est.chunks_per_stage, Integral) else None
    schedules = None if auto_schedule else (est.schedule,)
    if first.launcher == "torchrun" or not auto_stages:
        counts = [first.n_stages]  # a job's world fixes the stages
    else:
        n_layers = max(1, len(_planner.layer_list(module, sample)))
        counts = list(range(1, n_layers + 1))
    last_error: ValueError | None = None
    for n in counts:
        config = first if n == first.n_stages else dataclasses.replace(
            config_for(n, first.schedule), tp_plan=first.tp_plan
        )
        if n == 1:
            if not auto_stages:
                return config, None  # one stage: nothing to split or plan
            if _planner.fits_one_device(module, sample, config, budget, _threads(config)):
                return config, None
            continue
        if not isinstance(est.balance, str) and len(est.balance) % n == 0:
            fixed_v = len(est.balance) // n
        if config.launcher == "torchrun":
            # rank 0 plans; every rank runs its choice (their measurements would differ)
            job_world(config.devices[0], config.n_stages, config.n_replicas)
            if dist.get_rank() != 0:
                return _received(broadcast_object(None))
        try:
            choice = _planner.choose(
                module,
                config,
                sample,
                threads=_threads(config),
                one_stage_threads=torch.get_num_threads(),
                budget=budget,
                fixed_microbatches=fixed_m,
                fixed_chunks=fixed_v,
                schedules=schedules,
                balances=_planner.BALANCES if auto_balance else None,
                optimizer=optimizer,
            )
        except ValueError as exc:
            last_error = exc
            if auto_stages and config.launcher != "torchrun":
                continue
            if config.launcher == "torchrun":
                broadcast_object(str(exc))  # the other ranks raise it too
            raise
        if config.launcher == "torchrun":
            broadcast_object(choice)
        return choice.config, choice
    raise ValueError(
        f"n_stages='auto': no number of stages up to {counts[-1]} fits stage_memory_budget "
        f"({human_bytes(budget or 0)} per stage). {last_error or ''}"
    )


def _prediction(
    module: nn.Module,
    sample: torch.Tensor,
    config: PipelineConfig,
    optimizer: tuple[Callable[..., torch.optim.Optimizer], dict[str, Any]] | None,
) -> _planner.Choice:
    """The planner's prediction for ``config`` exactly as given (its schedule, micro-batches,
    chunks and balance): a report, not a choice the fit takes (each process measures its own
    under torchrun: nothing is sent)."""
    choice = _planner.choose(
        module, config, sample, threads=_threads(config),
        one_stage_threads=torch.get_num_threads(),
        fixed_microbatches=config.n_microbatches, fixed_chunks=config.chunks_per_stage,
        schedules=(config.schedule,), optimizer=optimizer,
    )
    return dataclasses.replace(choice, config=config, binding=False)


def _received(choice: object) -> tuple[PipelineConfig, _planner.Choice]:
    """Rank 0's choice, as another rank of a torchrun job receives it (or its error)."""
    if isinstance(choice, str):
        raise ValueError(f"rank 0 of the torchrun job could not plan the fit: {choice}")
    if not isinstance(choice, _planner.Choice):
        raise RuntimeError(f"rank 0 of the torchrun job sent no plan (got {choice!r})")
    return choice.config, choice


def layout_config(est: Any, n_stages: int, schedule: str, batch: int) -> PipelineConfig:
    """The validated configuration for ``n_stages`` stages and ``schedule``, refusing
    callbacks its launcher cannot run (``est``: the estimator, whose parameters they are)."""
    # the processes of one stage: its replicas' tensor shards
    launcher = resolve_launcher(
        est.launcher, n_stages, est.n_replicas * est.tensor_parallel
    )
    check_callbacks_fit(est.callbacks, runner_class(launcher).weights_in_driver, launcher)
    config = make_config(
        n_stages=n_stages,
        n_replicas=est.n_replicas,
        tensor_parallel=est.tensor_parallel,
        shard=est.shard,
        n_microbatches=est.n_microbatches,
        schedule=schedule,
        chunks_per_stage=est.chunks_per_stage,
        # 'auto' is the planner's to choose; 'uniform' validates the rest meanwhile
        balance=(
            ("uniform" if est.balance == "auto" else est.balance)
            if isinstance(est.balance, str)
            else tuple(est.balance)
        ),
        checkpoint=est.checkpoint,
        launcher=launcher,
        devices=resolve_devices(
            est.devices, n_stages, launcher, est.n_replicas, est.tensor_parallel
        ),
        batch_size=batch,
        precision=est.precision,
        max_grad_norm=est.max_grad_norm,
        clips_gradients=bool(grad_clips(est.callbacks)),
        timeout=float(est.timeout),
    )
    check_asynchronous(config, est.callbacks, est.n_stages)  # what skpipe's own cannot run
    return config
