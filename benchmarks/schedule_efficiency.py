"""Benchmark 1: how close each schedule's step gets to its theoretical time.

A network of sleep layers with known forward (F) and backward (B) time per micro-batch and
stage, n_stages=4, n_microbatches=16, every schedule: skpipe's measured step time against the
schedule's theoretical time and against raw torch.distributed.pipelining driven by hand (one
process per rank, the same stages and schedule class) in the same run.

    python benchmarks/schedule_efficiency.py [--quick]
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import torch
import torch.distributed as dist
from torch import nn

sys.path.insert(0, os.path.dirname(__file__))
from _common import (  # noqa: E402
    SleepLayer, cpu_config, emit, median, run_raw_ranks, runner_step_times,
)

from skpipe.engine.plan import _schedules as S  # noqa: E402


def network(p: int, v: int, f: float, b: float) -> nn.Sequential:
    # p*v chunks, one sleep layer each, F/v and B/v so every rank does F and B per micro-batch
    return nn.Sequential(*[SleepLayer(f / v, b / v) for _ in range(p * v)])


def _raw_worker(
    rank: int, world: int, schedule: str, m: int, f: float, b: float, steps: int, batch: int,
) -> float:
    from torch.distributed.pipelining import PipelineStage
    from torch.distributed.pipelining import schedules as ts

    spec = S.SCHEDULES[schedule]
    v = S.resolve_chunks(schedule, "auto")
    net = network(world, v, f, b)
    chunks = S.chunks_of_rank(rank, world, v, spec.placement)
    mb = batch // m
    stages = [
        PipelineStage(
            net[c],
            c,
            world * v,
            torch.device("cpu"),
            input_args=(torch.empty(mb, 8, requires_grad=c > 0),),
            output_args=(torch.empty(mb, 8, requires_grad=True),),
        )
        for c in chunks
    ]
    cls = getattr(ts, spec.torch_class)
    loss = lambda out, tgt: (out * 0.0).sum() + out.mean()  # noqa: E731
    if issubclass(cls, ts.PipelineScheduleSingle):
        sched = cls(stages[0], m, loss_fn=loss, scale_grads=False)
    else:
        sched = cls(stages, m, loss_fn=loss, scale_grads=False)
    x = torch.randn(batch, 8)
    tgt = torch.zeros(batch)
    holds_first = 0 in chunks
    holds_last = world * v - 1 in chunks
    times = []
    for _ in range(steps + 1):
        dist.barrier()
        t0 = time.perf_counter()
        sched.step(*((x,) if holds_first else ()), target=tgt if holds_last else None)
        dist.barrier()
        times.append(time.perf_counter() - t0)
    return median(times[1:])


def raw_step_time(schedule, p, m, f, b, steps, batch) -> float:  # noqa: ANN001
    return run_raw_ranks(_raw_worker, p, (schedule, m, f, b, steps, batch))  # type: ignore[return-value]


def skpipe_step_time(schedule, p, m, f, b, steps, batch) -> float:  # noqa: ANN001
    v = S.resolve_chunks(schedule, "auto")
    net = network(p, v, f, b)
    cfg = cpu_config(n_stages=p, n_microbatches=m, schedule=schedule, batch_size=batch)
    x, y = torch.randn(batch, 8), torch.zeros(batch, 8)
    step, _ = runner_step_times(net, cfg, x, y, steps)
    from skpipe import shutdown_workers

    shutdown_workers()
    return step


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true", help="tiny setting (for the test suite)")
    ap.add_argument("--steps", type=int, default=4)
    args = ap.parse_args()
    p, m, f, b = (2, 4, 0.002, 0.004) if args.quick else (4, 16, 0.010, 0.020)
    schedules = ["gpipe", "1f1b"] if args.quick else list(S.SCHEDULE_NAMES)
    steps = 1 if args.quick else args.steps
    batch = 4 * m
    rows = {}
    for schedule in schedules:
        v = S.resolve_chunks(schedule, "auto")
        theory = S.theoretical_step_time(schedule, p, m, v, f, b)
        ours = skpipe_step_time(schedule, p, m, f, b, steps, batch)
        raw = raw_step_time(schedule, p, m, f, b, steps, batch)
        rows[schedule] = {
            "theory_s": round(theory, 4),
            "skpipe_s": round(ours, 4),
            "raw_torch_s": round(raw, 4),
            "skpipe_efficiency": round(theory / ours, 3),
            "raw_torch_efficiency": round(theory / raw, 3),
            "skpipe_vs_raw": round(raw / ours, 3),
        }
    emit(
        "schedule_efficiency",
        {"n_stages": p, "n_microbatches": m, "F_s": f, "B_s": b, "steps": steps, "schedules": rows},
    )


if __name__ == "__main__":
    main()
