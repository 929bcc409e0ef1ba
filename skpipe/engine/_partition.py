"""Split a network into contiguous chunks of layers: flatten, balance, and the chunk modules."""

from __future__ import annotations

import time
from collections.abc import Sequence
from copy import deepcopy

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
            "skpipe splits an nn.Sequential at its layer boundaries. Express the network as "
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
        x = sample.to(dev)
        for layer in layers:
            copy = real_copy(layer).to(dev).train()
            inp = x.detach().requires_grad_(x.is_floating_point())
            with torch.no_grad():  # warm-up: first calls pay one-off costs that are not the layer's
                copy(inp)
            times = []
            out = inp
            for _ in range(repeats):
                sync(dev)
                t0 = time.perf_counter()
                out = copy(inp)
                if out.requires_grad:
                    out.float().sum().backward()
                sync(dev)
                times.append(time.perf_counter() - t0)
            costs.append(sorted(times)[len(times) // 2])
            x = out.detach()
            del copy
    return costs


def split_by_costs(costs: Sequence[float], n_chunks: int) -> list[int]:
    """Layer counts per chunk that minimise the largest chunk's summed cost."""
    return _split_min_max(list(costs), n_chunks)


def split_time_costs(
    layers: Sequence[nn.Module], sample: torch.Tensor, device: str = "cpu", repeats: int = 3
) -> list[tuple[float, float, float]]:
    """Each layer's measured seconds on ``sample`` (medians of ``repeats``, on ``device``):
    forward, input gradient (what a zero-bubble schedule's 'I' runs) and weight gradient ('W');
    a full backward is about the two. Measured on copies under a forked random generator, like
    ``time_costs``."""
    dev = torch.device(device)

    def now() -> float:
        if dev.type == "cuda":
            torch.cuda.synchronize(dev)
        return time.perf_counter()

    costs: list[tuple[float, float, float]] = []
    with torch.random.fork_rng(devices=[dev] if dev.type == "cuda" else []):
        x = sample.to(dev)
        for layer in layers:
            twin = real_copy(layer).to(dev).train()
            params = [p for p in twin.parameters() if p.requires_grad]
            inp = x.detach().requires_grad_(x.is_floating_point())
            with torch.no_grad():
                twin(inp)  # warm-up: first calls pay one-off costs that are not the layer's
            times: list[list[float]] = [[], [], []]
            out = inp
            for _ in range(repeats):
                t0 = now()
                out = twin(inp)
                t1 = now()
                times[0].append(t1 - t0)
                if not out.requires_grad:
                    times[1].append(0.0)
                    times[2].append(0.0)
                    continue
                grad = torch.ones_like(out)
                if inp.requires_grad:
                    torch.autograd.grad(out, inp, grad, retain_graph=True, allow_unused=True)
                t2 = now()
                if params:
                    torch.autograd.grad(out, params, grad, allow_unused=True)
                t3 = now()
                times[1].append(t2 - t1)
                times[2].append(t3 - t2)
            f, i, w = (sorted(t)[len(t) // 2] for t in times)
            costs.append((f, i, w))
            x = out.detach()
            del twin
    return costs


def balance_sizes(
    layers: Sequence[nn.Module],
    n_chunks: int,
    balance: str | Sequence[int],
    sample: torch.Tensor | None = None,
    device: str = "cpu",
) -> tuple[list[int], list[float] | None]:
    """Layer counts per chunk for a balance rule; also the measured costs when
    ``balance='time'``."""
    n_layers = len(layers)
    if n_chunks > n_layers:
        raise ValueError(
            f"the network has {n_layers} splittable layers, fewer than the {n_chunks} pipeline "
            "chunks asked for (n_stages x chunks_per_stage); lower n_stages or chunks_per_stage, "
            "or give the network more layers."
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


def boundary_shapes(
    layers: Sequence[nn.Module], bounds: Sequence[tuple[int, int]], n_features: int
) -> list[tuple[int, ...]]:
    """Per-row shape at every chunk boundary (len = n_chunks + 1), found on the meta device so
    that no real compute runs; falls back to a real two-row forward (on a copy) for layers meta
    cannot run."""
    shapes: list[tuple[int, ...]] = [(n_features,)]
    x = torch.zeros((2, n_features), device="meta")
    for k, (s, e) in enumerate(bounds):
        chunk = nn.Sequential(*layers[s:e])
        try:
            with torch.no_grad():
                out = deepcopy(chunk).to_empty(device="meta")(x)
        except Exception:  # noqa: BLE001 - meta unsupported by some layer: measure for real
            with torch.no_grad(), torch.random.fork_rng(devices=[]):
                real = torch.zeros((2,) + tuple(x.shape[1:]))
                out = real_copy(chunk).eval()(real)
        if not isinstance(out, torch.Tensor):
            raise TypeError(
                f"pipeline chunk {k} (layers {s}..{e - 1}) returns {type(out).__name__}, not a "
                "tensor: stage outputs must be tensors. Wrap layers that return tuples or dicts "
                "in a block whose forward returns one tensor, or change the balance."
            )
        shapes.append(tuple(out.shape[1:]))
        x = torch.zeros(out.shape, device="meta", dtype=out.dtype)
    return shapes
