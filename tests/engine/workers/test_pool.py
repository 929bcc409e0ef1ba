"""Warm stage workers: reused across fits, isolated, gone when idle or asked."""

import os
import subprocess
import sys
import textwrap
import time

import numpy as np
import pytest
from sklearn.model_selection import GridSearchCV

import skpipe
from skpipe import PipeNetClassifier
from skpipe.engine.workers import _pool
from tests.conftest import wait_no_workers, worker_pids

pytestmark = pytest.mark.distributed


def make(**kw):
    p = dict(module__hidden_layer_sizes=(8, 8), max_epochs=2, batch_size=16, n_stages=2,
             n_microbatches=2, launcher="spawn", random_state=0, lr=0.01)
    p.update(kw)
    return PipeNetClassifier(**p)


def test_second_fit_reuses_workers_and_is_identical(classification_data):
    X, y = classification_data
    skpipe.shutdown_workers()
    cold = make().fit(X, y)
    pids = sorted(worker_pids())
    assert len(pids) == 2  # left up, idle
    t0 = time.perf_counter()
    warm = make().fit(X, y)
    warm_time = time.perf_counter() - t0
    assert sorted(worker_pids()) == pids
    np.testing.assert_array_equal(warm.predict_proba(X), cold.predict_proba(X))
    np.testing.assert_array_equal(warm.history_[:, "train_loss"], cold.history_[:, "train_loss"])
    # a different network on the same workers starts from scratch, too
    other = make(module__hidden_layer_sizes=(4, 4, 4)).fit(X, y)
    assert other.module_[0].out_features == 4
    again = make().fit(X, y)
    np.testing.assert_array_equal(again.predict_proba(X), cold.predict_proba(X))
    print(f"warm fit {warm_time:.2f}s")
    assert skpipe.shutdown_workers() == 1
    assert wait_no_workers() == []


def test_dropout_is_the_same_warm_or_cold(classification_data):
    X, y = classification_data
    skpipe.shutdown_workers()
    a = make(module__dropout=0.3).fit(X, y)
    b = make(module__dropout=0.3).fit(X, y)
    np.testing.assert_array_equal(a.predict_proba(X), b.predict_proba(X))
    skpipe.shutdown_workers()


def test_forward_pipelined_gives_the_same_numbers(classification_data):
    X, y = classification_data
    est = make(schedule="zbv").fit(X, y)
    out = est.forward_pipelined(X, batch_size=37)
    np.testing.assert_allclose(out, est._forward(X), atol=1e-6)
    skpipe.shutdown_workers()


def test_grid_search_starts_workers_once(classification_data):
    X, y = classification_data
    skpipe.shutdown_workers()
    started = []
    original = _pool.WorkerGroup.__init__

    def counting(self, *a, **k):
        started.append(1)
        original(self, *a, **k)

    _pool.WorkerGroup.__init__ = counting
    try:
        GridSearchCV(make(), {"lr": [0.01, 0.1], "schedule": ["gpipe", "1f1b"]}, cv=3).fit(X, y)
    finally:
        _pool.WorkerGroup.__init__ = original
    assert len(started) == 1  # 12 fits + refit on one warm group
    skpipe.shutdown_workers()
    assert wait_no_workers() == []


def test_idle_workers_exit_on_their_own(classification_data, monkeypatch):
    X, y = classification_data
    skpipe.shutdown_workers()
    monkeypatch.setenv("SKPIPE_IDLE_TIMEOUT", "2")
    make().fit(X, y)
    assert len(worker_pids()) == 2
    assert wait_no_workers(timeout=10) == []
    make().fit(X, y)  # the dead group is noticed and replaced
    skpipe.shutdown_workers()


SCRIPT = """
import numpy as np, time
from torch import nn
from sklearn.model_selection import GridSearchCV
from skpipe import PipeNetClassifier

class Block(nn.Module):            # defined in __main__ (a script, a notebook cell)
    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(8, 8)
    def forward(self, x):
        return self.lin(x).tanh()

rng = np.random.RandomState(0)
X, y = rng.normal(size=(60, 4)), rng.randint(0, 2, 60)
net = nn.Sequential(nn.Linear(4, 8), Block(), nn.Linear(8, 2))
est = PipeNetClassifier(module=net, n_stages=2, launcher="spawn", max_epochs=2, batch_size=16,
                        n_microbatches=2, random_state=0)
search = GridSearchCV(est, {"lr": [0.01, 0.1]}, cv=2, n_jobs=N_JOBS).fit(X, y)
print("score", round(search.best_score_, 3))
"""


@pytest.mark.parametrize("how", ["script", "stdin", "loky"])
def test_main_module_classes_from_script_notebook_and_loky(tmp_path, how):
    code = SCRIPT.replace("N_JOBS", "2" if how == "loky" else "1")
    if how == "stdin":  # like a notebook cell: no file behind __main__
        proc = subprocess.run([sys.executable, "-"], input=code, capture_output=True, text=True,
                              timeout=300, cwd=os.getcwd())
    else:
        path = tmp_path / "script.py"
        path.write_text(textwrap.dedent(code))
        proc = subprocess.run([sys.executable, str(path)], capture_output=True, text=True,
                              timeout=300, cwd=os.getcwd())
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "score" in proc.stdout


def test_pipeline_hyperparameters_in_a_grid_with_a_forbidden_combination(classification_data):
    """A combination torch refuses is scored as failed with its message, never a hang."""
    import warnings

    X, y = classification_data
    grid = {"schedule": ["1f1b", "dualpipev"], "n_microbatches": [2, 4], "checkpoint": ["never", "always"],
            "balance": ["uniform", "parameters"]}
    est = make(launcher="local", module__hidden_layer_sizes=(8, 8, 8))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        search = GridSearchCV(est, grid, cv=2, error_score=np.nan).fit(X, y)
    scores = dict(zip(map(str, search.cv_results_["params"]), search.cv_results_["mean_test_score"]))
    failed = [p for p, s in scores.items() if np.isnan(s)]
    assert failed and all("'dualpipev'" in p and "'n_microbatches': 2" in p for p in failed)
    assert any("n_microbatches (2) must be >= the number of model chunks (4" in str(w.message) for w in caught)
    assert search.best_params_["schedule"] in ("1f1b", "dualpipev")
