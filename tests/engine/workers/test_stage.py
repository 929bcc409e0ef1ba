"""One chunk of layers as a stage runs it: recomputation per micro-batch, autocast, checks."""

import pytest
import torch
from torch import nn

from skpipe.engine.plan._memory import ActivationMeter
from skpipe.engine.workers._stage import ChunkModule


def layers():
    torch.manual_seed(0)
    return [nn.Linear(8, 64), nn.Tanh(), nn.Linear(64, 64), nn.Tanh()]


def held_per_microbatch(mode, m=3):
    chunk = ChunkModule(layers(), index=0, checkpoint=mode, n_microbatches=m)
    meter = ActivationMeter(chunk.parameters())
    held = []
    with meter.track():
        outs = []
        for _ in range(m):
            before = meter.live
            outs.append(chunk(torch.randn(5, 8, requires_grad=True)))
            held.append(meter.live - before)
    return held


def test_recomputation_modes_keep_less_and_except_last_spares_the_last():
    never, always, except_last = (held_per_microbatch(m) for m in ("never", "always", "except_last"))
    assert all(a < n for a, n in zip(always, never))
    assert except_last[:-1] == always[:-1] and except_last[-1] == never[-1]


def test_recomputed_gradients_equal_plain_ones():
    x = torch.randn(5, 8)
    grads = []
    for mode in ("never", "always"):
        chunk = ChunkModule(layers(), index=0, checkpoint=mode, n_microbatches=1)
        chunk(x).sum().backward()
        grads.append([p.grad.clone() for p in chunk.parameters()])
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b)


def test_bf16_chunks_hand_on_float32_and_non_tensors_are_refused():
    chunk = ChunkModule(layers(), index=0, precision="bf16")
    assert chunk(torch.randn(4, 8)).dtype == torch.float32

    class Pair(nn.Module):
        def forward(self, x):
            return x, x.to(torch.bfloat16)

    # a tuple crosses, in float32; a chunk receiving several tensors hands them on as one tuple
    out = ChunkModule([Pair()], index=2)(torch.randn(2, 8))
    assert isinstance(out, tuple) and [t.dtype for t in out] == [torch.float32] * 2
    assert ChunkModule([nn.Identity()], index=3)(*out) == out

    class AsDict(nn.Module):
        def forward(self, x):
            return {"h": x}

    with pytest.raises(TypeError, match=r"pipeline chunk 3 returned dict: a stage boundary"):
        ChunkModule([AsDict()], index=3)(torch.randn(2, 8))
