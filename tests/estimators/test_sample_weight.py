"""sample_weight and class_weight with scikit-learn's semantics, on every home of the stages."""

import numpy as np
import pytest
import sklearn
import torch
from sklearn.metrics import accuracy_score
from sklearn.model_selection import GridSearchCV, KFold
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler
from sklearn.utils.class_weight import compute_sample_weight

import skpipe
from skpipe import PipeNetClassifier, PipeNetRegressor
from skpipe.engine.plan._schedules import SCHEDULE_NAMES
from tests.conftest import assert_same_weights, worker_pids

rng = np.random.RandomState(0)
X = rng.normal(size=(90, 6)).astype(np.float32)  # batches of 13: the last one has 12 rows
Y = rng.randint(0, 3, size=90)
W = rng.uniform(0.2, 3.0, size=90)


def make(cls=PipeNetClassifier, **kw):
    p = dict(module__hidden_layer_sizes=(16, 16, 16, 16), module__activation="tanh", lr=0.01,
             max_epochs=3, batch_size=13, random_state=0)
    p.update(kw)
    return cls(**p)


def assert_same(a, b, atol=1e-5):
    assert_same_weights(a, b, atol=atol)


def test_weights_change_the_fit():
    weighted, plain = make().fit(X, Y, sample_weight=W), make().fit(X, Y)
    assert np.abs(weighted.predict_proba(X) - plain.predict_proba(X)).max() > 1e-3


def test_zero_weight_rows_change_nothing_whatever_their_targets():
    garbage_X = np.vstack([X, rng.normal(size=(30, 6)).astype(np.float32) * 50])
    garbage_y = np.r_[Y, np.full(30, 2)]
    w = np.r_[W, np.zeros(30)]
    assert_same(make().fit(garbage_X, garbage_y, sample_weight=w), make().fit(X, Y, sample_weight=W), atol=1e-6)


def test_scaling_every_weight_changes_nothing_and_all_ones_is_unweighted():
    assert_same(make().fit(X, Y, sample_weight=W * 37.5), make().fit(X, Y, sample_weight=W), atol=1e-6)
    assert_same(make().fit(X, Y, sample_weight=np.ones(90)), make().fit(X, Y), atol=0)


def test_integer_weights_equal_repeated_rows_in_one_batch():
    """One batch: sum(w_i * loss_i) / sum(w_i) is the mean over the repeated rows (SGD, whose
    steps follow the loss's scale, unlike Adam's)."""
    counts = rng.randint(1, 4, size=90)
    kw = dict(batch_size="all", optimizer=torch.optim.SGD, lr=0.5)
    weighted = make(**kw).fit(X, Y, sample_weight=counts)
    repeated = make(**kw).fit(np.repeat(X, counts, axis=0), np.repeat(Y, counts))
    np.testing.assert_allclose(weighted.history_[:, "train_loss"], repeated.history_[:, "train_loss"], atol=1e-6)
    np.testing.assert_allclose(weighted.predict_proba(X), repeated.predict_proba(X), atol=1e-5)


SCHEDULE_CASES = [(s, 2, 4 if s != "dualpipev" else 4) for s in SCHEDULE_NAMES] + [("1f1b", 4, 4)]


@pytest.fixture(scope="module")
def one_device():
    return make().fit(X, Y, sample_weight=W)


@pytest.mark.parametrize("schedule,p,m", SCHEDULE_CASES)
def test_pipelined_weighted_fit_equals_one_device(one_device, schedule, p, m):
    est = make(n_stages=p, n_microbatches=m, schedule=schedule, launcher="local").fit(X, Y, sample_weight=W)
    assert_same(est, one_device)
    np.testing.assert_allclose(est.history_[:, "train_loss"], one_device.history_[:, "train_loss"], atol=1e-5)


@pytest.mark.distributed
@pytest.mark.parametrize("schedule", ["1f1b", "zbv"])
def test_spawned_weighted_fit_equals_one_device(one_device, schedule):
    est = make(n_stages=2, n_microbatches=4, schedule=schedule, launcher="spawn").fit(X, Y, sample_weight=W)
    assert_same(est, one_device)
    skpipe.shutdown_workers()


def test_regressor_weighted_pipelined_equals_one_device():
    y2 = np.c_[X[:, 0] - X[:, 1], X[:, 2]]
    ref = make(PipeNetRegressor).fit(X, y2, sample_weight=W)
    est = make(PipeNetRegressor, n_stages=2, n_microbatches=4, launcher="local").fit(X, y2, sample_weight=W)
    assert_same(est, ref)
    assert np.abs(ref.predict(X) - make(PipeNetRegressor).fit(X, y2).predict(X)).max() > 1e-3


def test_class_weight_multiplies_the_sample_weights():
    balanced = make(class_weight="balanced").fit(X, Y)
    by_rows = make().fit(X, Y, sample_weight=compute_sample_weight("balanced", Y))
    assert_same(balanced, by_rows, atol=1e-6)
    as_dict = make(class_weight={0: 3.0, 2: 0.5}).fit(X, Y, sample_weight=W)
    by_hand = make().fit(X, Y, sample_weight=W * np.array([3.0, 1.0, 0.5])[Y])
    assert_same(as_dict, by_hand, atol=1e-6)


def test_string_labels_with_class_weight():
    labels = np.array(["ant", "bee", "cat"])[Y]
    est = make(class_weight={"bee": 5.0}).fit(X, labels)
    by_hand = make().fit(X, labels, sample_weight=np.where(labels == "bee", 5.0, 1.0))
    assert_same(est, by_hand, atol=1e-6)


def test_score_takes_sample_weight():
    est = make().fit(X, Y)
    assert est.score(X, Y, sample_weight=W) == pytest.approx(accuracy_score(Y, est.predict(X), sample_weight=W))


def test_metadata_routing_through_pipeline_and_grid_search():
    with sklearn.config_context(enable_metadata_routing=True):
        pipe = make_pipeline(StandardScaler().set_fit_request(sample_weight=False),
                             make(max_epochs=2).set_fit_request(sample_weight=True)
                             .set_score_request(sample_weight=True))
        search = GridSearchCV(pipe, {"pipenetclassifier__lr": [0.01, 0.02]}, cv=KFold(2))
        search.fit(X, Y, sample_weight=W)
        best_lr = search.best_params_["pipenetclassifier__lr"]
        direct = make_pipeline(StandardScaler().set_fit_request(sample_weight=False),
                               make(max_epochs=2, lr=best_lr).set_fit_request(sample_weight=True))
        direct.fit(X, Y, sample_weight=W)
    np.testing.assert_allclose(search.best_estimator_.predict_proba(X), direct.predict_proba(X), atol=1e-6)


@pytest.fixture
def no_worker_may_start(monkeypatch):
    from skpipe.engine.workers import _pool

    def refuse(*a, **k):
        raise AssertionError("a stage worker was started before the bad input was refused")

    monkeypatch.setattr(_pool.WorkerGroup, "__init__", refuse)


SPAWN = dict(n_stages=2, n_microbatches=2, launcher="spawn", max_epochs=1)


@pytest.mark.parametrize("weights,kw,match", [
    (-W, {}, r"Negative values in data passed to `sample_weight`"),
    (np.r_[W[:-1], np.nan], {}, r"Input sample_weight contains NaN"),
    (np.r_[W[:-1], np.inf], {}, r"Input sample_weight contains infinity"),
    (W[:50], {}, r"sample_weight.shape == \(50,\), expected \(90,\)"),
    (np.zeros(90), {}, r"Sample weights must contain at least one non-zero number"),
    (None, dict(class_weight={7: 2.0}), r"class_weight names class\(es\) \[7\] that y does not have \(classes_=\[0, 1, 2\]\)"),
    (None, dict(class_weight={1: -2.0}), r"class_weight must map classes to non-negative finite weights; got \{1: -2.0\}"),
    (None, dict(class_weight="uniform"), r"The 'class_weight' parameter of PipeNetClassifier must be .*Got 'uniform' instead"),
])
def test_bad_weights_are_refused_before_any_worker(weights, kw, match, no_worker_may_start):
    with pytest.raises(ValueError, match=match):
        make(**SPAWN, **kw).fit(X, Y, sample_weight=weights)
    assert worker_pids() == []


TORCHRUN_SCRIPT = """
import numpy as np, torch.distributed as dist
from skpipe import PipeNetClassifier
dist.init_process_group("gloo")
rng = np.random.RandomState(0)
X = rng.normal(size=(90, 6)).astype(np.float32); y = rng.randint(0, 3, size=90)
w = rng.uniform(0.2, 3.0, size=90)
kw = dict(module__hidden_layer_sizes=(16, 16, 16), module__activation="tanh", lr=0.01,
          max_epochs=3, batch_size=13, random_state=0)
piped = PipeNetClassifier(n_stages=2, n_microbatches=4, launcher="torchrun", **kw).fit(X, y, sample_weight=w)
one = PipeNetClassifier(**kw).fit(X, y, sample_weight=w)  # one stage, in this rank
diff = max(float((a - b).abs().max()) for a, b in zip(piped.module_.state_dict().values(),
                                                       one.module_.state_dict().values()))
import sys
sys.stdout.write(f"rank {dist.get_rank()} max difference {diff:.3g}\\n")  # one write: no interleaving
sys.stdout.flush()
dist.destroy_process_group()
"""


@pytest.mark.distributed
def test_torchrun_weighted_fit_equals_one_device(tmp_path):
    import subprocess
    import sys

    from tests.test_examples import free_port

    script = tmp_path / "weighted.py"
    script.write_text(TORCHRUN_SCRIPT)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2",
           "--master-addr", "127.0.0.1", "--master-port", str(free_port()), str(script)]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    diffs = [float(line.rsplit(" ", 1)[1]) for line in out.stdout.splitlines() if line.startswith("rank ")]
    assert len(diffs) == 2 and max(diffs) < 1e-5
