"""The split of a network into chunks, with what each chunk holds: the plan of a pipelined fit."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from ._config import PipelineConfig
from ._partition import balance_sizes, chunk_bounds, flatten_layers
from ._stage import boundary_shapes


@dataclass
class Plan:
    """Where every layer goes.

    ``bounds[c]`` is the half-open layer range of chunk c; ``shapes[c]`` the per-row shape entering
    chunk c (``shapes[-1]`` the output); ``owners[c]`` the pipeline rank holding chunk c.
    """

    n_layers: int
    bounds: list[tuple[int, int]]
    shapes: list[tuple[int, ...]]
    owners: list[int]
    parameters: list[int]
    layer_costs: list[float] | None = None
    layer_names: list[str] = field(default_factory=list)

    def chunk_layers(self, layers: list[nn.Module], c: int) -> nn.Sequential:
        s, e = self.bounds[c]
        return nn.Sequential(*layers[s:e])


def make_plan(module: nn.Module, config: PipelineConfig, sample: torch.Tensor) -> tuple[Plan, list[nn.Module]]:
    """Split ``module`` for ``config``; ``sample`` (a few rows of X) feeds ``balance='time'``."""
    layers = flatten_layers(module, config.n_chunks)
    sizes, costs = balance_sizes(layers, config.n_chunks, config.balance, sample)
    bounds = chunk_bounds(sizes)
    shapes = boundary_shapes(layers, bounds, sample.shape[1])
    owners = [config.owner(c) for c in range(config.n_chunks)]
    params = [sum(p.numel() for layer in layers[s:e] for p in layer.parameters()) for s, e in bounds]
    names = [type(layer).__name__ for layer in layers]
    return Plan(len(layers), bounds, shapes, owners, params, costs, names), layers
