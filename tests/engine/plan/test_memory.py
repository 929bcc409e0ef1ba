"""The activation meter: bytes autograd holds for backward, parameters excluded, shared storage
counted once, released as backward frees them."""

import pytest
import torch
from torch import nn

from skpipe.engine.plan._memory import ActivationMeter


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


class RunsOutOfMemory(torch.nn.Module):
    """Stands for a layer whose activations do not fit the device when it trains (the copies
    the plan measures, on a few rows, fit)."""

    def forward(self, x):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB")

    def __deepcopy__(self, memo):
        return torch.nn.Identity()


class OutOfMemoryNet(torch.nn.Sequential):
    def __init__(self, n_features_in, n_outputs):
        super().__init__(torch.nn.Linear(n_features_in, 256), torch.nn.ReLU(),
                         torch.nn.Linear(256, 256), RunsOutOfMemory(),
                         torch.nn.Linear(256, n_outputs))


def test_out_of_memory_says_what_the_network_holds_and_suggests_stages():
    import numpy as np

    from skpipe import PipeNetRegressor

    X, y = np.zeros((32, 4), dtype="float32"), np.zeros(32, dtype="float32")
    with pytest.raises(torch.OutOfMemoryError) as info:
        PipeNetRegressor(module=OutOfMemoryNet, max_epochs=1).fit(X, y)
    text = str(info.value)
    assert "the network ran out of memory on cpu" in text
    held = 4 * 4 * (4 * 256 + 256 + 256 * 256 + 256 + 256 + 1)  # 4 x float32 parameter bytes
    assert f"about {held / 2**30:.2f} GiB" in text
    assert "n_stages=2" in text and "Tried to allocate 20.00 GiB" in text


@pytest.mark.distributed
def test_a_stage_out_of_memory_names_the_stage():
    import numpy as np

    from skpipe import PipeNetRegressor, shutdown_workers
    from skpipe.engine.workers._pool import WorkerError

    X, y = np.zeros((32, 4), dtype="float32"), np.zeros(32, dtype="float32")
    with pytest.raises(WorkerError, match=r"stage 1 ran out of memory on cpu(.|\n)*n_stages=4"):
        PipeNetRegressor(module=OutOfMemoryNet, max_epochs=1, n_stages=2, launcher="spawn",
                         balance=[3, 2]).fit(X, y)
    shutdown_workers()
