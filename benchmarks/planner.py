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
    python benchmarks/planner.py --timeline   # the spans behind the real-compute misses
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import numpy as np
import torch
from torch import nn

sys.path.insert(0, os.path.dirname(__file__))
from _common import SplitSleepLayer, emit, median, runner_step_times  # noqa: E402

from skpipe import shutdown_workers  # noqa: E402
from skpipe.engine.planner import _planner as PL  # noqa: E402
from skpipe.engine.planner._measure import forget_measurements  # noqa: E402
from skpipe.engine.plan import _schedules as S  # noqa: E402
from skpipe.engine.plan._config import TrainSpec, make_config  # noqa: E402
from skpipe.engine.plan._plan import make_plan  # noqa: E402
from skpipe.engine.runners._runners import make_runner  # noqa: E402


def config(p: int, m: int, schedule: str, v: int, batch: int) -> object:
    return make_config(
        n_stages=p, n_microbatches=m, schedule=schedule, chunks_per_stage=v,
        balance="uniform", checkpoint="never", launcher="spawn", devices=("cpu",) * p,
        batch_size=batch, precision="float32", max_grad_norm=None, timeout=300.0,
    )


def measured_step(net: nn.Module, cfg: object, steps: int) -> float:
    batch = cfg.batch_size  # type: ignore[attr-defined]
    x, y = torch.randn(batch, 8), torch.zeros(batch, 8)
    return runner_step_times(net, cfg, x, y, steps)[0]  # type: ignore[arg-type]


def predicted_step(net: nn.Module, cfg: object) -> float:
    x = torch.randn(cfg.batch_size, 8)  # type: ignore[attr-defined]
    profile = PL.measure(net, x, PL.rows_to_measure(cfg.batch_size), "cpu", 1)  # type: ignore[attr-defined]
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


def real_compute(quick: bool, steps: int) -> dict:
    """An MLP on two spawned CPU workers (one thread each): predicted against measured."""
    width, depth, batch = (64, 4, 64) if quick else (512, 8, 256)
    net = nn.Sequential(*[m for _ in range(depth) for m in (nn.Linear(width, width), nn.Tanh())])
    rows = {}
    for schedule, m in ([("1f1b", 4)] if quick else
                        [("gpipe", 4), ("1f1b", 8), ("interleaved_1f1b", 4),
                         ("interleaved_zero_bubble", 4), ("zbv", 4)]):
        v = S.resolve_chunks(schedule, "auto")
        cfg = config(2, m, schedule, v, batch)
        x = torch.randn(batch, width)
        profile = PL.measure(net, x, PL.rows_to_measure(batch), "cpu", 1)
        predicted, _, _ = PL.predict(profile, cfg, schedule, m, v, PL.message_cost("cpu"),
                                     local=False)
        y = torch.zeros(batch, width)
        measured, _ = runner_step_times(net, cfg, x, y, steps, warm=2)  # type: ignore[arg-type]
        rows[f"{schedule} m={m}"] = {"predicted_ms": round(predicted * 1e3, 2),
                                     "measured_ms": round(measured * 1e3, 2),
                                     "error": round(predicted / measured - 1, 3)}
    shutdown_workers()
    return {"width": width, "hidden_layers": depth, "batch": batch, "cases": rows,
            "max_abs_error": max(abs(r["error"]) for r in rows.values())}


PROFILES = {
    # per layer (F, I, W) seconds: 8 layers
    "uniform": [(0.002, 0.002, 0.002)] * 8,
    "one_heavy_layer": [(0.002, 0.002, 0.002)] * 3 + [(0.008, 0.008, 0.008)]
    + [(0.002, 0.002, 0.002)] * 4,
    "heavy_weight_gradients": [(0.002, 0.001, 0.006)] * 8,
}


def choice(quick: bool, steps: int) -> dict:
    """The planner's choice measured against every valid candidate measured."""
    out = {}
    batch = 16
    for name, layers in PROFILES.items():
        if quick and name != "uniform":
            continue
        net = nn.Sequential(*[SplitSleepLayer(f, i, w) for f, i, w in layers])
        cfg = config(2, 2, "gpipe", 1, batch)
        x = torch.randn(batch, 8)
        profile = PL.measure(net, x, PL.rows_to_measure(batch), "cpu", 1)
        found = PL.candidates(profile, cfg, message=PL.message_cost("cpu"), local=False)
        if quick:
            found = found[:3]
        measured = {}
        for c in found:
            key = (c.schedule, c.n_microbatches, c.chunks_per_stage)
            measured[key] = measured_step(net, config(2, c.n_microbatches, c.schedule,
                                                      c.chunks_per_stage, batch), steps)
        chosen = next(c for c in found if c.chosen)
        pick = measured[(chosen.schedule, chosen.n_microbatches, chosen.chunks_per_stage)]
        best_key = min(measured, key=measured.__getitem__)
        out[name] = {
            "candidates": len(found),
            "chosen": f"{chosen.schedule} m={chosen.n_microbatches} v={chosen.chunks_per_stage}",
            "chosen_measured_ms": round(pick * 1e3, 1),
            "best_measured": f"{best_key[0]} m={best_key[1]} v={best_key[2]}",
            "best_measured_ms": round(measured[best_key] * 1e3, 1),
            "ratio": round(pick / measured[best_key], 3),  # goal <= 1.05
        }
        shutdown_workers()
    return out


def cost(quick: bool) -> dict:
    """Planning time, cold (measuring) and cached, against one epoch of the network."""
    width, depth, rows, batch = (64, 4, 512, 64) if quick else (512, 8, 8192, 256)
    from skpipe import PipeNetClassifier

    rng = np.random.RandomState(0)
    X = rng.normal(size=(rows, width)).astype(np.float32)
    y = (X[:, 0] > 0).astype(np.int64)
    est = PipeNetClassifier(module__hidden_layer_sizes=(width,) * depth, n_stages=2,
                            schedule="auto", launcher="spawn", batch_size=batch, max_epochs=2,
                            random_state=0)
    forget_measurements(messages=False)  # a cold plan measures the layers again
    t0 = time.perf_counter()
    report = est.plan(X, y)
    cold = time.perf_counter() - t0
    t0 = time.perf_counter()
    est.plan(X, y)
    cached = time.perf_counter() - t0
    est.fit(X, y)
    epoch = median([e["dur"] for e in est.history_])
    shutdown_workers()
    return {"rows": rows, "width": width, "hidden_layers": depth, "batch": batch,
            "candidates": len(report.candidates),
            "planning_cold_s": round(cold, 3), "planning_cached_s": round(cached, 3),
            "planner_inside_s": round(report.planning_seconds, 3),
            "epoch_s": round(epoch, 3),
            "cold_share_of_epoch": round(cold / epoch, 3)}


def timeline(target_width: int) -> dict:
    """The recorded spans of a GPipe step of the real-compute MLP (2 spawned CPU workers, m=4),
    with MSE targets ``target_width`` wide: when each rank started each action (ms from the
    step's first span). What the misses of the real-compute prediction are read from."""
    from skpipe.engine.plan._timeline import Timeline

    width, depth, batch = 512, 8, 256
    layers = [m for _ in range(depth) for m in (nn.Linear(width, width), nn.Tanh())]
    if target_width != width:
        layers.append(nn.Linear(width, target_width))
    net = nn.Sequential(*layers)
    cfg = config(2, 4, "gpipe", 1, batch)
    x, y = torch.randn(batch, width), torch.zeros(batch, target_width)
    spec = TrainSpec(optimizer=torch.optim.SGD, optimizer_kwargs={"lr": 0.0},
                     criterion=nn.MSELoss())
    with make_runner(make_plan(net, cfg, x[:4]), net, spec) as runner:
        for _ in range(3):
            runner.train_step(x, y)
        runner.record_timeline(1)
        runner.train_step(x, y)
        spans = Timeline.of(runner.spans(), cfg).spans
    shutdown_workers()
    t0 = min(s.start for s in spans)
    return {f"rank{s.rank} {s.kind}{s.microbatch}": [round((s.start - t0) * 1e3, 2),
                                                      round((s.end - t0) * 1e3, 2)]
            for s in sorted(spans, key=lambda s: s.start)}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true", help="tiny setting (for the test suite)")
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--timeline", action="store_true",
                    help="print the spans of the real-compute GPipe step instead")
    args = ap.parse_args()
    if args.timeline:
        emit("planner_timeline", {"target_512_wide": timeline(512),
                                  "target_8_wide": timeline(8)})
        return
    steps = 1 if args.quick else args.steps
    message = PL.message_cost("cpu")
    emit("planner", {
        "steps": steps,
        "message_cost": {"latency_us": round(message.latency * 1e6, 1),
                         "GB_per_s": round(1e-9 / message.per_byte, 2)
                         if message.per_byte else None,
                         "per_action_us": round(message.per_action * 1e6, 1)},
        "prediction_sleep": prediction(args.quick, steps),
        "prediction_real": real_compute(args.quick, steps),
        "choice": choice(args.quick, steps),
        "cost": cost(args.quick),
    })


if __name__ == "__main__":
    main()
