"""Data as users pass it, and a clear error for each bad input or parameter."""

import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp
from sklearn.exceptions import NotFittedError

from skpipe import PipeNetClassifier, PipeNetRegressor


def clf(**kw):
    params = dict(max_epochs=5, lr=0.01, random_state=0)
    params.update(kw)
    return PipeNetClassifier(**params)


@pytest.mark.parametrize("dtype", [np.float64, np.float32, np.int64, np.int32, np.uint8, np.float16])
def test_any_numeric_dtype(classification_data, dtype):
    X, y = classification_data
    Xd = (X * 10).astype(dtype)
    est = clf().fit(Xd, y)
    assert est.predict(Xd).shape == (90,)


def test_dataframe_sets_feature_names(classification_data):
    X, y = classification_data
    df = pd.DataFrame(X, columns=[f"f{i}" for i in range(6)])
    est = clf().fit(df, y)
    assert list(est.feature_names_in_) == list(df.columns)
    assert est.n_features_in_ == 6
    with pytest.warns(UserWarning, match="feature names"):
        est.predict(X)


def test_sparse_matches_dense(classification_data):
    X, y = classification_data
    Xs = sp.csr_matrix(np.where(np.abs(X) > 1.0, X, 0.0))
    dense = clf().fit(Xs.toarray(), y)
    sparse = clf().fit(Xs, y)
    np.testing.assert_allclose(sparse.predict_proba(Xs), dense.predict_proba(Xs.toarray()), atol=1e-6)
    clf().fit(Xs.tocsc(), y).predict(Xs.tocoo())


def test_lists(classification_data):
    X, y = classification_data
    est = clf().fit(X.tolist(), y.tolist())
    assert est.predict(X[:3].tolist()).shape == (3,)


@pytest.mark.parametrize(
    "labels",
    [
        np.array(["cat", "dog", "emu"]),
        np.array([10, 20, 30]),
        np.array([-1.0, 0.0, 2.0]),
        pd.Categorical(["lo", "mid", "hi"]),
    ],
)
def test_labels_come_back_as_given(classification_data, labels):
    X, y = classification_data
    y_lab = np.asarray(labels)[y]
    est = clf().fit(X, pd.Series(y_lab) if isinstance(labels, pd.Categorical) else y_lab)
    pred = est.predict(X)
    assert set(pred) <= set(np.asarray(labels))
    assert pred.dtype == np.asarray(labels).dtype or isinstance(labels, pd.Categorical)
    proba = est.predict_proba(X)
    assert proba.shape == (90, 3) and proba.dtype == np.float64
    np.testing.assert_allclose(proba.sum(axis=1), 1.0, atol=1e-9)
    assert np.mean(pred == y_lab) > 0.6


def test_bool_labels(classification_data):
    X, y = classification_data
    est = clf().fit(X, y == 0)
    assert est.predict(X).dtype == bool
    assert list(est.classes_) == [False, True]


def test_regressor_shapes(regression_data):
    X, y = regression_data
    reg = PipeNetRegressor(max_epochs=5, random_state=0)
    assert reg.fit(X, y).predict(X).shape == (80,)
    Y = np.c_[y, -y]
    assert reg.fit(X, Y).predict(X).shape == (80, 2)
    assert reg.n_outputs_ == 2


# -- bad inputs -----------------------------------------------------------------------------

def test_nan_and_inf_in_X(classification_data):
    X, y = classification_data
    Xn = X.copy(); Xn[3, 2] = np.nan
    with pytest.raises(ValueError, match="Input X contains NaN"):
        clf().fit(Xn, y)
    Xi = X.copy(); Xi[0, 0] = np.inf
    with pytest.raises(ValueError, match="Input X contains infinity"):
        clf().fit(Xi, y)


def test_nan_in_y(regression_data):
    X, y = regression_data
    y = y.copy(); y[5] = np.nan
    with pytest.raises(ValueError, match="Input y contains NaN"):
        PipeNetRegressor(max_epochs=1).fit(X, y)


def test_one_class(classification_data):
    X, _ = classification_data
    with pytest.raises(ValueError, match=r"y has only one class \('a'\)"):
        clf().fit(X, np.array(["a"] * 90))


def test_wrong_feature_count_at_predict(classification_data):
    X, y = classification_data
    est = clf().fit(X, y)
    with pytest.raises(ValueError, match="X has 5 features, but PipeNetClassifier is expecting 6"):
        est.predict(X[:, :5])


def test_predict_before_fit(classification_data):
    with pytest.raises(NotFittedError):
        clf().predict(classification_data[0])


def test_empty_data():
    with pytest.raises(ValueError, match="0 sample"):
        clf().fit(np.empty((0, 3)), np.empty(0))


def test_lengths_differ(classification_data):
    X, y = classification_data
    with pytest.raises(ValueError, match=r"inconsistent numbers of samples: \[90, 89\]"):
        clf().fit(X, y[:-1])


def test_continuous_target_for_classifier(regression_data):
    with pytest.raises(ValueError, match="Unknown label type"):
        clf().fit(*regression_data)


@pytest.mark.parametrize(
    "param,value,match",
    [
        ("lr", -1.0, r"The 'lr' parameter of PipeNetClassifier must be a float in the range \(0.0, inf\). Got -1.0"),
        ("lr", 0, r"The 'lr' parameter"),
        ("batch_size", 0, r"The 'batch_size' parameter of PipeNetClassifier must be .*Got 0 instead"),
        ("max_epochs", 0, r"The 'max_epochs' parameter .*Got 0 instead"),
        ("n_stages", 0, r"The 'n_stages' parameter .*Got 0 instead"),
        ("schedule", "zero_bubble", r"The 'schedule' parameter .*Got 'zero_bubble' instead"),
        ("checkpoint", "sometimes", r"The 'checkpoint' parameter .*Got 'sometimes' instead"),
        ("launcher", "slurm", r"The 'launcher' parameter .*Got 'slurm' instead"),
        ("n_microbatches", 0, r"The 'n_microbatches' parameter .*Got 0 instead"),
        ("balance", "even", r"The 'balance' parameter .*Got 'even' instead"),
        ("precision", "fp8", r"The 'precision' parameter .*Got 'fp8' instead"),
    ],
)
def test_invalid_parameter_values(classification_data, param, value, match):
    with pytest.raises(ValueError, match=match):
        clf(**{param: value}).fit(*classification_data)


def test_unknown_parameter_did_you_mean(classification_data):
    with pytest.raises(TypeError, match=r"unexpected parameter 'lrr'. Did you mean 'lr'\?"):
        clf(lrr=0.1).fit(*classification_data)
    with pytest.raises(TypeError, match=r"unexpected parameter 'module_hidden_layer_sizes'. Did you mean 'module__hidden_layer_sizes'"):
        clf(module_hidden_layer_sizes=(3,)).fit(*classification_data)


def test_unknown_module_parameter(classification_data):
    with pytest.raises(ValueError, match=r"module__hidden_sizes is not a parameter of MLP.*Did you mean 'module__hidden_layer_sizes'"):
        clf(module__hidden_sizes=(3,)).fit(*classification_data)


def test_module_must_be_a_module(classification_data):
    with pytest.raises(TypeError, match=r"The 'module' parameter of PipeNetClassifier must be a torch.nn.Module"):
        clf(module="mlp").fit(*classification_data)


def test_unsplittable_module(classification_data):
    from torch import nn

    class Net(nn.Module):
        def __init__(self, n_features_in, n_outputs):
            super().__init__()
            self.a = nn.Linear(n_features_in, n_outputs)

        def forward(self, x):
            return self.a(x)

    with pytest.raises(TypeError, match=r"module Net cannot be split into 2 pipeline chunks"):
        clf(module=Net, n_stages=2, launcher="local").fit(*classification_data)
    clf(module=Net).fit(*classification_data)  # fine on one stage


def test_too_many_stages_for_layers(classification_data):
    with pytest.raises(ValueError, match=r"3 splittable layers, fewer than the 4 pipeline chunks"):
        clf(n_stages=4, launcher="local", n_microbatches=4).fit(*classification_data)


def test_more_stages_than_devices(classification_data):
    with pytest.raises(ValueError, match=r"n_stages \(3\) is larger than the number of devices given \(2"):
        clf(n_stages=3, devices=["cpu", "cpu"], launcher="spawn").fit(*classification_data)


def test_microbatches_larger_than_batch(classification_data):
    with pytest.raises(ValueError, match=r"n_microbatches \(16\) must be <= batch_size \(8\)"):
        clf(n_stages=2, batch_size=8, n_microbatches=16, launcher="local").fit(*classification_data)


def test_failed_fit_leaves_estimator_unchanged(classification_data):
    X, y = classification_data
    est = clf().fit(X, y)
    before = est.predict_proba(X)
    with pytest.raises(ValueError):
        est.set_params(lr=-1).fit(X[:, :4], np.zeros(90))
    assert est.n_features_in_ == 6
    np.testing.assert_array_equal(est.predict_proba(X), before)


# -- numpy integers are integers (defect: a bare AssertionError in validation) -----------------
def test_numpy_integers_in_a_grid_search(classification_data):
    from sklearn.model_selection import GridSearchCV

    X, y = classification_data
    est = PipeNetClassifier(module__hidden_layer_sizes=(8, 8), max_epochs=1, batch_size=16,
                            n_stages=2, launcher="local", random_state=0)
    search = GridSearchCV(est, {"n_microbatches": np.arange(2, 4)}, cv=2, error_score="raise")
    search.fit(X, y)
    assert [p["n_microbatches"] for p in search.cv_results_["params"]] == [2, 3]


@pytest.mark.parametrize("param,value", [
    ("n_microbatches", np.int64(4)),
    ("chunks_per_stage", np.int32(2)),
    ("batch_size", np.int64(16)),
    ("n_stages", np.int64(2)),
    ("balance", list(np.array([2, 2, 2, 1]))),
])
def test_numpy_integer_parameters_fit_like_python_ints(classification_data, param, value):
    X, y = classification_data
    base = dict(module__hidden_layer_sizes=(8, 8, 8), max_epochs=1, batch_size=16, n_stages=2,
                n_microbatches=4, schedule="interleaved_1f1b", launcher="local", random_state=0)
    plain = [int(v) for v in value] if isinstance(value, list) else int(value)
    ref = PipeNetClassifier(**{**base, param: plain}).fit(X, y)
    est = PipeNetClassifier(**{**base, param: value}).fit(X, y)
    np.testing.assert_array_equal(est.predict_proba(X), ref.predict_proba(X))


# -- typos are caught where they are made ---------------------------------------------------
@pytest.mark.parametrize("key,hint", [
    ("n_stage", r"Did you mean 'n_stages'\?"),
    ("module_hidden_layer_sizes", r"Did you mean 'module__hidden_layer_sizes'\?"),
    ("moduel__width", r"Did you mean 'module__'\?"),
    ("zzz", r"Valid parameters are"),
])
def test_set_params_refuses_unknown_names(key, hint):
    est = PipeNetClassifier()
    with pytest.raises(ValueError, match=rf"Invalid parameter '{key}' for estimator PipeNetClassifier\..*{hint}"):
        est.set_params(**{key: 2})
    assert key not in est.get_params()


def test_set_params_stores_values_unvalidated_and_prefixed_names_free_form():
    est = PipeNetClassifier().set_params(n_stages=-3, module__anything=1, optimizer__betas=(0.8, 0.9))
    assert est.get_params()["n_stages"] == -3 and est.get_params()["module__anything"] == 1


def test_a_grid_with_a_typo_names_it(classification_data):
    from sklearn.model_selection import GridSearchCV

    search = GridSearchCV(PipeNetClassifier(max_epochs=1), {"n_stage": [1, 2]}, cv=2)
    with pytest.raises(ValueError, match=r"Invalid parameter 'n_stage'.*Did you mean 'n_stages'"):
        search.fit(*classification_data)


# -- predictions do not depend on which rows share a call -------------------------------------
def test_a_rows_prediction_does_not_depend_on_its_batch():
    rng = np.random.RandomState(0)
    X = rng.normal(size=(300, 37))
    y = rng.normal(size=300)
    est = PipeNetRegressor(module__hidden_layer_sizes=(100, 100), max_epochs=1).fit(X, y)
    whole = est.predict(X)
    alone = np.array([est.predict(X[i : i + 1])[0] for i in range(40)])
    np.testing.assert_array_equal(alone, whole[:40])  # bit for bit
    order = rng.permutation(300)[:77]
    np.testing.assert_array_equal(est.predict(X[order]), whole[order])


def test_read_only_memmapped_data_trains_without_warnings(tmp_path):
    """joblib hands large arrays to GridSearchCV(n_jobs>1) workers as read-only memmaps."""
    import warnings

    import joblib

    rng = np.random.RandomState(0)
    X = rng.normal(size=(300, 20)).astype(np.float32)
    y = rng.randint(0, 3, 300)
    joblib.dump(X, tmp_path / "X")
    Xm = joblib.load(tmp_path / "X", mmap_mode="r")
    assert not Xm.flags.writeable
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        est = PipeNetClassifier(max_epochs=2, random_state=0).fit(Xm, y)
        proba = est.predict_proba(Xm)
    np.testing.assert_array_equal(proba, PipeNetClassifier(max_epochs=2, random_state=0).fit(X, y).predict_proba(X))
