"""Submodules by name and by unit: names as torch's name patterns match them
(``parallelize_module``'s plans: part by part, each part an fnmatch pattern,
``"blocks.*.ffn.0"``), and the units FSDP2 gathers weights by."""

from __future__ import annotations

from fnmatch import fnmatchcase

from torch import nn


def matches(pattern: str, name: str) -> bool:
    """Whether submodule ``name`` matches ``pattern``."""
    atoms, parts = pattern.split("."), name.split(".")
    return len(atoms) == len(parts) and all(
        fnmatchcase(p, a) for a, p in zip(atoms, parts, strict=True)
    )


def style_of(plan: tuple[tuple[str, object], ...] | dict[str, object], name: str) -> object:
    """The style the last pattern of ``plan`` matching submodule ``name`` gives (None: no
    pattern names it)."""
    items = plan.items() if isinstance(plan, dict) else plan
    found = [style for pattern, style in items if matches(pattern, name)]
    return found[-1] if found else None


def split_parameter(style: object, parameter: str) -> bool:
    """Whether a parameter (its name in its module: 'weight', 'bias') is split over the
    tensor ranks by ``style``: a colwise layer's weight and bias, a rowwise layer's weight (its
    bias is added once, whole), anything a torch ParallelStyle is given (an upper bound)."""
    if style is None or style == "replicate":
        return False
    if style == "rowwise":
        return parameter == "weight"
    return True


def shard_units(layers: nn.Module) -> list[nn.Module]:
    """The modules whose weights are gathered together where replicas shard them (one FSDP2
    unit each): the children of ``layers`` holding parameters, containers (``nn.Sequential``,
    ``nn.ModuleList``: an MLP, a stack of blocks) opened into theirs."""
    out: list[nn.Module] = []
    for child in layers.children():
        if isinstance(child, (nn.Sequential, nn.ModuleList)):
            out += shard_units(child)
        elif any(True for _ in child.parameters()):
            out.append(child)
    return out
