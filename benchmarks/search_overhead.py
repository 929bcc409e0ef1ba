"""Benchmark 5: what a grid search pays per fit for pipelining.

A tiny network in GridSearchCV(cv=5) with n_stages=2: wall time per fit with cold workers
(stopped before every fit), with warm workers (reused across the search's fits), and with
n_stages=1.

    python benchmarks/search_overhead.py [--quick]
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import numpy as np
from sklearn.model_selection import GridSearchCV

sys.path.insert(0, os.path.dirname(__file__))
from _common import emit  # noqa: E402

from skpipe import PipeNetClassifier, shutdown_workers  # noqa: E402
from skpipe.engine.runners import _spawn  # noqa: E402


def search(est, grid, X, y, cold: bool) -> float:  # noqa: ANN001
    if cold:  # stop the warm group before every new one is asked for
        original = _spawn.acquire_group

        def cold_acquire(*a, **k) -> object:  # noqa: ANN002, ANN003
            shutdown_workers()
            return original(*a, **k)

        _spawn.acquire_group = cold_acquire
    try:
        t0 = time.perf_counter()
        gs = GridSearchCV(est, grid, cv=5, refit=False).fit(X, y)
        elapsed = time.perf_counter() - t0
    finally:
        if cold:
            _spawn.acquire_group = original
    n_fits = 5 * len(gs.cv_results_["params"])
    return elapsed / n_fits


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true")
    args = ap.parse_args()
    rng = np.random.RandomState(0)
    X = rng.normal(size=(200, 8)).astype(np.float32)
    y = (X[:, 0] > 0).astype(np.int64)
    grid = {"lr": [0.01, 0.02]} if args.quick else {"lr": [0.003, 0.01, 0.03, 0.1]}
    base = dict(
        module__hidden_layer_sizes=(16,),
        max_epochs=2 if args.quick else 5,
        batch_size=32,
        random_state=0,
    )
    one = search(PipeNetClassifier(**base), grid, X, y, cold=False)
    pipe = PipeNetClassifier(n_stages=2, n_microbatches=2, launcher="spawn", **base)
    shutdown_workers()
    cold = search(pipe, grid, X, y, cold=True)
    shutdown_workers()
    warm = search(pipe, grid, X, y, cold=False)
    shutdown_workers()
    emit(
        "search_overhead",
        {
            "fits": 5 * len(grid["lr"]),
            "one_stage_s_per_fit": round(one, 4),
            "two_stages_cold_s_per_fit": round(cold, 4),
            "two_stages_warm_s_per_fit": round(warm, 4),
            "warm_overhead_s_per_fit": round(warm - one, 4),
            "cold_overhead_s_per_fit": round(cold - one, 4),
        },
    )


if __name__ == "__main__":
    main()
