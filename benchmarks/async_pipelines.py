"""Benchmark 9: the asynchronous schedules' epoch against the synchronous ones, side by side.

Sleep stages (forward F, backward B per micro-batch and stage, whatever the CPU), p stages,
m micro-batches, a given number of batches per epoch, spawned workers. Each schedule trains
the same epochs through the runner a fit uses (the next batch sent ahead, as the training loop
does); an epoch's time is measured from its first step to its drain. The goal for '2bw' is one
fill and one drain per epoch: epoch <= 1.1 x (batches * m + p - 1) * (F + B). Beside each,
what ``plan()`` predicts (the planner's replay of the executor's order with its own
measurements of the layers, the messages and the optimizer): the step a batch adds, against the
measured epoch per batch (which also carries the epoch's one fill and drain). Last, memory:
the peak RSS of the worker holding a 4096 x 4096 Linear (64 MiB) with `2bw` against `1f1b`, in
copies of that layer (PipeDream-2BW keeps one stashed copy besides the live weights). Also
``2bw`` with ``max_grad_norm``: its stages sum each batch's norm while they work on.

    python benchmarks/async_pipelines.py [--quick] [--runs 3]
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import torch
from torch import nn

sys.path.insert(0, os.path.dirname(__file__))
from _common import SleepLayer, cpu_config, emit, median  # noqa: E402

from skpipe import shutdown_workers  # noqa: E402
from skpipe.engine.plan._config import TrainSpec  # noqa: E402
from skpipe.engine.planner import _planner as PL  # noqa: E402
from skpipe.engine.plan._plan import make_plan  # noqa: E402
from skpipe.engine.plan._schedules import resolve_chunks  # noqa: E402
from skpipe.engine.runners._runners import make_runner  # noqa: E402

SCHEDULES = ("2bw", "pipedream", "1f1b", "interleaved_1f1b")
CLIPPED = "2bw+max_grad_norm"  # '2bw' clipping each batch by its global norm


def network(schedule: str, p: int, f: float, b: float) -> nn.Sequential:
    v = resolve_chunks(schedule, "auto")
    return nn.Sequential(*[SleepLayer(f / v, b / v) for _ in range(p * v)])


def predicted_step(schedule: str, p: int, m: int, f: float, b: float) -> float:
    """The planner's predicted step (seconds a batch adds), as ``plan()`` gives it."""
    shutdown_workers()  # the planner measures before a fit's workers start
    cfg = cpu_config(n_stages=p, n_microbatches=m, schedule=schedule, batch_size=4 * m)
    net = network(schedule, p, f, b)
    x = torch.randn(4 * m, 8)
    profile = PL.measure(net, x, PL.rows_to_measure(4 * m), "cpu", 1)
    step, _, _ = PL.predict(profile, cfg, schedule, m, cfg.chunks_per_stage,
                            PL.message_cost("cpu"), local=False,
                            optimizer=PL.optimizer_cost(torch.optim.SGD, {"lr": 0.0}, "cpu", 1))
    return step


def epoch_seconds(schedule: str, p: int, m: int, batches: int, f: float, b: float,
                  epochs: int, actions: list[float] | None = None,
                  max_grad_norm: float | None = None) -> list[float]:
    """Seconds of each of ``epochs`` epochs of ``batches`` batches (after one warm epoch).
    ``actions``: where given, the medians of the last stage's recorded forward and backward
    seconds over those epochs are added to it (what a 10 ms sleep really takes here).
    ``max_grad_norm``: clip each batch's gradient by its global norm (the stages' norms summed
    while they work on; '2bw' only)."""
    net = network(schedule, p, f, b)
    rows = 4 * m
    cfg = cpu_config(n_stages=p, n_microbatches=m, schedule=schedule, batch_size=rows,
                     max_grad_norm=max_grad_norm)
    spec = TrainSpec(optimizer=torch.optim.SGD, optimizer_kwargs={"lr": 0.0},
                     criterion=nn.MSELoss())
    x, y = torch.randn(rows, 8), torch.randn(rows, 8)
    out = []
    with make_runner(make_plan(net, cfg, x[:4]), net, spec) as runner:
        for epoch in range(epochs + 1):
            if epoch == 1 and actions is not None:
                runner.record_timeline(epochs * batches)
            t0 = time.perf_counter()
            runner.begin_epoch(batches)
            for i in range(batches):
                runner.prefetch(*((x, y, None) if i + 1 < batches else (None, None, None)))
                runner.train_step(x, y)
            runner.end_epoch()
            out.append(time.perf_counter() - t0)
        if actions is not None:
            spans = [s for s in runner.spans() if s.rank == p - 1]
            for kind in "FB":
                actions.append(median([s.end - s.start for s in spans if s.kind == kind]))
    return out[1:]


def stage_peak_mib(schedule: str, width: int) -> float:
    """Peak RSS (MiB) of the worker holding the second of two stages, whose Linear is
    ``width`` x ``width`` (SGD: no optimizer state), over a 2-epoch fit on spawned workers."""
    import threading

    import numpy as np
    import psutil

    from skpipe import PipeNetRegressor

    shutdown_workers()
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(8, width), nn.ReLU(), nn.Linear(width, width), nn.ReLU(),
                        nn.Linear(width, 1))
    me, peaks, stop = psutil.Process(), {}, threading.Event()

    def sample() -> None:
        while not stop.is_set():
            for child in me.children(recursive=True):
                try:  # a worker once it runs (a child between fork and exec shows our RSS)
                    if "_worker_main" in " ".join(child.cmdline()):
                        peaks[child.pid] = max(peaks.get(child.pid, 0), child.memory_info().rss)
                except psutil.Error:
                    pass
            time.sleep(0.01)

    watcher = threading.Thread(target=sample)
    watcher.start()
    X = np.random.RandomState(0).randn(256, 8).astype(np.float32)
    try:
        PipeNetRegressor(module=net, n_stages=2, n_microbatches=2, schedule=schedule,
                         balance=[2, 3], optimizer=torch.optim.SGD, lr=1e-6, batch_size=32,
                         max_epochs=2, launcher="spawn").fit(X, X[:, 0].copy())
    finally:
        stop.set()
        watcher.join()
    shutdown_workers()
    return max(peaks.values()) / 2**20


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true", help="tiny setting (for the test suite)")
    ap.add_argument("--runs", type=int, default=3)
    args = ap.parse_args()
    if args.quick:
        p, m, batches, f, b, epochs, runs = 2, 2, 4, 0.002, 0.004, 1, 1
    else:
        p, m, batches, f, b, epochs, runs = 4, 4, 16, 0.010, 0.020, 2, args.runs
    ideal = (batches * m + p - 1) * (f + b)
    seconds: dict[str, list[float]] = {s: [] for s in (*SCHEDULES, CLIPPED)}
    actions: list[float] = []  # 2bw's last stage: forward, backward seconds, run by run
    for _ in range(runs):  # the schedules alternate within each run
        for schedule in SCHEDULES:
            seconds[schedule] += epoch_seconds(schedule, p, m, batches, f, b, epochs,
                                               actions if schedule == "2bw" else None)
        seconds[CLIPPED] += epoch_seconds("2bw", p, m, batches, f, b, epochs, max_grad_norm=1.0)
    # the same fill and drain with the forward and backward a sleep really took here
    real = (batches * m + p - 1) * (median(actions[0::2]) + median(actions[1::2]))
    epoch = {s: median(t) for s, t in seconds.items()}
    predicted = {s: predicted_step(s, p, m, f, b) for s in SCHEDULES}
    clipped = epoch.pop(CLIPPED)
    # 2bw's stashed weights: its second stage's peak against 1f1b's, in copies of the layer
    width = 512 if args.quick else 4096
    layer_mib = 4 * width * width / 2**20
    peak = {s: median([stage_peak_mib(s, width) for _ in range(runs)]) for s in ("1f1b", "2bw")}
    emit("async_pipelines", {
        "setting": f"p={p} m={m} {batches} batches/epoch, F={1e3 * f:g} ms B={1e3 * b:g} ms, "
                   f"spawn, median of {runs} runs x {epochs} epochs",
        "one_fill_drain_epoch_s": round(ideal, 4),
        **{f"{s}_epoch_s": round(t, 4) for s, t in epoch.items()},
        "2bw_over_one_fill_drain": round(epoch["2bw"] / ideal, 3),
        "2bw_goal_met": epoch["2bw"] <= 1.1 * ideal,
        "2bw_measured_F_ms": round(1e3 * median(actions[0::2]), 2),
        "2bw_measured_B_ms": round(1e3 * median(actions[1::2]), 2),
        "one_fill_drain_at_measured_actions_s": round(real, 4),
        "2bw_over_one_fill_drain_at_measured_actions": round(epoch["2bw"] / real, 3),
        "2bw_over_1f1b": round(epoch["2bw"] / epoch["1f1b"], 3),
        "2bw_max_grad_norm_epoch_s": round(clipped, 4),  # the norms summed while stages work
        "2bw_max_grad_norm_over_2bw": round(clipped / epoch["2bw"], 3),
        "2bw_over_interleaved_1f1b": round(epoch["2bw"] / epoch["interleaved_1f1b"], 3),
        "pipedream_over_1f1b": round(epoch["pipedream"] / epoch["1f1b"], 3),
        "memory_layer_MiB": round(layer_mib, 1),
        "1f1b_stage_peak_MiB": round(peak["1f1b"], 1),
        "2bw_stage_peak_MiB": round(peak["2bw"], 1),
        "2bw_extra_weight_copies": round((peak["2bw"] - peak["1f1b"]) / layer_mib, 2),
        **{f"{s}_predicted_step_ms": round(1e3 * predicted[s], 2) for s in SCHEDULES},
        **{f"{s}_measured_ms_per_batch": round(1e3 * epoch[s] / batches, 2) for s in SCHEDULES},
        **{f"{s}_prediction_error": round(predicted[s] * batches / epoch[s] - 1, 3)
           for s in SCHEDULES},
    })


if __name__ == "__main__":
    main()
