"""Entry point of a stage worker: ``python -m skpipe.engine._worker_main`` (started by _workers)."""

from __future__ import annotations

import os
import pickle
import signal
import sys
import threading
import time
import traceback
from datetime import timedelta
from multiprocessing.connection import Client
from typing import Any


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


def _tensor(a: Any) -> Any:
    import torch

    return None if a is None else torch.from_numpy(a)


def main() -> None:
    parent = int(os.environ["SKPIPE_PARENT_PID"])
    _die_with_parent(parent)
    rank = int(os.environ["SKPIPE_RANK"])
    world = int(os.environ["SKPIPE_WORLD_SIZE"])
    conn = Client(
        ("127.0.0.1", int(os.environ["SKPIPE_CONTROL_PORT"])),
        authkey=bytes.fromhex(os.environ["SKPIPE_AUTHKEY"]),
    )
    conn.send_bytes(pickle.dumps(rank))

    import torch
    import torch.distributed as dist

    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    host = None
    device_used = "cpu"

    def reply(payload: Any) -> None:
        conn.send_bytes(pickle.dumps(("ok", payload), protocol=5))

    idle = float(os.environ.get("SKPIPE_IDLE_TIMEOUT", "300"))
    while True:
        try:
            if not conn.poll(idle):
                break  # idle too long: a warm worker nobody came back for
            message = pickle.loads(conn.recv_bytes())
        except (EOFError, OSError):
            break
        kind = message[0]
        if kind == "close":
            break
        try:
            if kind == "setup":
                from skpipe.engine._stage import StageHost

                setup = message[1]
                config = setup["config"]
                device = setup["device"]
                device_used = device
                # same seed warm or cold, so that a fit does not depend on what ran before
                torch.manual_seed(setup["seed"] + rank)
                if host is not None:
                    host.close()
                    host = None
                if device.startswith("cuda"):
                    torch.cuda.set_device(torch.device(device))
                if dist.is_initialized():
                    host = StageHost(
                        setup["chunks"], config, setup["spec"], setup["shapes"],
                        rank=rank, device=device, group=dist.group.WORLD,
                    )
                    reply(None)
                    continue
                store = dist.FileStore(os.environ["SKPIPE_STORE_PATH"], world)
                backend = "nccl" if device.startswith("cuda") else "gloo"
                dist.init_process_group(
                    backend,
                    store=store,
                    rank=rank,
                    world_size=world,
                    timeout=timedelta(seconds=max(config.timeout, 120.0)),
                )
                group = dist.group.WORLD
                host = StageHost(
                    setup["chunks"],
                    config,
                    setup["spec"],
                    setup["shapes"],
                    rank=rank,
                    device=device,
                    group=group,
                )
                reply(None)
            elif kind == "step":
                assert host is not None
                _, x, y, n_real = message
                loss, out = host.train_step(_tensor(x), _tensor(y), n_real)
                reply(None if loss is None else (loss.cpu().numpy(), out.cpu().numpy()))
            elif kind == "forward":
                assert host is not None
                _, x, n_rows = message
                out = host.forward(_tensor(x), n_rows)
                reply(None if out is None else out.cpu().numpy())
            elif kind == "reset":
                if host is not None:
                    host.close()
                    host = None
                if device_used.startswith("cuda"):  # give the idle GPU memory back
                    import gc

                    gc.collect()
                    torch.cuda.empty_cache()
                reply(None)
            elif kind == "get_state":
                assert host is not None
                from skpipe.engine._runner import _cpu

                reply((host.state_dicts(), _cpu(host.optimizer.state_dict())))
            elif kind == "set_state":
                assert host is not None
                host.load_state(message[1], message[2])
                reply(None)
            elif kind == "timeline":
                assert host is not None
                host.record_timeline(message[1])
                reply(None)
            elif kind == "spans":
                assert host is not None
                reply(host.spans())
            elif kind == "track":
                assert host is not None
                host.track_memory(message[1])
                reply(None)
            elif kind == "stats":
                assert host is not None
                reply(host.stats())
            elif kind == "state":
                assert host is not None
                reply(host.state_dicts())
            else:
                raise ValueError(f"unknown message {kind!r}")
        except BaseException:  # noqa: BLE001 - everything goes back to the driver
            text = traceback.format_exc()
            try:
                conn.send_bytes(pickle.dumps(("error", text)))
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
