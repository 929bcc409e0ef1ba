"""The plan: made once, from copies (the network and the random stream are untouched), with the
figures the report and the memory budget read."""

import numpy as np
import pytest
import torch
from torch import nn

from skpipe import PipeNetClassifier
from skpipe.engine.plan._plan import make_plan
from tests.conftest import pipeline_config


def config(**kw):
    return pipeline_config(**{"n_microbatches": 2, "batch_size": 8, **kw})


def bn_net():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 8), nn.BatchNorm1d(8), nn.Dropout(0.3), nn.ReLU(),
                         nn.Linear(8, 8), nn.BatchNorm1d(8), nn.Linear(8, 3))


@pytest.mark.parametrize("balance", ["time", "parameters", "uniform"])
def test_planning_changes_neither_the_network_nor_the_random_stream(balance):
    net = bn_net()
    sample = torch.randn(8, 4) * 5 + 3
    before = {k: v.clone() for k, v in net.state_dict().items()}
    rng = torch.get_rng_state()
    plan = make_plan(net, config(balance=balance), sample)
    after = net.state_dict()
    for key, value in before.items():
        torch.testing.assert_close(after[key], value, atol=0, rtol=0, msg=key)
    assert torch.equal(torch.get_rng_state(), rng)
    assert net.training  # the mode is the caller's
    assert sum(plan.parameters) == sum(p.numel() for p in net.parameters())


def test_time_balanced_fit_equals_the_same_split_given_explicitly():
    """Profiling used to run the live network in train mode: BatchNorm's running statistics and
    the random stream moved before training started."""
    rng = np.random.RandomState(0)
    X = rng.normal(size=(60, 4)) * 3 + 1
    y = rng.randint(0, 3, 60)

    def make(balance):
        return PipeNetClassifier(module=bn_net(), balance=balance, n_stages=2, n_microbatches=2,
                                 launcher="local", max_epochs=2, batch_size=16, random_state=0)

    timed = make("time").fit(X, y)
    sizes = [c.n_layers for c in timed.plan_.chunks]
    given = make(sizes).fit(X, y)
    for (key, a), b in zip(timed.module_.state_dict().items(), given.module_.state_dict().values()):
        torch.testing.assert_close(a, b, atol=0, rtol=0, msg=key)


def test_parameter_names_follow_the_whole_network():
    net = nn.Sequential(nn.Sequential(nn.Linear(4, 8), nn.ReLU()), nn.Linear(8, 8), nn.Linear(8, 3))
    plan = make_plan(net, config(), torch.randn(8, 4))
    assert plan.rank_parameter_names() == [n for n, _ in net.named_parameters()]
    assert plan.rank_parameter_names(1) == ["1.weight", "1.bias", "2.weight", "2.bias"][2 * (plan.bounds[1][0] - 2):]


def test_activation_bytes_per_row_are_measured():
    net = nn.Sequential(nn.Linear(4, 64), nn.Tanh(), nn.Linear(64, 3))
    plan = make_plan(net, config(), torch.randn(8, 4))
    # chunk 0 (Linear, Tanh) keeps at least tanh's output (64 floats) per row for backward
    per_row = plan.activation_bytes_per_row[0]
    assert 4 * 64 <= per_row < 4 * 64 * 2
    report = plan.report()  # 8 rows in 2 micro-batches of 4 rows
    assert report.chunks[0].activation_MiB_per_microbatch == pytest.approx(per_row * 4 / 2**20)
    halved = plan.with_microbatches(4).report().chunks[0].activation_MiB_per_microbatch
    assert halved == pytest.approx(per_row * 2 / 2**20)
