"""Stage boundaries that carry several tensors: a layer returning a tuple hands it to the next
layer as one argument (as in nn.Sequential), across stages too; what cannot cross is refused by
the plan, naming the chunk, before any worker starts."""

import numpy as np
import pytest
import torch
from torch import nn

import skpipe
from skpipe import PipeNetRegressor
from skpipe.engine.plan._schedules import SCHEDULE_NAMES
from tests.conftest import assert_same_weights, wait_no_workers


class Split(nn.Module):
    """h -> (tanh(W h), h): a residual path that crosses stage boundaries."""

    def __init__(self, d):
        super().__init__()
        self.lin = nn.Linear(d, d)

    def forward(self, x):
        return torch.tanh(self.lin(x)), x


class Carry(nn.Module):
    def __init__(self, d):
        super().__init__()
        self.lin = nn.Linear(d, d)

    def forward(self, pair):
        h, skip = pair
        return torch.tanh(self.lin(h)), skip * 0.5


class Join(nn.Module):
    def __init__(self, d):
        super().__init__()
        self.lin = nn.Linear(d, d)

    def forward(self, pair):
        h, skip = pair
        return torch.tanh(self.lin(h)) + skip


class ResidualNet(nn.Sequential):
    def __init__(self, n_features_in, n_outputs):
        super().__init__(nn.Linear(n_features_in, 16), Split(16), Carry(16), Carry(16), Join(16),
                         nn.Linear(16, n_outputs))


@pytest.fixture(scope="module")
def data():
    rng = np.random.RandomState(0)
    X = rng.randn(60, 5).astype("float32")
    y = (X.sum(axis=1) + 0.1 * rng.randn(60)).astype("float32")
    return X, y


KW = dict(module=ResidualNet, max_epochs=3, batch_size=16, random_state=0, lr=0.01)


@pytest.fixture(scope="module")
def reference(data):
    return PipeNetRegressor(**KW).fit(*data)


def assert_same(est, ref):
    assert_same_weights(est, ref, atol=1e-5)
    np.testing.assert_allclose(est.history_[:, "train_loss"], ref.history_[:, "train_loss"],
                               atol=1e-5)


@pytest.mark.parametrize("schedule", SCHEDULE_NAMES)
def test_every_schedule_carries_tuples_like_one_device(data, reference, schedule):
    # 2 chunks cut after Split (a tuple crosses); 4 chunks: two tuples and one tensor cross
    est = PipeNetRegressor(**KW, n_stages=2, schedule=schedule, launcher="local").fit(*data)
    crossing = est.plan_.chunks[0].layers
    assert crossing.endswith("Split") or "Split" in crossing
    assert_same(est, reference)


@pytest.mark.distributed
@pytest.mark.parametrize("schedule", ["1f1b", "zbv"])
def test_spawned_stages_carry_tuples_like_one_device(data, reference, schedule):
    est = PipeNetRegressor(**KW, n_stages=2, schedule=schedule, launcher="spawn",
                           balance=[2, 4] if schedule == "1f1b" else "uniform").fit(*data)
    assert_same(est, reference)
    # prediction through the stages crosses the same boundaries
    np.testing.assert_allclose(est.forward_pipelined(data[0])[:, 0], reference.predict(data[0]),
                               atol=1e-5)
    skpipe.shutdown_workers()
    assert wait_no_workers() == []


def test_planned_and_time_balanced_splits_measure_tuples(data, reference):
    planned = PipeNetRegressor(**KW, n_stages=2, schedule="auto", launcher="local").fit(*data)
    assert planned.plan_.candidates
    assert_same(planned, reference)
    timed = PipeNetRegressor(**KW, n_stages=2, balance="time", launcher="local").fit(*data)
    assert all(c.fwd_bwd_ms is not None for c in timed.plan_.chunks)
    assert_same(timed, reference)


class Pair(nn.Module):
    def forward(self, x):
        return x, x * 2


class WithMask(nn.Module):
    def forward(self, x):
        return x, (x > 0)


class WithScale(nn.Module):
    def forward(self, x):
        return x, x.mean()


class AsDict(nn.Module):
    def forward(self, x):
        return {"h": x}


class First(nn.Module):
    def forward(self, pair):
        return pair[0] if isinstance(pair, tuple) else pair["h"]


def net(middle, last=None):
    class Net(nn.Sequential):
        def __init__(self, n_features_in, n_outputs):
            layers = [nn.Linear(n_features_in, 8), middle, First(), nn.Linear(8, n_outputs)]
            super().__init__(*(layers if last is None else layers[:-2] + [last]))
    return Net


@pytest.mark.parametrize("module,balance,match", [
    (net(Pair(), last=Pair()), [1, 2], r"chunk 1 \(layers 1..2\) is the network's output and "
                                       r"returns a tuple of 2 .*must be one tensor"),
    (net(WithMask()), [2, 2], r"chunk 0 \(layers 0..1\) returns a tuple whose tensors \[1\] are "
                              r"not floating point"),
    (net(WithScale()), [2, 2], r"chunk 0 \(layers 0..1\) returns a tuple whose tensors \[1\] have "
                               r"no row per sample"),
    (net(AsDict()), [2, 2], r"chunk 0 \(layers 0..1\) returns a dict, which cannot cross a stage"),
], ids=["output-tuple", "integer-mask", "rowless", "dict"])
def test_what_cannot_cross_is_refused_before_any_worker(data, module, balance, match):
    with pytest.raises(TypeError, match=match):
        PipeNetRegressor(module=module, n_stages=2, balance=balance, launcher="spawn",
                         max_epochs=1).fit(*data)
    assert wait_no_workers(timeout=1.0) == []


def test_one_stage_network_output_must_be_one_tensor(data):
    class Pairs(nn.Module):
        def __init__(self, n_features_in, n_outputs):
            super().__init__()
            self.lin = nn.Linear(n_features_in, n_outputs)

        def forward(self, x):
            return self.lin(x), x

    with pytest.raises(TypeError, match=r"module Pairs is the network's output and returns a "
                                        r"tuple of 2 .*must be one tensor"):
        PipeNetRegressor(module=Pairs, max_epochs=1).fit(*data)
