"""Benchmark 9: a network of 400M+ parameters trained with n_stages = 1, 2 and 4 (spawned workers).

Each fit runs in a fresh process (the "driver"); this script samples the resident memory of the
driver and of every worker it starts (psutil, every 20 ms) and reports, per layout: the
driver's peak, each worker's peak (each process's own largest value, reached at its own moment),
the peak of all processes together (the largest sum seen at one instant: what the machine must
have), the sum of the per-process peaks (an upper bound: the processes peak at different
moments), the fit's wall time, the driver's peak while it pickles the fitted estimator, and
every 997th value of the trained weights, compared with the n_stages=1 fit's (the same network
trained the same way).
The fixed cost of a torch process is the resident memory of a bare ``import torch, skpipe``.

Goals (issue 10): worker peak <= 1.15 x (n_stages=1 peak) / p + the fixed cost; driver peak <= one
copy of the weights + the fixed cost; all processes <= 1.3 x the n_stages=1 peak; fit time <=
1.3 x the n_stages=1 fit.

    python benchmarks/large_network.py [--quick] [--stages 1 2 4] [--runs 1] [--network marked]

``--network marked``: the same parameters written as forward code (residual blocks with a
``pipe_split()`` after each), split by tracing instead of as an ``nn.Sequential``.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time

import numpy as np
import psutil

sys.path.insert(0, os.path.dirname(__file__))
from _common import emit  # noqa: E402

GiB = 2**30

JOB = r"""
import json, os, pickle, sys, time
import numpy as np, torch
from skpipe import PipeNetClassifier, shutdown_workers
from torch import nn
from torch.distributed.pipelining import pipe_split
from skpipe.modules import MLP
width, depth, stages, steps, batch = (int(a) for a in sys.argv[1:6])
network = sys.argv[7]


class Marked(nn.Module):
    # the MLP's parameters as forward code: residual blocks, a pipe_split() after each
    def __init__(self, n_features_in, n_outputs, width, depth):
        super().__init__()
        self.inp = nn.Linear(n_features_in, width)
        self.blocks = nn.ModuleList(nn.Linear(width, width) for _ in range(depth - 1))
        self.out = nn.Linear(width, n_outputs)

    def forward(self, x):
        h = torch.tanh(self.inp(x))
        for block in self.blocks:
            h = h + torch.tanh(block(h))
            pipe_split()
        return self.out(h)


rng = np.random.RandomState(0)
X = rng.randn(steps * batch, width).astype("float32")
y = rng.randint(0, 4, steps * batch)
shape = (dict(module=MLP, module__hidden_layer_sizes=(width,) * depth) if network == "mlp" else
         dict(module=Marked, module__width=width, module__depth=depth))
est = PipeNetClassifier(
    **shape, max_epochs=1, batch_size=batch,
    n_stages=stages, n_microbatches=max(2, stages), launcher="spawn", random_state=0, lr=1e-4,
)
def mark(name):
    print(json.dumps({"mark": name, "t": time.time()}), flush=True)
mark("fit")
t0 = time.perf_counter()
est.fit(X, y)
fit_s = time.perf_counter() - t0
mark("fitted")
shutdown_workers()
mark("pickle")
with open(os.devnull, "wb") as f:
    pickle.dump(est, f, protocol=5)
mark("pickled")
# every 997th value of every tensor: enough to compare layouts, small enough to keep
values = est.module_.state_dict().values()
sample = np.concatenate([v.reshape(-1)[::997].double().numpy() for v in values])
np.save(sys.argv[6], sample)
params = sum(p.numel() for p in est.module_.parameters())
print(json.dumps({"fit_s": fit_s, "params": params,
                  "weight_GiB": sum(p.numel() * 4 for p in est.module_.parameters()) / 2**30}),
      flush=True)
"""


class Sampler:
    """Resident memory of a process and its descendants, sampled until stopped."""

    def __init__(self, root: int, every: float = 0.02) -> None:
        self.root = psutil.Process(root)
        self.every = every
        self.samples: list[tuple[float, dict[int, int]]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            rss: dict[int, int] = {}
            try:
                procs = [self.root, *self.root.children(recursive=True)]
            except psutil.NoSuchProcess:
                break
            for p in procs:
                try:
                    rss[p.pid] = p.memory_info().rss
                except psutil.NoSuchProcess:
                    pass
            self.samples.append((time.time(), rss))
            time.sleep(self.every)

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()

    def peaks(self, start: float = 0.0, end: float = float("inf")) -> tuple[dict[int, int], int]:
        """Per-process peak and the peak of the sum, over samples in [start, end]."""
        per: dict[int, int] = {}
        total = 0
        for t, rss in self.samples:
            if start <= t <= end:
                for pid, b in rss.items():
                    per[pid] = max(per.get(pid, 0), b)
                total = max(total, sum(rss.values()))
        return per, total


def bare_process_rss() -> float:
    """Resident bytes of a Python process that imported torch and skpipe (the fixed cost)."""
    code = "import torch, skpipe, psutil, os; print(psutil.Process(os.getpid()).memory_info().rss)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    return float(out.stdout.strip())


def sampled_job(
    code: str, args: list[object], what: str, **env: str
) -> tuple[int, Sampler, list[dict], dict[str, float]]:
    """Run ``code`` in a fresh Python process (``args`` on its command line, ``env`` added to
    its environment) while sampling its memory and its children's; its pid, the sampler, the
    JSON lines it printed and the times of its ``{"mark": ...}`` lines."""
    environ = dict(os.environ, PYTHONPATH=os.pathsep.join([os.getcwd(), *sys.path]), **env)
    proc = subprocess.Popen([sys.executable, "-c", code, *map(str, args)],
                            stdout=subprocess.PIPE, text=True, env=environ)
    sampler = Sampler(proc.pid)
    lines = [json.loads(line) for line in proc.stdout or () if line.startswith("{")]
    proc.wait()
    sampler.stop()
    if proc.returncode != 0:
        raise RuntimeError(f"{what} failed (exit {proc.returncode})")
    return proc.pid, sampler, lines, {m["mark"]: m["t"] for m in lines if "mark" in m}


def run(
    width: int, depth: int, stages: int, steps: int, batch: int, folder: str, network: str
) -> dict:
    sample = os.path.join(folder, f"weights-{stages}.npy")
    pid, sampler, lines, marks = sampled_job(
        JOB, [width, depth, stages, steps, batch, sample, network], f"the n_stages={stages} fit"
    )
    result = next(m for m in lines if "fit_s" in m)
    per, total = sampler.peaks(marks["fit"], marks["fitted"])  # the fit only
    workers = sorted((b for p, b in per.items() if p != pid), reverse=True)
    whole, _ = sampler.peaks()
    pickle_per, _ = sampler.peaks(marks["pickle"] - 0.05, marks["pickled"] + 0.05)
    return {
        "n_stages": stages,
        "fit_s": round(result["fit_s"], 2),
        "driver_peak_GiB": round(per.get(pid, 0) / GiB, 3),
        "worker_peak_GiB": [round(b / GiB, 3) for b in workers],
        "all_processes_peak_GiB": round(total / GiB, 3),  # the largest sum at one instant
        "sum_of_peaks_GiB": round((per.get(pid, 0) + sum(workers)) / GiB, 3),
        "pickle_driver_peak_GiB": round(pickle_per.get(pid, 0) / GiB, 3),
        "process_peak_GiB": round(whole.get(pid, 0) / GiB, 3),  # the whole job
        "params": result["params"],
        "weight_GiB": round(result["weight_GiB"], 3),
        "weights": np.load(sample),
    }


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--quick", action="store_true", help="a 4M-parameter network, p = 1, 2")
    parser.add_argument("--stages", type=int, nargs="+", default=None)
    parser.add_argument("--runs", type=int, default=1, help="rounds; times are medians")
    parser.add_argument("--width", type=int, default=4096)
    parser.add_argument("--depth", type=int, default=24)
    parser.add_argument("--network", choices=["mlp", "marked"], default="mlp",
                        help="marked: the same parameters as forward code split at pipe_split()")
    args = parser.parse_args()
    width, depth = (256, 4) if args.quick else (args.width, args.depth)
    stages = args.stages or ([1, 2] if args.quick else [1, 2, 4])
    steps, batch = 2, 16
    fixed = bare_process_rss()
    # what a driver and a worker hold that is not this network: the same job on a tiny one
    with tempfile.TemporaryDirectory() as folder:
        tiny = {p: run(64, 4, p, steps, batch, folder, args.network) for p in stages}
    rounds: dict[int, list[dict]] = {p: [] for p in stages}
    with tempfile.TemporaryDirectory() as folder:
        for _ in range(args.runs):
            for p in stages:  # side by side in each round
                rounds[p].append(run(width, depth, p, steps, batch, folder, args.network))
    rows = []
    for p in stages:
        row = dict(rounds[p][-1])
        row["fit_s"] = round(statistics.median(r["fit_s"] for r in rounds[p]), 2)
        rows.append(row)
    base = next((r for r in rows if r["n_stages"] == 1), None)
    fixed_gib = fixed / GiB
    for row in rows:
        p = row["n_stages"]
        row["tiny_network_driver_GiB"] = tiny[p]["process_peak_GiB"]
        row["tiny_network_worker_GiB"] = max(tiny[p]["worker_peak_GiB"], default=None)
        if base is None or row is base:
            continue
        # the goals' "fixed cost of a torch process": a bare import, and (in brackets) what
        # the same process holds training a tiny network
        worker_fixed = row["tiny_network_worker_GiB"]
        driver_fixed = row["tiny_network_driver_GiB"]
        single = base["driver_peak_GiB"] - base["tiny_network_driver_GiB"]  # the fit's own bytes
        row["goals"] = {
            "worker_peak_vs_goal": round(
                max(row["worker_peak_GiB"]) / (1.15 * base["driver_peak_GiB"] / p + fixed_gib), 3
            ),
            "worker_peak_vs_goal_role_fixed": round(
                max(row["worker_peak_GiB"]) / (1.15 * single / p + worker_fixed), 3
            ),
            "driver_peak_vs_goal": round(
                row["driver_peak_GiB"] / (row["weight_GiB"] + fixed_gib), 3
            ),
            "driver_peak_vs_goal_role_fixed": round(
                row["driver_peak_GiB"] / (row["weight_GiB"] + driver_fixed), 3
            ),
            "all_processes_vs_single": round(
                row["all_processes_peak_GiB"] / base["all_processes_peak_GiB"], 3
            ),
            "fit_time_vs_single": round(
                statistics.median(
                    a["fit_s"] / b["fit_s"] for a, b in zip(rounds[p], rounds[1], strict=True)
                ),
                3,
            ),
            # trained weights (every 997th value) against the n_stages=1 fit's
            "max_abs_weight_diff_vs_single": float(
                np.abs(row["weights"] - base["weights"]).max()
            ),
        }
    for row in rows:
        del row["weights"], row["process_peak_GiB"]
    largest = rows[-1]
    emit(
        "large_network",
        {
            "network": args.network,
            "params": rows[0]["params"],
            "fixed_process_GiB": round(fixed_gib, 3),
            "steps": steps,
            "batch_size": batch,
            "runs": args.runs,
            # the headline: all processes together at the most stages, vs one stage
            "all_processes_vs_single": largest.get("goals", {}).get(
                "all_processes_vs_single", 1.0
            ),
            "layouts": rows,
        },
    )


if __name__ == "__main__":
    main()
