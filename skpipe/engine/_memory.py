"""Measure the activation memory autograd holds for backward (saved tensors), per process.

Parameters are excluded (they are held anyway); tensors sharing storage count once. Works on
the meta device too (sizes without memory): a network built on meta is measured without values.
"""

from __future__ import annotations

import contextlib
import weakref
from collections.abc import Iterable, Iterator

import torch


class _Box:
    __slots__ = ("tensor", "__weakref__")

    def __init__(self, tensor: torch.Tensor) -> None:
        self.tensor = tensor


def _storage_key(t: torch.Tensor) -> int:
    """What tells storages apart: the address of their memory, or on the meta device (no
    memory) the storage object itself (torch keeps one per storage)."""
    storage = t.untyped_storage()
    return id(storage) if t.is_meta else storage.data_ptr()


class ActivationMeter:
    """Live and peak bytes of the tensors saved for backward while ``track()`` is active."""

    def __init__(self, params: Iterable[torch.Tensor]) -> None:
        self._params = {_storage_key(p) for p in params}
        self._refs: dict[int, int] = {}
        self._sizes: dict[int, int] = {}
        self.live = 0
        self.peak = 0

    def _pack(self, t: torch.Tensor) -> object:
        storage = t.untyped_storage()
        key = _storage_key(t)
        if key in self._params or key == 0:
            return t
        if key not in self._refs:
            self._refs[key] = 0
            self._sizes[key] = storage.nbytes()
            self.live += storage.nbytes()
            self.peak = max(self.peak, self.live)
        self._refs[key] += 1
        box = _Box(t)
        weakref.finalize(box, self._release, key)
        return box

    def _release(self, key: int) -> None:
        self._refs[key] -= 1
        if self._refs[key] == 0:
            del self._refs[key]
            self.live -= self._sizes.pop(key)

    @staticmethod
    def _unpack(packed: object) -> torch.Tensor:
        return packed.tensor if isinstance(packed, _Box) else packed  # type: ignore[return-value]

    @contextlib.contextmanager
    def track(self) -> Iterator[None]:
        with torch.autograd.graph.saved_tensors_hooks(self._pack, self._unpack):
            yield
