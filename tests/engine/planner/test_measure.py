"""What the planner measures: layer profiles (a line through two sizes, kept per process) and
the message costs between two processes."""

import time

import pytest
import torch
from torch import nn

from skpipe.engine.planner import _measure as PL


def test_costs_are_a_line_through_the_two_measured_sizes():
    p = PL.LayerProfile(rows=(4, 12), fiw=(((1.0, 2.0, 3.0, 5.0),), ((3.0, 2.0, 7.0, 9.0),)),
                        activation_bytes_per_row=(0.0,), output_bytes_per_row=(0.0,),
                        parameter_bytes=(0,), threads=1)
    assert p.costs(8) == [(2.0, 2.0, 5.0, 7.0)]
    assert p.costs(1)[0][0] == 0.25  # extrapolated, never below zero
    assert p.costs(0) == [(0.0, 2.0, 1.0, 3.0)]


def test_measurements_are_kept_for_the_process():
    def net():  # the same structure and sizes, other weights: the same costs
        return nn.Sequential(nn.Linear(16, 64), nn.Tanh(), nn.Linear(64, 64), nn.Tanh(), nn.Linear(64, 3))

    x = torch.randn(64, 16)
    first = PL.measure(net(), x, (4, 32), "cpu", 1)
    assert len(first.fiw[0]) == 5 and first.threads == 1
    assert all(f > 0 and b > 0 for f, _, _, b in first.fiw[1])
    t0 = time.perf_counter()
    again = PL.measure(net(), x, (4, 32), "cpu", 1)
    assert again is first and time.perf_counter() - t0 < 1.0
    assert first.activation_bytes_per_row[0] > 0 and first.output_bytes_per_row[-1] == 3 * 4
    assert first.parameter_bytes[0] == (16 * 64 + 64) * 4


class SlowBackward(torch.autograd.Function):
    """Identity whose backward sleeps: a non-parameter op that costs time in the backward."""

    @staticmethod
    def forward(ctx, x):
        return x.clone()

    @staticmethod
    def backward(ctx, grad):
        time.sleep(0.03)
        return grad


class Block(nn.Module):
    """A parameter op followed by ops that cost time in the backward: the shape of a residual
    or attention block."""

    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(16, 16)

    def forward(self, x):
        return SlowBackward.apply(torch.tanh(self.lin(x)))


def test_input_and_weight_gradients_are_timed_as_torch_splits_the_backward():
    """I runs the whole backward to the input (the sleep once); W starts from the gradients I
    kept (no sleep): I + W is one backward, not two, and a full backward B is about the same."""
    from skpipe.engine.split._timing import split_time_costs

    (f, i, w, b), = split_time_costs([Block()], torch.randn(8, 16), repeats=3)
    assert i >= 0.03 and b >= 0.03
    assert w < 0.015, f"W ran the sleeping part of the backward again ({w:.3f} s)"
    assert abs((i + w) - b) < 0.015


@pytest.mark.distributed
def test_message_cost_is_measured_between_two_processes():
    cost = PL.message_cost("cpu")
    assert 0 < cost.latency < 0.1 and cost.per_byte >= 0 and 0 < cost.per_action < 0.1
    assert PL.message_cost("cpu") is cost  # once per process


class SleepsInBackward(nn.Module):
    """A layer whose backward sleeps ``seconds`` (through a parameter op, so it has weights)."""

    def __init__(self, seconds):
        super().__init__()
        self.seconds = seconds
        self.lin = nn.Linear(16, 16)

    def forward(self, x):
        out = self.lin(x)
        return SlowBackward.apply(out) if self.seconds else out


def test_each_layers_full_backward_is_the_part_of_one_backward_it_ran():
    """B is timed inside one backward of the chain: the sleeping layer gets the sleep, its
    neighbours (which run before and after it in the backward) do not."""
    from skpipe.engine.split._timing import split_time_costs

    costs = split_time_costs([SleepsInBackward(0), SleepsInBackward(1), SleepsInBackward(0)],
                             torch.randn(8, 16), repeats=3)
    b = [c[3] for c in costs]
    assert b[1] >= 0.03
    assert b[0] < 0.01 and b[2] < 0.01, f"the sleep went to a neighbour: {b}"


def test_an_optimizer_step_is_timed_per_byte_and_per_tensor():
    sgd = PL.optimizer_cost(torch.optim.SGD, {"lr": 0.1}, "cpu", 1)
    adam = PL.optimizer_cost(torch.optim.Adam, {"lr": 0.1}, "cpu", 1)
    assert PL.optimizer_cost(torch.optim.SGD, {"lr": 0.1}, "cpu", 1) is sgd  # kept
    assert sgd.per_byte > 0 and adam.per_tensor >= 0
    # Adam reads and writes two moments besides the weight: clearly more per byte than SGD
    assert adam.per_byte > 1.5 * sgd.per_byte
    assert adam.seconds(4e6, 10) == pytest.approx(4e6 * adam.per_byte + 10 * adam.per_tensor)


@pytest.mark.distributed
def test_messages_slow_the_compute_they_travel_beside():
    cost = PL.message_cost("cpu")
    # loopback copies share the CPU with the stages: measured, not zero
    assert cost.send_per_byte + cost.receive_per_byte > 0
