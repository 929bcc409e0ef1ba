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


def out_of_memory(
    exc: BaseException, where: str, device: str, held_bytes: float, n_stages: int
) -> torch.OutOfMemoryError:
    """torch's out-of-memory error, with what the fit holds there and what to change.

    ``where``: 'the network' (n_stages=1) or 'stage s'; ``held_bytes``: its weights,
    gradients and optimizer state (and activations, where known)."""
    more = 2 if n_stages == 1 else n_stages * 2
    return torch.OutOfMemoryError(
        f"{where} ran out of memory on {device}: its training state (weights, gradients, "
        f"optimizer state) comes to about {held_bytes / 2**30:.2f} GiB before activations. "
        f"Split the network over more stages (n_stages={more}: each stage holds about "
        "1/n_stages of it; devices= one per stage, or stages sharing a GPU), or hold fewer "
        "activations (checkpoint='always', a smaller batch_size, more n_microbatches). "
        f"torch said: {exc}"
    )


def out_of_memory_in(exc: BaseException) -> BaseException | None:
    """The out-of-memory error behind ``exc`` (itself, or what it was raised from), if any."""
    seen: BaseException | None = exc
    while seen is not None:
        if isinstance(seen, torch.OutOfMemoryError):
            return seen
        seen = seen.__cause__ or seen.__context__
    return None


def human_bytes(n: float) -> str:
    """``n`` bytes in the unit that shows them: 512 B, 12.3 KiB, 1.5 MiB, 2.10 GiB."""
    for unit, size in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if abs(n) >= size:
            return f"{n / size:.2f} {unit}" if unit == "GiB" else f"{n / size:.1f} {unit}"
    return f"{n:.0f} B"
