"""Data-parallel replicas of a pipeline, as a user meets them: the mesh in the plan, one timeline
row per rank, warm workers, searches over n_replicas, checkpoints and a dead replica."""


import numpy as np
import pytest
from sklearn.model_selection import GridSearchCV

import skpipe
from skpipe import PipeNetClassifier
from skpipe.engine.workers._pool import WorkerError
from skpipe.viz import plot_timeline
from tests.conftest import wait_no_workers, worker_pids
from tests.engine.test_faults import KillWorker

pytestmark = pytest.mark.distributed


def make(**kw):
    p = dict(module__hidden_layer_sizes=(8, 8), module__activation="tanh", max_epochs=2,
             batch_size=16, n_stages=2, n_replicas=2, n_microbatches=2, launcher="spawn",
             random_state=0, lr=0.01)
    p.update(kw)
    return PipeNetClassifier(**p)


def test_plan_shows_which_rank_holds_which_replica_and_stage(classification_data):
    report = make(devices=["cpu:0", "cpu:1", "cpu:2", "cpu:3"]).plan(*classification_data)
    text = str(report)
    assert "mesh: 2 replicas x 2 stage(s)" in text
    assert "replica 1: stage 0 rank 2 on cpu:2, stage 1 rank 3 on cpu:3" in text
    assert report.to_dict()["mesh"][3] == {"rank": 3, "replica": 1, "stage": 1, "tensor": 0,
                                           "device": "cpu:3"}
    assert report.microbatch_rows == 4  # 16 rows: 8 per replica, in 2 micro-batches


def test_timeline_has_a_row_per_rank_and_workers_stay_warm(classification_data, tmp_path):
    X, y = classification_data
    skpipe.shutdown_workers()
    est = make(timeline_steps=2, schedule="interleaved_zero_bubble").fit(X, y)
    pids = sorted(worker_pids())
    assert len(pids) == 4  # 2 replicas x 2 stages, left up, idle
    tl = est.timeline_
    assert {s.rank for s in tl.spans} == {0, 1, 2, 3}
    for rank in range(4):  # every rank ran all 2 x 2 forward chunks of each recorded step
        assert len([s for s in tl.spans if s.rank == rank and s.kind == "F" and s.step == 1]) == 4
    assert 0.0 <= tl.measured_bubble() < 1.0
    ax = plot_timeline(tl)
    assert [t.get_text() for t in ax.get_yticklabels()][0] == "replica 1 stage 1"
    again = make(timeline_steps=2, schedule="interleaved_zero_bubble").fit(X, y)
    assert sorted(worker_pids()) == pids  # the same four workers
    np.testing.assert_array_equal(again.predict_proba(X), est.predict_proba(X))
    skpipe.shutdown_workers()
    assert wait_no_workers() == []


def test_grid_search_over_replicas_scores_as_one_device(classification_data):
    X, y = classification_data
    est = make(n_stages=1, n_replicas=1)
    grid = {"n_replicas": [1, 2], "n_stages": [1, 2]}
    search = GridSearchCV(est, grid, cv=2).fit(X, y)
    scores = search.cv_results_["mean_test_score"]
    np.testing.assert_allclose(scores, scores[0], atol=1e-12)  # every layout trains the same
    assert search.best_estimator_.config_.world_size == 1  # the first of equal scores
    skpipe.shutdown_workers()


def test_a_dead_replica_stops_the_fit_and_leaves_no_process(classification_data):
    X, y = classification_data
    skpipe.shutdown_workers()
    est = make(max_epochs=5, callbacks=[KillWorker(2, 3)])  # replica 1's first stage
    with pytest.raises(WorkerError, match=r"stage worker 2 \(pid \d+\) stopped: it was killed by signal SIGKILL"):
        est.fit(X, y)
    assert wait_no_workers() == []
    assert not hasattr(est, "module_")
    make().fit(X, y)  # the next fit works
    skpipe.shutdown_workers()
