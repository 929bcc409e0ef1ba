"""Benchmark 12: what the asynchronous schedules cost in convergence, against the synchronous fit.

The same estimator, data, seed and epochs with ``schedule='1f1b'`` (what one device trains),
``'2bw'`` (one batch of delay) and ``'pipedream'`` (weight stashing, an update per
micro-batch), on spawned stages. Each fit holds out the same validation rows
(``train_split=0.2``, stratified, the estimator's ``random_state``) and records skorch's
``valid_loss`` after every epoch. The recipe: an MLP over 4 stages, m = 4, Adam at lr 1e-3
under a cosine learning-rate schedule over the fit (skorch's ``LRScheduler``, per epoch).
Three data sets:

- the bundled penguins (behind their ``ColumnTransformer``): 20 epochs, batch 32;
- scikit-learn's bundled breast-cancer table (569 rows, 30 features, standardised): 20
  epochs, batch 32;
- the tabular benchmark chosen for the goal, Friedman #1 regression at scale
  (scikit-learn's generator: 20,000 rows, 10 features of which 5 matter, noise 1.0, the
  target standardised, so that the validation loss cannot go below ~0.04): 100 epochs,
  batch 128 (12,500 updates).

The goal: the last epoch's validation loss within 2 % of the synchronous fit's (median over
seeds of the relative gap, each seed paired with the same seed's ``1f1b`` fit). The gap a
quarter of the way through the fit is printed too: the delay costs most early. ``--png``
draws the curves of every seed.

    python benchmarks/async_convergence.py [--quick] [--seeds 10] [--epochs N]
        [--png docs/images/async_convergence.png]

One protocol's seeds can be split over runs (``--first-seed``, ``--data``, ``--curves-out``)
and reported together (``--from-curves a.json b.json --png ...``): a fit's curve depends only
on its seed, not on what runs beside it.

``--rule`` runs only a plain one-process loop of the 2bw rule against the synchronous one
(no pipeline, Friedman #1, 8 epochs at a constant rate), for optimizers with and without
momentum: how much of the delay's cost the optimizer decides.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys

import numpy as np

sys.path.insert(0, os.path.dirname(__file__))
from _common import emit, median  # noqa: E402

from skpipe import PipeNetClassifier, PipeNetRegressor  # noqa: E402
from skpipe.datasets import load_penguins, penguin_preprocessor  # noqa: E402

SCHEDULES = ("1f1b", "2bw", "pipedream")


# per data set: its epochs and batch size (the rest of the recipe is shared)
SETTINGS = {"penguins": (20, 32), "breast_cancer": (20, 32), "friedman1": (100, 128)}


def datasets(quick: bool = False) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """The features already preprocessed (fitted on all rows: the same for every schedule);
    float targets are regression."""
    from sklearn.datasets import load_breast_cancer, make_friedman1
    from sklearn.preprocessing import StandardScaler

    X, y = load_penguins(return_X_y=True)
    penguins = penguin_preprocessor().fit_transform(X).astype(np.float32)
    bc = load_breast_cancer()
    cancer = StandardScaler().fit_transform(bc.data).astype(np.float32)
    Xf, yf = make_friedman1(n_samples=2_000 if quick else 20_000, n_features=10, noise=1.0,
                            random_state=0)
    friedman = (Xf.astype(np.float32), ((yf - yf.mean()) / yf.std()).astype(np.float32))
    return {"penguins": (penguins, np.asarray(y)), "breast_cancer": (cancer, bc.target),
            "friedman1": friedman}


def curve(X: np.ndarray, y: np.ndarray, schedule: str, seed: int, epochs: int,
          stages: int, lr: float, batch_size: int) -> list[float]:
    """``valid_loss`` after each epoch of one fit."""
    from skorch.callbacks import LRScheduler
    from torch.optim.lr_scheduler import CosineAnnealingLR

    kind = PipeNetRegressor if y.dtype.kind == "f" else PipeNetClassifier
    est = kind(
        module__hidden_layer_sizes=(64,) * (stages - 1) + (32,), n_stages=stages,
        n_microbatches=4, schedule=schedule, launcher="spawn", lr=lr, batch_size=batch_size,
        max_epochs=epochs, train_split=0.2, random_state=seed, verbose=0,
        callbacks=[LRScheduler(CosineAnnealingLR, T_max=epochs)])
    est.fit(X, y)
    return [float(v) for v in est.history_[:, "valid_loss"]]


def draw(curves: dict, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(curves), figsize=(5.5 * len(curves), 4))
    colors = {"1f1b": "black", "2bw": "tab:blue", "pipedream": "tab:orange"}
    for ax, (name, per_schedule) in zip(np.atleast_1d(axes), curves.items(), strict=True):
        for schedule, runs in per_schedule.items():
            for i, run in enumerate(runs):
                ax.plot(range(1, len(run) + 1), run, color=colors[schedule], alpha=0.8,
                        lw=1.2, label=schedule if i == 0 else None,
                        ls="-" if schedule == "1f1b" else "--")
        ax.set_title(name)
        ax.set_xlabel("epoch")
        ax.set_ylabel("validation loss")
        ax.set_yscale("log")
        ax.legend()
    fig.suptitle("Synchronous (1f1b) against the asynchronous schedules, every seed")
    fig.tight_layout()
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    fig.savefig(path, dpi=110)


# the optimizers the plain loop compares (--rule): the delay against momentum
RULE_OPTIMIZERS = {
    "adam_lr1e-3": ("Adam", dict(lr=1e-3)),
    "adam_beta1_0": ("Adam", dict(lr=1e-3, betas=(0.0, 0.999))),
    "sgd_momentum_0.9_lr0.01": ("SGD", dict(lr=0.01, momentum=0.9)),
    "sgd_lr0.05": ("SGD", dict(lr=0.05)),
}


def rule_loop(X: np.ndarray, y: np.ndarray, optimizer: str, delay: bool, seed: int,
              epochs: int, batch_size: int) -> float:
    """The last validation loss of a plain one-process loop (no pipeline): the 2bw rule
    (batch t's gradient at W_{t-1}) with ``delay``, else the synchronous one; the estimator's
    MLP, a constant rate, the last 20 % of the rows held out."""
    import torch
    from torch import nn
    from torch.func import functional_call

    from skpipe.modules import MLP

    torch.set_num_threads(1)
    Xt, yt = torch.from_numpy(X), torch.from_numpy(y)[:, None]
    cut = len(Xt) * 4 // 5
    torch.manual_seed(seed)
    net = MLP(X.shape[1], 1, (64, 64, 64, 32))
    name, kw = RULE_OPTIMIZERS[optimizer]
    opt = getattr(torch.optim, name)(net.parameters(), **kw)
    previous = {n: p.detach().clone() for n, p in net.named_parameters()}
    order = torch.Generator().manual_seed(seed)
    for _ in range(epochs):
        perm = torch.randperm(cut, generator=order)
        for i in range(0, cut, batch_size):
            rows = perm[i:i + batch_size]
            current = {n: p.detach().clone() for n, p in net.named_parameters()}
            at = {n: t.requires_grad_(True) for n, t in (previous if delay else current).items()}
            loss = nn.functional.mse_loss(functional_call(net, at, (Xt[rows],)), yt[rows])
            grads = torch.autograd.grad(loss, list(at.values()))
            for p, g in zip(net.parameters(), grads, strict=True):
                p.grad = g
            opt.step()
            previous = current
    with torch.no_grad():
        return float(nn.functional.mse_loss(net(Xt[cut:]), yt[cut:]))


def rule_figures(quick: bool, seeds: int) -> dict:
    X, y = datasets(quick)["friedman1"]
    epochs = 1 if quick else 8
    out: dict = {"rule_setting": f"plain loop, Friedman #1 {len(X)} rows, {epochs} epochs at "
                                 f"a constant rate, batch 128, median of {seeds} seeds"}
    for optimizer in RULE_OPTIMIZERS:
        for delay in (False, True):
            losses = [rule_loop(X, y, optimizer, delay, seed, epochs, 128) for seed in range(seeds)]
            out[f"rule_{optimizer}_{'2bw' if delay else 'sync'}"] = round(median(losses), 4)
    return out


def report(curves: dict, seeds: list[int], figures: dict) -> None:
    """The figures of every data set: medians over ``seeds`` of the last loss and of each
    seed's gap to the same seed's ``1f1b`` fit (also the quartiles of those gaps: how far the
    seeds disagree), and the gap a quarter of the way through."""
    for name, per_schedule in curves.items():
        sync = [per_schedule["1f1b"][seed] for seed in seeds]
        finals = [c[-1] for c in sync]
        figures[f"{name}_1f1b_valid_loss"] = round(median(finals), 4)
        # how far the synchronous fits' own last losses lie apart over the seeds (the noise
        # the 2 % is measured against)
        figures[f"{name}_1f1b_seed_spread"] = round((max(finals) - min(finals)) / median(finals), 3)
        quarter = max(1, len(sync[0]) // 4) - 1
        for s in SCHEDULES[1:]:
            runs = [per_schedule[s][seed] for seed in seeds]
            figures[f"{name}_{s}_valid_loss"] = round(median([c[-1] for c in runs]), 4)
            gaps = [c[-1] / ref[-1] - 1 for c, ref in zip(runs, sync, strict=True)]
            gap = median(gaps)
            figures[f"{name}_{s}_relative_gap"] = round(gap, 4)
            if len(gaps) >= 4:
                q1, _, q3 = statistics.quantiles(gaps, n=4)
                figures[f"{name}_{s}_gap_quartiles"] = [round(q1, 4), round(q3, 4)]
            figures[f"{name}_{s}_within_2pct"] = abs(gap) <= 0.02
            figures[f"{name}_{s}_gap_at_epoch_{quarter + 1}"] = round(median(
                [c[quarter] / ref[quarter] - 1 for c, ref in zip(runs, sync, strict=True)]), 4)


def merged(paths: list[str]) -> tuple[dict, list[int]]:
    """The curves of several ``--curves-out`` files (seeds of separate runs) as one, with the
    seeds every schedule of every data set has."""
    curves: dict = {}
    for path in paths:
        with open(path) as f:
            for name, per_schedule in json.load(f).items():
                for s, runs in per_schedule.items():
                    curves.setdefault(name, {}).setdefault(s, {}).update(
                        {int(seed): run for seed, run in runs.items()})
    seeds = sorted(set.intersection(*(set(runs) for per in curves.values()
                                      for runs in per.values())))
    return curves, seeds


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true", help="tiny setting (for the test suite)")
    ap.add_argument("--seeds", type=int, default=10)
    ap.add_argument("--first-seed", type=int, default=0,
                    help="seeds first-seed .. first-seed + seeds - 1 (to split one protocol's "
                         "seeds over runs, merged by --from-curves)")
    ap.add_argument("--data", default=",".join(SETTINGS),
                    help=f"comma-separated data sets, of {', '.join(SETTINGS)}")
    ap.add_argument("--epochs", type=int, default=None,
                    help="epochs of every data set (default: each set's own, see SETTINGS)")
    ap.add_argument("--stages", type=int, default=4)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--png", default=None, help="where to draw the curves")
    ap.add_argument("--curves-out", default=None, help="write every curve here (JSON)")
    ap.add_argument("--from-curves", nargs="+", default=None, metavar="JSON",
                    help="fit nothing: report (and draw) the curves of these --curves-out files")
    ap.add_argument("--rule", action="store_true",
                    help="only the plain one-process loop of the rule, sync against delayed, "
                         "for optimizers with and without momentum")
    args = ap.parse_args()
    if args.rule:
        emit("async_convergence_rule", rule_figures(args.quick, 1 if args.quick else 3))
        return
    names = args.data.split(",")
    unknown = [n for n in names if n not in SETTINGS]
    if unknown:
        ap.error(f"--data: unknown data set(s) {unknown}; choose from {list(SETTINGS)}")
    figures: dict = {}
    if args.from_curves:
        curves, seeds = merged(args.from_curves)
        figures["setting"] = f"curves of {args.from_curves}, seeds {seeds}"
    else:
        n_seeds, stages = (1, 2) if args.quick else (args.seeds, args.stages)
        seeds = list(range(args.first_seed, args.first_seed + n_seeds))
        figures["setting"] = (f"MLP over {stages} spawned stages, m=4, Adam lr {args.lr:g} "
                              f"under a cosine schedule, 20 % held out, seeds {seeds}")
        curves = {}
        for name, (X, y) in datasets(args.quick).items():
            if name not in names:
                continue
            epochs, batch_size = SETTINGS[name]
            epochs = 2 if args.quick else (args.epochs or epochs)
            figures[f"{name}_setting"] = f"{len(X)} rows, {epochs} epochs, batch {batch_size}"
            curves[name] = {s: {seed: curve(X, y, s, seed, epochs, stages, args.lr, batch_size)
                                for seed in seeds} for s in SCHEDULES}
        if args.curves_out:
            with open(args.curves_out, "w") as f:
                json.dump(curves, f)
            figures["curves"] = args.curves_out
    report(curves, seeds, figures)
    if args.png:
        draw({name: {s: [runs[seed] for seed in seeds] for s, runs in per.items()}
              for name, per in curves.items()}, args.png)
        figures["png"] = args.png
    emit("async_convergence", figures)


if __name__ == "__main__":
    main()
