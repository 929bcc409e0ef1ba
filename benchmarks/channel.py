"""Driver <-> worker channel: ms per pipelined step against the bytes of the batch the driver sends.

A 2-stage MLP whose compute is negligible (1F1B, 4 micro-batches, 256 rows per batch); the batch
width sets its size from 1 KiB to 1 MiB. Rows: ``spawn`` (one worker per stage, a message per step
over the driver's channel), ``local`` (both stages in this process) and one stage. The goal: spawn
stays flat, within 2x of local, at every size (a TCP channel with Nagle's algorithm stalled 40 ms
per step for 16-64 KiB batches). Each figure is the median of ``--steps`` steps after warm-up.

    python benchmarks/channel.py [--quick]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import cpu_config, emit, median  # noqa: E402

from skpipe import shutdown_workers  # noqa: E402
from skpipe.engine.plan._config import TrainSpec  # noqa: E402
from skpipe.engine.plan._plan import make_plan  # noqa: E402
from skpipe.engine.runners._runners import make_runner  # noqa: E402

ROWS = 256


def step_ms(launcher: str, n_features: int, steps: int) -> float:
    p = 1 if launcher == "single" else 2
    cfg = cpu_config(n_stages=p, n_microbatches=4 if p > 1 else 1, schedule="1f1b",
                     batch_size=ROWS, launcher=launcher)
    torch.manual_seed(0)
    net = nn.Sequential(
        nn.Linear(n_features, 8), nn.ReLU(), nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 3)
    )
    spec = TrainSpec(
        optimizer=torch.optim.SGD, optimizer_kwargs={"lr": 0.01}, criterion=nn.CrossEntropyLoss()
    )
    x, y = torch.randn(ROWS, n_features), torch.randint(0, 3, (ROWS,))
    times = []
    with make_runner(make_plan(net, cfg, x[:64]), net, spec) as runner:
        for _ in range(steps + 3):
            t0 = time.perf_counter()
            runner.train_step(x, y)
            times.append(time.perf_counter() - t0)
    return 1e3 * median(times[3:])


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--steps", type=int, default=40)
    args = ap.parse_args()
    sizes_kib = [4, 32] if args.quick else [1, 4, 8, 12, 16, 20, 32, 48, 64, 256, 1024]
    steps = 5 if args.quick else args.steps
    rows = []
    for kib in sizes_kib:
        n_features = max(1, kib * 1024 // (4 * ROWS))
        row = {"batch_KiB": kib}
        for launcher in ("spawn", "local", "single"):
            row[f"{launcher}_ms"] = round(step_ms(launcher, n_features, steps), 2)
        row["spawn_over_local"] = round(row["spawn_ms"] / row["local_ms"], 2)
        rows.append(row)
        print(row, file=sys.stderr, flush=True)
    shutdown_workers()
    emit(
        "channel",
        {
            "rows_per_batch": ROWS,
            "steps": steps,
            "worst_spawn_over_local": max(r["spawn_over_local"] for r in rows),
            "sizes": rows,
        },
    )


if __name__ == "__main__":
    main()
