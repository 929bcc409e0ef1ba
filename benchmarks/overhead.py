"""Benchmark 2: what skpipe's n_stages=1 fit costs over a hand-written PyTorch loop, and skorch.

The same 64-128-2 MLP, data (20000 rows), batch size 256 and thread count; seconds per epoch,
median over epochs after the first.

    python benchmarks/overhead.py [--quick]
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
from _common import emit, median  # noqa: E402

from skpipe import PipeNetClassifier  # noqa: E402
from skpipe.modules import MLP  # noqa: E402


def slicing_loop(X, y, epochs, batch) -> list[float]:  # noqa: ANN001
    torch.manual_seed(0)
    net = MLP(X.shape[1], 2, hidden_layer_sizes=(128,))
    opt = torch.optim.Adam(net.parameters(), lr=1e-3)
    crit = nn.CrossEntropyLoss()
    Xt, yt = torch.from_numpy(X), torch.from_numpy(y)
    g = torch.Generator().manual_seed(0)
    times = []
    for _ in range(epochs):
        t0 = time.perf_counter()
        perm = torch.randperm(len(Xt), generator=g)
        for s in range(0, len(Xt), batch):
            idx = perm[s : s + batch]
            opt.zero_grad()
            loss = crit(net(Xt[idx]), yt[idx])
            loss.backward()
            opt.step()
            loss.item()
        times.append(time.perf_counter() - t0)
    return times


def epoch_times(history) -> list[float]:  # noqa: ANN001
    return [e["dur"] for e in history]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--runs", type=int, default=5, help="side-by-side runs; medians reported")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    n, epochs, runs = (2000, 3, 1) if args.quick else (20000, 8, args.runs)
    rng = np.random.RandomState(0)
    X = rng.normal(size=(n, 64)).astype(np.float32)
    y = (X[:, 0] + X[:, 1] > 0).astype(np.int64)
    batch = 256

    from skorch import NeuralNetClassifier

    loop_t, ours_t, skorch_t, ratios = [], [], [], []
    for _ in range(runs):  # the loop and skpipe alternate, so that both see the same machine
        loop = median(slicing_loop(X, y, epochs, batch)[1:])
        est = PipeNetClassifier(
            module__hidden_layer_sizes=(128,),
            max_epochs=epochs,
            batch_size=batch,
            random_state=0,
            devices=["cpu"],
        ).fit(X, y)
        ours = median(epoch_times(est.history_)[1:])
        loop_t.append(loop)
        ours_t.append(ours)
        ratios.append(ours / loop)
    sk = NeuralNetClassifier(
        MLP,
        module__n_features_in=64,
        module__n_outputs=2,
        module__hidden_layer_sizes=(128,),
        criterion=nn.CrossEntropyLoss,
        optimizer=torch.optim.Adam,
        lr=1e-3,
        max_epochs=epochs,
        batch_size=batch,
        train_split=None,
        verbose=0,
        iterator_train__shuffle=True,
    )
    sk.fit(X, y)
    skorch_t = epoch_times(sk.history_)[1:]
    emit(
        "overhead",
        {
            "rows": n,
            "batch_size": batch,
            "threads": args.threads,
            "epochs_timed": epochs - 1,
            "runs": runs,
            "slicing_loop_s_per_epoch": round(median(loop_t), 4),
            "skpipe_s_per_epoch": round(median(ours_t), 4),
            "skorch_s_per_epoch": round(median(skorch_t), 4),
            "skpipe_over_loop": round(median(ratios), 3),
            "skpipe_over_loop_runs": [round(r, 3) for r in ratios],
            "skorch_over_loop": round(median(skorch_t) / median(loop_t), 3),
        },
    )


if __name__ == "__main__":
    main()
