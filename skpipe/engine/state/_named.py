"""Training state keyed by names in the whole network: CPU copies, optimizer state by parameter
name (and its groups' settings: ``hyperparameters``), and the checkpoint parts each stage writes
where it lives.

An optimizer's ``state_dict`` numbers its parameters in the order it was given them, which
depends on how the network was split. Keyed by the parameters' names in the whole network
instead, the state of every stage merges into one, and it can be handed back to any split of
the same network (a resumed fit whose ``balance='time'`` measured another split, say).
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Sequence
from typing import Any

import torch


def cpu_copy(obj: Any) -> Any:
    """A copy of a (nested) state dict with every tensor on the CPU."""
    if isinstance(obj, torch.Tensor):
        return obj.detach().cpu().clone()
    if isinstance(obj, dict):
        return {k: cpu_copy(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(cpu_copy(v) for v in obj)
    return obj


def group_settings(group: dict[str, Any]) -> dict[str, Any]:
    """A parameter group's settings (lr, momentum...): everything but its parameters."""
    return {k: v for k, v in group.items() if k != "params"}


def hyperparameters(optimizer: torch.optim.Optimizer) -> list[dict[str, Any]]:
    """Each parameter group's settings, in order."""
    return [group_settings(g) for g in optimizer.param_groups]


def set_hyperparameters(optimizer: torch.optim.Optimizer, groups: list[dict[str, Any]]) -> None:
    """Give ``optimizer``'s groups the settings ``groups`` (in order; same number of groups)."""
    for group, settings in zip(optimizer.param_groups, groups, strict=False):
        group.update(settings)


def state_by_name(optimizer_state: dict[str, Any], names: Sequence[str]) -> dict[str, Any]:
    """``{'state': {name: per-parameter state}, 'hyper': settings}`` from a torch optimizer
    ``state_dict`` over parameters named ``names`` (in the optimizer's order)."""
    groups = optimizer_state["param_groups"]
    if len(groups) != 1:
        raise ValueError(f"expected one parameter group per stage optimizer, got {len(groups)}")
    order = groups[0]["params"]
    if len(order) != len(names):
        raise ValueError(
            f"the optimizer holds {len(order)} parameters but {len(names)} names were given"
        )
    state = optimizer_state["state"]
    return {
        "state": {names[i]: state[index] for i, index in enumerate(order) if index in state},
        "hyper": group_settings(groups[0]),
    }


def merge_by_name(parts: Iterable[dict[str, Any]]) -> dict[str, Any]:
    """One named optimizer state from the named states of every stage."""
    merged: dict[str, Any] = {"state": {}, "hyper": {}}
    for part in parts:
        merged["state"].update(part["state"])
        merged["hyper"] = merged["hyper"] or part["hyper"]
    return merged


def state_for(named: dict[str, Any], names: Sequence[str]) -> dict[str, Any]:
    """A torch optimizer ``state_dict`` for parameters ``names``, taken from a named state
    (a parameter without state, frozen or not yet stepped, has none here either)."""
    return {
        "state": {i: named["state"][n] for i, n in enumerate(names) if n in named["state"]},
        "param_groups": [{**named["hyper"], "params": list(range(len(names)))}],
    }


def write_state_file(
    path: str, module: dict[str, torch.Tensor], optimizer: dict[str, Any],
    stash: dict[str, Any] | None = None,
) -> None:
    """A checkpoint part, written atomically: tensors by their names in the whole network, and
    the optimizer's state keyed by parameter name (``state_by_name``); ``stash``: what an
    asynchronous schedule's stage needs besides (its weight versions and batch count)."""
    tmp = f"{path}.{os.getpid()}.tmp"
    part: dict[str, Any] = {"module": module, "optimizer": optimizer}
    if stash is not None:
        part["stash"] = stash
    try:
        torch.save(part, tmp)
        os.replace(tmp, path)  # a reader sees the old file or the new one, whole
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


def read_state_files(paths: Sequence[str]) -> dict[str, Any]:
    """The parts of a checkpoint merged: ``{'module': state dict of the whole network,
    'optimizer': state keyed by parameter name, 'stashes': the asynchronous stages' stashes
    (none for a synchronous schedule)}``. Tensors are memory-mapped from the files (read when
    used)."""
    parts = [torch.load(p, mmap=True, weights_only=True) for p in paths]
    module: dict[str, torch.Tensor] = {}
    for part in parts:
        module.update(part["module"])
    return {"module": module, "optimizer": merge_by_name(part["optimizer"] for part in parts),
            "stashes": [part["stash"] for part in parts if "stash" in part]}


def stage_state(
    saved: dict[str, Any], names: dict[int, dict[str, str]], parameter_names: Sequence[str]
) -> tuple[dict[int, dict[str, torch.Tensor]], dict[str, Any]]:
    """One stage's chunk state dicts and optimizer state dict, taken by name from a merged
    checkpoint (``names``: per chunk, each state-dict key -> its name in the whole network)."""
    missing = [q for m in names.values() for q in m.values() if q not in saved["module"]]
    if missing:
        raise ValueError(f"the checkpoint has no tensors for {missing[:5]}")
    chunks = {c: {k: saved["module"][q] for k, q in m.items()} for c, m in names.items()}
    return chunks, state_for(saved["optimizer"], parameter_names)
