"""Where a fitted pipelined estimator predicts: through its stages on their GPUs, or with
module_ on the CPU (trained on CPUs, or unpickled where the GPUs are not)."""

import dataclasses
import pickle

import numpy as np
import pytest
import torch

from skpipe import PipeNetClassifier


@pytest.fixture(scope="module")
def fitted():
    rng = np.random.RandomState(0)
    X = rng.randn(96, 6).astype("float32")
    y = (X[:, 0] + X[:, 1] > 0).astype(int)
    est = PipeNetClassifier(module__hidden_layer_sizes=(16, 16), n_stages=2, launcher="local",
                            max_epochs=3, random_state=0).fit(X, y)
    return est, X, y


def as_if_trained_on_gpus(est):
    twin = pickle.loads(pickle.dumps(est))
    twin.config_ = dataclasses.replace(twin.config_, devices=("cuda:0", "cuda:1"))
    return twin


def test_trained_on_cpus_predicts_here(fitted):
    est, X, _ = fitted
    assert not est.predicts_on_stages()
    with torch.no_grad():
        expected = torch.softmax(est.module_(torch.from_numpy(X)), dim=1).numpy()
    np.testing.assert_allclose(est.predict_proba(X), expected, atol=1e-6)


def test_trained_on_gpus_predicts_through_the_stages_where_they_are(fitted, monkeypatch):
    est, X, y = fitted
    twin = as_if_trained_on_gpus(est)
    calls = []

    def through_stages(X, batch_size=4096):
        calls.append(len(X))
        return twin._forward_here(X)  # stands in for the stages' GPUs

    monkeypatch.setattr(twin, "forward_pipelined", through_stages)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    assert twin.predicts_on_stages()
    np.testing.assert_allclose(twin.predict_proba(X), est.predict_proba(X), atol=1e-6)
    assert twin.score(X, y) == est.score(X, y)
    assert calls == [len(X), len(X)]
    # unpickled on a machine with one GPU (or none): module_ on the CPU
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    assert not twin.predicts_on_stages()
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert not twin.predicts_on_stages()
    np.testing.assert_allclose(twin.predict_proba(X), est.predict_proba(X), atol=1e-6)
    assert calls == [len(X), len(X)]
