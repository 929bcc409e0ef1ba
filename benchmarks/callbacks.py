"""Benchmark 10: what callbacks cost on spawned stages (issue 20).

1. The weights a callback sees. The 400M-parameter network of ``large_network.py`` (MLP 4096 x
   24, Adam, batch 16, 2 steps per epoch, 2 epochs), trained on 2 spawned stages three ways in
   one process: with no callback; with a user callback that reads the weights in
   ``on_epoch_end``; with one that also writes one tensor in ``on_epoch_begin``. Per hook, the
   time to bring the stages' weights into this process (pull), to keep and compare a copy
   (snapshot + compare) and to send the change back (push), timed around the runner's calls;
   the fit times side by side.
2. The LR schedule. A 64-128-128-2 MLP, 4096 rows, batch 64 (64 steps per epoch), SGD, on one
   device and on 2 spawned stages: seconds per epoch (median over epochs after the first) with
   no scheduler and with ``LRScheduler(OneCycleLR, step_every='batch')`` (on spawn: new
   hyperparameters with every step message), alternated ``--runs`` times; the ratio for each.

    python benchmarks/callbacks.py [--quick] [--runs 3] [--width 4096]
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from collections import defaultdict

import numpy as np
import torch
from skorch.callbacks import Callback, LRScheduler

sys.path.insert(0, os.path.dirname(__file__))
from _common import emit  # noqa: E402

from skpipe import PipeNetClassifier, shutdown_workers  # noqa: E402
from skpipe.engine.runners._spawn import SpawnRunner  # noqa: E402
from skpipe.estimators import _mirror  # noqa: E402

TIMES: dict[str, list[float]] = defaultdict(list)


def timed(owner: object, name: str, label: str) -> None:
    """Record the wall time of every call of ``owner.name`` under ``label``."""
    inner = getattr(owner, name)

    def wrapper(*args: object, **kwargs: object) -> object:
        t0 = time.perf_counter()
        try:
            return inner(*args, **kwargs)
        finally:
            TIMES[label].append(time.perf_counter() - t0)

    setattr(owner, name, wrapper)


class Reads(Callback):
    def on_epoch_end(self, net: PipeNetClassifier, **kwargs: object) -> None:
        self.norm_ = float(next(net.module_.parameters()).detach().norm())


class Writes(Reads):
    def on_epoch_begin(self, net: PipeNetClassifier, **kwargs: object) -> None:
        with torch.no_grad():
            next(net.module_.parameters()).mul_(0.999)


class Epochs(Callback):
    """The wall time of every epoch, into ``times``."""

    def __init__(self, times: list[float]) -> None:
        self.times = times

    def on_epoch_begin(self, net: PipeNetClassifier, **kwargs: object) -> None:
        self.t0 = time.perf_counter()

    def on_epoch_end(self, net: PipeNetClassifier, **kwargs: object) -> None:
        self.times.append(time.perf_counter() - self.t0)


def mirror_costs(width: int, depth: int) -> dict:
    rng = np.random.RandomState(0)
    batch, steps = 16, 2
    X = rng.randn(steps * batch, width).astype(np.float32)
    y = rng.randint(0, 4, steps * batch)
    timed(SpawnRunner, "pull_weights", "pull")
    timed(SpawnRunner, "push_weights", "push")
    timed(_mirror.WeightMirror, "_changes", "compare")
    timed(_mirror.WeightMirror, "_snapshot", "snapshot")
    fits = {}
    for name, callbacks in (("none", None), ("reads", [Reads()]), ("writes", [Writes()])):
        TIMES.clear()
        est = PipeNetClassifier(
            module__hidden_layer_sizes=(width,) * depth, max_epochs=2, batch_size=batch,
            n_stages=2, n_microbatches=2, launcher="spawn", random_state=0, lr=1e-4,
            callbacks=callbacks,
        )
        t0 = time.perf_counter()
        est.fit(X, y)
        fits[name] = {
            "fit_s": round(time.perf_counter() - t0, 2),
            **{f"{k}_s_per_call": round(statistics.median(v), 3) for k, v in TIMES.items()},
            **{f"{k}_calls": len(v) for k, v in TIMES.items()},
        }
        params = sum(p.numel() for p in est.module_.parameters())
        shutdown_workers()
    writes = fits["writes"]
    return {
        "params": params,
        "fits": fits,
        "pull_s_per_hook": fits["reads"].get("pull_s_per_call"),
        "snapshot_compare_s_per_hook": round(
            writes.get("snapshot_s_per_call", 0.0) + writes.get("compare_s_per_call", 0.0), 3
        ),
        "push_s_per_hook": writes.get("push_s_per_call", 0.0),
    }


def lr_overhead(runs: int, quick: bool) -> dict:
    """Epoch time with and without a per-batch LR schedule, on one device and on two spawned
    stages, alternated; the ratio per launcher (median over runs of each run's ratio)."""
    rng = np.random.RandomState(0)
    n = 1024 if quick else 4096
    X = rng.randn(n, 64).astype(np.float32)
    y = rng.randint(0, 2, n)
    epochs = 3 if quick else 6
    modes = {"one device": dict(n_stages=1), "spawn": dict(n_stages=2, launcher="spawn")}
    per: dict[tuple[str, str], list[float]] = defaultdict(list)
    for _ in range(runs):
        for mode, layout in modes.items():
            for scheduled in (False, True):
                per_run: list[float] = []
                callbacks: list[Callback] = [Epochs(per_run)]
                if scheduled:
                    callbacks.append(LRScheduler(
                        torch.optim.lr_scheduler.OneCycleLR, max_lr=0.1,
                        total_steps=epochs * n // 64, step_every="batch",
                    ))
                PipeNetClassifier(
                    module__hidden_layer_sizes=(128, 128), optimizer=torch.optim.SGD,
                    optimizer__momentum=0.9, lr=0.05, max_epochs=epochs, batch_size=64,
                    n_microbatches=2, random_state=0, callbacks=callbacks, **layout,
                ).fit(X, y)
                per[mode, "scheduled" if scheduled else "none"].append(
                    statistics.median(per_run[1:])
                )
    shutdown_workers()
    out: dict = {"epoch_s": {f"{m} {k}": round(statistics.median(v), 4)
                             for (m, k), v in per.items()}}
    for mode in modes:
        ratios = [a / b for a, b in zip(per[mode, "scheduled"], per[mode, "none"], strict=True)]
        out[f"ratio_{mode.replace(' ', '_')}"] = round(statistics.median(ratios), 3)
    return out


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--quick", action="store_true", help="a 0.3M-parameter network")
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--width", type=int, default=4096, help="the mirrored network's width")
    args = parser.parse_args()
    width, depth = (256, 4) if args.quick else (args.width, 24)
    mirror = mirror_costs(width, depth)
    lr = lr_overhead(1 if args.quick else args.runs, args.quick)
    emit("callbacks", {
        "pull_s_per_hook": mirror["pull_s_per_hook"],
        "snapshot_compare_s_per_hook": mirror["snapshot_compare_s_per_hook"],
        "push_s_per_hook": mirror["push_s_per_hook"],
        "lr_schedule_epoch_ratio_spawn": lr["ratio_spawn"],
        "lr_schedule_epoch_ratio_one_device": lr["ratio_one_device"],
        "mirror": mirror,
        "lr_schedule": lr,
    })


if __name__ == "__main__":
    main()
