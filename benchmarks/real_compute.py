"""Benchmark 3: real compute split across two CPU workers.

A deep MLP trained with n_stages=2 (one thread per worker) against one process with one thread
(ideal speed-up 2m/(m+1) for m micro-batches) and one process with two threads.

    python benchmarks/real_compute.py [--quick]
"""

from __future__ import annotations

import argparse
import os
import sys

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(__file__))
from _common import emit, median  # noqa: E402

from skpipe import PipeNetClassifier, shutdown_workers  # noqa: E402


def epoch_time(threads: int, **kw: object) -> float:
    torch.set_num_threads(threads)
    est = PipeNetClassifier(**kw).fit(*DATA)
    return median([e["dur"] for e in est.history_][1:])


def main() -> None:
    global DATA
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true")
    args = ap.parse_args()
    n, width, depth, epochs, m = (512, 64, 4, 3, 4) if args.quick else (8192, 512, 8, 4, 8)
    rng = np.random.RandomState(0)
    X = rng.normal(size=(n, width)).astype(np.float32)
    DATA = (X, (X[:, 0] > 0).astype(np.int64))
    common = dict(
        module__hidden_layer_sizes=(width,) * depth,
        max_epochs=epochs,
        batch_size=256,
        random_state=0,
    )
    one_thread = epoch_time(1, devices=["cpu"], **common)
    two_threads = epoch_time(2, devices=["cpu"], **common)
    os.environ["OMP_NUM_THREADS"] = "2"  # two cores for the two workers: one thread each
    pipelined = epoch_time(
        1,
        n_stages=2,
        n_microbatches=m,
        schedule="1f1b",
        launcher="spawn",
        balance="parameters",
        **common,
    )
    shutdown_workers()
    emit(
        "real_compute",
        {
            "rows": n,
            "width": width,
            "hidden_layers": depth,
            "n_microbatches": m,
            "one_process_1_thread_s_per_epoch": round(one_thread, 4),
            "one_process_2_threads_s_per_epoch": round(two_threads, 4),
            "two_stages_1_thread_each_s_per_epoch": round(pipelined, 4),
            "speedup_vs_1_thread": round(one_thread / pipelined, 3),
            "ideal_speedup": round(2 * m / (m + 1), 3),
            "speedup_vs_2_threads": round(two_threads / pipelined, 3),
        },
    )


DATA = None

if __name__ == "__main__":
    main()
