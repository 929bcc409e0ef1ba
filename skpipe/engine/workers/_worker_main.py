"""Entry point of a stage worker: ``python -m skpipe.engine.workers._worker_main`` (started by
``_pool``).

The worker answers one message at a time; the message's type picks its handler from
``HANDLERS``. Any exception goes back to the driver as ``Failed(traceback)`` and ends the worker.
"""

from __future__ import annotations

import os
import signal
import sys
import threading
import time
import traceback
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from multiprocessing.connection import Client
from typing import Any

from . import _protocol as P
from ._shared import Inbox


def _die_with_parent(parent_pid: int) -> None:
    """Never outlive the driver: ask the kernel for SIGKILL when the parent dies, and watch."""
    if sys.platform.startswith("linux"):
        try:
            import ctypes

            libc = ctypes.CDLL("libc.so.6", use_errno=True)
            libc.prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
        except OSError:
            pass

    def watch() -> None:
        while True:
            if os.getppid() != parent_pid:
                os._exit(3)
            time.sleep(0.5)

    if os.getppid() != parent_pid:  # the parent died before the kernel was asked to tell us
        os._exit(3)
    threading.Thread(target=watch, daemon=True, name="skpipe-parent-watch").start()


class _Stream:
    """A handler's reply whose tensors go as raw bytes after the message (``P.Streamed``)."""

    def __init__(self, payload: Any) -> None:
        self.payload = payload


def _reply(conn: Any, result: Any) -> None:
    if not isinstance(result, _Stream):
        conn.send_bytes(P.encode(P.Ok(result)))
        return
    from ..state._stream import split_tensors, write_tensors

    skeleton, tensors = split_tensors(result.payload)
    conn.send_bytes(P.encode(P.Ok(P.Streamed(skeleton))))
    write_tensors(conn.fileno(), tensors)


class _Then:
    """A handler's reply, and what the worker does once it is sent."""

    def __init__(self, reply: Any, then: Callable[[], None]) -> None:
        self.reply = reply
        self.then = then


def _rows(m: P.Step) -> dict[str, Any]:
    """A step message's batch, as ``StageHost.compute_gradients`` takes it."""
    return {
        "x": _tensor(m.x), "y": _tensor(m.y), "n_real": m.n_real, "w": _tensor(m.w),
        "total_rows": m.total_rows, "total_weight": m.total_weight,
        "denominator": m.denominator,
    }


def _loss_reply(loss: Any, out: Any) -> Any:
    return None if loss is None else (loss.cpu().numpy(), out.cpu().numpy())


def _rng_state(device: str) -> Any:
    import torch

    cuda = torch.cuda.get_rng_state(device) if device.startswith("cuda") else None
    return torch.get_rng_state(), cuda


def _set_rng_state(device: str, state: Any) -> None:
    import torch

    torch.set_rng_state(state[0])
    if state[1] is not None:
        torch.cuda.set_rng_state(state[1], device)


def _tensor(a: Any) -> Any:
    import torch

    return None if a is None else torch.from_numpy(a)


class Worker:
    """The state of one stage worker between messages: its rank and the stages it hosts."""

    def __init__(self, rank: int, world: int) -> None:
        self.rank = rank
        self.world = world
        self.host: Any = None  # StageHost, once set up
        self.device = "cpu"
        # a synchronous step's next batch, sent along with it, and the random state from before
        # its forward and backward ran (whether they did: the host's ``computed``)
        self._ahead: P.Step | None = None
        self._rng: Any = None

    def stages(self) -> Any:
        if self.host is None:
            raise RuntimeError("this stage worker got a request before its setup")
        return self.host

    def setup(self, m: P.Setup) -> None:
        import torch

        from ..parallel._groups import mesh_groups, worker_world
        from ._stage import StageHost

        if self.host is not None:
            self.host.close()
            self.host = None
        if m.program is not None:  # this stage's layers, built here (see _construct)
            m.program.apply(m.chunks)
        self.device = m.device
        cfg = m.config
        # same seed warm or cold, so that a fit does not depend on what ran before; the same
        # for a stage's tensor shards, which must draw the same dropout on whole activations
        torch.manual_seed(m.seed + self.rank // cfg.tensor_parallel)
        if m.device.startswith("cuda"):
            torch.cuda.set_device(torch.device(m.device))
        store = os.environ["SKPIPE_STORE_PATH"]
        worker_world(store, self.rank, self.world, m.device, cfg.timeout)
        mesh = mesh_groups(cfg.n_replicas, cfg.n_stages, m.device, cfg.tensor_parallel)
        self.host = StageHost(
            m.chunks,
            cfg,
            m.spec,
            m.shapes,
            rank=cfg.stage_of(self.rank),
            device=m.device,
            group=mesh.pipeline,
            replica=cfg.replica_of(self.rank),
            replica_group=mesh.replicas,
            mesh=mesh,
            tensor_rank=cfg.tensor_of(self.rank),
            tensor_styles=m.tensor_styles,
        )

    @contextmanager
    def _out_of_memory_named(self) -> Iterator[None]:
        """An out-of-memory error of a step, said with the stage, the device and what it held."""
        from ..plan._memory import out_of_memory, out_of_memory_in

        try:
            yield
        except Exception as exc:
            oom = out_of_memory_in(exc)  # torch's schedule wraps what a stage raised
            if oom is None:
                raise
            host = self.stages()
            held = 4 * host.stats()["gradient_bytes"]  # weights, gradients, two Adam moments
            raise out_of_memory(
                oom, f"stage {host.rank}", self.device, held, host.config.n_stages
            ) from None

    def step(self, m: P.Step) -> Any:
        with self._out_of_memory_named():
            loss, out = self.stages().train_step(**_rows(m), hyper=m.hyper)
        return _loss_reply(loss, out)

    # -- synchronous steps whose next batch goes along (P.SyncStep) ---------------------------
    def sync_step(self, m: P.SyncStep) -> Any:
        host = self.stages()
        with self._out_of_memory_named():
            if m.now is not None:
                self.discard_ahead()
                host.compute_gradients(**_rows(m.now))
            elif self._ahead is None:
                raise RuntimeError("a step came without its batch, and none went ahead")
            elif not host.computed:  # dropped by a message since: computed again
                host.compute_gradients(**_rows(self._ahead))
            self._ahead = None
            loss, out = host.update(m.hyper)
        reply = _loss_reply(loss, out)
        ahead = m.ahead
        if ahead is None:
            return reply
        return _Then(reply, lambda: self._compute_ahead(ahead))

    def _compute_ahead(self, rows: P.Step) -> None:
        """The next batch's forward and backward, while the driver runs its callbacks."""
        self._ahead = rows
        self._rng = _rng_state(self.device)
        with self._out_of_memory_named():
            self.stages().compute_gradients(**_rows(rows))

    def discard_ahead(self) -> None:
        """Undo the next batch's forward and backward (a message that may change the weights
        came first): its gradients dropped, the random state back; its rows kept."""
        if self.host is not None and self.host.computed:
            self.host.discard_gradients()
            _set_rng_state(self.device, self._rng)

    def async_begin(self, m: P.AsyncBegin) -> None:
        self.pipe().begin(m.n_batches)

    def async_step(self, m: P.AsyncStep) -> Any:
        from ..asyncpipe._mailbox import BatchRows
        from ._async import step

        pipe = self.pipe()
        records = {pipe.fed: m.now, pipe.fed + 1: m.ahead}  # this batch, and the next ahead
        rows = {
            t: BatchRows(r.n_real, _tensor(r.x), _tensor(r.y), _tensor(r.w), r.total_rows,
                         r.total_weight, r.denominator)
            for t, r in records.items() if r is not None
        }
        result = step(pipe, self.stages().holds_last, m.hyper, rows)
        return None if result is None else (result[0].cpu().numpy(), result[1].cpu().numpy())

    def async_end(self, m: P.AsyncEnd) -> None:
        self.pipe().end()

    def pipe(self) -> Any:
        pipe = self.stages().pipe
        if pipe is None:
            raise RuntimeError("an asynchronous step was asked of a synchronous schedule")
        return pipe

    def forward(self, m: P.Forward) -> Any:
        out = self.stages().forward(_tensor(m.x), m.n_rows)
        return None if out is None else out.cpu().numpy()

    def reset(self, m: P.Reset) -> None:
        if self.host is not None:
            self.host.close()
            self.host = None
        if self.device.startswith("cuda"):  # give the idle GPU memory back
            import gc

            import torch

            gc.collect()
            torch.cuda.empty_cache()

    def get_state(self, m: P.GetState) -> Any:
        host = self.stages()
        return _Stream((host.state_dicts(lazy=True), host.optimizer_state(copy=False, lazy=True)))

    def set_state(self, m: P.SetState) -> None:
        self.stages().load_state(m.chunks, m.optimizer)

    def save_stage(self, m: P.SaveStage) -> None:
        self.stages().save_part(m.path, m.names, m.parameter_names)

    def load_stage(self, m: P.LoadStage) -> None:
        self.stages().load_parts(m.paths, m.names, m.parameter_names)

    def hyper(self, m: P.Hyper) -> Any:
        return self.stages().hyperparameters(m.groups)

    def set_weights(self, m: P.SetWeights) -> None:
        self.stages().set_weights(m.values, m.requires_grad)

    def drop_training_state(self, m: P.DropTrainingState) -> None:
        self.stages().drop_training_state()

    def collect(self, m: P.Collect) -> Any:
        return _Stream(self.stages().state_dicts(lazy=True))

    def record_timeline(self, m: P.RecordTimeline) -> None:
        self.stages().record_timeline(m.steps)

    def spans(self, m: P.Spans) -> Any:
        return self.stages().spans()

    def track_memory(self, m: P.TrackMemory) -> None:
        self.stages().track_memory(m.on)

    def stats(self, m: P.Stats) -> Any:
        return self.stages().stats()


HANDLERS: dict[type[P.Message], Callable[[Worker, Any], Any]] = {
    P.Setup: Worker.setup,
    P.Step: Worker.step,
    P.SyncStep: Worker.sync_step,
    P.AsyncBegin: Worker.async_begin,
    P.AsyncStep: Worker.async_step,
    P.AsyncEnd: Worker.async_end,
    P.Forward: Worker.forward,
    P.Reset: Worker.reset,
    P.GetState: Worker.get_state,
    P.SetState: Worker.set_state,
    P.Collect: Worker.collect,
    P.DropTrainingState: Worker.drop_training_state,
    P.Hyper: Worker.hyper,
    P.SetWeights: Worker.set_weights,
    P.SaveStage: Worker.save_stage,
    P.LoadStage: Worker.load_stage,
    P.RecordTimeline: Worker.record_timeline,
    P.Spans: Worker.spans,
    P.TrackMemory: Worker.track_memory,
    P.Stats: Worker.stats,
}


# the messages that leave a computed next batch as it is: they read the stage, or change only
# the optimizer's settings (which its update then takes)
KEEP_AHEAD = (P.SyncStep, P.Hyper, P.GetState, P.Collect, P.Spans, P.Stats)


def main() -> None:
    parent = int(os.environ["SKPIPE_PARENT_PID"])
    _die_with_parent(parent)
    rank = int(os.environ["SKPIPE_RANK"])
    world = int(os.environ["SKPIPE_WORLD_SIZE"])
    conn = Client(
        os.environ["SKPIPE_CONTROL_PATH"],
        family="AF_UNIX",
        authkey=bytes.fromhex(os.environ["SKPIPE_AUTHKEY"]),
    )
    conn.send_bytes(P.encode(P.Ok(rank)))

    import torch

    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    worker = Worker(rank, world)
    inbox = Inbox()  # a batch's arrays, sent through shared memory
    idle = float(os.environ.get("SKPIPE_IDLE_TIMEOUT", "300"))
    while True:
        try:
            if not conn.poll(idle):
                break  # idle too long: a warm worker nobody came back for
            message = P.decode(conn.recv_bytes())
        except (EOFError, OSError):
            break
        if isinstance(message, P.Close):
            break
        try:
            message = inbox.unpack(message)
            handler = HANDLERS.get(type(message))
            if handler is None:
                raise ValueError(f"unknown message {type(message).__name__}")
            if not isinstance(message, KEEP_AHEAD):
                worker.discard_ahead()
            result = handler(worker, message)
            if isinstance(result, _Then):
                _reply(conn, result.reply)
                result.then()  # a failure is the reply to the next message
            else:
                _reply(conn, result)
        except BaseException:  # noqa: BLE001 - everything goes back to the driver
            text = traceback.format_exc()
            try:
                conn.send_bytes(P.encode(P.Failed(text)))
            except OSError:
                pass
            break
    try:
        conn.close()
    finally:
        # a process group with a broken peer cannot be destroyed cleanly; leave at once
        os._exit(0)


if __name__ == "__main__":
    main()
