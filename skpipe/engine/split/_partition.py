"""Split a network into contiguous chunks of layers: flatten, balance, and the chunk modules."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from ._boundary import (  # re-exported: the split's boundaries
    Boundary,
    TensorTuple,
    as_boundary,
    backward_from,
    boundary_bytes_per_row,
    boundary_shapes,
    boundary_tensors,
    check_boundary,
    fresh_inputs,
    leaves,
    map_boundary,
)
from ._timing import time_costs  # balance='time' (tests replace it here)


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


def split_by_costs(costs: Sequence[float], n_chunks: int) -> list[int]:
    """Layer counts per chunk that minimise the largest chunk's summed cost."""
    return _split_min_max(list(costs), n_chunks)


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


__all__ = [
    "Boundary", "TensorTuple", "as_boundary", "backward_from", "balance_sizes",
    "boundary_bytes_per_row", "boundary_shapes", "boundary_tensors", "check_boundary",
    "chunk_bounds", "flatten_layers", "fresh_inputs", "leaves", "map_boundary", "named_layers",
    "parameter_costs", "split_by_costs", "time_costs", "uniform_sizes",
]
