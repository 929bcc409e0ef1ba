"""Benchmark 13: the memory of tensor shards and sharded replicas (issue 22), with step times.

Each fit runs in a fresh driver process; this script samples the resident memory of the driver
and of every worker (psutil, every 20 ms: ``large_network.Sampler``) and reports each process's
own peak during the fit, with the training loop's time per step (skorch's epoch ``dur`` over
its batches; Adam, CPU, one thread per process).

1. Tensor parallelism: an MLP whose largest Linear is 16384 x 16384 (1 GiB of weights, ~4 GiB
   with its gradient and Adam's moments), ``tensor_parallel=1`` (one process: the driver) and
   ``2`` (two workers, the big layer split rowwise). Goal: each rank's peak <= 0.5 x the t = 1
   peak x 1.15 + a torch process's fixed cost.
2. Sharded replicas: the 400M-parameter MLP of benchmark 9 (24 x 4096^2), ``n_replicas=2,
   n_stages=1`` with ``shard='none'``, ``'optimizer'`` and ``'full'``. Goals: with 'full' each
   rank's peak <= 0.5 x the 'none' rank's peak x 1.15 + fixed; with 'optimizer' the Adam state
   halves (the rank's peak less what 'none' holds, against the weights' bytes).

The fixed cost is a bare ``import torch, skpipe`` process (``large_network.bare_process_rss``).

    python benchmarks/parallel_memory.py [--quick] [--only tensor|shard]
"""

from __future__ import annotations

import argparse
import json
import os
import sys

sys.path.insert(0, os.path.dirname(__file__))
from _common import emit  # noqa: E402
from large_network import GiB, bare_process_rss, sampled_job  # noqa: E402

JOB = r"""
import json, sys, time
import numpy as np, torch
from skpipe import PipeNetRegressor, shutdown_workers
width, depth, n_in, batch, steps = (int(a) for a in sys.argv[1:6])
layout = json.loads(sys.argv[6])
rng = np.random.RandomState(0)
X = rng.randn(steps * batch, n_in).astype("float32")
y = rng.randn(steps * batch).astype("float32")
est = PipeNetRegressor(module__hidden_layer_sizes=(width,) * depth, max_epochs=1,
                       batch_size=batch, lr=1e-4, random_state=0, **layout)
print(json.dumps({"mark": "fit", "t": time.time()}), flush=True)
est.fit(X, y)
print(json.dumps({"mark": "fitted", "t": time.time()}), flush=True)
shutdown_workers()
epoch = est.history_[-1]
print(json.dumps({"step_s": epoch["dur"] / len(epoch["batches"]),
                  "params": sum(p.numel() for p in est.module_.parameters()),
                  "loss": epoch["train_loss"]}), flush=True)
"""


def run(width: int, depth: int, n_in: int, batch: int, steps: int, layout: dict) -> dict:
    pid, sampler, lines, marks = sampled_job(
        JOB, [width, depth, n_in, batch, steps, json.dumps(layout)], f"the fit with {layout}",
        OMP_NUM_THREADS="1",
    )
    result = next(m for m in lines if "step_s" in m)
    per, total = sampler.peaks(marks["fit"], marks["fitted"])
    workers = sorted((b for p, b in per.items() if p != pid), reverse=True)
    return {
        "layout": layout,
        "step_s": round(result["step_s"], 3),
        "loss": result["loss"],
        "params": result["params"],
        "driver_peak_GiB": round(per.get(pid, 0) / GiB, 3),
        "worker_peak_GiB": [round(b / GiB, 3) for b in workers],
        "all_processes_peak_GiB": round(total / GiB, 3),
    }


def rank_peak(row: dict) -> float:
    """The peak of the process(es) holding the network: the workers', else the driver's."""
    return max(row["worker_peak_GiB"]) if row["worker_peak_GiB"] else row["driver_peak_GiB"]


def tensor_part(width: int, n_in: int, batch: int, steps: int, fixed: float) -> dict:
    # MLP(n_in -> width -> width -> 1): the width x width layer is the rowwise half of the pair
    one = run(width, 2, n_in, batch, steps, {})
    two = run(width, 2, n_in, batch, steps, {"tensor_parallel": 2, "launcher": "spawn"})
    goal = 0.5 * rank_peak(one) * 1.15 + fixed
    return {
        "largest_linear": f"{width} x {width}",
        "t1": one,
        "t2": two,
        "rank_peak_t2_vs_t1": round(rank_peak(two) / rank_peak(one), 3),
        "rank_peak_t2_vs_goal": round(rank_peak(two) / goal, 3),  # goal: <= 1
        "step_time_t2_vs_t1": round(two["step_s"] / one["step_s"], 3),
        "same_loss": abs(one["loss"] - two["loss"]) < 1e-4 * max(1.0, abs(one["loss"])),
    }


def shard_part(width: int, depth: int, batch: int, steps: int, fixed: float) -> dict:
    rows = {
        shard: run(width, depth, width, batch, steps,
                   {"n_replicas": 2, "shard": shard, "launcher": "spawn"})
        for shard in ("none", "optimizer", "full")
    }
    weights = rows["none"]["params"] * 4 / GiB
    none = rank_peak(rows["none"])
    return {
        "params": rows["none"]["params"],
        "weight_GiB": round(weights, 3),
        **rows,
        "full_rank_peak_vs_none": round(rank_peak(rows["full"]) / none, 3),
        "full_rank_peak_vs_goal": round(rank_peak(rows["full"]) / (0.5 * none * 1.15 + fixed), 3),
        # what 'optimizer' saves against 'none', in weight copies: Adam's two moments halved
        # save one copy, the gradients halved another half
        "optimizer_saves_weight_copies": round((none - rank_peak(rows["optimizer"])) / weights, 2),
        "full_saves_weight_copies": round((none - rank_peak(rows["full"])) / weights, 2),
        "step_time_optimizer_vs_none": round(
            rows["optimizer"]["step_s"] / rows["none"]["step_s"], 3),
        "step_time_full_vs_none": round(rows["full"]["step_s"] / rows["none"]["step_s"], 3),
        "same_loss": len({round(r["loss"], 4) for r in rows.values()}) == 1,
    }


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true", help="small networks, for the test suite")
    ap.add_argument("--only", choices=["tensor", "shard"], default=None)
    args = ap.parse_args()
    fixed = bare_process_rss() / GiB
    figures: dict = {"fixed_process_GiB": round(fixed, 3)}
    if args.only in (None, "tensor"):
        width, n_in = (256, 16) if args.quick else (16384, 64)
        figures["tensor_parallel"] = tensor_part(width, n_in, 8, 3, fixed)
    if args.only in (None, "shard"):
        width, depth = (128, 4) if args.quick else (4096, 24)
        figures["shard"] = shard_part(width, depth, 8, 3, fixed)
    emit("parallel_memory", figures)


if __name__ == "__main__":
    main()
