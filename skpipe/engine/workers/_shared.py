"""Big arrays of a message (a batch's inputs) passed to a worker through shared memory, not
through its socket.

Written through the socket, a batch of 256 x 512 float32 (512 KiB) takes several context
switches on each side: the driver blocks until the worker has read what the socket buffer
cannot hold, and the workers of a step start one after another. Instead the driver writes
each large array into the rank's segment (a file in ``/dev/shm``, mode 0600, mapped on both
sides) and the message carries a ``SharedArray`` reference; the worker copies the array out as
soon as it decodes the message, before it does anything else.

A segment's bytes are reused only after the rank has replied to every message that refers to
them (``Outbox.acknowledged``), and a full segment is replaced by a larger one, not
overwritten. A segment's file is unlinked by the worker as soon as it has mapped it (the driver
holds it mapped already), else by the driver once the rank has replied, and at
``Outbox.close``: nothing is left in ``/dev/shm``, even when the driver is killed outright
(SIGKILL), except a segment made for a message its worker never read. Where there is no
``/dev/shm`` (not Linux), arrays go through the socket.
"""

from __future__ import annotations

import dataclasses
import mmap
import os
import tempfile
from dataclasses import dataclass
from typing import Any

import numpy as np

from ._protocol import AsyncStep, Forward, Step, SyncStep

BATCH_MESSAGES = (Step, AsyncStep, SyncStep, Forward)  # the messages that carry a batch's rows
SHM_DIR = "/dev/shm"
SMALLEST = 64 * 2**10  # arrays smaller than this go inside the message
ALIGN = 64


@dataclass(frozen=True)
class SharedArray:
    """Where an array of a message lies: its segment's file, offset, dtype and shape."""

    path: str
    offset: int
    dtype: str
    shape: tuple[int, ...]


class _Segment:
    def __init__(self, size: int) -> None:
        fd, self.path = tempfile.mkstemp(prefix="skpipe-batch-", dir=SHM_DIR)
        try:
            os.ftruncate(fd, size)
            self.map = mmap.mmap(fd, size)
        finally:
            os.close(fd)
        self.size = size
        self.used = 0
        self.linked = True

    def unlink(self) -> None:
        if self.linked:
            self.linked = False
            try:
                os.unlink(self.path)
            except FileNotFoundError:
                pass


class Outbox:
    """The driver's side: one segment per rank (made on the first large array)."""

    def __init__(self, n_ranks: int, enabled: bool | None = None) -> None:
        self.enabled = os.path.isdir(SHM_DIR) if enabled is None else enabled
        self._segments: list[_Segment | None] = [None] * n_ranks
        self._awaiting: list[list[_Segment]] = [[] for _ in range(n_ranks)]

    def pack(self, rank: int, message: Any) -> Any:
        """``message`` with each large numpy array in it written to ``rank``'s segment."""
        if not self.enabled or not isinstance(message, BATCH_MESSAGES):
            return message

        def share(obj: Any) -> Any:
            if isinstance(obj, np.ndarray) and obj.nbytes >= SMALLEST and obj.dtype != object:
                return self._write(rank, np.ascontiguousarray(obj))
            return obj

        return _rebuilt(message, share)

    def _write(self, rank: int, array: np.ndarray) -> SharedArray:
        n = -(-array.nbytes // ALIGN) * ALIGN
        seg = self._segments[rank]
        if seg is None or seg.used + n > seg.size:
            seg = _Segment(max(n, 2 * seg.size if seg else 4 * n))
            self._retire(rank)
            self._segments[rank] = seg
        view = np.frombuffer(seg.map, dtype=np.uint8, count=array.nbytes, offset=seg.used)
        view[:] = array.reshape(-1).view(np.uint8)
        ref = SharedArray(seg.path, seg.used, array.dtype.str, tuple(array.shape))
        seg.used += n
        if seg not in self._awaiting[rank]:
            self._awaiting[rank].append(seg)
        return ref

    def _retire(self, rank: int) -> None:
        """The rank's segment is replaced: it stays mapped and linked until the rank replies."""
        seg = self._segments[rank]
        if seg is not None and seg not in self._awaiting[rank]:
            seg.unlink()
            seg.map.close()

    def acknowledged(self, rank: int) -> None:
        """``rank`` replied: it has copied out every array sent to it so far."""
        current = self._segments[rank]
        for seg in self._awaiting[rank]:
            seg.unlink()  # mapped by the rank by now
            if seg is not current:
                seg.map.close()
        self._awaiting[rank] = []
        if current is not None:
            current.used = 0

    def close(self) -> None:
        """Unlink and unmap every segment (the group's workers are gone)."""
        segments = {id(s): s for held in self._awaiting for s in held}
        segments.update({id(s): s for s in self._segments if s is not None})
        for seg in segments.values():
            seg.unlink()
            seg.map.close()
        self._segments = [None] * len(self._segments)
        self._awaiting = [[] for _ in self._segments]


class Inbox:
    """A worker's side: the segment it was last sent arrays in, mapped."""

    def __init__(self) -> None:
        self._path: str | None = None
        self._map: mmap.mmap | None = None

    def unpack(self, message: Any) -> Any:
        """``message`` with each ``SharedArray`` copied out of its segment (only the batch
        messages carry any)."""

        def copied(obj: Any) -> Any:
            if not isinstance(obj, SharedArray):
                return obj
            view = np.frombuffer(
                self._mapped(obj.path), dtype=np.dtype(obj.dtype),
                count=int(np.prod(obj.shape)), offset=obj.offset,
            )
            return view.reshape(obj.shape).copy()

        return _rebuilt(message, copied)

    def _mapped(self, path: str) -> mmap.mmap:
        if path == self._path and self._map is not None:
            return self._map
        if self._map is not None:
            self._map.close()
        with open(path, "r+b") as f:
            mapped = mmap.mmap(f.fileno(), 0)
        try:  # both sides hold it mapped now: nobody needs its name, whoever dies next
            os.unlink(path)
        except FileNotFoundError:
            pass
        self._path, self._map = path, mapped
        return mapped


def _rebuilt(obj: Any, leaf: Any) -> Any:
    """``obj`` (a batch message, or lists, tuples and dicts in one) with ``leaf(x)`` in place
    of everything else ``x`` in it."""
    if isinstance(obj, BATCH_MESSAGES):
        fields = {f.name: _rebuilt(getattr(obj, f.name), leaf) for f in dataclasses.fields(obj)}
        return dataclasses.replace(obj, **fields)
    if isinstance(obj, (list, tuple)):
        return type(obj)(_rebuilt(v, leaf) for v in obj)
    if isinstance(obj, dict):
        return {k: _rebuilt(v, leaf) for k, v in obj.items()}
    return leaf(obj)
