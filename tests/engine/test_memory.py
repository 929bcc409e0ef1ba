"""The activation meter: bytes autograd holds for backward, parameters excluded, shared storage
counted once, released as backward frees them."""

import torch
from torch import nn

from skpipe.engine._memory import ActivationMeter


def test_peak_counts_saved_activations_and_falls_back_to_zero():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(8, 32), nn.Tanh(), nn.Linear(32, 4))
    meter = ActivationMeter(net.parameters())
    x = torch.randn(10, 8)
    with meter.track():
        out = net(x)
    held = meter.live
    # Linear keeps its input (10x8), tanh its output (10x32), the last Linear its input (shared
    # with tanh's output: counted once)
    assert held == 4 * (10 * 8 + 10 * 32)
    out.sum().backward()
    del out
    assert meter.live == 0 and meter.peak == held


def test_parameters_are_not_activations():
    w = nn.Parameter(torch.randn(16, 16))
    meter = ActivationMeter([w])
    with meter.track():
        y = (w * 2.0).sum()  # mul saves w (a parameter) and nothing else
    assert meter.peak == 0
    y.backward()
