"""Big states moved between processes one tensor at a time: a skeleton with a slot in each
tensor's place, then each tensor's raw bytes, read straight into its own memory."""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import torch


@dataclass(frozen=True)
class LazyTensor:
    """A tensor made only when it is streamed (``read()``): a sharded tensor gathered whole
    just before its bytes go, so the sender holds one whole tensor at a time, never its whole
    state. ``shape`` and ``dtype`` are the tensor ``read()`` returns."""

    shape: tuple[int, ...]
    dtype: torch.dtype
    read: Callable[[], torch.Tensor]


@dataclass(frozen=True)
class TensorSlot:
    """Where a streamed tensor goes in its payload: its place in the stream, shape and dtype."""

    index: int
    shape: tuple[int, ...]
    dtype: torch.dtype


def split_tensors(obj: Any) -> tuple[Any, list[Any]]:
    """``obj`` (nested dicts, lists, tuples) with each tensor (or ``LazyTensor``) replaced by a
    ``TensorSlot``, and the tensors in slot order (as they are, on their device: nothing is
    copied or read here)."""
    found: list[Any] = []

    def walk(o: Any) -> Any:
        if isinstance(o, (torch.Tensor, LazyTensor)):
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


def write_tensors(fd: int, tensors: Iterable[Any]) -> None:
    """Write each tensor's bytes to ``fd``, one tensor at a time (a device tensor is brought
    to the CPU alone, a ``LazyTensor`` read just before): the sender never holds a second copy
    of its state."""
    for t in tensors:
        if isinstance(t, LazyTensor):
            t = t.read()
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
