"""Tensor parallelism: which layers of a network are split over a stage's ``tensor_parallel``
ranks, and how (torch's ``parallelize_module`` with DTensor does the splitting).

A plan maps submodule names of the whole network (torch's patterns: ``"blocks.*.ffn.0"``, one
``*`` per name part) to a style: ``"colwise"`` (the layer's outputs split over the ranks),
``"rowwise"`` (its inputs split, the partial outputs summed), ``"replicate"`` (every rank holds
all of it: the default for what the plan does not name) or a torch ``ParallelStyle``. A colwise
layer followed by a rowwise one keeps the activation between them split, the Megatron-LM pair;
colwise siblings before a rowwise one inside a module that is not a Sequential (an attention's
q, k and v, then its out) all keep theirs split. Where a stage boundary falls between a pair,
or a colwise layer has no rowwise partner, the colwise layer gathers its output and the
rowwise layer splits its input, so that every stage boundary carries whole (replicated)
activations: rank (replica, s, i) sends to (replica, s+1, i).

skpipe's own networks have plans built in (``builtin_plan``); a user's network gets one from
``tp_plan``. Plans are checked against the network before any worker starts (``check_plan``).
"""

from __future__ import annotations

import difflib
from collections.abc import Mapping
from typing import Any

from torch import nn

from ..split._names import matches

STYLES = ("colwise", "rowwise", "replicate")

PlanValue = Any  # a style name, or a torch ParallelStyle


def builtin_plan(module: nn.Module) -> dict[str, str] | None:
    """The plan skpipe knows for its own networks (``skpipe.modules``); None for others.

    - ``MLP``: its Linear layers in pairs, colwise then rowwise (an odd last one replicated);
    - ``TabularResNet``: each block's ``up`` colwise and ``down`` rowwise (the residual stream,
      the first and the last Linear replicated);
    - ``FTTransformer``: in each block, the attention's heads split (its ``q``, ``k``, ``v``
      colwise, ``out`` rowwise: each rank computes n_heads / t heads) and the feed-forward
      network colwise then rowwise (the tokenizer, norms and head replicated).
    """
    from ... import modules

    if isinstance(module, modules.MLP):
        linears = [name for name, m in module.named_children() if isinstance(m, nn.Linear)]
        plan = {}
        for k in range(0, len(linears) - 1, 2):
            plan[linears[k]], plan[linears[k + 1]] = "colwise", "rowwise"
        return plan
    # networks of blocks: each block's split layers (by their names in it) and their styles
    attention = {"attention.q": "colwise", "attention.k": "colwise", "attention.v": "colwise",
                 "attention.out": "rowwise"}
    blocks = {
        modules.TabularResNet: (modules.ResidualBlock, {"up": "colwise", "down": "rowwise"}),
        modules.FTTransformer: (
            modules.TransformerBlock, {**attention, "ffn.0": "colwise", "ffn.3": "rowwise"}
        ),
    }
    for network, (block, styles) in blocks.items():
        if isinstance(module, network):
            return {
                f"{name}.{layer}": style
                for name, m in module.named_children() if isinstance(m, block)
                for layer, style in styles.items()
            }
    return None


def _check_heads(module: nn.Module, t: int) -> None:
    """Each attention of skpipe's FTTransformer splits whole heads over the ``t`` ranks."""
    from ... import modules

    for name, m in module.named_modules():
        if isinstance(m, modules.SelfAttention) and m.n_heads % t:
            raise ValueError(
                f"tensor_parallel={t} must divide the number of heads of {name!r} "
                f"(n_heads={m.n_heads}): each rank computes whole heads; choose a "
                f"tensor_parallel that divides {m.n_heads}."
            )


def plan_for(
    module: nn.Module, tp_plan: Mapping[str, PlanValue] | None, tensor_parallel: int
) -> dict[str, PlanValue]:
    """The checked plan of a fit: ``tp_plan``, or the built-in one of skpipe's networks."""
    if tp_plan is None:
        plan = builtin_plan(module)
        if plan is None:
            raise ValueError(
                f"tensor_parallel={tensor_parallel} needs a plan of which layers to split, and "
                f"skpipe has none for {type(module).__name__}: give tp_plan, a dict from "
                "submodule name (e.g. '2' or 'blocks.*.ffn.0') to 'colwise', 'rowwise', "
                "'replicate' or a torch ParallelStyle."
            )
        _check_heads(module, tensor_parallel)
        return check_plan(module, plan, tensor_parallel)
    return check_plan(module, tp_plan, tensor_parallel)


def with_tensor_plan(config: Any, module: nn.Module, tp_plan: Any) -> Any:
    """``config`` (a ``PipelineConfig``) carrying the checked plan its tensor shards split
    ``module`` by; a ``tp_plan`` given with ``tensor_parallel=1`` is checked all the same (it
    applies once tensor_parallel > 1, e.g. in a grid search over it)."""
    import dataclasses

    t = config.tensor_parallel
    if t == 1:
        if tp_plan is not None:
            check_plan(module, tp_plan, 1)
        return config
    return dataclasses.replace(config, tp_plan=tuple(plan_for(module, tp_plan, t).items()))


def check_plan(
    module: nn.Module, plan: Mapping[str, PlanValue], tensor_parallel: int
) -> dict[str, PlanValue]:
    """``plan`` checked against ``module``: every pattern names a submodule (else the closest
    names), every style is one of the four, every split layer's width divides by
    ``tensor_parallel`` (else the layer and its size)."""
    from torch.distributed.tensor.parallel import ParallelStyle

    if not isinstance(plan, Mapping):
        raise ValueError(
            f"tp_plan must be a dict from submodule name to style; got {type(plan).__name__}."
        )
    names = [n for n, _ in module.named_modules() if n]
    modules = dict(module.named_modules())
    out: dict[str, PlanValue] = {}
    for pattern, style in plan.items():
        if not isinstance(pattern, str):
            raise ValueError(f"tp_plan's keys are submodule names; got {pattern!r}.")
        if not (isinstance(style, ParallelStyle) or style in STYLES):
            raise ValueError(
                f"tp_plan[{pattern!r}] is {style!r}, which is not one of {list(STYLES)} or a "
                "torch ParallelStyle (torch.distributed.tensor.parallel)."
            )
        found = [n for n in names if matches(pattern, n)]
        if not found:
            close = difflib.get_close_matches(pattern, names, n=3, cutoff=0.5)
            raise ValueError(
                f"tp_plan names submodule {pattern!r}, which {type(module).__name__} does not "
                f"have" + (f"; closest: {close}" if close else f"; its submodules: {names[:8]}")
                + "."
            )
        for name in found:
            _check_width(name, modules[name], style, tensor_parallel)
        out[pattern] = style
    return out


def _check_width(name: str, layer: nn.Module, style: PlanValue, t: int) -> None:
    if not isinstance(style, str) or style == "replicate":
        return
    if not isinstance(layer, (nn.Linear, nn.Embedding)):
        raise ValueError(
            f"tp_plan splits {name!r} {style}, but it is a {type(layer).__name__}: the styles "
            "'colwise' and 'rowwise' split nn.Linear and nn.Embedding layers; name those, or "
            "give a torch ParallelStyle."
        )
    if isinstance(layer, nn.Linear):
        what, size = (
            ("out_features", layer.out_features)
            if style == "colwise"
            else ("in_features", layer.in_features)
        )
    else:
        what, size = (
            ("embedding_dim", layer.embedding_dim)
            if style == "colwise"
            else ("num_embeddings", layer.num_embeddings)
        )
    if size % t:
        raise ValueError(
            f"tensor_parallel={t} must divide the width {style} layer {name!r} is split along "
            f"({what}={size}); choose a tensor_parallel that divides {size}, or leave "
            f"{name!r} replicated."
        )


def chunk_styles(
    layers: nn.Module, global_names: Mapping[str, str], plan: Mapping[str, PlanValue]
) -> dict[str, Any]:
    """The ``parallelize_module`` plan of one chunk: its submodules (by their names inside
    ``layers``) that the fit's ``plan`` names (by their names in the whole network,
    ``global_names``: chunk-local state key -> whole-network key), with every boundary
    carrying whole activations (see the module's doc)."""
    from torch.distributed.tensor import Replicate
    from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel

    planned: list[tuple[str, PlanValue]] = []
    for local, sub in layers.named_modules():
        params = [k for k, _ in sub.named_parameters(recurse=False)]
        if not local or not params:
            continue
        key = global_names.get(f"{local}.{params[0]}")
        if key is None:
            continue
        whole = key[: -len(params[0]) - 1]
        styles = [style for pattern, style in plan.items() if matches(pattern, whole)]
        if styles and styles[-1] != "replicate":
            planned.append((local, styles[-1]))
    kept = _kept_split(layers, planned)
    out: dict[str, Any] = {}
    for k, (local, style) in enumerate(planned):
        if not isinstance(style, str):
            out[local] = style
        elif style == "colwise":
            out[local] = ColwiseParallel() if kept[k] else ColwiseParallel(
                output_layouts=Replicate()
            )
        else:
            paired = k > 0 and planned[k - 1][1] == "colwise"
            out[local] = RowwiseParallel() if paired else RowwiseParallel(
                input_layouts=Replicate()
            )
    return out


def _kept_split(layers: nn.Module, planned: list[tuple[str, PlanValue]]) -> list[bool]:
    """Per planned layer (in order), whether a colwise one keeps its output split: the next
    planned layer is rowwise (the pair), or it is a colwise sibling that keeps its own split
    inside a module that is not a Sequential (branches of one input, as an attention's q, k
    and v before its out)."""
    kept = [False] * len(planned)
    for k in reversed(range(len(planned) - 1)):
        local, style = planned[k]
        following, after = planned[k + 1]
        if style != "colwise":
            continue
        parent = local.rpartition(".")[0]
        kept[k] = after == "rowwise" or (
            after == "colwise"
            and kept[k + 1]
            and following.rpartition(".")[0] == parent
            and not isinstance(layers.get_submodule(parent), nn.Sequential)
        )
    return kept


def stage_styles(
    chunks: Mapping[int, nn.Module],
    names: Mapping[int, Mapping[str, str]],
    plan: Any,
) -> dict[int, dict[str, Any]]:
    """Per chunk of a stage (``chunks``, with ``names``: chunk -> local key -> whole-network
    key, as ``Plan.state_names`` gives them), its ``parallelize_module`` plan."""
    return {c: chunk_styles(chunks[c], names[c], dict(plan)) for c in chunks}


def shard_layers(layers: nn.Module, mesh: Any, styles: Mapping[str, Any]) -> None:
    """Split ``layers`` over the tensor ``mesh`` in place, as ``styles`` say (every rank holds
    the same values before: each keeps its part)."""
    from torch.distributed.tensor.parallel import parallelize_module

    if styles:
        parallelize_module(layers, mesh, dict(styles), src_data_rank=None)
