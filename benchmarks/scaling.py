"""Benchmark 7: data-parallel replicas of a pipeline (``n_replicas``).

1. Weak scaling on sleep layers (CPU-independent): 2 replicas x 2 stages stepping on twice the
   batch against 1 replica x 2 stages, the same rows per replica; throughput = 2 x t1 / t2.
2. Real compute on this machine's cores: ``n_stages=1, n_replicas=2`` (one thread per worker)
   against one process with one thread (ideal 2x) and with two threads, on a deep MLP.
3. Against raw torch DDP (issue 22's goal: within 1.05x): ``n_replicas=2, n_stages=1`` on
   ``spawn`` beside ``DistributedDataParallel`` over two gloo processes, one thread each, on the
   same network (skpipe's ``MLP``), data, batch and optimizer (Adam), each process taking half
   of every batch; seconds per epoch (the first epoch left out), alternated ``--runs`` times.
4. The gradient all-reduce per step (summing a stage's gradients over its replicas) against the
   parameter bytes, so that a cluster user can predict it: the raw all-reduce in skpipe's
   buckets between two gloo processes (ms and the bandwidth it implies), and what a skpipe step
   still waited for after its backward (the rest overlapped with it).

5. Each synchronous step's next batch sent along with it (``P.SyncStep``: the spawned stages
   compute its forward and backward while the driver runs the step's callbacks and makes the
   next message) against plain steps (the driver's round trip between two steps), on
   ``n_replicas=2, n_stages=1``: on sleep layers (forward 5 ms, backward 10 ms: the CPU idles
   while the "device" works, as spawned GPU stages leave it), and on the MLP of 3 (two workers
   taking both cores of a 2-core machine, so that the driver has no core of its own).

Every ratio compares runs made side by side in this script, alternated ``--runs`` times;
figures are medians.

    python benchmarks/scaling.py [--quick] [--runs 3] [--only ddp|ahead]
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import numpy as np
import torch
import torch.distributed as dist
from torch import nn

sys.path.insert(0, os.path.dirname(__file__))
from _common import SleepLayer, emit, median, run_raw_ranks, runner_step_times  # noqa: E402

from skpipe import PipeNetClassifier, shutdown_workers  # noqa: E402
from skpipe.modules import MLP  # noqa: E402
from skpipe.engine.plan._config import make_config  # noqa: E402
from skpipe.engine.parallel._replicas import BUCKET_BYTES  # noqa: E402


def config(n_stages: int, n_replicas: int, m: int, batch: int, schedule: str = "1f1b") -> object:
    return make_config(
        n_stages=n_stages, n_replicas=n_replicas, n_microbatches=m, schedule=schedule,
        chunks_per_stage="auto", balance="uniform", checkpoint="never", launcher="spawn",
        devices=("cpu",) * (n_stages * n_replicas), batch_size=batch, precision="float32",
        max_grad_norm=None, timeout=300.0,
    )


def step_times(net: nn.Module, cfg: object, x: torch.Tensor, y: torch.Tensor,
               steps: int) -> tuple[float, list[dict[str, float]]]:
    """Median step time (after a first, warming step) and the ranks' stats."""
    return runner_step_times(net, cfg, x, y, steps)  # type: ignore[arg-type]


def weak_scaling(f: float, b: float, m: int, steps: int, runs: int) -> dict:
    net = lambda: nn.Sequential(SleepLayer(f, b), SleepLayer(f, b))  # noqa: E731
    rows = 4 * m  # per replica
    one, two = [], []
    for _ in range(runs):
        x, y = torch.randn(rows, 8), torch.zeros(rows, 8)
        one.append(step_times(net(), config(2, 1, m, rows), x, y, steps)[0])
        x2, y2 = torch.randn(2 * rows, 8), torch.zeros(2 * rows, 8)
        two.append(step_times(net(), config(2, 2, m, 2 * rows), x2, y2, steps)[0])
    ratio = median([a / b for a, b in zip(one, two, strict=True)])
    return {
        "F_s": f, "B_s": b, "n_microbatches": m, "rows_per_replica": rows,
        "one_replica_step_s": round(median(one), 4),
        "two_replicas_step_s": round(median(two), 4),
        "step_time_ratio": round(ratio, 3),  # goal >= 0.9
        "throughput_x": round(2 * ratio, 3),  # goal >= 1.8
    }


def epoch_time(threads: int, data: tuple, **kw: object) -> float:
    torch.set_num_threads(threads)
    est = PipeNetClassifier(**kw).fit(*data)
    return median([e["dur"] for e in est.history_][1:])


def real_compute(quick: bool, runs: int, batch: int) -> dict:
    n, width, depth, epochs = (512, 64, 4, 3) if quick else (8192, 512, 8, 4)
    rng = np.random.RandomState(0)
    X = rng.normal(size=(n, width)).astype(np.float32)
    data = (X, (X[:, 0] > 0).astype(np.int64))
    common = dict(module__hidden_layer_sizes=(width,) * depth, max_epochs=epochs,
                  batch_size=batch, random_state=0)
    saved = os.environ.get("OMP_NUM_THREADS")
    one, two_threads, replicas = [], [], []
    for _ in range(runs):
        one.append(epoch_time(1, data, devices=["cpu"], **common))
        two_threads.append(epoch_time(2, data, devices=["cpu"], **common))
        os.environ["OMP_NUM_THREADS"] = "2"  # two cores for the two workers: one thread each
        replicas.append(epoch_time(1, data, n_replicas=2, launcher="spawn", **common))
        shutdown_workers()
        if saved is None:
            os.environ.pop("OMP_NUM_THREADS")
        else:
            os.environ["OMP_NUM_THREADS"] = saved
    vs_one = median([a / b for a, b in zip(one, replicas, strict=True)])
    vs_two = median([a / b for a, b in zip(two_threads, replicas, strict=True)])
    return {
        "rows": n, "width": width, "hidden_layers": depth, "batch_size": batch,
        "one_process_1_thread_s_per_epoch": round(median(one), 4),
        "one_process_2_threads_s_per_epoch": round(median(two_threads), 4),
        "two_replicas_1_thread_each_s_per_epoch": round(median(replicas), 4),
        "speedup_vs_1_thread": round(vs_one, 3),
        "ideal_speedup": 2.0,
        "speedup_vs_2_threads": round(vs_two, 3),
    }


def _ddp_epochs(rank: int, world: int, data: tuple, hidden: tuple, batch: int,
                epochs: int) -> list[float]:
    """Raw torch DDP: each of ``world`` gloo processes takes its share of every batch."""
    X, y = (torch.from_numpy(a) for a in data)
    torch.manual_seed(0)
    net = nn.parallel.DistributedDataParallel(MLP(X.shape[1], 2, hidden))
    optimizer = torch.optim.Adam(net.parameters(), lr=1e-3)
    criterion = nn.CrossEntropyLoss()
    durations = []
    for _ in range(epochs):
        dist.barrier()
        t0 = time.perf_counter()
        for start in range(0, len(X), batch):
            rows = slice(start + rank * batch // world, start + (rank + 1) * batch // world)
            optimizer.zero_grad()
            loss = criterion(net(X[rows]), y[rows])
            loss.backward()
            optimizer.step()
            loss.item()  # what a training loop reports
        durations.append(time.perf_counter() - t0)
    return durations


def versus_ddp(quick: bool, runs: int) -> dict:
    n, width, depth, epochs, batch = (512, 64, 2, 3, 64) if quick else (8192, 512, 8, 4, 256)
    rng = np.random.RandomState(0)
    X = rng.normal(size=(n, width)).astype(np.float32)
    y = (X[:, 0] > 0).astype(np.int64)
    hidden = (width,) * depth
    saved = os.environ.get("OMP_NUM_THREADS")
    ddp, ours = [], []
    for _ in range(runs):
        durations: list[float] = run_raw_ranks(  # type: ignore[assignment]
            _ddp_epochs, 2, ((X, y), hidden, batch, epochs))
        ddp.append(median(durations[1:]))
        os.environ["OMP_NUM_THREADS"] = "2"  # two cores for the two workers: one thread each
        ours.append(epoch_time(1, (X, y), n_replicas=2, n_stages=1, launcher="spawn",
                               module__hidden_layer_sizes=hidden, max_epochs=epochs,
                               batch_size=batch, optimizer=torch.optim.Adam, lr=1e-3,
                               # every row trained, as raw DDP's epoch does (no held-out
                               # rows and no validation pass)
                               train_split=None, random_state=0))
        shutdown_workers()
        if saved is None:
            os.environ.pop("OMP_NUM_THREADS")
        else:
            os.environ["OMP_NUM_THREADS"] = saved
    return {
        "rows": n, "width": width, "hidden_layers": depth, "batch_size": batch,
        "optimizer": "Adam", "processes": "2 x 1 thread, gloo",
        "raw_ddp_s_per_epoch": round(median(ddp), 4),
        "skpipe_s_per_epoch": round(median(ours), 4),
        "skpipe_vs_ddp": round(median([a / b for a, b in zip(ours, ddp, strict=True)]), 3),
    }


class SleepNet(nn.Module):
    """A linear layer, then a layer that sleeps ``f`` seconds forward and ``b`` backward."""

    def __init__(self, n_features_in: int, n_outputs: int, f: float = 0.005,
                 b: float = 0.010) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Linear(n_features_in, 8), SleepLayer(f, b),
                                  nn.Linear(8, n_outputs))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x)


def step_ahead(quick: bool, runs: int) -> dict:
    """Seconds per step with the next batch sent ahead and without, side by side."""
    from skpipe.engine.plan import _config

    rng = np.random.RandomState(0)
    out = {}
    for workload in ("sleep layers", "mlp 512 x 8, 2 workers on 2 cores"):
        if workload == "sleep layers":
            n, batch, epochs = (256, 32, 2) if quick else (2048, 64, 4)
            X = rng.normal(size=(n, 8)).astype(np.float32)
            kw: dict = dict(module=SleepNet)
        else:
            n, batch, epochs = (512, 64, 2) if quick else (8192, 256, 4)
            X = rng.normal(size=(n, 512)).astype(np.float32)
            kw = dict(module__hidden_layer_sizes=(64 if quick else 512,) * 8)
        data = (X, (X[:, 0] > 0).astype(np.int64))
        times: dict[bool, list[float]] = {True: [], False: []}
        saved = os.environ.get("OMP_NUM_THREADS")
        os.environ["OMP_NUM_THREADS"] = "2"  # two cores for the two workers: one thread each
        try:
            for _ in range(runs):
                for ahead in (True, False):
                    _config.STEP_AHEAD = ahead
                    seconds = epoch_time(1, data, n_replicas=2, n_stages=1, launcher="spawn",
                                         max_epochs=epochs, batch_size=batch,
                                         train_split=None, random_state=0,
                                         optimizer=torch.optim.Adam, lr=1e-3, **kw)
                    times[ahead].append(seconds / (n // batch))
                    shutdown_workers()
        finally:
            _config.STEP_AHEAD = True
            if saved is None:
                os.environ.pop("OMP_NUM_THREADS")
            else:
                os.environ["OMP_NUM_THREADS"] = saved
        out[workload] = {
            "ahead_ms_per_step": round(median(times[True]) * 1e3, 2),
            "plain_ms_per_step": round(median(times[False]) * 1e3, 2),
            "ahead_vs_plain": round(median([a / b for a, b in zip(times[True], times[False],
                                                                  strict=True)]), 3),
        }
    return out


def _raw_allreduce(rank: int, world: int, sizes: list[int], steps: int) -> list[float]:
    """All-reduce ``sizes`` bytes in skpipe's buckets between ``world`` plain gloo processes."""
    out = []
    for nbytes in sizes:
        flat = torch.ones(nbytes // 4)
        chunk = BUCKET_BYTES // 4
        times = []
        for _ in range(steps + 1):
            dist.barrier()
            t0 = time.perf_counter()
            works = [dist.all_reduce(flat[i : i + chunk], async_op=True)
                     for i in range(0, flat.numel(), chunk)]
            for work in works:
                work.wait()
            times.append(time.perf_counter() - t0)
        out.append(median(times[1:]))
    return out


def allreduce_cost(sizes_mib: list[float], steps: int) -> dict:
    """Per size: the raw all-reduce between two processes (what a step pays without overlap),
    and what a skpipe step with two one-stage replicas waited for after its backward."""
    sizes = [int(mib * 2**20) for mib in sizes_mib]
    raw: list[float] = run_raw_ranks(_raw_allreduce, 2, (sizes, steps))  # type: ignore[assignment]
    rows = []
    for mib, raw_s in zip(sizes_mib, raw, strict=True):
        width = 512
        layers = max(1, round(mib * 2**20 / 4 / (width * width)))
        net = nn.Sequential(*[nn.Linear(width, width) for _ in range(layers)])
        x, y = torch.randn(8, width), torch.zeros(8, width)
        _, stats = step_times(net, config(1, 2, 1, 8), x, y, steps)
        exposed = median([s["gradient_sync_ms_per_step"] for s in stats])
        rows.append({
            "gradient_MiB": round(mib, 1),
            "raw_allreduce_ms": round(raw_s * 1e3, 2),
            "raw_GB_per_s": round(mib * 2**20 / raw_s / 1e9, 2),
            "skpipe_step_waited_ms": round(exposed, 2),  # after the backward (overlap)
        })
    shutdown_workers()
    return {"replicas": 2, "backend": "gloo (loopback)", "bucket_MiB": BUCKET_BYTES / 2**20,
            "sizes": rows}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true", help="tiny setting (for the test suite)")
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--only", choices=["ddp", "ahead"],
                    help="only the comparison with raw DDP, or only the next batch ahead")
    args = ap.parse_args()
    runs = 1 if args.quick else args.runs
    if args.only == "ddp":
        emit("scaling", {"runs": runs, "versus_ddp": versus_ddp(args.quick, runs)})
        return
    if args.only == "ahead":
        emit("scaling", {"runs": runs, "next_batch_ahead": step_ahead(args.quick, runs)})
        return
    if args.quick:
        weak = weak_scaling(0.002, 0.004, 2, 2, runs)
    else:
        weak = weak_scaling(0.010, 0.020, 8, 4, runs)
    shutdown_workers()
    batches = [256] if args.quick else [256, 1024]
    real = [real_compute(args.quick, runs, batch) for batch in batches]
    ddp = versus_ddp(args.quick, runs)  # goal: skpipe_vs_ddp <= 1.05
    sizes = [1.0, 4.0] if args.quick else [4.0, 16.0, 64.0, 256.0]
    cost = allreduce_cost(sizes, 2 if args.quick else 5)
    ahead = step_ahead(args.quick, runs)
    emit("scaling", {"runs": runs, "weak_scaling_sleep": weak, "real_compute": real,
                     "versus_ddp": ddp, "gradient_allreduce": cost, "next_batch_ahead": ahead})


if __name__ == "__main__":
    main()
