"""Experiment tracking with MLflow: one run per fit, with the per-epoch metrics, the parameters,
the plan and the timeline figure.

``mlflow.sklearn.autolog()`` already records a ``GridSearchCV`` and its candidates with
skpipe's parameters (``n_stages``, ``schedule`` ...). ``MlflowLogger`` adds what happens inside
each fit: every epoch's numbers from the history (train and valid loss, scores), and, at the
end, the plan (``plan.txt``, ``plan.json``) and, with ``timeline_steps``, the recorded timeline
as a figure (``timeline.png``). It works the same with the stages in worker processes, as it
runs in the process that drives the fit. Needs ``pip install "skpipe[tracking]"``.

Examples
--------
>>> from skpipe import PipeNetClassifier
>>> from skpipe.tracking import MlflowLogger
>>> est = PipeNetClassifier(callbacks=[MlflowLogger()], timeline_steps=2)
"""

from __future__ import annotations

import math
from numbers import Real
from typing import Any

from skorch.callbacks import Callback

from .engine.plan._timeline import Timeline

# history keys that are bookkeeping, not measurements
_SKIP = {"epoch", "batches"}


def _mlflow() -> Any:
    try:
        import mlflow
    except ImportError:  # pragma: no cover - the extra is installed in the tests
        raise ImportError(
            "MlflowLogger needs MLflow: pip install \"skpipe[tracking]\" (or mlflow-skinny)."
        ) from None
    return mlflow


class MlflowLogger(Callback):
    """Log each fit to MLflow as its own run (nested under the active run, if any).

    Parameters
    ----------
    run_name : str or None, default=None
        Name of the fit's run; None lets MLflow choose.
    log_params : bool, default=True
        Log the estimator's parameters (``n_stages``, ``schedule``, ``lr`` ...).
    log_timeline : bool, default=True
        With ``timeline_steps > 0``, log the recorded timeline as ``timeline.png``.
    """

    needs_weights = False  # logs the history and the plan, never the weights

    def __init__(
        self, run_name: str | None = None, log_params: bool = True, log_timeline: bool = True
    ) -> None:
        self.run_name = run_name
        self.log_params = log_params
        self.log_timeline = log_timeline

    def initialize(self) -> MlflowLogger:
        self.run_id_: str | None = None
        return self

    def on_train_begin(self, net: Any, **kwargs: Any) -> None:
        mlflow = _mlflow()
        run = mlflow.start_run(run_name=self.run_name, nested=mlflow.active_run() is not None)
        self.run_id_ = run.info.run_id
        estimator = getattr(net, "estimator", None)
        if self.log_params and estimator is not None:
            params = {k: _short(v) for k, v in estimator.get_params().items() if k != "callbacks"}
            mlflow.log_params(params)

    def on_epoch_end(self, net: Any, **kwargs: Any) -> None:
        row = net.history[-1]
        metrics = {
            k: float(v)
            for k, v in row.items()
            if k not in _SKIP and isinstance(v, Real) and not isinstance(v, bool)
            and math.isfinite(float(v))
        }
        _mlflow().log_metrics(metrics, step=int(row["epoch"]))

    def on_train_end(self, net: Any, **kwargs: Any) -> None:
        mlflow = _mlflow()
        try:
            plan = getattr(net, "plan", None)
            if plan is not None:
                mlflow.log_text(str(plan), "plan.txt")
                mlflow.log_dict(plan.to_dict(), "plan.json")
            recorded: int = getattr(net, "timeline_steps", 0)
            if self.log_timeline and recorded > 0:
                self._log_timeline(mlflow, net)
        finally:
            mlflow.end_run()

    def _log_timeline(self, mlflow: Any, net: Any) -> None:
        spans = net.runner.spans()
        if not spans:
            return
        import matplotlib

        matplotlib.use("Agg", force=False)
        from .viz import plot_timeline

        ax = plot_timeline(Timeline.of(spans, net.runner.config))
        mlflow.log_figure(ax.figure, "timeline.png")
        import matplotlib.pyplot as plt

        plt.close(ax.figure)


def _short(value: Any) -> str:
    """A parameter as MLflow can store it (at most 500 characters)."""
    if isinstance(value, type):
        text = value.__name__
    else:
        text = value if isinstance(value, str) else repr(value)
    return text if len(text) <= 500 else text[:497] + "..."
