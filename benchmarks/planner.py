"""Benchmark 8: the planner (``schedule='auto'``) against measurement.

1. Prediction on sleep networks: for every schedule, p = 2 and 4, layers whose forward F,
   input gradient I and weight gradient W sleep for set times, the planner's predicted step
   (from its own measurement of the layers and of messages between two processes) against the
   step measured with spawned workers. Two kinds of layer: a weight op with both halves of its
   backward on it ("layers"), and blocks (a weight op followed by a sleeping op without
   weights, the shape of residual and attention blocks: "blocks").
2. Prediction on real compute: an MLP, a tabular ResNet and an FT-Transformer from
   ``skpipe.modules`` on two spawned CPU workers (one thread each), every schedule, and the
   one-stage step (this process, all its threads); whether the advice ("one stage would be
   faster") says what the measurements say.
3. Choice: on three sleep profiles, one whose times grow with the rows, and the
   FT-Transformer, the measured step of the planner's choice against the fastest of all valid
   candidates, each measured; and the advice against the one-stage step measured.
4. Cost: planning time (cold, and cached) against an epoch.

    python benchmarks/planner.py [--quick] [--only prediction_sleep,prediction_real,...]
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
from _common import (  # noqa: E402
    BlockSleepLayer,
    RowSleepLayer,
    SplitSleepLayer,
    emit,
    median,
    runner_step_times,
)

from skpipe import shutdown_workers  # noqa: E402
from skpipe.modules import FTTransformer, TabularResNet  # noqa: E402
from skpipe.engine.planner import _planner as PL  # noqa: E402
from skpipe.engine.planner._measure import forget_measurements  # noqa: E402
from skpipe.engine.plan import _schedules as S  # noqa: E402
from skpipe.engine.plan._config import TrainSpec, make_config  # noqa: E402
from skpipe.engine.plan._plan import make_plan  # noqa: E402
from skpipe.engine.runners._runners import make_runner, resolve_launcher  # noqa: E402


def config(p: int, m: int, schedule: str, v: int, batch: int) -> object:
    """Spawned CPU workers; one stage runs in this process, as a fit's n_stages=1 does."""
    return make_config(
        n_stages=p, n_microbatches=m, schedule=schedule, chunks_per_stage=v,
        balance="uniform", checkpoint="never", launcher=resolve_launcher("spawn", p),
        devices=("cpu",) * p,
        batch_size=batch, precision="float32", max_grad_norm=None, timeout=300.0,
    )


def measured_step(net: nn.Module, cfg: object, steps: int) -> float:
    batch = cfg.batch_size  # type: ignore[attr-defined]
    x, y = torch.randn(batch, 8), torch.zeros(batch, 8)
    return runner_step_times(net, cfg, x, y, steps)[0]  # type: ignore[arg-type]


SGD0 = (torch.optim.SGD, {"lr": 0.0})  # what runner_step_times steps with


def predicted_step(net: nn.Module, cfg: object) -> float:
    x = torch.randn(cfg.batch_size, 8)  # type: ignore[attr-defined]
    profile = PL.measure(net, x, PL.rows_to_measure(cfg.batch_size), "cpu", 1)  # type: ignore[attr-defined]
    step, _, _ = PL.predict(profile, cfg, cfg.schedule, cfg.n_microbatches,  # type: ignore[arg-type, attr-defined]
                            cfg.chunks_per_stage, PL.message_cost("cpu"), local=False,  # type: ignore[attr-defined]
                            optimizer=PL.optimizer_cost(*SGD0, "cpu", 1))
    return step


def prediction(quick: bool, steps: int, layer: type[nn.Module]) -> dict:
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
            net = nn.Sequential(*[layer(f / v, i / v, w / v) for _ in range(p * v)])
            cfg = config(p, m, schedule, v, 4 * m)
            shutdown_workers()  # the planner measures before a fit's workers start
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


def one_stage_step(
    net: nn.Module, x: torch.Tensor, y: torch.Tensor, batch: int, steps: int
) -> tuple[float, float]:
    """The one-stage step (ms), predicted with this process's threads and measured in this
    process, as a fit's n_stages=1 runs."""
    threads = torch.get_num_threads()
    single = PL.measure(net, x, PL.rows_to_measure(batch), "cpu", threads)
    predicted = PL.one_stage_ms(single, batch, PL.optimizer_cost(*SGD0, "cpu", threads))
    measured = runner_step_times(net, config(1, 1, "gpipe", 1, batch), x, y,  # type: ignore[arg-type]
                                 steps, warm=2)[0]
    return predicted, 1e3 * measured


def advice_right(said: bool, one_over_pipelined: float) -> bool:
    """The goal: said where one stage measures >= 10 % faster than the best pipelined step,
    silent where pipelining does; either is right in between."""
    if one_over_pipelined <= 1 / 1.10:
        return said
    if one_over_pipelined >= 1.10:
        return not said
    return True


def networks(quick: bool) -> dict[str, tuple[nn.Module, int, int]]:
    """The real-compute networks: (network, input width, batch)."""
    torch.manual_seed(0)
    if quick:
        return {"mlp": (nn.Sequential(*[m for _ in range(4) for m in (nn.Linear(64, 64),
                                                                       nn.Tanh())]), 64, 64)}
    return {
        "mlp": (nn.Sequential(*[m for _ in range(8) for m in (nn.Linear(512, 512), nn.Tanh())]),
                512, 256),
        "tabular_resnet": (TabularResNet(16, 2, width=256, n_blocks=8), 16, 256),
        "ft_transformer": (FTTransformer(16, 2, d_token=64, n_blocks=4), 16, 256),
    }


def real_compute(quick: bool, steps: int) -> dict:
    """Each network on two spawned CPU workers (one thread each) and on one stage in this
    process: predicted against measured, and whether the advice is right."""
    out: dict = {}
    message = PL.message_cost("cpu")
    for name, (net, width, batch) in networks(quick).items():
        x = torch.randn(batch, width)
        y = torch.zeros(batch, net(x[:2]).shape[1])
        rows = {}
        for schedule, m in ([("1f1b", 4)] if quick else
                            [("gpipe", 4), ("1f1b", 4), ("1f1b", 8), ("interleaved_1f1b", 4),
                             ("interleaved_zero_bubble", 4), ("zbv", 4)]):
            v = S.resolve_chunks(schedule, "auto")
            cfg = config(2, m, schedule, v, batch)
            profile = PL.measure(net, x, PL.rows_to_measure(batch), "cpu", 1)
            predicted, _, _ = PL.predict(profile, cfg, schedule, m, v, message, local=False,
                                         optimizer=PL.optimizer_cost(*SGD0, "cpu", 1))
            measured, _ = runner_step_times(net, cfg, x, y, steps, warm=2)  # type: ignore[arg-type]
            rows[f"{schedule} m={m}"] = {"predicted_ms": round(predicted * 1e3, 2),
                                         "measured_ms": round(measured * 1e3, 2),
                                         "error": round(predicted / measured - 1, 3)}
        shutdown_workers()
        one_predicted, one_measured = one_stage_step(net, x, y, batch, steps)
        best_measured = min(r["measured_ms"] for r in rows.values())
        best_predicted = min(r["predicted_ms"] for r in rows.values())
        says_one_stage = one_predicted < best_predicted  # what Choice.advice tests
        out[name] = {
            "batch": batch, "cases": rows,
            "one_stage": {"predicted_ms": round(one_predicted, 2),
                          "measured_ms": round(one_measured, 2),
                          "error": round(one_predicted / one_measured - 1, 3)},
            "max_abs_error": max([abs(r["error"]) for r in rows.values()]
                                 + [abs(one_predicted / one_measured - 1)]),
            "advice": {"one_stage_over_best_pipelined_measured":
                       round(one_measured / best_measured, 3),
                       "said": says_one_stage,
                       "right": advice_right(says_one_stage, one_measured / best_measured)},
        }
    return out


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
    cases: dict[str, tuple[nn.Module, int, int]] = {}
    for name, layers in PROFILES.items():
        if quick and name != "uniform":
            continue
        cases[name] = (nn.Sequential(*[SplitSleepLayer(f, i, w) for f, i, w in layers]), 8, 16)
    if not quick:
        # times growing with the rows, as compute does: here two stages beat one
        cases["uniform_per_row"] = (nn.Sequential(*[RowSleepLayer(0.002, 0.002, 0.002)
                                                    for _ in range(8)]), 8, 16)
        cases["ft_transformer"] = networks(False)["ft_transformer"]
    for name, (net, width, batch) in cases.items():
        cfg = config(2, 2, "gpipe", 1, batch)
        x = torch.randn(batch, width)
        y = torch.zeros(batch, net(x[:2]).shape[1])
        profile = PL.measure(net, x, PL.rows_to_measure(batch), "cpu", 1)
        found = PL.candidates(profile, cfg, message=PL.message_cost("cpu"), local=False,
                              optimizer=PL.optimizer_cost(*SGD0, "cpu", 1))
        if quick:
            found = found[:3]
        measured = {}
        for c in found:
            key = (c.schedule, c.n_microbatches, c.chunks_per_stage)
            measured[key] = runner_step_times(
                net, config(2, c.n_microbatches, c.schedule, c.chunks_per_stage, batch), x, y,
                steps, warm=2)[0]
        shutdown_workers()
        chosen = next(c for c in found if c.chosen)
        pick = measured[(chosen.schedule, chosen.n_microbatches, chosen.chunks_per_stage)]
        best_key = min(measured, key=measured.__getitem__)
        # the advice: the one-stage step predicted (this process's threads) and measured
        one_predicted, one_measured = one_stage_step(net, x, y, batch, steps)
        said = one_predicted < chosen.predicted_step_ms  # what Choice.advice tests
        ratio = one_measured / (1e3 * measured[best_key])
        out[name + "_advice"] = {
            "one_stage_predicted_ms": round(one_predicted, 1),
            "one_stage_measured_ms": round(one_measured, 1),
            "one_stage_over_best_pipelined_measured": round(ratio, 3),
            "said": said,
            "right": advice_right(said, ratio),
        }
        out[name] = {
            "candidates": len(found),
            "chosen": f"{chosen.schedule} m={chosen.n_microbatches} v={chosen.chunks_per_stage}",
            "chosen_predicted_ms": round(chosen.predicted_step_ms, 1),
            "chosen_measured_ms": round(pick * 1e3, 1),
            "best_measured": f"{best_key[0]} m={best_key[1]} v={best_key[2]}",
            "best_measured_ms": round(measured[best_key] * 1e3, 1),
            "ratio": round(pick / measured[best_key], 3),  # goal <= 1.05
        }
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


_PLAN_MEMORY = r"""
import json, resource, sys, numpy as np
from skpipe import PipeNetClassifier
width, depth, schedule = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3]
rng = np.random.RandomState(0)
X, y = rng.randn(256, width).astype("float32"), rng.randint(0, 4, 256)
est = PipeNetClassifier(module__hidden_layer_sizes=(width,) * depth, n_stages=4,
                        schedule=schedule, launcher="spawn", batch_size=64, random_state=0)
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
est.plan(X, y)
after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
print(json.dumps({"before_MiB": before / 1024, "after_MiB": after / 1024}))
"""


def planning_memory(quick: bool) -> dict:
    """The driver's peak resident memory before and after ``plan()`` of an MLP built on the
    meta device (fresh processes): with a schedule given (shapes only), and with
    ``schedule='auto'`` (the planner times the layers with values)."""
    import json
    import subprocess

    width, depth = (512, 4) if quick else (4096, 16)
    out: dict = {"width": width, "hidden_layers": depth,
                 "weights_MiB": round(4 * depth * width * width / 2**20)}
    for schedule in ("1f1b", "auto"):
        done = subprocess.run([sys.executable, "-c", _PLAN_MEMORY, str(width), str(depth),
                               schedule], capture_output=True, text=True, check=True)
        figures = json.loads(done.stdout.strip().splitlines()[-1])
        out[schedule] = {k: round(v, 1) for k, v in figures.items()}
        out[schedule]["rise_MiB"] = round(figures["after_MiB"] - figures["before_MiB"], 1)
    return out


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
    ap.add_argument("--only", default="", help="comma-separated parts to run (default: all)")
    ap.add_argument("--timeline", action="store_true",
                    help="print the spans of the real-compute GPipe step instead")
    args = ap.parse_args()
    if args.timeline:
        emit("planner_timeline", {"target_512_wide": timeline(512),
                                  "target_8_wide": timeline(8)})
        return
    steps = 1 if args.quick else args.steps
    parts = {
        "prediction_sleep": lambda: prediction(args.quick, steps, SplitSleepLayer),
        "prediction_blocks": lambda: prediction(args.quick, steps, BlockSleepLayer),
        "prediction_real": lambda: real_compute(args.quick, steps),
        "choice": lambda: choice(args.quick, steps),
        "cost": lambda: cost(args.quick),
        "planning_memory": lambda: planning_memory(args.quick),
    }
    only = args.only.split(",") if args.only else list(parts)
    unknown = sorted(set(only) - set(parts))
    if unknown:
        ap.error(f"--only: unknown part(s) {unknown}; the parts are {list(parts)}")
    message = PL.message_cost("cpu")
    emit("planner", {
        "steps": steps,
        "message_cost": {"latency_us": round(message.latency * 1e6, 1),
                         "GB_per_s": round(1e-9 / message.per_byte, 2)
                         if message.per_byte else None,
                         "per_action_us": round(message.per_action * 1e6, 1),
                         "compute_lost_ns_per_byte": [round(message.send_per_byte * 1e9, 2),
                                                      round(message.receive_per_byte * 1e9, 2)]},
        **{name: parts[name]() for name in only},
    })


if __name__ == "__main__":
    main()
