"""partial_fit: one pass per call, the network, optimizer state and history carried over."""

import numpy as np
import pytest
import torch

import skpipe
from skpipe import PipeNetClassifier, PipeNetRegressor
from tests.conftest import worker_pids

rng = np.random.RandomState(0)
X = rng.normal(size=(90, 6)).astype(np.float32)
Y = rng.randint(0, 3, size=90)


def make(cls=PipeNetClassifier, **kw):
    p = dict(module__hidden_layer_sizes=(16, 16), module__activation="tanh", lr=0.01,
             batch_size=13, random_state=0)
    p.update(kw)
    return cls(**p)


def calls(est, n=3, **kw):
    for i in range(n):
        est.partial_fit(X[30 * i: 30 * i + 30], Y[30 * i: 30 * i + 30], **kw)
    return est


def test_each_call_is_one_epoch_and_the_optimizer_continues():
    est = calls(make(), classes=[0, 1, 2])
    assert est.n_iter_ == len(est.history_) == 3
    steps = [float(s["step"]) for s in est.optimizer_state_["state"].values()]
    assert steps and all(s == 3 * 3 for s in steps)  # 3 calls x 3 batches of <= 13 rows
    # a fresh optimizer each call (what warm_start does) trains another network
    fresh = make(warm_start=True, max_epochs=1)
    for i in range(3):
        fresh.fit(X[30 * i: 30 * i + 30], Y[30 * i: 30 * i + 30])
    assert np.abs(fresh.predict_proba(X) - est.predict_proba(X)).max() > 1e-4


@pytest.mark.parametrize("launcher,n_replicas", [
    ("local", 1), pytest.param("spawn", 1, marks=pytest.mark.distributed),
    pytest.param("spawn", 2, marks=pytest.mark.distributed, id="spawn-replicas")])
def test_pipelined_partial_fits_equal_one_device(launcher, n_replicas):
    ref = calls(make(), classes=[0, 1, 2])
    est = calls(make(n_stages=2, n_microbatches=2, launcher=launcher, schedule="zbv",
                     n_replicas=n_replicas, module__hidden_layer_sizes=(16, 16, 16)),
                classes=[0, 1, 2])
    ref3 = calls(make(module__hidden_layer_sizes=(16, 16, 16)), classes=[0, 1, 2])
    for (k, a), b in zip(est.module_.state_dict().items(), ref3.module_.state_dict().values()):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=0, msg=k)
    assert ref.n_iter_ == 3
    skpipe.shutdown_workers()


@pytest.mark.distributed
def test_warm_workers_stay_between_calls():
    skpipe.shutdown_workers()
    est = make(n_stages=2, n_microbatches=2, launcher="spawn")
    est.partial_fit(X, Y, classes=[0, 1, 2])
    first = sorted(worker_pids())
    est.partial_fit(X, Y)
    assert len(first) == 2 and sorted(worker_pids()) == first
    skpipe.shutdown_workers()


def test_classes_are_needed_first_and_fixed_after():
    with pytest.raises(ValueError, match=r"classes must be given on the first call to partial_fit"):
        make().partial_fit(X, Y)
    est = make().partial_fit(X[Y < 2], Y[Y < 2], classes=[0, 1, 2])  # a class not seen yet
    assert est.predict_proba(X).shape == (90, 3)
    with pytest.raises(ValueError, match=r"y contains classes \[7\] not in classes_ \(\[0, 1, 2\], set by the first fit or partial_fit\)"):
        est.partial_fit(X[:5], np.array([0, 1, 7, 0, 1]))
    assert est.n_iter_ == 1  # the failed call changed nothing


def test_regressor_partial_fit_and_weights():
    y = X[:, 0] - 2 * X[:, 1]
    est = make(PipeNetRegressor)
    for _ in range(5):
        est.partial_fit(X, y, sample_weight=np.linspace(0.5, 2, 90))
    assert est.n_iter_ == 5
    assert est.history_[-1, "train_loss"] < est.history_[0, "train_loss"]
    with pytest.raises(ValueError, match=r"X has 4 features, but PipeNetRegressor is expecting 6"):
        est.partial_fit(X[:, :4], y)
