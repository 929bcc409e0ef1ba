"""Benchmark 8: the planner (``schedule='auto'``) against measurement.

1. Prediction: for every schedule, p = 2 and 4, sleep layers with forward F, input gradient I
   and weight gradient W set separately, the planner's predicted step time (from its own
   measurement of the layers and of a message between two processes) against the step time
   measured with spawned workers.
2. Choice: on three profiles (uniform layers, one heavy layer, heavy weight gradients), the
   measured step time of the planner's choice against the fastest of all valid candidates,
   each measured.
3. Cost: planning time (cold, and cached) against an epoch.

    python benchmarks/planner.py [--quick]
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import torch
from torch import nn

sys.path.insert(0, os.path.dirname(__file__))
from _common import SplitSleepLayer, emit, median  # noqa: E402

from skpipe import shutdown_workers  # noqa: E402
from skpipe.engine import _planner as PL  # noqa: E402
from skpipe.engine import _schedules as S  # noqa: E402
from skpipe.engine._config import TrainSpec, make_config  # noqa: E402
from skpipe.engine._plan import make_plan  # noqa: E402
from skpipe.engine._runners import make_runner  # noqa: E402


def config(p: int, m: int, schedule: str, v: int, batch: int) -> object:
    return make_config(
        n_stages=p, n_microbatches=m, schedule=schedule, chunks_per_stage=v,
        balance="uniform", checkpoint="never", launcher="spawn", devices=("cpu",) * p,
        batch_size=batch, precision="float32", max_grad_norm=None, timeout=300.0,
    )


def measured_step(net: nn.Module, cfg: object, steps: int) -> float:
    batch = cfg.batch_size  # type: ignore[attr-defined]
    x, y = torch.randn(batch, 8), torch.zeros(batch, 8)
    spec = TrainSpec(optimizer=torch.optim.SGD, optimizer_kwargs={"lr": 0.0},
                     criterion=nn.MSELoss())
    with make_runner(make_plan(net, cfg, x[:4]), net, spec) as runner:
        times = []
        for _ in range(steps + 1):
            t0 = time.perf_counter()
            runner.train_step(x, y)
            times.append(time.perf_counter() - t0)
    return median(times[1:])


def predicted_step(net: nn.Module, cfg: object) -> float:
    x = torch.randn(cfg.batch_size, 8)  # type: ignore[attr-defined]
    profile = PL.measure(net, x, PL.rows_to_measure(cfg), "cpu", 1)  # type: ignore[arg-type]
    step, _, _ = PL.predict(profile, cfg, cfg.schedule, cfg.n_microbatches,  # type: ignore[arg-type, attr-defined]
                            cfg.chunks_per_stage, PL.message_cost("cpu"), local=False)  # type: ignore[attr-defined]
    return step


def prediction(quick: bool, steps: int) -> dict:
    f, i, w = (0.002, 0.002, 0.002) if quick else (0.010, 0.010, 0.010)
    rows = {}
    for schedule in (["gpipe", "zbv"] if quick else S.SCHEDULE_NAMES):
        for p in ([2] if quick else [2, 4]):
            v = S.resolve_chunks(schedule, "auto")
            m = 2 * p
            try:
                S.check_microbatches(schedule, p, m, v, 4 * m)
            except ValueError:
                m = 4 * p
            net = nn.Sequential(*[SplitSleepLayer(f / v, i / v, w / v) for _ in range(p * v)])
            cfg = config(p, m, schedule, v, 4 * m)
            predicted = predicted_step(net, cfg)
            measured = measured_step(net, cfg, steps)
            rows[f"{schedule} p={p} m={m}"] = {
                "predicted_ms": round(predicted * 1e3, 1),
                "measured_ms": round(measured * 1e3, 1),
                "error": round(predicted / measured - 1, 3),
            }
        shutdown_workers()
    errors = [abs(r["error"]) for r in rows.values()]
    return {"F_s": f, "I_s": i, "W_s": w, "cases": rows, "max_abs_error": max(errors)}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true", help="tiny setting (for the test suite)")
    ap.add_argument("--steps", type=int, default=3)
    args = ap.parse_args()
    steps = 1 if args.quick else args.steps
    emit("planner", {"prediction_sleep": prediction(args.quick, steps)})


if __name__ == "__main__":
    main()
