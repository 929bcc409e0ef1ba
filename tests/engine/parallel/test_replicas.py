"""Summing a stage's gradients over its replicas: buckets, early starts during the backward, and
sums written back exactly (here in a world of one, where the sum is the gradient itself; the
transparency tests sum across processes)."""

import pytest
import torch
from torch import nn

from skpipe.engine.parallel._groups import local_world
from skpipe.engine.parallel._replicas import ReplicaGradients, buckets


def test_buckets_keep_order_dtype_and_size():
    ts = [torch.zeros(4), torch.zeros(4), torch.zeros(8), torch.zeros(2, dtype=torch.float64), torch.zeros(1)]
    groups = buckets(ts, limit=32)  # bytes: 16, 16 | 32 | float64 | float32
    assert [[t.numel() for t in g] for g in groups] == [[4, 4], [8], [2], [1]]
    assert [t for g in groups for t in g] == ts


def backward(net, xs):
    for x in xs:  # one backward per micro-batch, as a schedule runs them
        net(x).pow(2).sum().backward()


@pytest.mark.parametrize("overlap", [True, False])
def test_buckets_start_once_final_and_the_sums_come_back(overlap):
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(6, 7), nn.Tanh(), nn.Linear(7, 7), nn.Tanh(), nn.Linear(7, 2))
    xs = [torch.randn(5, 6) for _ in range(3)]
    backward(net, xs)
    expected = [p.grad.clone() for p in net.parameters()]
    net.zero_grad(set_to_none=True)
    sums = ReplicaGradients(list(net.parameters()), local_world("cpu"), 3, overlap=overlap,
                            bucket_bytes=64)
    # small buckets, the last layers' first; the last layer's weight (56 bytes) and bias share one
    assert [len(b) for b in sums.buckets] == [2, 1, 1, 1, 1]
    assert sums.buckets[0][0] is net[4].bias and sums.buckets[0][1] is net[4].weight
    sums.begin()
    backward(net, xs[:2])
    assert sums._running == []  # nothing is final before the last micro-batch's backward
    backward(net, xs[2:])
    # with overlap every bucket started during the last backward, before finish
    assert len(sums._running) == (5 if overlap else 0)
    sums.finish()
    for p, g in zip(net.parameters(), expected):  # a world of one: the sum is the gradient
        torch.testing.assert_close(p.grad, g, atol=0, rtol=0)
    assert sums.steps == 1 and sums.exposed_seconds >= 0
    sums.close()
