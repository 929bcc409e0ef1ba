"""Groups of stage-worker processes, their channels, and the pool of warm ones.

Workers are plain ``python -m skpipe.engine.workers._worker_main`` subprocesses, not
``multiprocessing`` children, so they start the same way from a script, a notebook or a joblib
(loky) worker. Each connects back to the driver over an authenticated Unix-domain socket in a
private (0700) temporary folder: the channel is never on a network, and a local socket has none
of TCP's small-write delays (Nagle's algorithm meeting delayed ACKs cost 40 ms per step on TCP
loopback for batches of 16-64 KiB). Workers join a torch process group through a FileStore in
the same folder and exchange tensors over loopback only. A worker exits when the driver says so,
when its channel closes, or when its parent dies; the driver kills workers that fail, hang past
``timeout`` or outlive an interrupted fit.

Fits in one process (and in each joblib worker) reuse idle groups of the same shape, so a grid
search pays the start-up once; every fit sends a fresh network, optimizer and seed.
"""

from __future__ import annotations

import atexit
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import weakref
from collections.abc import Sequence
from multiprocessing.connection import Connection, answer_challenge, deliver_challenge, wait
from typing import Any

from ..parallel._devices import threads_per_worker
from ..state._stream import join_tensors, read_tensors, slots
from ._protocol import Close, Failed, Message, Ok, Reset, Streamed, decode, encode
from ._shared import Outbox

# Starting a worker (importing torch, joining the group) is not bounded by the step timeout.
STARTUP_TIMEOUT = 120.0

_LIVE: weakref.WeakSet[WorkerGroup] = weakref.WeakSet()


class WorkerError(RuntimeError):
    """A stage worker failed, died or stopped answering; the message carries its traceback."""


def idle_timeout() -> float:
    """Seconds an idle warm worker waits for its next fit before exiting (SKPIPE_IDLE_TIMEOUT)."""
    return float(os.environ.get("SKPIPE_IDLE_TIMEOUT", "300"))


def _describe_exit(proc: subprocess.Popen[bytes]) -> str:
    code = proc.poll()
    if code is None:
        return "its channel closed while it was still running"
    if code < 0:
        try:
            name = signal.Signals(-code).name
        except ValueError:
            name = str(-code)
        return f"it was killed by signal {name}"
    return f"it exited with code {code}"


class WorkerGroup:
    """The processes of one pipeline, their channels and the rendezvous store."""

    def __init__(self, n_workers: int, devices: tuple[str, ...], timeout: float) -> None:
        self.n_workers = n_workers
        self.devices = devices
        self.timeout = timeout
        self.idle_since = time.monotonic()
        self.pending_reset = False
        self._outbox = Outbox(n_workers)  # batches through shared memory
        self.procs: list[subprocess.Popen[bytes]] = []
        self.conns: list[Connection] = []
        self._authkey = os.urandom(32)
        self._dir = tempfile.mkdtemp(prefix="skpipe-")  # mode 0700: ours alone
        self._socket = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        control = os.path.join(self._dir, "control")
        self._socket.bind(control)
        self._socket.listen(n_workers)
        threads = threads_per_worker(n_workers) if devices[0] == "cpu" else 1
        _LIVE.add(self)
        try:
            for rank in range(n_workers):
                env = dict(os.environ)
                env.update(
                    SKPIPE_CONTROL_PATH=control,
                    SKPIPE_AUTHKEY=self._authkey.hex(),
                    SKPIPE_RANK=str(rank),
                    SKPIPE_WORLD_SIZE=str(n_workers),
                    SKPIPE_STORE_PATH=os.path.join(self._dir, "store"),
                    SKPIPE_PARENT_PID=str(os.getpid()),
                    # the worker imports whatever the driver can (user modules beside a script)
                    PYTHONPATH=os.pathsep.join(p for p in sys.path if p and os.path.isdir(p)),
                    SKPIPE_IDLE_TIMEOUT=str(idle_timeout()),
                    OMP_NUM_THREADS=str(threads),
                    MKL_NUM_THREADS=str(threads),
                )
                # gloo and NCCL talk over loopback only: nothing listens beyond 127.0.0.1
                env.setdefault("GLOO_SOCKET_IFNAME", "lo")
                env.setdefault("NCCL_SOCKET_IFNAME", "lo")
                # torchrun's variables would make the worker think it is part of another job
                for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
                    env.pop(key, None)
                proc = subprocess.Popen(
                    [sys.executable, "-m", "skpipe.engine.workers._worker_main"],
                    env=env,
                    stdin=subprocess.DEVNULL,
                    start_new_session=True,  # Ctrl-C reaches the driver only; it stops workers
                )
                self.procs.append(proc)
            self._accept_all()
        except BaseException:
            self.close()
            raise

    def _accept_all(self) -> None:
        deadline = time.monotonic() + STARTUP_TIMEOUT
        by_rank: dict[int, Connection] = {}
        while len(by_rank) < self.n_workers:
            remaining = deadline - time.monotonic()
            for rank, proc in enumerate(self.procs):
                if proc.poll() is not None and rank not in by_rank:
                    raise WorkerError(
                        f"stage worker {rank} (pid {proc.pid}) failed to start: "
                        f"{_describe_exit(proc)}."
                    )
            if remaining <= 0:
                raise WorkerError(
                    f"only {len(by_rank)} of {self.n_workers} stage workers connected within "
                    f"{STARTUP_TIMEOUT:.0f} s."
                )
            self._socket.settimeout(min(1.0, remaining))
            try:
                sock, _ = self._socket.accept()
            except (socket.timeout, TimeoutError):
                continue
            sock.setblocking(True)
            conn = Connection(sock.detach())
            try:
                deliver_challenge(conn, self._authkey)
                answer_challenge(conn, self._authkey)
                rank = int(decode(conn.recv_bytes()).payload)
            except Exception:  # noqa: BLE001 - a peer that cannot authenticate is not ours
                conn.close()
                continue
            by_rank[rank] = conn
        self.conns = [by_rank[r] for r in range(self.n_workers)]

    # -- messaging -----------------------------------------------------------------------------
    def send(self, rank: int, message: Message) -> None:
        try:
            self.conns[rank].send_bytes(encode(self._outbox.pack(rank, message)))
        except (BrokenPipeError, ConnectionError, OSError):
            raise self._dead(rank) from None

    def ask_all(
        self, message: Message | Sequence[Message], timeout: float | None = None
    ) -> list[Any]:
        """Send ``message`` (or ``message[rank]``) to every rank; the replies in rank order."""
        return self.ask(range(self.n_workers), message, timeout)

    def ask(
        self,
        ranks: Sequence[int],
        message: Message | Sequence[Message],
        timeout: float | None = None,
    ) -> list[Any]:
        """Send ``message`` (or ``message[i]``) to each of ``ranks``; their replies in order."""
        ranks = list(ranks)
        for i, rank in enumerate(ranks):
            self.send(rank, message if isinstance(message, Message) else message[i])
        replies = self.gather(timeout, ranks)
        return [replies[rank] for rank in ranks]

    def _root_cause(self, rank: int, text: str) -> WorkerError:
        """A worker's error; when a peer died, the death is the cause and the error its echo
        (a peer's lost connection surfaces in the survivors as a communication error)."""
        deadline = time.monotonic() + 1.0
        while time.monotonic() < deadline:
            for other, proc in enumerate(self.procs):
                if other != rank and proc.poll() is not None and proc.returncode != 0:
                    dead = self._dead(other)
                    return WorkerError(f"{dead} Stage worker {rank} then failed with:\n{text}")
            time.sleep(0.05)
        return WorkerError(f"stage worker {rank} raised an exception:\n{text}")

    def alive(self) -> bool:
        return bool(self.procs) and all(p.poll() is None for p in self.procs)

    def _dead(self, rank: int) -> WorkerError:
        proc = self.procs[rank]
        try:
            proc.wait(timeout=2.0)
        except subprocess.TimeoutExpired:
            pass
        return WorkerError(f"stage worker {rank} (pid {proc.pid}) stopped: {_describe_exit(proc)}.")

    def gather(
        self, timeout: float | None = None, ranks: Sequence[int] | None = None
    ) -> dict[int, Any]:
        """Wait for one reply from each rank (of ``ranks``, when given); raise WorkerError on any
        failure or timeout."""
        ranks = range(self.n_workers) if ranks is None else ranks
        pending: dict[Any, int] = {self.conns[r]: r for r in ranks}
        replies: dict[int, Any] = {}
        timeout = self.timeout if timeout is None else timeout
        deadline = time.monotonic() + timeout
        while pending:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                ranks_left = sorted(pending.values())
                raise WorkerError(
                    f"stage worker(s) {ranks_left} gave no answer within timeout={timeout:g} s; "
                    "they were stopped. Raise the estimator's timeout if a step really takes "
                    "this long."
                )
            for conn in wait(list(pending), timeout=min(remaining, 0.5)):
                rank = pending.pop(conn)
                self._outbox.acknowledged(rank)  # it has read its batch, whatever it answers
                try:
                    reply = decode(conn.recv_bytes())  # type: ignore[union-attr]
                    if isinstance(reply, Ok) and isinstance(reply.payload, Streamed):
                        reply = Ok(self._streamed(rank, reply.payload, deadline, timeout))
                except (EOFError, ConnectionError, OSError):
                    raise self._dead(rank) from None
                if isinstance(reply, Failed):
                    raise self._root_cause(rank, reply.traceback)
                replies[rank] = reply.payload
            # a worker that died without closing its socket cleanly
            for conn, rank in list(pending.items()):
                if self.procs[rank].poll() is not None and not conn.poll():
                    raise self._dead(rank)
        return replies

    def _streamed(self, rank: int, reply: Streamed, deadline: float, timeout: float) -> Any:
        """The payload of a streamed reply: its tensors read from the channel into their own
        memory, one at a time (``state._stream.read_tensors``)."""
        conn = self.conns[rank]

        def ready() -> None:
            while not wait([conn], timeout=0.5):
                if self.procs[rank].poll() is not None:
                    raise EOFError("the worker died while sending its state")
                if time.monotonic() > deadline:
                    raise WorkerError(
                        f"stage worker {rank} did not finish sending its state within "
                        f"timeout={timeout:g} s."
                    )

        tensors = read_tensors(conn.fileno(), slots(reply.skeleton), ready)
        return join_tensors(reply.skeleton, tensors)

    def close(self) -> None:
        """Ask workers to exit, then terminate and kill what is left. Idempotent."""
        for conn in self.conns:
            try:
                conn.send_bytes(encode(Close()))
            except Exception:  # noqa: BLE001 - already gone
                pass
        deadline = time.monotonic() + 2.0
        for proc in self.procs:
            try:
                proc.wait(timeout=max(0.05, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                pass
        for proc in self.procs:
            if proc.poll() is None:
                proc.kill()
        for proc in self.procs:
            try:
                proc.wait(timeout=5.0)
            except subprocess.TimeoutExpired:  # pragma: no cover - kill cannot fail this way
                pass
        for conn in self.conns:
            conn.close()
        self._outbox.close()
        self.conns = []
        self.procs = []
        self._socket.close()
        shutil.rmtree(self._dir, ignore_errors=True)
        _LIVE.discard(self)


# -- warm workers ------------------------------------------------------------------------------
_POOL: dict[tuple[int, tuple[str, ...]], list[WorkerGroup]] = {}
_POOL_LOCK = threading.Lock()


def acquire_group(n_workers: int, devices: tuple[str, ...], timeout: float) -> WorkerGroup:
    """An idle live group of this shape, or a new one."""
    key = (n_workers, devices)
    with _POOL_LOCK:
        groups = _POOL.get(key, [])
        while groups:
            group = groups.pop()
            if group.alive() and time.monotonic() - group.idle_since < idle_timeout() - 1.0:
                group.timeout = timeout
                try:
                    if group.pending_reset:
                        group.gather()
                        group.pending_reset = False
                except WorkerError:
                    group.close()
                    continue
                return group
            group.close()
    return WorkerGroup(n_workers, devices, timeout)


def release_group(group: WorkerGroup) -> None:
    """Put a healthy group back for the next fit. Its workers drop their stages (and free
    device memory) while idle; the next fit collects that answer before its own setup."""
    try:
        for rank in range(group.n_workers):
            group.send(rank, Reset())
    except WorkerError:
        group.close()
        return
    group.pending_reset = True
    group.idle_since = time.monotonic()
    with _POOL_LOCK:
        _POOL.setdefault((group.n_workers, group.devices), []).append(group)


def shutdown_workers() -> int:
    """Stop every idle warm worker of this process now; returns how many groups were stopped.

    Idle workers also exit by themselves after ``SKPIPE_IDLE_TIMEOUT`` seconds (default 300)
    and when this process exits.
    """
    with _POOL_LOCK:
        groups = [g for gs in _POOL.values() for g in gs]
        _POOL.clear()
    for group in groups:
        group.close()
    return len(groups)


@atexit.register
def _close_all() -> None:
    shutdown_workers()
    for group in list(_LIVE):
        group.close()
