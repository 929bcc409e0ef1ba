"""The layer profile as one rank of a (replica x stage x tensor) mesh sees it: tensor shards
and sharded replicas change what each layer costs that rank and what it holds.

- ``tensor_parallel=t``: the split part of a layer (its share of parameter bytes the plan
  splits) computes 1/t of its work; each rowwise layer all-reduces its output over the t ranks
  in the forward, each colwise layer the gradient of its input in the backward (the Megatron-LM
  pair's two all-reduces), as ring all-reduces at the measured message cost. A layer's split
  parameter bytes count 1/t (its optimizer step and the replicas' gradient sum shrink alike).
- ``shard='optimizer'``/``'full'`` (FSDP2 over k replicas): each layer gathers its weights for
  every micro-batch's forward (again for its backward with ``'full'``, which lets them go after
  the forward) and reduce-scatters its gradient after each backward; FSDP2 gathers the next
  layer while this one computes, so a layer's action takes the longer of its compute and its
  messages. The replicas' gradient sum after the schedule is then nothing, and the optimizer
  steps 1/k of the parameters (``_costs.stepped_bytes``).
"""

from __future__ import annotations

import dataclasses
from typing import Any

import torch
from torch import nn

from ..plan._config import PipelineConfig
from ..split._names import style_of
from ._costs import ring_seconds
from ._measure import LayerProfile, MessageCost


@dataclasses.dataclass(frozen=True)
class TensorSplit:
    """Per layer: the share of its parameter bytes split over the tensor ranks, and the bytes
    per row its forward and its backward all-reduce over them."""

    split: tuple[float, ...]
    forward_bytes_per_row: tuple[float, ...]
    backward_bytes_per_row: tuple[float, ...]


def tensor_split(named: list[tuple[str, nn.Module]], plan: Any) -> TensorSplit:
    """The ``TensorSplit`` of the network's layers (``named``: the split's layers and their
    names in the whole network) under ``plan`` (pairs of name pattern and style)."""
    split, forward, backward = [], [], []
    for prefix, layer in named:
        total = sum(p.numel() * p.element_size() for p in layer.parameters())
        cut = fwd = bwd = 0.0
        for local, sub in layer.named_modules():
            if not isinstance(sub, nn.Linear):
                continue
            name = f"{prefix}.{local}".strip(".") if local else prefix
            style = style_of(plan, name)
            size = sub.weight.element_size()
            if style == "colwise":
                cut += sum(p.numel() * p.element_size() for p in sub.parameters())
                bwd += sub.in_features * size
            elif style == "rowwise":
                cut += sub.weight.numel() * size
                fwd += sub.out_features * size
        split.append(cut / total if total else 0.0)
        forward.append(fwd)
        backward.append(bwd)
    return TensorSplit(tuple(split), tuple(forward), tuple(backward))


def rank_profile(
    profile: LayerProfile,
    config: PipelineConfig,
    message: MessageCost,
    tensors: TensorSplit | None,
) -> LayerProfile:
    """``profile`` as one rank of ``config``'s mesh sees it (see the module's doc)."""
    t, k = config.tensor_parallel, config.n_replicas
    sharded = config.shard != "none" and k > 1
    if (t == 1 or tensors is None) and not sharded:
        return profile
    n = len(profile.parameter_bytes)
    split = tensors.split if tensors is not None and t > 1 else (0.0,) * n
    share = [1.0 - f + f / t for f in split]
    params = tuple(int(b * s) for b, s in zip(profile.parameter_bytes, share, strict=True))
    fiw = []
    for rows, layers in zip(profile.rows, profile.fiw, strict=True):
        out = []
        for j, (f, i, w, b) in enumerate(layers):
            f, i, w, b = (x * share[j] for x in (f, i, w, b))
            if tensors is not None and t > 1:
                f += ring_seconds(rows * tensors.forward_bytes_per_row[j], t, message) \
                    if tensors.forward_bytes_per_row[j] else 0.0
                back = tensors.backward_bytes_per_row[j]
                extra = ring_seconds(rows * back, t, message) if back else 0.0
                i, b = i + extra, b + extra
            if sharded and params[j]:
                gather = ring_seconds(params[j], k, message) / 2  # an all-gather: half a ring
                scatter = gather  # a reduce-scatter: the other half
                again = gather if config.shard == "full" else 0.0
                f = max(f, gather)
                b = max(b, again + scatter)
            out.append((f, i, w, b))
        fiw.append(tuple(out))
    return dataclasses.replace(profile, fiw=tuple(fiw), parameter_bytes=params)


def mesh_split(
    module: nn.Module, sample: torch.Tensor, config: PipelineConfig
) -> TensorSplit | None:
    """The network's ``TensorSplit`` under ``config``'s tensor plan (None without one)."""
    if config.tensor_parallel == 1 or not config.tp_plan:
        return None
    from ..split._trace import split_network

    named, _ = split_network(module, 2, tuple(sample.shape[1:]), sample.dtype)
    return tensor_split(named, config.tp_plan)
