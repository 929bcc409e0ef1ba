"""The estimators inside real scikit-learn workflows, with skorch's callbacks, and persisted."""

import pickle
import os
import subprocess
import sys
import time

import joblib
import numpy as np
import pytest
import torch
from skorch.callbacks import EarlyStopping, EpochScoring, LRScheduler
from skorch.dataset import ValidSplit
from sklearn.base import clone
from sklearn.model_selection import GridSearchCV, StratifiedKFold, cross_val_score
from sklearn.neural_network import MLPClassifier
from sklearn.pipeline import make_pipeline

from skpipe import PipeNetClassifier, PipeNetRegressor
from skpipe._demo import penguin_grid, penguin_pipeline
from skpipe.datasets import penguin_preprocessor
from skpipe.datasets import load_penguins


def test_penguins_grid_search_matches_sklearn_mlp():
    X, y = load_penguins(return_X_y=True)
    cv = StratifiedKFold(5, shuffle=True, random_state=0)
    t0 = time.perf_counter()
    search = GridSearchCV(penguin_pipeline(), penguin_grid(), cv=cv).fit(X, y)
    elapsed = time.perf_counter() - t0
    assert search.best_params_.keys() == penguin_grid().keys()
    mlp = make_pipeline(penguin_preprocessor(), MLPClassifier(max_iter=2000, random_state=0))
    yardstick = cross_val_score(mlp, X, y, cv=cv).mean()
    print(f"skpipe {search.best_score_:.4f} vs MLPClassifier {yardstick:.4f} in {elapsed:.1f}s")
    assert search.best_score_ >= yardstick - 0.02
    assert search.best_score_ > 0.95
    assert set(search.predict(X.iloc[:10])) <= {"Adelie", "Chinstrap", "Gentoo"}


def test_pipelined_penguins_search_is_the_same_as_one_stage():
    X, y = load_penguins(return_X_y=True)
    grid = {"pipenetclassifier__lr": [0.01], "pipenetclassifier__n_stages": [1, 2]}
    search = GridSearchCV(
        penguin_pipeline(max_epochs=5, launcher="local", n_microbatches=2), grid, cv=3
    ).fit(X, y)
    scores = search.cv_results_["split0_test_score"]
    assert scores[0] == scores[1]


def test_nested_routing_through_pipeline():
    pipe = penguin_pipeline()
    pipe.set_params(pipenetclassifier__module__hidden_layer_sizes=(7,), pipenetclassifier__optimizer__weight_decay=0.1)
    est = pipe[-1]
    assert est.get_params()["module__hidden_layer_sizes"] == (7,)
    assert clone(est).module__hidden_layer_sizes == (7,)
    X, y = load_penguins(return_X_y=True)
    pipe.set_params(pipenetclassifier__max_epochs=1).fit(X, y)
    assert est.module_[0].out_features == 7


def test_same_seed_same_predictions(classification_data):
    X, y = classification_data
    a = PipeNetClassifier(max_epochs=5, random_state=3).fit(X, y)
    b = PipeNetClassifier(max_epochs=5, random_state=3).fit(X, y)
    c = PipeNetClassifier(max_epochs=5, random_state=4).fit(X, y)
    np.testing.assert_array_equal(a.predict_proba(X), b.predict_proba(X))
    assert not np.array_equal(a.predict_proba(X), c.predict_proba(X))


def test_fit_does_not_touch_global_torch_rng(classification_data):
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    PipeNetClassifier(max_epochs=1, random_state=0).fit(*classification_data)
    assert torch.equal(torch.rand(3), expected)


def test_module_instance_is_not_trained_in_place(classification_data):
    from skpipe.modules import MLP

    net = MLP(6, 3)
    w = net[0].weight.detach().clone()
    est = PipeNetClassifier(module=net, max_epochs=2).fit(*classification_data)
    assert torch.equal(net[0].weight, w)
    assert not torch.equal(est.module_[0].weight, w)


@pytest.mark.parametrize("dump", ["pickle", "joblib"])
def test_persistence_round_trip(tmp_path, classification_data, dump):
    X, y = classification_data
    est = PipeNetClassifier(max_epochs=3, random_state=0).fit(X, y)
    path = tmp_path / "est.bin"
    if dump == "pickle":
        path.write_bytes(pickle.dumps(est))
        loaded = pickle.loads(path.read_bytes())
    else:
        joblib.dump(est, path)
        loaded = joblib.load(path)
    np.testing.assert_array_equal(loaded.predict_proba(X), est.predict_proba(X))


def test_persisted_model_loads_in_a_process_without_gpu(tmp_path, classification_data):
    X, y = classification_data
    est = PipeNetClassifier(max_epochs=2, random_state=0).fit(X, y)
    assert all(p.device.type == "cpu" for p in est.module_.parameters())
    joblib.dump(est, tmp_path / "m.joblib")
    np.save(tmp_path / "X.npy", X)
    code = (
        "import joblib, numpy as np, torch; assert not torch.cuda.is_available();"
        f"e = joblib.load({str(tmp_path / 'm.joblib')!r}); X = np.load({str(tmp_path / 'X.npy')!r});"
        "print(e.predict(X[:4]).tolist())"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True,
        env={**os.environ, "CUDA_VISIBLE_DEVICES": ""},
    )
    assert out.stdout.strip() == str(est.predict(X[:4]).tolist())


def test_callbacks_run_in_the_users_process(classification_data, capsys):
    X, y = classification_data
    est = PipeNetClassifier(
        max_epochs=200,
        lr=0.05,
        train_split=ValidSplit(3, stratified=True),
        callbacks=[EpochScoring("accuracy", name="valid_acc", lower_is_better=False), EarlyStopping(patience=3)],
        verbose=1,
        random_state=0,
        n_stages=2,
        launcher="local",
    ).fit(X, y)
    assert len(est.history_) < 200  # early stopping took effect
    assert "valid_acc" in est.history_[-1]
    out = capsys.readouterr().out
    assert "valid_loss" in out and "train_loss" in out


def test_lr_scheduler_with_local_stages(classification_data):
    def fit(callbacks, **kw):
        return PipeNetClassifier(max_epochs=4, callbacks=callbacks, random_state=0, lr=0.05,
                                 **kw).fit(*classification_data)

    def scheduler():
        return [LRScheduler("StepLR", step_size=1, gamma=0.1)]

    est = fit(scheduler(), n_stages=2, launcher="local", n_microbatches=2)
    assert len(est.history_) == 4
    np.testing.assert_allclose(est.history_[:, "event_lr"], [0.05, 0.005, 0.0005, 0.00005])
    # the stages' optimizer really stepped with those rates: one device with the same scheduler
    # trains the same network, and one without it another
    same = fit(scheduler())
    other = fit(None, n_stages=2, launcher="local", n_microbatches=2)
    w, w_same, w_other = (e.module_[0].weight for e in (est, same, other))
    torch.testing.assert_close(w, w_same, atol=1e-5, rtol=0)
    assert (w - w_other).abs().max() > 1e-3


def test_a_gradient_reading_callback_is_refused_under_spawn_before_any_worker(
    classification_data, monkeypatch
):
    from skorch.callbacks import Callback

    from skpipe.engine.workers import _pool

    class GradNorms(Callback):
        def on_grad_computed(self, net, named_parameters, **kw):
            pass

    def no_workers(*a, **k):
        raise AssertionError("a stage worker was started")

    monkeypatch.setattr(_pool.WorkerGroup, "__init__", no_workers)
    est = PipeNetClassifier(max_epochs=2, n_stages=2, launcher="spawn", n_microbatches=2,
                            callbacks=[GradNorms()])
    with pytest.raises(ValueError, match=r"callbacks contains GradNorms, whose on_grad_computed "
                                         r"reads the gradients, but with launcher='spawn'"):
        est.fit(*classification_data)


@pytest.mark.distributed
@pytest.mark.parametrize("launcher", ["local", "spawn"])
def test_callbacks_read_the_scheduled_lr_on_every_launcher(classification_data, launcher):
    from skorch.callbacks import Callback

    class ReadsLR(Callback):
        def initialize(self):
            self.lrs_ = []
            return self

        def on_epoch_end(self, net, **kw):
            self.lrs_.append(net.optimizer_.param_groups[0]["lr"])

    reads = ReadsLR()
    est = PipeNetClassifier(
        max_epochs=3, n_stages=2, launcher=launcher, n_microbatches=2, lr=0.4,
        callbacks=[LRScheduler("StepLR", step_size=1, gamma=0.5), reads],
    ).fit(*classification_data)
    np.testing.assert_allclose(est.history_[:, "event_lr"], [0.4, 0.2, 0.1])
    np.testing.assert_allclose(reads.lrs_, [0.2, 0.1, 0.05])


@pytest.mark.parametrize("n_stages", [1, 2])
def test_on_grad_computed_sees_the_gradients_where_they_live(classification_data, n_stages):
    from skorch.callbacks import Callback

    class GradNorms(Callback):
        def initialize(self):
            self.norms_ = []
            return self

        def on_grad_computed(self, net, named_parameters, **kw):
            self.norms_.append(float(sum(p.grad.norm() for _, p in named_parameters)))

    norms = GradNorms()
    PipeNetClassifier(max_epochs=1, n_stages=n_stages, launcher="auto" if n_stages == 1
                      else "local", n_microbatches=2, random_state=0, batch_size=50,
                      callbacks=[norms]).fit(*classification_data)
    assert len(norms.norms_) == 2 and all(n > 0 for n in norms.norms_)  # 90 rows, 2 steps
    if n_stages == 2:
        one = GradNorms()
        PipeNetClassifier(max_epochs=1, n_microbatches=2, random_state=0, batch_size=50,
                          callbacks=[one]).fit(*classification_data)
        np.testing.assert_allclose(norms.norms_, one.norms_, rtol=1e-5)


def test_warm_start_continues(classification_data):
    X, y = classification_data
    est = PipeNetClassifier(max_epochs=2, warm_start=True, random_state=0).fit(X, y)
    w = est.module_[0].weight.detach().clone()
    est.fit(X, y)
    assert len(est.history_) == 4
    assert not torch.equal(est.module_[0].weight, w)


def test_regressor_in_grid_search(regression_data):
    X, y = regression_data
    search = GridSearchCV(
        PipeNetRegressor(max_epochs=60, lr=0.01, random_state=0),
        {"module__hidden_layer_sizes": [(16,), (32,)]}, cv=3,
    ).fit(X, y)
    assert search.best_score_ > 0.8
