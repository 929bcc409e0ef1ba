"""Time a network's layers: forward and backward of each layer alone (``time_costs``, for
``balance='time'``), and forward, input gradient, weight gradient and full backward as a stage
runs them, the backward split as torch's schedules split it (``split_time_costs``, for the
planner)."""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import nn

from ._construct import real_copy
from ._boundary import backward_from, fresh_inputs, leaves, map_boundary


def time_costs(
    layers: Sequence[nn.Module], sample: torch.Tensor, device: str = "cpu", repeats: int = 3
) -> list[float]:
    """Measured forward+backward seconds of each layer on ``sample`` (median of ``repeats``),
    on ``device``.

    Each layer is timed on a copy (one layer at a time), under a forked random generator: the
    network's weights, running statistics (BatchNorm) and the random stream are as they were.
    """
    dev = torch.device(device)
    now = _clock(dev)
    costs = []
    with torch.random.fork_rng(devices=[dev] if dev.type == "cuda" else []):
        x: Any = sample.to(dev)
        for layer in layers:
            copy = real_copy(layer).to(dev).train()
            inp = fresh_inputs(x)
            with torch.no_grad():  # warm-up: first calls pay one-off costs that are not the layer's
                copy(inp)
            times = []
            out = inp
            for _ in range(repeats):
                t0 = now()
                out = copy(inp)
                backward_from(out)
                times.append(now() - t0)
            costs.append(sorted(times)[len(times) // 2])
            x = map_boundary(out, torch.Tensor.detach)
            del copy
    return costs


# the planner measures consecutive layers together, as many as hold this many parameter bytes
CHAIN_BYTES = 64 * 2**20


def chains(layers: Sequence[nn.Module], budget: int = CHAIN_BYTES) -> list[list[nn.Module]]:
    """``layers`` in consecutive groups whose parameter bytes stay within ``budget`` (a larger
    layer alone): what is copied and measured together."""
    out: list[list[nn.Module]] = []
    held = 0
    for layer in layers:
        size = sum(p.numel() * p.element_size() for p in layer.parameters())
        if not out or held + size > budget:
            out.append([])
            held = 0
        out[-1].append(layer)
        held += size
    return out


def _clock(dev: torch.device) -> Callable[[], float]:
    """Seconds, with ``dev``'s queued work finished first (a CUDA device runs asynchronously)."""
    if dev.type != "cuda":
        return time.perf_counter

    def now() -> float:
        torch.cuda.synchronize(dev)
        return time.perf_counter()

    return now


def _chain_forward(
    twins: list[nn.Module], x: Any, times: list[list[list[float]]], now: Callable[[], float]
) -> tuple[list[Any], list[list[torch.Tensor]]]:
    """The layers' forwards one after the other, each on its own leaf inputs (so each layer's
    backward can be run alone), timed into ``times[k][0]``: each layer's inputs, and its
    outputs that take gradients."""
    ins, outs, h = [], [], x
    for k, twin in enumerate(twins):
        inp = fresh_inputs(h)
        t0 = now()
        out = twin(inp)
        times[k][0].append(now() - t0)
        ins.append(inp)
        outs.append([t for t in leaves(out) if t.requires_grad])
        h = map_boundary(out, torch.Tensor.detach)
    return ins, outs


def _chain_backward(
    twins: list[nn.Module], x: Any, times: list[list[list[float]]], now: Callable[[], float]
) -> None:
    """The layers' forwards as one graph, then one backward; a hook on each layer's input says
    when the backward reached it, so layer k's full backward (into ``times[k][3]``) runs from
    the end of layer k+1's to its input's gradient (the first layer's, to the end: its weight
    gradients may come after its input's)."""
    reached = [0.0] * len(twins)
    h = fresh_inputs(x)
    for k, twin in enumerate(twins):
        _when_reached(h, reached, k, now)
        h = twin(h)
    outputs = [t for t in leaves(h) if t.requires_grad]
    start = now()
    if outputs:
        torch.autograd.backward(outputs, [torch.ones_like(t) for t in outputs])
    done = now()
    for k in reversed(range(len(twins))):
        until = done if k == 0 else (reached[k] or start)
        times[k][3].append(until - start)
        start = until


def _when_reached(x: Any, reached: list[float], k: int, now: Callable[[], float]) -> None:
    """Record in ``reached[k]`` when the backward has computed the gradient of ``x`` (a
    boundary: the latest of its tensors)."""

    def hook(grad: torch.Tensor) -> None:
        reached[k] = max(reached[k], now())

    for t in leaves(x):
        if t.requires_grad:
            t.register_hook(hook)


def _backward_call_seconds(dev: torch.device, now: Callable[[], float]) -> float:
    """What one call into autograd costs with nothing to compute (median of 21)."""
    leaf = torch.zeros(1, device=dev, requires_grad=True)
    times = []
    for _ in range(21):
        out = leaf * 1.0
        t0 = now()
        torch.autograd.backward(out, torch.ones_like(out))
        times.append(now() - t0)
    return sorted(times)[10]


def split_time_costs(
    layers: Sequence[nn.Module], sample: torch.Tensor, device: str = "cpu", repeats: int = 3
) -> list[tuple[float, float, float, float]]:
    """Each layer's measured seconds on ``sample`` (medians of ``repeats``, on ``device``):
    forward 'F'; input gradient 'I' and weight gradient 'W' as a zero-bubble schedule runs
    them (torch's ``stage_backward_input``, then ``stage_backward_weight``, which starts from
    the gradients 'I' kept: the part of the backward between the layer's output and its
    parameters is not run twice); and a full backward 'B', as the other schedules run it.

    The layers run as a stage runs them: the forwards of consecutive layers one after the
    other, then their backwards last layer first (``chains``: as many layers at a time as hold
    ``CHAIN_BYTES`` of parameters), so each layer's backward finds its inputs and weights as
    cold in the caches as in training; a layer timed alone on the input it just read is up to
    a fifth faster. 'B' is timed inside one backward of the chain (a hook on each layer's input
    marks where it ends); autograd's start-up, which a stage pays once per action, is left out
    of each layer's 'I' and 'W'. Measured on copies under a forked random generator, like
    ``time_costs``."""
    # torch's own split of the backward (autograd only; imported here, where it is used)
    from torch.distributed.pipelining._backward import (
        stage_backward_input,
        stage_backward_weight,
    )

    dev = torch.device(device)
    now = _clock(dev)
    costs: list[tuple[float, float, float, float]] = []
    call = _backward_call_seconds(dev, now)
    with torch.random.fork_rng(devices=[dev] if dev.type == "cuda" else []):
        x: Any = sample.to(dev)
        for group in chains(layers):
            twins = [real_copy(layer).to(dev).train() for layer in group]
            params = [[p for p in t.parameters() if p.requires_grad] for t in twins]
            times: list[list[list[float]]] = [[[], [], [], []] for _ in twins]  # [layer][F,I,W,B]

            with torch.no_grad():  # warm-up: first calls pay one-off costs that are not the layer's
                h = x
                for twin in twins:
                    h = twin(h)
            last: Any = h
            for _ in range(repeats):
                ins, outs = _chain_forward(twins, x, times, now)
                for k in reversed(range(len(twins))):
                    if not outs[k]:
                        times[k][1].append(0.0)
                        times[k][2].append(0.0)
                        continue
                    grads = [torch.ones_like(t) for t in outs[k]]
                    t1 = now()
                    _, groups = stage_backward_input(
                        outs[k], grads, list(leaves(ins[k])), iter(params[k])
                    )
                    t2 = now()
                    if params[k]:
                        stage_backward_weight(iter(params[k]), groups)
                    times[k][1].append(t2 - t1)
                    times[k][2].append(now() - t2)
                del ins, outs
                _chain_backward(twins, x, times, now)
                for twin in twins:
                    twin.zero_grad(set_to_none=True)
            for layer_times in times:
                f, i, w, b = (sorted(t)[len(t) // 2] for t in layer_times)
                # a stage pays autograd's start-up once per action, not once per layer (the
                # planner adds torch's per-action time): left out of each layer's I and W
                # (B was timed inside one backward)
                i, w = (max(0.0, t - call) for t in (i, w))
                costs.append((f, i, w, b))
            x = last
            del twins
    return costs
