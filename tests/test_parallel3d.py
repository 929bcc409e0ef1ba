"""3D parallelism as a user meets it: tensor shards of skpipe's networks and of one's own (with
tp_plan), sharded replicas, partial_fit, a grid search over the new parameters, the timeline."""

import numpy as np
import pytest
import torch
from sklearn.model_selection import GridSearchCV
from torch import nn

import skpipe
from skpipe import PipeNetClassifier, PipeNetRegressor
from skpipe.modules import FTTransformer, TabularResNet
from tests.conftest import wait_no_workers

pytestmark = pytest.mark.distributed


@pytest.fixture(scope="module")
def data():
    rng = np.random.RandomState(0)
    X = rng.normal(size=(48, 6)).astype(np.float32)
    y = (X[:, :2] @ np.array([[1.0, -2.0], [0.5, 1.0]])).astype(np.float32)
    return X, y


def same(est, ref, atol=1e-5):
    for key, value in ref.module_.state_dict().items():
        torch.testing.assert_close(est.module_.state_dict()[key], value, atol=atol, rtol=0, msg=key)
    np.testing.assert_allclose(est.history_[:, "train_loss"], ref.history_[:, "train_loss"],
                               atol=atol)


@pytest.mark.parametrize("module,params", [
    # each block's up colwise, down rowwise; a 2-stage cut between blocks
    (TabularResNet, dict(module__width=8, module__n_blocks=2)),
    # each block's attention heads split (q, k, v colwise, out rowwise), feed-forward pair
    (FTTransformer, dict(module__d_token=8, module__n_blocks=2, module__n_heads=2)),
])
def test_built_in_plans_of_skpipe_networks_train_like_one_device(data, module, params):
    # SGD: attention's key bias has a zero gradient up to rounding, which Adam makes steps of lr
    common = dict(module=module, max_epochs=2, batch_size=16, lr=0.05, random_state=0,
                  optimizer=torch.optim.SGD, **params)
    ref = PipeNetRegressor(**common).fit(*data)
    est = PipeNetRegressor(n_stages=2, tensor_parallel=2, n_microbatches=2, launcher="spawn",
                           **common).fit(*data)
    same(est, ref)


class Towers(nn.Module):
    """A user's network: two towers on the same input, summed: no Sequential, no built-in plan."""

    def __init__(self, n_features_in, n_outputs):
        super().__init__()
        self.left = nn.Sequential(nn.Linear(n_features_in, 8), nn.Tanh(), nn.Linear(8, n_outputs))
        self.right = nn.Linear(n_features_in, n_outputs)

    def forward(self, x):
        return self.left(x) + self.right(x)


def test_tp_plan_splits_a_users_own_network(data):
    from torch.distributed.tensor import Replicate
    from torch.distributed.tensor.parallel import ColwiseParallel

    common = dict(module=Towers, max_epochs=2, batch_size=16, lr=0.01, random_state=0)
    ref = PipeNetRegressor(**common).fit(*data)
    plan = {"left.0": "colwise", "left.2": "rowwise",
            "right": ColwiseParallel(output_layouts=Replicate())}
    est = PipeNetRegressor(tensor_parallel=2, tp_plan=plan, launcher="spawn", **common)
    same(est.fit(*data), ref)
    assert "x 2 tensor shards" in str(est.plan_)


def test_partial_fit_continues_on_shards(data):
    X, y = data
    common = dict(max_epochs=1, batch_size=16, lr=0.01, random_state=0,
                  module__hidden_layer_sizes=(8, 8))
    ref = PipeNetRegressor(**common)
    for _ in range(3):
        ref.partial_fit(X, y)
    for layout in (dict(n_stages=2, tensor_parallel=2, n_microbatches=2),
                   dict(n_replicas=2, shard="full")):
        est = PipeNetRegressor(launcher="spawn", **layout, **common)
        for _ in range(3):
            est.partial_fit(X, y)
        same(est, ref)


def test_grid_search_over_tensor_parallel_and_shard_scores_as_one_device():
    rng = np.random.RandomState(0)
    X = rng.normal(size=(60, 4)).astype(np.float32)
    y = (X[:, 0] > 0).astype(int)
    common = dict(module__hidden_layer_sizes=(8, 8), max_epochs=2, batch_size=10, lr=0.05,
                  random_state=0, launcher="spawn", n_replicas=2)
    grid = GridSearchCV(PipeNetClassifier(**common),
                        {"tensor_parallel": [1, 2], "shard": ["none", "full"]}, cv=2)
    grid.fit(X, y)
    scores = grid.cv_results_["mean_test_score"]
    np.testing.assert_allclose(scores, scores[0])  # every layout trains the same network
    skpipe.shutdown_workers()
    assert wait_no_workers() == []


def test_timeline_has_a_row_per_rank_of_the_mesh(data):
    est = PipeNetRegressor(n_stages=2, tensor_parallel=2, n_microbatches=2, n_replicas=2,
                           launcher="spawn", max_epochs=1, batch_size=16, timeline_steps=1,
                           module__hidden_layer_sizes=(8, 8)).fit(*data)
    timeline = est.timeline_
    assert timeline.n_ranks == 8 and sorted({s.rank for s in timeline.spans}) == list(range(8))
    assert timeline.rank_label(5) == "replica 1 stage 0 shard 1"  # (1 x 2 + 0) x 2 + 1
    for rank in range(8):  # each shard runs every micro-batch's forward and backward
        kinds = [s.kind for s in timeline.spans if s.rank == rank]
        assert kinds.count("F") == 2 and kinds.count("B") == 2, rank


@pytest.mark.parametrize("layout", [dict(n_stages=2, tensor_parallel=2, n_microbatches=2),
                                    dict(n_replicas=2, shard="full")])
def test_lr_schedule_and_freezer_reach_shards(data, layout):
    """Callbacks that change the learning rate and which weights train act on the shards as
    on one device."""
    from skorch.callbacks import Freezer, LRScheduler

    def common():
        return dict(max_epochs=3, batch_size=16, lr=0.05, random_state=0,
                    module__hidden_layer_sizes=(8, 8), optimizer=torch.optim.SGD,
                    callbacks=[LRScheduler("StepLR", step_size=1, gamma=0.5), Freezer(["0.*"])])

    ref = PipeNetRegressor(**common()).fit(*data)
    est = PipeNetRegressor(launcher="spawn", **layout, **common()).fit(*data)
    same(est, ref)
    assert not torch.equal(est.module_[2].weight, PipeNetRegressor(
        **{**common(), "max_epochs": 1}).fit(*data).module_[2].weight)


def test_the_planner_chooses_for_tensor_shards_and_counts_their_messages(data):
    """schedule='auto' with tensor shards: the planner predicts a step for one rank of the mesh
    (its compute halved, the shards' all-reduces counted) and the fit trains as one device."""
    common = dict(max_epochs=1, batch_size=16, lr=0.05, random_state=0,
                  module__hidden_layer_sizes=(8, 8), optimizer=torch.optim.SGD)
    ref = PipeNetRegressor(**common).fit(*data)
    est = PipeNetRegressor(n_stages=2, tensor_parallel=2, schedule="auto", launcher="spawn",
                           **common).fit(*data)
    same(est, ref)
    assert est.plan_.candidates and est.plan_.predicted_step_ms > 0
    assert est.config_.tp_plan  # the plan the planner counted is the one the fit split by


class AutocastProbe(nn.Module):
    """Adds 10 where it runs under autocast: the training loss shows where bf16 was on."""

    def forward(self, x):
        return x + (10.0 if torch.is_autocast_enabled(x.device.type) else 0.0)


class ProbedNet(nn.Sequential):
    def __init__(self, n_features_in, n_outputs):
        super().__init__(nn.Linear(n_features_in, 16), nn.ReLU(), nn.Linear(16, 16), nn.ReLU(),
                         nn.Linear(16, n_outputs), AutocastProbe())


@pytest.mark.parametrize("layout", [
    dict(n_stages=2, tensor_parallel=2, n_microbatches=2,
         tp_plan={"0": "colwise", "2": "rowwise", "4": "colwise"}),
    dict(n_replicas=2, shard="full"),
])
def test_bf16_autocast_on_shards_trains_as_one_device_does(data, layout):
    """bf16 autocast on tensor shards (their partial sums all-reduced in bf16) and on sharded
    replicas: on (the probe's offset is in every loss), and the losses and weights follow one
    device's bf16 fit to bf16's precision."""
    common = dict(module=ProbedNet, max_epochs=4, batch_size=16, lr=0.01, random_state=0,
                  precision="bf16", optimizer=torch.optim.SGD)
    ref = PipeNetRegressor(**common).fit(*data)
    est = PipeNetRegressor(launcher="spawn", **layout, **common).fit(*data)
    losses, expected = est.history_[:, "train_loss"], ref.history_[:, "train_loss"]
    assert losses[0] > 50  # (10 + error)^2: the shards computed under autocast
    np.testing.assert_allclose(losses, expected, rtol=3e-2)
    for key, value in ref.module_.state_dict().items():
        torch.testing.assert_close(est.module_.state_dict()[key], value, atol=2e-2, rtol=2e-2)
