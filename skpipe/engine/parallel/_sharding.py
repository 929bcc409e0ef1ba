"""A stage's state spread over ranks: replicas sharded with torch's FSDP2 (``shard``), and the
DTensor bookkeeping that tensor and replica shards share — reading a stage's state whole,
writing whole values back into shards, and the global gradient norm over every shard.

``shard='full'`` is ZeRO-3 as torchtitan composes it with pipeline stages: every layer of a
chunk that holds parameters is ``fully_shard``-ed over the replica mesh (weights, gradients and
optimizer state: 1/k per replica), its weights gathered for its forward and backward and let go
after each. ``shard='optimizer'`` is the same with ``reshard_after_forward=False``: a layer's
weights stay gathered from its forward to its backward, so each micro-batch gathers them once;
at rest the state is sharded (the optimizer's Adam moments included: they follow the sharded
parameters).

The chunk itself is not an ``FSDPModule``, so torch's ``PipelineStage`` runs a plain backward and
FSDP2's own hooks reduce-scatter each micro-batch's gradients as soon as a layer's backward is
done (summed, not averaged: each replica's loss is already its part of the batch loss); torch's
stage integration instead keeps every layer's weights and gradients gathered until the step's
last backward, which would hold a whole stage's weights and gradients gathered at once.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from math import inf
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from ..split._names import shard_units

SHARD_STYLES = {"optimizer": False, "full": True}  # shard -> reshard_after_forward


def is_dtensor(t: Any) -> bool:
    from torch.distributed.tensor import DTensor

    return isinstance(t, DTensor)


def shard_replicas(layers: nn.Module, mesh: Any, shard: str) -> list[nn.Module]:
    """FSDP2 over the replicas' ``mesh`` on every unit of ``layers`` (``split._names.
    shard_units``: its layers, an MLP's or a stack's opened), then on ``layers``, the root (any
    parameter left is its own; see the module's doc); the sharded modules."""
    from torch.distributed.fsdp import fully_shard

    reshard = SHARD_STYLES[shard]
    quiet_composition()
    out: list[Any] = [
        fully_shard(unit, mesh=mesh, reshard_after_forward=reshard)
        for unit in shard_units(layers)
    ]
    # always the root, parameters left or not: FSDP2 keeps a root's weights gathered from its
    # forward to its backward, so units left as roots of their own would hold them all at once
    out.append(fully_shard(layers, mesh=mesh, reshard_after_forward=reshard))
    for m in out:
        # a sum over the replicas, not their mean, as a plain SUM (gloo has no PREMUL_SUM)
        m.set_gradient_divide_factor(1.0)
        m.set_force_sum_reduction_for_comms(True)
    return list(out)


def quiet_composition() -> None:
    """Silence two notes torch prints on every step where FSDP2 meets tensor shards and
    skpipe's own layers, about which the user can do nothing: a tensor-parallel layer's output
    is a view of its local shard (no skpipe layer changes it in place), and a 2D DTensor is
    gathered whole in two steps (once per tensor, when the state is read)."""
    import logging
    import warnings

    warnings.filterwarnings("ignore", message=r"FSDP2-wrapped module \(\w+\) returned a view")
    logging.getLogger("torch.distributed.tensor._redistribute").setLevel(logging.ERROR)


def reshard(modules: Iterable[nn.Module]) -> None:
    """Let go of gathered weights (after a forward-only pass, which does not)."""
    for m in modules:
        m.reshard()  # type: ignore[operator]


def whole(t: Any) -> torch.Tensor:
    """A tensor as one device holds it: a DTensor gathered from its shards (every rank holding
    a shard must call this), any other as it is."""
    return t.full_tensor() if is_dtensor(t) else t


def map_dtensors(state: Any, fn: Callable[[Any], Any]) -> Any:
    """A (nested) state with ``fn(t)`` in place of each DTensor ``t``, visited in order (dicts
    by their keys' order, lists by index: the order every rank of a gathering must keep)."""
    if isinstance(state, Mapping):
        return {k: map_dtensors(v, fn) for k, v in state.items()}
    if isinstance(state, list):
        return [map_dtensors(v, fn) for v in state]
    return fn(state) if is_dtensor(state) else state


def like(own: Any, value: torch.Tensor) -> torch.Tensor:
    """``value`` (a whole tensor) laid out as ``own`` is: this rank's shard of it for a
    DTensor (cut here, no message), else itself."""
    if not is_dtensor(own):
        return value
    from torch.distributed.tensor import distribute_tensor

    value = value.to(device=own.device, dtype=own.dtype)
    return distribute_tensor(value, own.device_mesh, own.placements, src_data_rank=None)


@torch.no_grad()
def assign(own: torch.Tensor, value: torch.Tensor) -> None:
    """Copy a whole ``value`` into ``own`` (a tensor or this rank's shards of one)."""
    own.copy_(like(own, value))


def place_optimizer_state(optimizer: torch.optim.Optimizer) -> None:
    """After ``load_state_dict`` of whole tensors: each state tensor of a sharded parameter
    becomes this rank's shard, laid out as the parameter (Adam's moments, ...)."""
    for group in optimizer.param_groups:
        p: Any
        for p in group["params"]:
            if not is_dtensor(p):
                continue
            state = optimizer.state.get(p, {})
            for key, value in list(state.items()):
                if torch.is_tensor(value) and not is_dtensor(value) and value.shape == p.shape:
                    state[key] = like(p, value)


def global_norm(
    grads: Iterable[torch.Tensor],
    norm_type: float,
    device: torch.device,
    pipeline: dist.ProcessGroup | None,
) -> float:
    """The ``norm_type``-norm of the gradients of a whole pipeline: each shard counted once
    (sharded DTensors summed over the mesh dimensions they are split on, replicated ones
    taken as they are), then over the pipeline's stages."""
    parts: dict[tuple[Any, ...], torch.Tensor] = {}
    g: Any
    for g in grads:
        groups: tuple[Any, ...] = ()
        if is_dtensor(g):
            mesh = g.device_mesh
            groups = tuple(
                mesh.get_group(d) for d, pl in enumerate(g.placements) if not pl.is_replicate()
            )
            g = g.to_local()
        a = g.detach().double().abs()
        acc = parts.setdefault(groups, torch.zeros((), device=device, dtype=torch.float64))
        if norm_type == inf:
            torch.maximum(acc, a.max() if a.numel() else acc, out=acc)
        else:
            acc.add_(a.pow(norm_type).sum())
    op = dist.ReduceOp.MAX if norm_type == inf else dist.ReduceOp.SUM
    total = torch.zeros((), device=device, dtype=torch.float64)
    for groups in sorted(parts, key=len):
        acc = parts[groups]
        for group in groups:
            dist.all_reduce(acc, op=op, group=group)
        total = torch.maximum(total, acc) if norm_type == inf else total + acc
    if pipeline is not None and dist.get_world_size(pipeline) > 1:
        dist.all_reduce(total, op=op, group=pipeline)
    return float(total) if norm_type == inf else float(total) ** (1.0 / norm_type)
