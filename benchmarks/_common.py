"""Shared bits of the benchmarks: JSON output, medians, sleep layers with known times."""

from __future__ import annotations

import json
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable

import torch
from torch import nn

from skpipe.engine.plan._config import PipelineConfig, TrainSpec, make_config
from skpipe.engine.plan._plan import make_plan
from skpipe.engine.runners._runners import make_runner


def emit(name: str, figures: dict) -> None:
    """Print the one JSON line a benchmark reports."""
    record = {
        "benchmark": name,
        "machine": f"{platform.machine()} {os.cpu_count()} cores, torch {torch.__version__}",
        "python": sys.version.split()[0],
        **figures,
    }
    print(json.dumps(record, sort_keys=False), flush=True)


def median(xs: list[float]) -> float:
    return statistics.median(xs)


def timed(fn: Callable[[], object], repeats: int) -> list[float]:
    out = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        out.append(time.perf_counter() - t0)
    return out


class _Sleep(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, f, b):  # noqa: ANN001, ANN205 - torch's Function protocol
        ctx.b = b
        time.sleep(f)
        return x * 1.0

    @staticmethod
    def backward(ctx, grad):  # noqa: ANN001, ANN205 - torch's Function protocol
        time.sleep(ctx.b)
        return grad * 1.0, None, None


class SleepLayer(nn.Module):
    """A layer whose forward takes ``f`` seconds and backward ``b`` seconds, whatever the CPU."""

    def __init__(self, f: float, b: float, width: int = 8) -> None:
        super().__init__()
        self.f, self.b = f, b
        self.scale = nn.Parameter(torch.ones(width))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _Sleep.apply(x, self.f, self.b) * self.scale


def runner_step_times(
    net: nn.Module, cfg: PipelineConfig, x: torch.Tensor, y: torch.Tensor, steps: int,
    warm: int = 1,
) -> tuple[float, list[dict[str, float]]]:
    """Median seconds of ``steps`` training steps of ``net`` on ``cfg``'s runner (after
    ``warm`` warming steps; SGD with lr 0 and MSE, so that every step does the same work), and
    the ranks' stats."""
    spec = TrainSpec(optimizer=torch.optim.SGD, optimizer_kwargs={"lr": 0.0},
                     criterion=nn.MSELoss())
    with make_runner(make_plan(net, cfg, x[:4]), net, spec) as runner:
        times = []
        for _ in range(steps + warm):
            t0 = time.perf_counter()
            runner.train_step(x, y)
            times.append(time.perf_counter() - t0)
        stats = runner.stats()
    return median(times[warm:]), stats


def cpu_config(
    *, n_stages: int, n_microbatches: int, schedule: str, batch_size: int,
    launcher: str = "spawn", checkpoint: str = "never", max_grad_norm: float | None = None,
) -> PipelineConfig:
    """A pipeline configuration on CPU workers with the defaults every benchmark shares."""
    return make_config(
        n_stages=n_stages, n_microbatches=n_microbatches, schedule=schedule,
        chunks_per_stage="auto", balance="uniform", checkpoint=checkpoint, launcher=launcher,
        devices=("cpu",) * n_stages, batch_size=batch_size, precision="float32",
        max_grad_norm=max_grad_norm, timeout=300.0,
    )


class _SleepWeight(torch.autograd.Function):
    """Identity on a weight whose backward (the weight gradient) takes ``w`` seconds."""

    @staticmethod
    def forward(ctx, p, w):  # noqa: ANN001, ANN205 - torch's Function protocol
        ctx.w = w
        return p * 1.0

    @staticmethod
    def backward(ctx, grad):  # noqa: ANN001, ANN205 - torch's Function protocol
        time.sleep(ctx.w)
        return grad * 1.0, None


class SplitSleepLayer(nn.Module):
    """A layer whose forward takes ``f`` s, input gradient ``i`` s and weight gradient ``w`` s
    (a full backward both), whatever the CPU: what the zero-bubble schedules split."""

    def __init__(self, f: float, i: float, w: float, width: int = 8) -> None:
        super().__init__()
        self.f, self.i, self.w = f, i, w
        self.scale = nn.Parameter(torch.ones(width))

    def extra_repr(self) -> str:  # part of the network's signature for the planner's cache
        return f"f={self.f}, i={self.i}, w={self.w}"

    def times(self, x: torch.Tensor) -> tuple[float, float, float]:
        """(F, I, W) seconds on ``x``."""
        return self.f, self.i, self.w

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        f, i, w = self.times(x)
        return _Sleep.apply(x, f, i) * _SleepWeight.apply(self.scale, w)


class BlockSleepLayer(SplitSleepLayer):
    """A block: a parameter op (its weight gradient takes ``w`` s) followed by a non-parameter
    op whose forward takes ``f`` s and backward ``i`` s: the shape of a residual or attention
    block, where the input gradient runs through ops without parameters. A weight gradient
    timed from the block's output would count ``i`` twice."""

    def extra_repr(self) -> str:
        return "block " + super().extra_repr()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        f, i, w = self.times(x)
        return _Sleep.apply(x * _SleepWeight.apply(self.scale, w), f, i)


class RowSleepLayer(SplitSleepLayer):
    """A SplitSleepLayer whose times are for 16 rows and grow with the micro-batch's rows, as
    compute does: pipelining can beat one stage on it, which fixed sleeps never let happen."""

    def extra_repr(self) -> str:
        return "per 16 rows " + super().extra_repr()

    def times(self, x: torch.Tensor) -> tuple[float, float, float]:
        r = x.shape[0] / 16
        return self.f * r, self.i * r, self.w * r


# -- raw torch processes beside skpipe -------------------------------------------------------
RAW_LIMIT_S = 300.0  # a raw torch run that takes longer has hung: it is stopped, with its stacks


def _raw_rank(rank: int, fn: Callable, world: int, port: int, args: tuple, queue: object,
              limit: float) -> None:
    """One raw torch process: a gloo group over loopback, ``fn(rank, world, *args)``, rank 0's
    result put on ``queue``. It then leaves at once (``os._exit``), without tearing the group
    down: a gloo group's teardown can hang (pytorch/pytorch#75097), and nothing is left to do.
    Rank 0, which serves the store, leaves last."""
    import faulthandler
    from datetime import timedelta

    import torch.distributed as dist

    faulthandler.dump_traceback_later(limit - 10.0, exit=True)  # a hang shows where it is
    os.environ["GLOO_SOCKET_IFNAME"] = "lo"  # nothing listens beyond 127.0.0.1
    torch.set_num_threads(1)
    wait = timedelta(seconds=limit - 20.0)
    store = dist.TCPStore("127.0.0.1", port, world, is_master=rank == 0, timeout=wait)
    dist.init_process_group("gloo", store=store, rank=rank, world_size=world, timeout=wait)
    result = fn(rank, world, *args)
    dist.barrier()
    if rank:
        store.set(f"left{rank}", "1")
    else:
        queue.put(result)  # type: ignore[attr-defined]
        store.wait([f"left{r}" for r in range(1, world)])
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def run_raw_ranks(fn: Callable, world: int, args: tuple, limit: float = RAW_LIMIT_S) -> object:
    """Rank 0's result of ``fn(rank, world, *args)`` run by ``world`` spawned gloo processes
    (one thread each); they are killed, and RuntimeError raised, when they take over ``limit``."""
    import socket

    import torch.multiprocessing as mp

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = int(sock.getsockname()[1])
    queue = mp.get_context("spawn").SimpleQueue()
    ctx = mp.start_processes(_raw_rank, args=(fn, world, port, args, queue, limit),
                             nprocs=world, join=False, start_method="spawn")
    deadline = time.monotonic() + limit
    while not ctx.join(timeout=1.0):
        if time.monotonic() > deadline:
            for proc in ctx.processes:
                proc.kill()
            raise RuntimeError(f"the raw torch processes of {fn.__name__} did not finish "
                               f"within {limit:g} s (their stacks are above)")
    return queue.get()
