"""The main job: a grid search over a pipelined classifier on the bundled penguins data."""

from __future__ import annotations

import time
from typing import Any

import numpy as np
from sklearn.model_selection import GridSearchCV, StratifiedKFold
from sklearn.pipeline import Pipeline, make_pipeline

from .datasets import load_penguins, penguin_preprocessor
from .estimators import PipeNetClassifier


def penguin_pipeline(**params: Any) -> Pipeline:
    """ColumnTransformer (impute+scale numbers, impute+one-hot categories) -> PipeNetClassifier."""
    defaults: dict[str, Any] = dict(lr=0.01, max_epochs=30, batch_size=32, random_state=0)
    defaults.update(params)
    return make_pipeline(penguin_preprocessor(), PipeNetClassifier(**defaults))


def penguin_grid() -> dict[str, list[Any]]:
    return {
        "pipenetclassifier__lr": [0.003, 0.01],
        "pipenetclassifier__module__hidden_layer_sizes": [(16,), (32, 32)],
    }


def run_demo(
    n_stages: int = 2,
    launcher: str = "auto",
    max_epochs: int = 30,
    verbose: int = 1,
    out: Any = print,
    timeline_png: str | None = "skpipe-demo-timeline.png",
    progress: bool = True,
) -> GridSearchCV:
    X, y = load_penguins(return_X_y=True)
    pipe = penguin_pipeline(
        n_stages=n_stages,
        launcher=launcher,
        max_epochs=max_epochs,
        n_microbatches=4,
        timeline_steps=3,
    )
    grid = penguin_grid()
    n_fits = 5 * int(np.prod([len(v) for v in grid.values()]))
    out(
        f"skpipe demo: GridSearchCV(cv=5) over {n_fits} fits of a {n_stages}-stage pipelined "
        f"classifier on the Palmer penguins ({X.shape[0]} rows, {X.shape[1]} mixed-type columns)"
    )
    out("")
    out("The plan of one candidate (what each stage holds, and the schedule's bubble):")
    Xt = penguin_preprocessor().fit_transform(X)
    out(str(pipe[-1].plan(Xt, y)))
    out("")
    search = GridSearchCV(
        pipe,
        grid,
        cv=StratifiedKFold(5, shuffle=True, random_state=0),
        verbose=0 if progress else verbose,
    )
    if progress and _has_rich():
        from sklearn.callback import ProgressBar

        search.set_callbacks(ProgressBar())
    t0 = time.perf_counter()
    search.fit(X, y)
    elapsed = time.perf_counter() - t0
    out("")
    out("rank  mean acc  std    params")
    res = search.cv_results_
    for i in np.argsort(res["rank_test_score"]):
        out(
            f"{res['rank_test_score'][i]:>4}  {res['mean_test_score'][i]:.4f}   "
            f"{res['std_test_score'][i]:.4f} {res['params'][i]}"
        )
    out("")
    out(f"best parameters: {search.best_params_}")
    out(f"best cross-validated accuracy: {search.best_score_:.4f}")
    out(f"grid search wall time: {elapsed:.1f} s ({n_fits} fits + refit)")
    best = search.best_estimator_[-1]
    if timeline_png and best.timeline_ is not None and best.timeline_.spans:
        import matplotlib

        matplotlib.use("Agg")
        from .viz import plot_timeline

        ax = plot_timeline(best.timeline_)
        ax.figure.tight_layout()
        ax.figure.savefig(timeline_png, dpi=120)
        out(
            f"timeline of the refit's steps 2-4 saved to {timeline_png} (measured bubble "
            f"{best.timeline_.measured_bubble():.0%}, "
            f"theoretical {best.timeline_.theoretical_bubble:.0%})"
        )
    return search


def _has_rich() -> bool:
    try:
        import rich  # noqa: F401
    except ImportError:
        return False
    return True
