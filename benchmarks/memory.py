"""Benchmark 4: peak activation memory held per stage, by schedule and checkpoint mode.

Each worker measures the bytes of the tensors autograd keeps for backward (parameters
excluded) during a real step of torch's schedule, at n_stages=4, n_microbatches=16, beside
the plan's estimate (what ``plan()`` prints and ``stage_memory_budget`` checks). 1F1B should
hold about p/m of GPipe's; checkpointing trades the held activations for recompute.

    python benchmarks/memory.py [--quick]
"""

from __future__ import annotations

import argparse
import os
import sys

import torch
from torch import nn

sys.path.insert(0, os.path.dirname(__file__))
from _common import cpu_config, emit  # noqa: E402

from skpipe import shutdown_workers  # noqa: E402
from skpipe.engine.plan._config import TrainSpec  # noqa: E402
from skpipe.engine.plan._plan import make_plan  # noqa: E402
from skpipe.engine.runners._runners import make_runner  # noqa: E402


def peak_per_stage(
    schedule: str, p: int, m: int, checkpoint: str, width: int, depth_per_chunk: int, batch: int
) -> tuple[list[float], list[float]]:
    """Each stage's measured peak of activation bytes in a step, and the plan's estimate."""
    cfg = cpu_config(n_stages=p, n_microbatches=m, schedule=schedule, batch_size=batch,
                     checkpoint=checkpoint)
    layers = []
    for _ in range(cfg.n_chunks * depth_per_chunk):
        layers += [nn.Linear(width, width), nn.Tanh()]
    net = nn.Sequential(*layers)
    spec = TrainSpec(
        optimizer=torch.optim.SGD, optimizer_kwargs={"lr": 0.0}, criterion=nn.MSELoss()
    )
    x, y = torch.randn(batch, width), torch.zeros(batch, width)
    plan = make_plan(net, cfg, x[:4])
    # the plan's estimate of each stage's activations (what stage_memory_budget checks, less
    # the 4 x parameter bytes of weights, gradients and Adam's moments)
    static = [4 * sum(b for b, o in zip(plan.parameter_bytes, plan.owners, strict=True) if o == s)
              for s in range(p)]
    estimate = [b - s for b, s in zip(plan.stage_bytes(), static, strict=True)]
    with make_runner(plan, net, spec) as runner:
        runner.train_step(x, y)  # first step: buffers and shapes settle
        runner.track_memory(True)
        runner.train_step(x, y)
        stats = runner.stats()
    return [s["peak_activation_bytes"] for s in stats], estimate


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true")
    args = ap.parse_args()
    p, m, width, depth = (2, 4, 32, 1) if args.quick else (4, 16, 256, 2)
    batch = 16 * m
    cases = (
        [("gpipe", "never"), ("1f1b", "never")]
        if args.quick
        else [
            ("gpipe", "never"),
            ("1f1b", "never"),
            ("interleaved_1f1b", "never"),
            ("interleaved_zero_bubble", "never"),
            ("zbv", "never"),
            ("gpipe", "except_last"),
            ("gpipe", "always"),
            ("1f1b", "always"),
        ]
    )
    rows = {}
    for schedule, checkpoint in cases:
        peaks, estimate = peak_per_stage(schedule, p, m, checkpoint, width, depth, batch)
        rows[f"{schedule}/{checkpoint}"] = {
            "peak_MiB_per_stage": [round(b / 2**20, 3) for b in peaks],
            "estimated_MiB_per_stage": [round(b / 2**20, 3) for b in estimate],
            # goal: the estimate covers the measured peak (>= 1; the last stage's loss is
            # left out of the estimate)
            "estimate_over_measured": round(min(e / m for e, m in zip(estimate, peaks,
                                                                       strict=True) if m), 3),
        }
    shutdown_workers()
    g = max(rows["gpipe/never"]["peak_MiB_per_stage"])
    o = max(rows["1f1b/never"]["peak_MiB_per_stage"])
    emit(
        "memory",
        {
            "n_stages": p,
            "n_microbatches": m,
            "width": width,
            "batch_size": batch,
            "cases": rows,
            "1f1b_over_gpipe_max_stage": round(o / g, 3),
            "expected_p_over_m": round(p / m, 3),
        },
    )


if __name__ == "__main__":
    main()
