"""Split a network into contiguous chunks of layers: flatten, balance, and the chunk modules."""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from copy import deepcopy
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from ._construct import real_copy


def flatten_layers(module: nn.Module, n_chunks: int) -> list[nn.Module]:
    """The layers of an ``nn.Sequential``, nested Sequentials flattened, in order."""
    return [layer for _, layer in named_layers(module, n_chunks)]


def named_layers(module: nn.Module, n_chunks: int, prefix: str = "") -> list[tuple[str, nn.Module]]:
    """The layers of an ``nn.Sequential`` with their names in ``module``, nested Sequentials
    flattened, in order. With one chunk, the whole module is the one layer (of any type).

    Raises TypeError for any other module: skpipe splits networks only at layer boundaries of a
    Sequential, so the error says how to write the network as one.
    """
    if n_chunks == 1 and not prefix:
        return [("", module)]
    if not isinstance(module, nn.Sequential):
        raise TypeError(
            f"module {type(module).__name__} cannot be split into {n_chunks} pipeline chunks: "
            "skpipe splits an nn.Sequential at its layer boundaries, or any network where its "
            "forward calls torch.distributed.pipelining.pipe_split() (and this one calls none). "
            "Call pipe_split() in forward where the network may be cut, express it as "
            "nn.Sequential(block_1, block_2, ...) of blocks whose forward takes one tensor and "
            "returns one tensor (skpipe.modules.MLP is one), or use n_stages=1."
        )
    layers: list[tuple[str, nn.Module]] = []
    for name, child in module.named_children():
        full = f"{prefix}{name}"
        if isinstance(child, nn.Sequential):
            layers.extend(named_layers(child, n_chunks, full + "."))
        else:
            layers.append((full, child))
    return layers


def _split_min_max(costs: Sequence[float], n_parts: int) -> list[int]:
    """Contiguous split of ``costs`` into n_parts non-empty parts minimising the largest part sum
    (linear partition by dynamic programming). Returns the part sizes."""
    n = len(costs)
    prefix = [0.0]
    for c in costs:
        prefix.append(prefix[-1] + float(c))
    inf = float("inf")
    # best[k][i]: minimal max-part cost splitting the first i items into k parts
    best = [[inf] * (n + 1) for _ in range(n_parts + 1)]
    cut = [[0] * (n + 1) for _ in range(n_parts + 1)]
    best[0][0] = 0.0
    for k in range(1, n_parts + 1):
        for i in range(k, n - (n_parts - k) + 1):
            for j in range(k - 1, i):
                cost = max(best[k - 1][j], prefix[i] - prefix[j])
                if cost < best[k][i] - 1e-12:
                    best[k][i] = cost
                    cut[k][i] = j
    sizes = []
    i = n
    for k in range(n_parts, 0, -1):
        j = cut[k][i]
        sizes.append(i - j)
        i = j
    return sizes[::-1]


def uniform_sizes(n_layers: int, n_chunks: int) -> list[int]:
    """Equal layer counts; the first chunks take one extra layer when it does not divide."""
    base, extra = divmod(n_layers, n_chunks)
    return [base + (1 if i < extra else 0) for i in range(n_chunks)]


def parameter_costs(layers: Sequence[nn.Module]) -> list[float]:
    # A layer without parameters (an activation) still costs a little, so it is not free to pile up.
    return [float(sum(p.numel() for p in layer.parameters())) + 1.0 for layer in layers]


def time_costs(
    layers: Sequence[nn.Module], sample: torch.Tensor, device: str = "cpu", repeats: int = 3
) -> list[float]:
    """Measured forward+backward seconds of each layer on ``sample`` (median of ``repeats``),
    on ``device``.

    Each layer is timed on a copy (one layer at a time), under a forked random generator: the
    network's weights, running statistics (BatchNorm) and the random stream are as they were.
    """
    dev = torch.device(device)
    sync = torch.cuda.synchronize if dev.type == "cuda" else (lambda *a: None)
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
                sync(dev)
                t0 = time.perf_counter()
                out = copy(inp)
                backward_from(out)
                sync(dev)
                times.append(time.perf_counter() - t0)
            costs.append(sorted(times)[len(times) // 2])
            x = map_boundary(out, torch.Tensor.detach)
            del copy
    return costs


def split_by_costs(costs: Sequence[float], n_chunks: int) -> list[int]:
    """Layer counts per chunk that minimise the largest chunk's summed cost."""
    return _split_min_max(list(costs), n_chunks)


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

    def now() -> float:
        if dev.type == "cuda":
            torch.cuda.synchronize(dev)
        return time.perf_counter()

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
                # the full backward: the chain's forward as one graph, then one backward; a hook
                # on each layer's input says when the backward reached it
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
                # layer k's backward: from the end of layer k+1's to its input's gradient (the
                # first layer's, to the end: its weight gradients may come after its input's)
                for k in reversed(range(len(twins))):
                    until = done if k == 0 else (reached[k] or start)
                    times[k][3].append(until - start)
                    start = until
                del h, outputs
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


def balance_sizes(
    layers: Sequence[nn.Module],
    n_chunks: int,
    balance: str | Sequence[int],
    sample: torch.Tensor | None = None,
    device: str = "cpu",
    traced: bool = False,
) -> tuple[list[int], list[float] | None]:
    """Layer counts per chunk for a balance rule; also the measured costs when
    ``balance='time'``. ``traced``: the layers are the pieces between pipe_split() marks."""
    n_layers = len(layers)
    if n_chunks > n_layers:
        more = (
            "call pipe_split() at more places in forward"
            if traced
            else "give the network more layers"
        )
        what = " (the pieces between its pipe_split() marks)" if traced else ""
        raise ValueError(
            f"the network has {n_layers} splittable layers{what}, fewer than the {n_chunks} "
            "pipeline chunks asked for (n_stages x chunks_per_stage); lower n_stages or "
            f"chunks_per_stage, or {more}."
        )
    if not isinstance(balance, str):
        sizes = [int(s) for s in balance]
        if len(sizes) != n_chunks or sum(sizes) != n_layers or min(sizes) < 1:
            raise ValueError(
                f"balance {list(balance)} must list {n_chunks} positive layer counts (one per "
                f"chunk) summing to the number of layers ({n_layers}); got {len(sizes)} counts "
                f"summing to {sum(sizes)}."
            )
        return sizes, None
    if balance == "uniform":
        return uniform_sizes(n_layers, n_chunks), None
    if balance == "parameters":
        return _split_min_max(parameter_costs(layers), n_chunks), None
    if balance == "time":
        if sample is None:
            raise ValueError("balance='time' needs a sample batch to profile the layers.")
        costs = time_costs(layers, sample, device)
        return _split_min_max(costs, n_chunks), costs
    raise ValueError(
        "balance must be 'uniform', 'parameters', 'time' or a list of layer counts; "
        f"got {balance!r}."
    )


def chunk_bounds(sizes: Sequence[int]) -> list[tuple[int, int]]:
    bounds, start = [], 0
    for s in sizes:
        bounds.append((start, start + s))
        start += s
    return bounds


@dataclass(frozen=True)
class TensorTuple:
    """A chunk boundary that carries several tensors (the layer before it returned a tuple, which
    the next layer receives as one argument, as in ``nn.Sequential``): their per-row shapes."""

    shapes: tuple[tuple[int, ...], ...]


# what crosses a chunk boundary: one tensor's per-row shape, or several
Boundary = tuple[int, ...] | TensorTuple


def boundary_tensors(
    boundary: Boundary, rows: int, device: torch.device | str, requires_grad: bool
) -> tuple[torch.Tensor, ...]:
    """Empty float32 tensors of a boundary for ``rows`` rows (stage templates, receive buffers)."""
    shapes = boundary.shapes if isinstance(boundary, TensorTuple) else (boundary,)
    return tuple(
        torch.empty((rows,) + shape, device=device, requires_grad=requires_grad)
        for shape in shapes
    )


def boundary_bytes_per_row(boundary: Boundary) -> float:
    shapes = boundary.shapes if isinstance(boundary, TensorTuple) else (boundary,)
    return float(sum(4 * math.prod(shape) for shape in shapes))


def as_boundary(x: torch.Tensor | tuple[torch.Tensor, ...]) -> Boundary:
    if isinstance(x, torch.Tensor):
        return tuple(x.shape[1:])
    return TensorTuple(tuple(tuple(t.shape[1:]) for t in x))


def leaves(x: torch.Tensor | tuple[torch.Tensor, ...]) -> tuple[torch.Tensor, ...]:
    """The tensors of what crosses a boundary."""
    return (x,) if isinstance(x, torch.Tensor) else tuple(x)


def map_boundary(x: Any, fn: Callable[[torch.Tensor], torch.Tensor]) -> Any:
    """``fn`` applied to what crosses a boundary: a tensor, or each tensor of a tuple."""
    return fn(x) if isinstance(x, torch.Tensor) else tuple(fn(t) for t in x)


def fresh_inputs(x: Any) -> Any:
    """``x`` (a tensor or a tuple of them) detached, as leaves that take gradients when
    floating: a layer's input for measuring it alone."""
    return map_boundary(x, lambda t: t.detach().requires_grad_(t.is_floating_point()))


def backward_from(out: Any) -> None:
    """Backward from the sum of a layer's outputs that take gradients (if any)."""
    graded = [t.float().sum() for t in leaves(out) if t.requires_grad]
    if graded:
        torch.stack(graded).sum().backward()


def check_boundary(out: Any, rows: int, where: str, last: bool) -> None:
    """Refuse what a chunk cannot hand to the next one (or to the loss), naming the chunk."""
    if isinstance(out, torch.Tensor) and out.dim() >= 1 and out.shape[0] == rows:
        return
    if last:
        raise TypeError(
            f"{where} is the network's output and returns {_describe(out)}: the output must be "
            "one tensor with a row per sample (the loss is computed on it). Make the last "
            "layer return one tensor."
        )
    if isinstance(out, tuple) and out and all(isinstance(t, torch.Tensor) for t in out):
        bad = [i for i, t in enumerate(out) if not t.is_floating_point()]
        if bad:
            raise TypeError(
                f"{where} returns a tuple whose tensors {bad} are not floating point: tensors "
                "crossing a stage boundary carry gradients, so they must be float. Recompute "
                "integer or boolean tensors (masks, indices) in the next layer, or cast them."
            )
        rowless = [i for i, t in enumerate(out) if t.dim() == 0 or t.shape[0] != rows]
        if not rowless:
            return
        raise TypeError(
            f"{where} returns a tuple whose tensors {rowless} have no row per sample (first "
            f"dimension {rows}): every tensor crossing a stage boundary is cut into "
            "micro-batches by rows. Broadcast them over the rows, or keep them inside a layer."
        )
    raise TypeError(
        f"{where} returns {_describe(out)}, which cannot cross a stage boundary: return one "
        "tensor, or a tuple of float tensors with a row per sample (the next layer receives "
        "the tuple as its one argument). Wrap layers that return dicts or other objects in a "
        "block that returns tensors, or change the balance."
    )


def _describe(out: Any) -> str:
    if isinstance(out, torch.Tensor):
        return f"a tensor of shape {tuple(out.shape)}"
    if isinstance(out, tuple):
        return f"a tuple of {len(out)} ({', '.join(type(t).__name__ for t in out)})"
    return f"a {type(out).__name__}"


def boundary_shapes(
    layers: Sequence[nn.Module], bounds: Sequence[tuple[int, int]], n_features: int
) -> list[Boundary]:
    """What crosses every chunk boundary, per row (len = n_chunks + 1): one tensor's shape or a
    ``TensorTuple``. Found on the meta device so that no real compute runs; falls back to a
    real two-row forward (on a copy) for layers meta cannot run."""
    shapes: list[Boundary] = [(n_features,)]
    x: Any = torch.zeros((2, n_features), device="meta")
    for k, (s, e) in enumerate(bounds):
        chunk = nn.Sequential(*layers[s:e])
        try:
            with torch.no_grad():
                out = deepcopy(chunk).to_empty(device="meta")(x)
        except Exception:  # noqa: BLE001 - meta unsupported by some layer: measure for real
            with torch.no_grad(), torch.random.fork_rng(devices=[]):
                real = map_boundary(x, lambda t: torch.zeros(t.shape, dtype=t.dtype))
                out = real_copy(chunk).eval()(real)
        check_boundary(
            out, 2, f"pipeline chunk {k} (layers {s}..{e - 1})", last=k == len(bounds) - 1
        )
        shapes.append(as_boundary(out))
        x = map_boundary(out, lambda t: torch.zeros(t.shape, device="meta", dtype=t.dtype))
    return shapes
