import pytest
import torch
from torch import nn

from skpipe.engine.split._partition import balance_sizes, flatten_layers, uniform_sizes
from skpipe.engine.split._partition import TensorTuple, boundary_shapes


def test_nested_sequentials_are_flattened():
    net = nn.Sequential(nn.Linear(3, 4), nn.Sequential(nn.ReLU(), nn.Sequential(nn.Linear(4, 4))), nn.Tanh())
    assert [type(m).__name__ for m in flatten_layers(net, 2)] == ["Linear", "ReLU", "Linear", "Tanh"]


def test_non_sequential_module_says_how_to_fix():
    class Net(nn.Module):
        def forward(self, x):
            return x

    with pytest.raises(TypeError, match=r"module Net cannot be split into 2 pipeline chunks.*nn.Sequential\(block_1"):
        flatten_layers(Net(), 2)


def test_uniform_sizes():
    assert uniform_sizes(7, 3) == [3, 2, 2]
    assert uniform_sizes(4, 4) == [1, 1, 1, 1]


def test_parameter_balance_evens_out_parameter_counts():
    layers = [nn.Linear(100, 100), nn.ReLU(), nn.Linear(100, 2), nn.ReLU(), nn.Linear(2, 2), nn.Linear(2, 2)]
    sizes, _ = balance_sizes(layers, 2, "parameters")
    assert sizes == [1, 5]  # the big layer alone; the small ones together


def test_time_balance_uses_measured_costs():
    class Slow(nn.Module):
        def forward(self, x):
            import time

            time.sleep(0.01)
            return x * 1.0

    layers = [Slow(), nn.Identity(), nn.Identity(), nn.Identity()]
    sizes, costs = balance_sizes(layers, 2, "time", torch.zeros(2, 3))
    assert sizes == [1, 3]
    assert costs[0] > 0.005


@pytest.mark.parametrize("balance,match", [
    ([2, 2], r"balance \[2, 2\] must list 2 positive layer counts.*\(5\); got 2 counts summing to 4"),
    ([5, 0], r"balance \[5, 0\] must list 2 positive"),
])
def test_explicit_balance_must_match_layers(balance, match):
    layers = [nn.Identity() for _ in range(5)]
    with pytest.raises(ValueError, match=match):
        balance_sizes(layers, 2, balance)


def test_more_chunks_than_layers():
    with pytest.raises(ValueError, match=r"has 3 splittable layers, fewer than the 4 pipeline chunks"):
        balance_sizes([nn.Identity()] * 3, 4, "uniform")


def test_boundary_shapes_and_tuple_outputs():
    layers = [nn.Linear(3, 5), nn.ReLU(), nn.Linear(5, 2)]
    assert boundary_shapes(layers, [(0, 2), (2, 3)], 3) == [(3,), (5,), (2,)]

    class Pair(nn.Module):
        def forward(self, x):
            return x, x

    # a tuple crosses a boundary (the next layer takes it as one argument) ...
    first = Lambda(lambda pair: pair[0] + pair[1])
    assert boundary_shapes([Pair(), first], [(0, 1), (1, 2)], 3) == [
        (3,), TensorTuple(((3,), (3,))), (3,)
    ]
    # ... but the network's output is one tensor
    with pytest.raises(TypeError, match=r"pipeline chunk 1 \(layers 1..1\) is the network's "
                       r"output and returns a tuple of 2 \(Tensor, Tensor\)"):
        boundary_shapes([Pair(), nn.Identity()], [(0, 1), (1, 2)], 3)


class Lambda(nn.Module):
    def __init__(self, fn):
        super().__init__()
        self.fn = fn

    def forward(self, x):
        return self.fn(x)
