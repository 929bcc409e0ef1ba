"""The planner on a (replica x stage x tensor) mesh: what a tensor shard computes, sends and
holds, and what sharded replicas send and hold, in the predicted step and peak."""

import pytest

from skpipe.engine.parallel._tensor import builtin_plan
from skpipe.engine.planner import _planner as PL
from skpipe.engine.planner._mesh import rank_profile, tensor_split
from skpipe.modules import MLP
from tests.conftest import pipeline_config
from tests.engine.planner.test_planner import FREE, profile


def test_tensor_split_counts_the_split_bytes_and_each_pairs_all_reduces():
    net = MLP(4, 3, (8, 8))  # Linear 0 (4->8) colwise, 2 (8->8) rowwise, 4 (8->3) whole
    named = [(name, layer) for name, layer in net.named_children()]
    split = tensor_split(named, tuple(builtin_plan(net).items()))
    assert split.split[0] == 1.0 and split.split[2] == pytest.approx(64 / 72)  # bias whole
    assert split.split[4] == 0.0 and split.split[1] == 0.0  # ReLU: nothing
    assert split.backward_bytes_per_row[0] == 4 * 4  # the colwise input's gradient
    assert split.forward_bytes_per_row[2] == 8 * 4  # the rowwise output
    assert split.forward_bytes_per_row[0] == split.backward_bytes_per_row[2] == 0


def tensor_config(t, **kw):
    return pipeline_config(n_stages=2, batch_size=64, launcher="spawn", tensor_parallel=t,
                           devices=("cpu",) * (2 * t), **kw)


def halves(n):
    """Every layer wholly split, forward and backward all-reducing 1 KiB per row."""
    from skpipe.engine.planner._mesh import TensorSplit

    return TensorSplit((1.0,) * n, (1024.0,) * n, (1024.0,) * n)


def test_a_tensor_shard_computes_its_part_and_pays_its_all_reduces():
    prof = profile([(1e-3, 1e-3, 1e-3)] * 4)
    one = PL.predict(prof, tensor_config(1), "1f1b", 4, 1, FREE, local=False)
    free = PL.predict(rank_profile(prof, tensor_config(2), FREE, halves(4)), tensor_config(2),
                      "1f1b", 4, 1, FREE, local=False)
    assert free[0] == pytest.approx(one[0] / 2)  # messages free: half the compute
    assert max(free[2]) < max(one[2])  # half the parameters held
    slow = PL.MessageCost(1e-3, 1e-6, 0.0)
    paid = PL.predict(rank_profile(prof, tensor_config(2), slow, halves(4)), tensor_config(2),
                      "1f1b", 4, 1, FREE, local=False)
    # per micro-batch of 16 rows, each layer's forward and backward all-reduce 16 KiB over 2
    per_action = 4 * (2 * 1e-3 + 16 * 1024 * 1e-6)
    assert paid[0] > free[0] + 4 * per_action


def test_sharded_replicas_gather_in_each_action_and_hold_their_part():
    layer = 4 * 2**20
    prof = profile([(1e-4, 1e-4, 1e-4)] * 16, params=layer)  # 8 layers per stage
    cfg = {shard: pipeline_config(n_stages=2, batch_size=64, launcher="spawn", n_replicas=2,
                                  shard=shard, devices=("cpu",) * 4)
           for shard in ("none", "optimizer", "full")}
    slow = PL.MessageCost(1e-4, 1e-8, 0.0)
    step = {s: PL.predict(rank_profile(prof, c, slow, None), c, "1f1b", 4, 1, slow,
                          local=False) for s, c in cfg.items()}
    # 'none' sums gradients once per step; sharded replicas gather per micro-batch: each of a
    # stage's 8 layers, in each of the 4 micro-batches, gathers its weights for the forward
    # and reduce-scatters its gradient (half a ring each), longer here than its compute
    half_ring = 1e-4 + layer / 2 * 1e-8
    assert step["optimizer"][0] > 4 * 8 * 2 * half_ring
    assert step["full"][0] > step["optimizer"][0] > step["none"][0]
    peaks = {s: max(p[2]) for s, p in step.items()}
    assert peaks["full"] < peaks["optimizer"] < peaks["none"]
    # 'full': weights, gradients and moments halved, plus the largest layer's gathered;
    # 'optimizer': the gradients and moments halved
    held = 8 * layer
    assert peaks["none"] - peaks["full"] == pytest.approx(4 * held / 2 - 2 * layer)
    assert peaks["none"] - peaks["optimizer"] == pytest.approx(3 * held / 2)
