"""The tabular architectures in skpipe.modules: pipeline-ready (stages cut between blocks, 3-D
token boundaries for the FT-Transformer), trained pipelined like one device, and searchable."""

import numpy as np
import pytest
import torch
from sklearn.compose import ColumnTransformer
from sklearn.model_selection import GridSearchCV
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import OneHotEncoder, StandardScaler

from skpipe import PipeNetClassifier
from skpipe.modules import FTTransformer, TabularResNet

rng = np.random.RandomState(0)
X = rng.normal(size=(80, 6)).astype(np.float32)
Y = (X[:, 0] + X[:, 1] > 0).astype(np.int64)


def fit(module, **kw):
    params = dict(module=module, lr=0.01, max_epochs=2, batch_size=16, random_state=0,
                  optimizer=torch.optim.SGD)
    params.update(kw)
    return PipeNetClassifier(**params).fit(X, Y)


@pytest.mark.parametrize("module,kw,n_stages", [
    (TabularResNet, dict(module__width=16, module__n_blocks=3), 3),
    (FTTransformer, dict(module__d_token=16, module__n_blocks=2, module__n_heads=4), 2),
])
def test_pipelined_like_one_device(module, kw, n_stages):
    ref = fit(module, **kw)
    est = fit(module, n_stages=n_stages, n_microbatches=4, launcher="local", **kw)
    for k, v in ref.module_.state_dict().items():
        torch.testing.assert_close(est.module_.state_dict()[k], v, atol=1e-5, rtol=0, msg=k)
    if module is FTTransformer:  # stages pass tokens: (rows, features + [CLS], d_token)
        assert est.plan_.chunks[1].layers.endswith("TransformerBlock,CLSHead")


def test_ft_transformer_in_a_pipelined_grid_search_behind_a_column_transformer():
    frame_X = np.column_stack([X[:, :4], rng.randint(0, 3, size=(80, 1))]).astype(object)
    pre = ColumnTransformer([("num", StandardScaler(), [0, 1, 2, 3]),
                             ("cat", OneHotEncoder(sparse_output=False), [4])])
    pipe = make_pipeline(pre, PipeNetClassifier(
        module=FTTransformer, module__n_heads=2, module__n_blocks=2, n_stages=2,
        n_microbatches=2, launcher="local", max_epochs=3, batch_size=16, lr=0.01,
        random_state=0))
    grid = {"pipenetclassifier__module__d_token": [8, 16]}
    search = GridSearchCV(pipe, grid, cv=2).fit(frame_X, Y)
    assert search.best_estimator_[-1].config_.n_stages == 2
    assert np.isfinite(search.cv_results_["mean_test_score"]).all()
    assert search.best_score_ > 0.5


def test_sizes_are_checked_by_name():
    with pytest.raises(ValueError, match=r"d_token \(10\) must be a multiple of n_heads \(4\)"):
        FTTransformer(3, 2, d_token=10, n_heads=4)
    with pytest.raises(ValueError, match=r"n_blocks must be a positive int; got 0"):
        TabularResNet(3, 2, n_blocks=0)
    with pytest.raises(ValueError, match=r"dropout must be in \[0, 1\); got 1.5"):
        FTTransformer(3, 2, dropout=1.5)


def test_sizes_reach_a_billion_parameters_by_constructor_parameters():
    def count(cls, **kw):  # on the meta device: no memory
        with torch.device("meta"):
            return sum(p.numel() for p in cls(100, 2, **kw).parameters())
    assert 0.9e9 < count(TabularResNet, width=1024, n_blocks=256) < 1.3e9
    assert 0.9e9 < count(FTTransformer, d_token=1024, n_blocks=160) < 1.3e9
    assert count(FTTransformer, d_token=64, n_blocks=3) < 2e5


def test_a_one_hot_column_gets_an_embedding_of_its_category():
    from skpipe.modules import FeatureTokenizer

    tok = FeatureTokenizer(2, 4)
    out = tok(torch.tensor([[0.0, 1.0]]))
    assert out.shape == (1, 3, 4)  # two columns and the [CLS] token, last
    torch.testing.assert_close(out[0, 0], tok.bias[0])  # category absent: its bias
    torch.testing.assert_close(out[0, 1], tok.weight[1] + tok.bias[1])  # present
    torch.testing.assert_close(out[0, 2], tok.cls[0, 0])


@pytest.mark.distributed
def test_ft_transformer_tokens_cross_processes():
    kw = dict(module__d_token=16, module__n_blocks=2, module__n_heads=4)
    ref = fit(FTTransformer, **kw)
    est = fit(FTTransformer, n_stages=2, n_microbatches=2, launcher="spawn", **kw)
    for k, v in ref.module_.state_dict().items():
        torch.testing.assert_close(est.module_.state_dict()[k], v, atol=1e-5, rtol=0, msg=k)
    import skpipe

    skpipe.shutdown_workers()
