"""Device leases: concurrent fits on one machine (GridSearchCV(n_jobs=...)) never share a GPU.

A lease is an exclusive ``flock`` on one file per device under a per-user directory; the kernel
drops it when the holder exits, so a crashed fit never leaves a device locked. Devices with an
index are leased (``cuda:1``; ``cpu:0`` and ``cpu:1`` stand for CPU "devices" in tests);
a bare ``cpu`` is shared freely.
"""

from __future__ import annotations

import fcntl
import os
import re
import tempfile
import time
from collections.abc import Sequence


def lease_dir() -> str:
    path = os.environ.get("SKPIPE_LEASE_DIR") or os.path.join(
        tempfile.gettempdir(), f"skpipe-leases-{os.getuid()}"
    )
    os.makedirs(path, mode=0o700, exist_ok=True)
    return path


def _leasable(device: str) -> bool:
    return ":" in device


class DeviceLease:
    """Held devices; ``release()`` (or leaving the ``with`` block) gives them back."""

    def __init__(self, devices: tuple[str, ...], fds: list[int]) -> None:
        self.devices = devices
        self._fds = fds

    def release(self) -> None:
        for fd in self._fds:
            try:
                fcntl.flock(fd, fcntl.LOCK_UN)
            finally:
                os.close(fd)
        self._fds = []

    def __enter__(self) -> DeviceLease:
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()


def _try_lock(device: str) -> int | None:
    name = re.sub(r"[^A-Za-z0-9_.-]", "_", device)
    fd = os.open(os.path.join(lease_dir(), name + ".lock"), os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        return None
    return fd


def lease_devices(
    devices: Sequence[str],
    timeout: float,
    *,
    choose_from: Sequence[str] | None = None,
    poll: float = 0.1,
) -> DeviceLease:
    """Lease ``devices`` (each distinct one once), waiting up to ``timeout`` seconds.

    With ``choose_from``, lease any ``len(devices)`` free devices among those instead (what
    ``devices='auto'`` does on a machine with several GPUs). Raises TimeoutError naming the
    devices that stayed busy.
    """
    wanted = list(dict.fromkeys(d for d in devices if _leasable(d)))
    if choose_from is not None:
        pool = [d for d in choose_from if _leasable(d)]
        count = len(wanted)
    deadline = time.monotonic() + timeout
    while True:
        fds: list[int] = []
        got: list[str] = []
        for device in pool if choose_from is not None else wanted:
            if choose_from is not None and len(got) == count:
                break
            fd = _try_lock(device)
            if fd is None:
                if choose_from is None:
                    break
                continue
            fds.append(fd)
            got.append(device)
        target = count if choose_from is not None else len(wanted)
        if len(got) == target:
            if choose_from is not None:
                mapping = dict(zip(wanted, got, strict=True))
                chosen = tuple(mapping.get(d, d) for d in devices)
            else:
                chosen = tuple(devices)
            return DeviceLease(chosen, fds)
        DeviceLease((), fds).release()
        if time.monotonic() >= deadline:
            busy = [d for d in (pool if choose_from is not None else wanted) if d not in got]
            raise TimeoutError(
                f"could not lease {target} device(s) within {timeout:g} s: {busy} stayed in use by "
                "other fits on this machine (concurrent fits never share a device). Lower n_jobs, "
                "lower n_stages, or raise timeout."
            )
        time.sleep(poll)
