"""A pipelined fit trains the same network as one device: parameters and losses within 1e-5.

90 rows in batches of 13 leave a ragged last batch (12 rows), and 13 rows in m micro-batches
give micro-batches of unequal real size (e.g. 4, 4, 4, 1 for m=4).
"""

import numpy as np
import pytest
import torch

import skpipe
from skpipe import PipeNetClassifier
from skpipe.engine.plan._schedules import SCHEDULE_NAMES, check_microbatches
from tests.conftest import assert_same_weights

HIDDEN = (16, 16, 16, 16)  # 9 layers: enough for 4 stages x 2 chunks


def make(**kw):
    params = dict(
        module__hidden_layer_sizes=HIDDEN,
        module__activation="tanh",
        lr=0.01,
        max_epochs=3,
        batch_size=13,
        random_state=0,
    )
    params.update(kw)
    return PipeNetClassifier(**params)


@pytest.fixture(scope="module")
def data():
    rng = np.random.RandomState(0)
    X = rng.normal(size=(90, 6)).astype(np.float32)
    y = rng.randint(0, 3, size=90)
    return X, y


@pytest.fixture(scope="module")
def reference(data):
    return make(n_stages=1).fit(*data)


def assert_same_training(est, ref):
    assert_same_weights(est, ref, atol=1e-5)
    losses = [b["train_loss"] for epoch in est.history_ for b in epoch["batches"]]
    ref_losses = [b["train_loss"] for epoch in ref.history_ for b in epoch["batches"]]
    assert len(losses) == len(ref_losses) == 3 * 7
    np.testing.assert_allclose(losses, ref_losses, atol=1e-5, rtol=0)
    np.testing.assert_allclose(est.history_[:, "train_loss"], ref.history_[:, "train_loss"], atol=1e-5)


def matrix():
    cases = []
    for schedule in SCHEDULE_NAMES:
        for p in (2, 4):
            chunks = 2 if schedule not in ("gpipe", "1f1b") else 1
            for m in (1, 2, 4, 8):
                try:
                    check_microbatches(schedule, p, m, chunks, 13)
                except ValueError:
                    continue
                cases.append((schedule, p, m))
    return cases


MATRIX = matrix()


def test_matrix_covers_every_schedule():
    assert {c[0] for c in MATRIX} == set(SCHEDULE_NAMES)
    assert len(MATRIX) >= 40


@pytest.mark.parametrize("schedule,n_stages,n_microbatches", MATRIX)
def test_local_pipeline_trains_like_one_device(data, reference, schedule, n_stages, n_microbatches):
    est = make(n_stages=n_stages, n_microbatches=n_microbatches, schedule=schedule, launcher="local")
    est.fit(*data)
    assert_same_training(est, reference)


@pytest.mark.parametrize("checkpoint", ["except_last", "always"])
@pytest.mark.parametrize("schedule", ["gpipe", "interleaved_zero_bubble"])
def test_checkpointing_does_not_change_training(data, reference, checkpoint, schedule):
    est = make(n_stages=2, n_microbatches=4, schedule=schedule, launcher="local", checkpoint=checkpoint)
    assert_same_training(est.fit(*data), reference)


@pytest.mark.parametrize("balance", ["parameters", "time", [1, 3, 3, 2]])
def test_balance_does_not_change_training(data, reference, balance):
    est = make(n_stages=4, n_microbatches=4, schedule="1f1b", launcher="local", balance=balance)
    assert_same_training(est.fit(*data), reference)


def test_gradient_clipping_uses_global_norm(data):
    ref = make(n_stages=1, max_grad_norm=0.05).fit(*data)
    est = make(n_stages=4, n_microbatches=4, schedule="looped_bfs", launcher="local", max_grad_norm=0.05)
    assert_same_training(est.fit(*data), ref)
    unclipped = make(n_stages=1).fit(*data)
    diff = (ref.module_[0].weight - unclipped.module_[0].weight).abs().max()
    assert diff > 1e-4  # clipping was active


def test_pipelined_predict_matches(data, reference):
    est = make(n_stages=2, n_microbatches=4, launcher="local").fit(*data)
    np.testing.assert_allclose(est.predict_proba(data[0]), reference.predict_proba(data[0]), atol=1e-5)


SPAWN_CASES = [
    ("gpipe", 2, 4),
    ("1f1b", 4, 4),
    ("interleaved_1f1b", 2, 4),
    ("looped_bfs", 2, 8),
    ("interleaved_zero_bubble", 2, 2),
    ("zbv", 2, 1),
    ("dualpipev", 2, 4),
]


@pytest.mark.distributed
@pytest.mark.parametrize("schedule,n_stages,n_microbatches", SPAWN_CASES)
def test_spawned_workers_train_like_one_device(data, reference, schedule, n_stages, n_microbatches):
    from tests.conftest import wait_no_workers

    est = make(n_stages=n_stages, n_microbatches=n_microbatches, schedule=schedule, launcher="spawn")
    est.fit(*data)
    assert_same_training(est, reference)
    skpipe.shutdown_workers()
    assert wait_no_workers() == []


def test_bf16_autocast_on_cpu_trains(data):
    est = make(n_stages=2, n_microbatches=2, launcher="local", precision="bf16", max_epochs=10)
    est.fit(*data)
    assert np.isfinite(est.history_[:, "train_loss"]).all()
    assert est.history_[-1, "train_loss"] < est.history_[0, "train_loss"]


# Data x pipeline parallelism: every schedule with two replicas of a 2-stage pipeline (13-row
# batches split 7 + 6, the ragged last one 6 + 6), plain data parallelism (one stage), and three
# replicas (shares of 5, 4, 4 rows) with uneven micro-batches.
REPLICA_CASES = [
    ("gpipe", 2, 2, 4),
    ("1f1b", 2, 2, 2),
    ("interleaved_1f1b", 2, 2, 2),
    ("looped_bfs", 2, 2, 4),
    ("interleaved_zero_bubble", 2, 2, 2),
    ("zbv", 2, 2, 2),
    ("dualpipev", 2, 2, 4),
    ("1f1b", 1, 2, 1),
    ("1f1b", 2, 3, 3),
]


@pytest.mark.distributed
@pytest.mark.parametrize("schedule,n_stages,n_replicas,n_microbatches", REPLICA_CASES)
def test_replicas_train_like_one_device(data, reference, schedule, n_stages, n_replicas,
                                        n_microbatches):
    est = make(n_stages=n_stages, n_replicas=n_replicas, n_microbatches=n_microbatches,
               schedule=schedule, launcher="spawn")
    est.fit(*data)
    assert_same_training(est, reference)
    assert len(est.plan_.mesh) == n_stages * n_replicas


@pytest.mark.distributed
def test_replicas_keep_sample_weights_clipping_and_predictions_exact(data):
    from tests.conftest import wait_no_workers

    X, y = data
    w = np.random.RandomState(1).uniform(0.1, 3.0, size=len(y))
    ref = make(n_stages=1, max_grad_norm=0.05).fit(X, y, sample_weight=w)
    est = make(n_stages=2, n_replicas=3, n_microbatches=2, launcher="spawn", max_grad_norm=0.05)
    assert_same_training(est.fit(X, y, sample_weight=w), ref)
    # forward through the stages: each replica takes its share of the rows (7 rows: 3, 2, 2)
    np.testing.assert_allclose(est.forward_pipelined(X, batch_size=7),
                               ref.module_(torch.as_tensor(X)).detach().numpy(), atol=1e-5)
    skpipe.shutdown_workers()
    assert wait_no_workers() == []


@pytest.mark.distributed
def test_replicas_sum_several_gradient_buckets_while_the_backward_runs(data):
    """A network of about 9 MiB of gradients: three 4 MiB buckets per replica, the first ones
    started during the backward; plain data parallelism and a 2-stage pipeline (2 micro-batches,
    so a gradient is final only after the second) both equal one device. (SGD: Adam turns the
    float rounding of near-zero gradients of so many weights into steps of lr.)"""
    wide = dict(module__hidden_layer_sizes=(1100, 1100, 1100), max_epochs=1,
                optimizer=torch.optim.SGD, lr=0.1)
    ref = make(n_stages=1, **wide).fit(*data)
    for layout in (dict(n_stages=1, n_replicas=2), dict(n_stages=2, n_replicas=2, n_microbatches=2)):
        assert_close_states(make(launcher="spawn", **layout, **wide).fit(*data), ref)


def assert_close_states(est, ref):
    for key, value in ref.module_.state_dict().items():
        torch.testing.assert_close(est.module_.state_dict()[key], value, atol=1e-5, rtol=0, msg=key)
    np.testing.assert_allclose(est.history_[:, "train_loss"], ref.history_[:, "train_loss"], atol=1e-5)


# The third dimension, tensor shards, and the replicas' sharded state: every layout below trains
# what one device trains (Adam, 21 steps). The MLP's built-in plan splits its Linear layers in
# colwise/rowwise pairs (a pair cut by a stage boundary gathers at the boundary); shard holds
# each replica's weights, gradients and Adam moments as 1/k.
PARALLEL_CASES = [
    # schedule, n_stages, n_replicas, tensor_parallel, shard, n_microbatches
    ("1f1b", 1, 1, 2, "none", 1),
    ("1f1b", 2, 1, 2, "none", 2),
    ("interleaved_1f1b", 2, 1, 2, "none", 2),
    ("looped_bfs", 2, 1, 2, "none", 4),
    ("gpipe", 1, 2, 1, "optimizer", 2),
    ("1f1b", 1, 2, 1, "full", 1),
    ("1f1b", 2, 2, 1, "full", 2),
    ("interleaved_1f1b", 2, 2, 1, "optimizer", 2),
    ("looped_bfs", 2, 2, 1, "full", 4),
    ("1f1b", 2, 2, 2, "none", 2),
    ("1f1b", 2, 2, 2, "full", 2),
]


@pytest.mark.distributed
@pytest.mark.parametrize("schedule,n_stages,n_replicas,tensor_parallel,shard,n_microbatches",
                         PARALLEL_CASES)
def test_tensor_shards_and_sharded_replicas_train_like_one_device(
    data, reference, schedule, n_stages, n_replicas, tensor_parallel, shard, n_microbatches
):
    est = make(n_stages=n_stages, n_replicas=n_replicas, tensor_parallel=tensor_parallel,
               shard=shard, n_microbatches=n_microbatches, schedule=schedule, launcher="spawn")
    assert_same_training(est.fit(*data), reference)
    assert len(est.plan_.mesh) == n_stages * n_replicas * tensor_parallel


@pytest.mark.distributed
@pytest.mark.parametrize("layout", [dict(n_stages=2, tensor_parallel=2),
                                    dict(n_stages=2, n_replicas=2, shard="full"),
                                    dict(n_stages=1, n_replicas=2, shard="optimizer")])
def test_shards_keep_sample_weights_global_clipping_and_predictions_exact(data, layout):
    """The global norm max_grad_norm clips by counts every shard once (a norm over the local
    shards alone, or over replicated ones counted t times, clips differently)."""
    X, y = data
    w = np.random.RandomState(1).uniform(0.1, 3.0, size=len(y))
    ref = make(n_stages=1, max_grad_norm=0.05).fit(X, y, sample_weight=w)
    est = make(n_microbatches=2, launcher="spawn", max_grad_norm=0.05, **layout)
    assert_same_training(est.fit(X, y, sample_weight=w), ref)
    np.testing.assert_allclose(est.forward_pipelined(X, batch_size=7),
                               ref.module_(torch.as_tensor(X)).detach().numpy(), atol=1e-5)
