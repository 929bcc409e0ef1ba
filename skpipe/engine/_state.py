"""Training state that crosses processes: CPU copies, optimizer state keyed by parameter name,
and big states streamed one tensor at a time.

An optimizer's ``state_dict`` numbers its parameters in the order it was given them, which
depends on how the network was split. Keyed by the parameters' names in the whole network
instead, the state of every stage merges into one, and it can be handed back to any split of
the same network (a resumed fit whose ``balance='time'`` measured another split, say).
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable, Sequence
from copy import deepcopy
from dataclasses import dataclass
from typing import Any

import torch

from ._construct import named_tensors, put_tensor


def cpu_copy(obj: Any) -> Any:
    """A copy of a (nested) state dict with every tensor on the CPU."""
    if isinstance(obj, torch.Tensor):
        return obj.detach().cpu().clone()
    if isinstance(obj, dict):
        return {k: cpu_copy(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(cpu_copy(v) for v in obj)
    return obj


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
        "hyper": {k: v for k, v in groups[0].items() if k != "params"},
    }


def merge_by_name(parts: Iterable[dict[str, Any]]) -> dict[str, Any]:
    """One named optimizer state from the named states of every stage."""
    merged: dict[str, Any] = {"state": {}, "hyper": {}}
    for part in parts:
        merged["state"].update(part["state"])
        merged["hyper"] = merged["hyper"] or part["hyper"]
    return merged


def state_for(named: dict[str, Any], names: Sequence[str]) -> dict[str, Any]:
    """A torch optimizer ``state_dict`` for parameters ``names``, taken from a named state."""
    missing = [n for n in names if n not in named["state"]]
    if missing and len(missing) != len(names):  # all missing: a state saved before any step
        raise ValueError(f"the saved optimizer state has no entry for parameters {missing[:5]}")
    return {
        "state": {i: named["state"][n] for i, n in enumerate(names) if n in named["state"]},
        "param_groups": [{**named["hyper"], "params": list(range(len(names)))}],
    }


# -- moving big states between processes, one tensor at a time -----------------------------------
@dataclass(frozen=True)
class TensorSlot:
    """Where a streamed tensor goes in its payload: its place in the stream, shape and dtype."""

    index: int
    shape: tuple[int, ...]
    dtype: torch.dtype


def split_tensors(obj: Any) -> tuple[Any, list[Any]]:
    """``obj`` (nested dicts, lists, tuples) with each tensor replaced by a ``TensorSlot``, and
    the tensors in slot order (as they are, on their device: nothing is copied here)."""
    found: list[torch.Tensor] = []

    def walk(o: Any) -> Any:
        if isinstance(o, torch.Tensor):
            found.append(o)
            return TensorSlot(len(found) - 1, tuple(o.shape), o.dtype)
        if isinstance(o, dict):
            return {k: walk(v) for k, v in o.items()}
        if isinstance(o, (list, tuple)):
            return type(o)(walk(v) for v in o)
        return o

    return walk(obj), found


def join_tensors(obj: Any, tensors: Sequence[torch.Tensor]) -> Any:
    """The inverse of ``split_tensors``."""
    if isinstance(obj, TensorSlot):
        return tensors[obj.index]
    if isinstance(obj, dict):
        return {k: join_tensors(v, tensors) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(join_tensors(v, tensors) for v in obj)
    return obj


def slots(obj: Any) -> list[TensorSlot]:
    """The slots of a ``split_tensors`` skeleton, in stream order."""
    if isinstance(obj, TensorSlot):
        return [obj]
    values = obj.values() if isinstance(obj, dict) else obj
    if isinstance(obj, (dict, list, tuple)):
        return sorted((s for v in values for s in slots(v)), key=lambda s: s.index)
    return []


def _raw(t: torch.Tensor) -> memoryview:
    """The bytes of a contiguous CPU tensor, without a copy."""
    return t.reshape(-1).view(torch.uint8).numpy().data


def write_tensors(fd: int, tensors: Iterable[torch.Tensor]) -> None:
    """Write each tensor's bytes to ``fd``, one tensor at a time (a device tensor is brought
    to the CPU alone): the sender never holds a second copy of its state."""
    for t in tensors:
        data = _raw(t.detach().cpu().contiguous()) if t.numel() else memoryview(b"")
        while len(data):
            data = data[os.write(fd, data):]


def read_tensors(
    fd: int, wanted: Sequence[TensorSlot], ready: Callable[[], None] | None = None
) -> list[torch.Tensor]:
    """Tensors for ``wanted``, their bytes read from ``fd`` straight into their own memory (no
    buffer in between). ``ready()`` is called before each read: it waits for data, and raises
    when the sender is gone or late."""
    out = []
    for slot in wanted:
        t = torch.empty(slot.shape, dtype=slot.dtype)
        if t.numel():
            view = _raw(t)
            while len(view):
                if ready is not None:
                    ready()
                n = os.readv(fd, [view])
                if n == 0:
                    raise EOFError("the sender closed the channel in the middle of a tensor")
                view = view[n:]
        out.append(t)
    return out


# -- checkpoints written where the state lives -----------------------------------------------------
def write_state_file(path: str, module: dict[str, torch.Tensor], optimizer: dict[str, Any]) -> None:
    """A checkpoint part, written atomically: tensors by their names in the whole network, and
    the optimizer's state keyed by parameter name (``state_by_name``)."""
    tmp = f"{path}.{os.getpid()}.tmp"
    try:
        torch.save({"module": module, "optimizer": optimizer}, tmp)
        os.replace(tmp, path)  # a reader sees the old file or the new one, whole
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


def read_state_files(paths: Sequence[str]) -> dict[str, Any]:
    """The parts of a checkpoint merged: ``{'module': state dict of the whole network,
    'optimizer': state keyed by parameter name}``. Tensors are memory-mapped from the files
    (read when used)."""
    parts = [torch.load(p, mmap=True, weights_only=True) for p in paths]
    module: dict[str, torch.Tensor] = {}
    for part in parts:
        module.update(part["module"])
    return {"module": module, "optimizer": merge_by_name(part["optimizer"] for part in parts)}


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


# -- pickling a big network ------------------------------------------------------------------------
class PortableModule:
    """Pickles a network as its structure (on the meta device) and one numpy array per tensor.

    Pickling an ``nn.Module`` directly keeps a bytes copy of every tensor in the pickler's memo
    until the end (peak memory: twice the weights); numpy arrays go with pickle protocol 5
    straight from the tensors' memory, and joblib writes them to its files as they are. Tied
    tensors stay tied.
    """

    def __init__(self, module: torch.nn.Module) -> None:
        self.module = module

    def __reduce__(self) -> tuple[Any, tuple[Any, ...]]:
        memo: dict[int, Any] = {}
        arrays: dict[str, Any] = {}
        by_id: dict[int, Any] = {}
        for name, t in named_tensors(self.module):
            if id(t) not in memo:
                meta = torch.empty_like(t, device="meta")
                memo[id(t)] = (
                    torch.nn.Parameter(meta, requires_grad=t.requires_grad)
                    if isinstance(t, torch.nn.Parameter)
                    else meta
                )
                by_id[id(t)] = _to_numpy(t)
            arrays[name] = by_id[id(t)]  # the same array object: pickled once
        skeleton = deepcopy(self.module, memo)
        return _rebuild_module, (skeleton, arrays)


_VIEWED = {torch.bfloat16: torch.int16, torch.float16: torch.int16}


def _to_numpy(t: torch.Tensor) -> tuple[Any, str]:
    t = t.detach()
    if t.dtype in _VIEWED:  # numpy has no bfloat16: its bits travel as int16
        return t.view(_VIEWED[t.dtype]).numpy(), str(t.dtype)
    return t.numpy(), ""


def _from_numpy(value: tuple[Any, str]) -> torch.Tensor:
    array, dtype = value
    t = torch.from_numpy(array)
    return t.view(getattr(torch, dtype.removeprefix("torch."))) if dtype else t


def _rebuild_module(skeleton: torch.nn.Module, arrays: dict[str, Any]) -> torch.nn.Module:
    done: dict[int, torch.Tensor] = {}
    made: dict[int, torch.Tensor] = {}
    for name, value in arrays.items():
        tensor = made.setdefault(id(value), _from_numpy(value))
        put_tensor(skeleton, name, tensor, done)
    return skeleton
