"""MLflow: autolog records a search of pipelined estimators with skpipe's parameters; the
MlflowLogger callback records each fit's epochs, plan and timeline, in one process or with
workers. A local file store in a temporary folder."""

import json
import os

import numpy as np
import pytest

mlflow = pytest.importorskip("mlflow")
from sklearn.model_selection import GridSearchCV  # noqa: E402

import skpipe  # noqa: E402
from skpipe import PipeNetClassifier  # noqa: E402
from skpipe.tracking import MlflowLogger  # noqa: E402

rng = np.random.RandomState(0)
X = rng.normal(size=(60, 5))
Y = rng.randint(0, 3, size=60)


@pytest.fixture
def store(tmp_path, monkeypatch):
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")
    mlflow.set_tracking_uri(f"file://{tmp_path / 'mlruns'}")
    mlflow.set_experiment("skpipe-tests")
    yield mlflow.tracking.MlflowClient()
    while mlflow.active_run():
        mlflow.end_run()
    mlflow.sklearn.autolog(disable=True)


def runs(client):
    exp = client.get_experiment_by_name("skpipe-tests")
    return client.search_runs([exp.experiment_id])


def make(**kw):
    p = dict(module__hidden_layer_sizes=(8, 8), max_epochs=3, batch_size=16, n_stages=2,
             n_microbatches=2, launcher="local", random_state=0)
    p.update(kw)
    return PipeNetClassifier(**p)


def test_autolog_records_the_search_and_its_candidates_with_skpipe_parameters(store):
    mlflow.sklearn.autolog(log_models=False, silent=True)
    with mlflow.start_run() as parent:
        GridSearchCV(make(schedule="gpipe"), {"lr": [0.01, 0.03]}, cv=2).fit(X, Y)
    children = [r for r in runs(store) if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id]
    assert len(children) == 2
    for child in children:
        assert child.data.params["n_stages"] == "2" and child.data.params["schedule"] == "gpipe"
        assert "mean_test_score" in child.data.metrics
    assert "best_cv_score" in store.get_run(parent.info.run_id).data.metrics


@pytest.mark.parametrize("launcher", ["local", pytest.param("spawn", marks=pytest.mark.distributed)])
def test_logger_records_epochs_plan_and_timeline(store, launcher, tmp_path):
    est = make(launcher=launcher, timeline_steps=2, callbacks=[MlflowLogger(run_name="fit")],
               train_split=None).fit(X, Y)
    logger = est.callbacks[0]
    run = store.get_run(logger.run_id_)
    assert run.info.run_name == "fit" and run.info.status == "FINISHED"
    history = store.get_metric_history(run.info.run_id, "train_loss")
    assert [m.step for m in history] == [1, 2, 3]
    np.testing.assert_allclose([m.value for m in history], est.history_[:, "train_loss"])
    assert run.data.params["launcher"] == launcher and run.data.params["n_stages"] == "2"
    artifacts = {a.path for a in store.list_artifacts(run.info.run_id)}
    assert {"plan.txt", "plan.json", "timeline.png"} <= artifacts
    local = store.download_artifacts(run.info.run_id, "plan.json", str(tmp_path))
    with open(local) as f:
        assert json.load(f)["n_stages"] == 2
    png = store.download_artifacts(run.info.run_id, "timeline.png", str(tmp_path))
    assert os.path.getsize(png) > 1000
    skpipe.shutdown_workers()


def test_valid_loss_and_scores_are_logged_per_epoch(store):
    from skorch.callbacks import EpochScoring
    from skorch.dataset import ValidSplit

    est = make(train_split=ValidSplit(3, stratified=True),
               callbacks=[EpochScoring("accuracy", name="valid_acc", lower_is_better=False),
                          MlflowLogger()]).fit(X, Y)
    run_id = est.callbacks[1].run_id_
    for key in ("train_loss", "valid_loss", "valid_acc"):
        values = [m.value for m in store.get_metric_history(run_id, key)]
        np.testing.assert_allclose(values, est.history_[:, key])
