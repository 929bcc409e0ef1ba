"""Plan before training, timeline after, pictures, and scikit-learn's progress callbacks."""

import matplotlib

matplotlib.use("Agg")

import numpy as np
import pandas as pd
import pytest
from sklearn.callback import ProgressBar
from sklearn.model_selection import GridSearchCV

import skpipe
from skpipe import PipeNetClassifier
from skpipe.viz import plot_learning_curves, plot_timeline


def make(**kw):
    p = dict(module__hidden_layer_sizes=(16, 16, 16), max_epochs=2, batch_size=16, random_state=0,
             n_stages=2, n_microbatches=4, launcher="local")
    p.update(kw)
    return PipeNetClassifier(**p)


def test_plan_before_fit_leaves_estimator_unfitted(classification_data):
    est = make(balance="time")
    plan = est.plan(*classification_data)
    assert not hasattr(est, "n_features_in_")
    frame = plan.to_frame()
    assert list(frame["stage"]) == [0, 1]
    assert frame["n_layers"].sum() == 7
    assert frame["parameters"].sum() == sum(p.numel() for p in make().fit(*classification_data).module_.parameters())
    assert (frame["activation_MiB_per_microbatch"] > 0).all()
    assert frame["fwd_bwd_ms"].notna().all()
    assert plan.bubble == pytest.approx(1 / 5)
    assert plan.predicted_step_ms > 0
    text = str(plan)
    assert "expected bubble: 20.0%" in text and "stage" in text
    assert plan.to_dict()["schedule"] == "1f1b"


def test_plan_kept_after_fit_and_interleaved_chunks(classification_data):
    est = make(schedule="interleaved_1f1b").fit(*classification_data)
    frame = est.plan_.to_frame()
    assert list(frame["stage"]) == [0, 1, 0, 1] and list(frame["chunk"]) == [0, 1, 2, 3]
    assert est.plan_.predicted_step_ms is None  # no times measured without balance='time'


@pytest.mark.parametrize("launcher", ["local", pytest.param("spawn", marks=pytest.mark.distributed)])
def test_timeline_records_spans_of_chosen_steps(classification_data, launcher, tmp_path):
    est = make(timeline_steps=2, launcher=launcher, schedule="interleaved_zero_bubble").fit(*classification_data)
    tl = est.timeline_
    assert tl.steps() == [1, 2]
    kinds = {s.kind for s in tl.spans}
    assert {"F", "I", "W"} <= kinds
    for step in tl.steps():
        for rank in range(2):
            fw = [s for s in tl.spans if s.step == step and s.rank == rank and s.kind == "F"]
            assert len(fw) == 4 * 2  # 4 micro-batches x 2 chunks per stage
    assert 0.0 <= tl.measured_bubble() < 1.0
    ax = plot_timeline(tl)
    ax.figure.savefig(tmp_path / "t.png")
    assert (tmp_path / "t.png").stat().st_size > 1000
    assert isinstance(tl.to_frame(), pd.DataFrame)
    skpipe.shutdown_workers()


def test_no_timeline_by_default(classification_data):
    assert make().fit(*classification_data).timeline_ is None


def test_learning_curves(classification_data, tmp_path):
    est = make(max_epochs=3).fit(*classification_data)
    ax = plot_learning_curves(est.history_)
    assert len(ax.lines) == 1
    ax.figure.savefig(tmp_path / "c.png")


class TaskLog:
    """A scikit-learn fit callback that writes down every task as it begins: (name, depth)."""

    def __init__(self):
        self.begun = []

    def setup(self, estimator, context):
        pass

    def teardown(self, estimator, context):
        pass

    def on_fit_task_begin(self, estimator, context, **kwargs):
        depth, parent = 0, context.parent
        while parent is not None:
            depth, parent = depth + 1, parent.parent
        self.begun.append((context.task_name, depth))

    def on_fit_task_end(self, estimator, context, **kwargs):
        pass


def test_sklearn_progress_bar_nests_epochs_in_search(classification_data, capsys):
    X, y = classification_data
    search = GridSearchCV(make(max_epochs=3), {"lr": [0.01, 0.02]}, cv=2)
    search.set_callbacks(ProgressBar(max_propagation_depth=None))
    search.fit(X, y)
    out = capsys.readouterr().out
    fits = [line for line in out.splitlines() if "PipeNetClassifier - fit #" in line]
    assert len(fits) == 2 * 2 + 1 and all(line.rstrip().endswith("100%") for line in fits)
    log = TaskLog()
    est = make(max_epochs=3).set_callbacks(log)
    est.fit(X, y)
    assert len(est.history_) == 3
    # the estimator's fit is the root task; each epoch is one sub-task under it
    assert log.begun == [("fit", 0)] + [("epoch", 1)] * 3


def test_memory_budget_raises_microbatch_count(classification_data):
    """1F1B holds about p micro-batches per stage, so smaller micro-batches hold less."""
    X, y = classification_data
    kw = dict(module__hidden_layer_sizes=(256, 256, 256), batch_size=64, schedule="1f1b",
              n_microbatches="auto")
    free = make(**kw).fit(X, y)
    assert free.config_.n_microbatches == 8  # the plain 'auto' rule: 4p
    import torch

    # the step's whole input on the first stage, its targets (as many bytes as the outputs)
    # on the last: every micro-batch is a view of them; m=11 pads the batch to 66 rows
    n_out = free.module_(torch.zeros(1, X.shape[1])).shape[1]
    ends = [66 * X.shape[1] * 4 / 2**20, 66 * n_out * 4 / 2**20]
    need = []
    for stage in (0, 1):
        chunks = [c for c in free.plan_.chunks if c.stage == stage]
        static = 4 * sum(c.parameter_MiB for c in chunks) + ends[stage]
        per_row = sum(c.activation_MiB_per_microbatch for c in chunks) / free.plan_.microbatch_rows
        need.append((static, per_row))
    # room for 12 rows in flight: m=8 holds 2 x 8 = 16 rows; the smallest count that fits is
    # m=11 (2 x ceil(64/11) = 12 rows)
    budget = max(static + 12 * per_row for static, per_row in need) * 2**20 * (1 + 1e-9)
    tight = make(stage_memory_budget=budget, **kw).fit(X, y)
    assert tight.config_.n_microbatches == 11
    np.testing.assert_allclose(tight.predict_proba(X), free.predict_proba(X), atol=1e-5)
    with pytest.raises(ValueError, match=r"stage_memory_budget \(1000 B\) is too small: even with one row per micro-batch, stage \d needs about"):
        make(stage_memory_budget=1000, **kw).fit(X, y)


def interleaved_timeline():
    """Two ranks, two chunks each (chunks 0, 2 on rank 0; 1, 3 on rank 1), one micro-batch."""
    from skpipe.engine.plan._timeline import Span, Timeline

    spans, t = [], 0.0
    for chunk in range(4):
        spans.append(Span(1, chunk % 2, chunk, "F", 0, t, t + 0.01))
        t += 0.01
    for chunk in reversed(range(4)):
        spans.append(Span(1, chunk % 2, chunk, "B", 0, t, t + 0.02))
        t += 0.02
    return Timeline(spans, n_stages=2, n_microbatches=1, chunks_per_stage=2,
                    schedule="interleaved_1f1b")


def test_the_timeline_legend_hides_no_bar_and_chunks_differ(tmp_path):
    ax = plot_timeline(interleaved_timeline())
    fig = ax.figure
    fig.savefig(tmp_path / "t.png")
    renderer = fig.canvas.get_renderer()
    legend = ax.get_legend().get_window_extent(renderer)
    axes = ax.get_window_extent(renderer)
    assert legend.x0 >= axes.x1  # beside the axes, not over the bars
    assert legend.x1 <= fig.bbox.x1 + 1  # and inside the saved figure
    # rank 0's two chunks (0 and 2) are drawn differently, and labelled micro-batch/chunk
    hatches = {c.get_hatch() or "" for c in ax.collections}
    assert len(hatches) >= 2
    labels = {t.get_text() for t in ax.texts}
    assert {"0/0", "0/2", "0/1", "0/3"} <= labels
    assert any("chunk 2" in t.get_text() for t in ax.get_legend().get_texts())
