"""What the planner measures: each layer's forward, input-gradient, weight-gradient and full
backward seconds (as torch's schedules run them) at three micro-batch sizes (straight lines in
the rows between them), the activation bytes it holds per row, its output bytes per row and its
parameter bytes (``measure``, kept per network signature, device, threads and rows for the life
of the process, so a grid search measures once); and the costs of stage-to-stage messages
between two processes as the launcher places them (``message_cost``: latency, bandwidth, and
torch's own time per schedule action; nothing for stages that share a process).
"""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from ..plan._plan import activation_bytes, microbatch_of
from ..split._boundary import as_boundary, boundary_bytes_per_row, leaves
from ..split._timing import split_time_costs
from ..split._trace import split_network
from ._simulate import ChunkCost, action_order, simulate


@dataclass(frozen=True)
class LayerProfile:
    """What the planner knows of a network's layers (see the module's doc)."""

    rows: tuple[int, ...]  # the micro-batch sizes measured, ascending
    # [size][layer] -> (F, I, W, B) seconds: I and W as a zero-bubble schedule splits the
    # backward, B the full backward
    fiw: tuple[tuple[tuple[float, float, float, float], ...], ...]
    activation_bytes_per_row: tuple[float, ...]
    output_bytes_per_row: tuple[float, ...]
    parameter_bytes: tuple[int, ...]
    threads: int
    input_bytes_per_row: float = 0.0  # what enters the first layer, per row
    parameter_tensors: tuple[int, ...] = ()  # per layer: what an optimizer steps tensor by tensor

    def costs(self, rows: int) -> list[tuple[float, ...]]:
        """Each layer's (F, I, W, B) seconds for a micro-batch of ``rows`` rows: straight
        lines between the measured sizes (the nearest two; the end lines extended beyond)."""
        sizes = self.rows
        if len(sizes) == 1 or sizes[0] == sizes[-1]:
            return [tuple(layer) for layer in self.fiw[0]]
        j = 1
        while j < len(sizes) - 1 and rows > sizes[j]:
            j += 1
        (r0, r1), (a, b) = (sizes[j - 1], sizes[j]), (self.fiw[j - 1], self.fiw[j])
        return [
            tuple(
                max(0.0, x0 + (x1 - x0) * (rows - r0) / (r1 - r0))
                for x0, x1 in zip(la, lb, strict=True)
            )
            for la, lb in zip(a, b, strict=True)
        ]


_PROFILES: dict[tuple[Any, ...], LayerProfile] = {}
_MESSAGES: dict[str, MessageCost] = {}


def signature(module: nn.Module) -> str:
    """The network's structure and sizes (not its weights): what its costs depend on."""
    text = repr(module) + repr([(n, tuple(p.shape)) for n, p in module.named_parameters()])
    return hashlib.sha1(text.encode()).hexdigest()


def measure(
    module: nn.Module, sample: torch.Tensor, rows: tuple[int, ...], device: str, threads: int
) -> LayerProfile:
    """The network's layer profile (kept for this process; see the module's doc)."""
    key = (signature(module), tuple(sample.shape[1:]), rows, device, threads)
    if key in _PROFILES:
        return _PROFILES[key]
    layers = layer_list(module, sample)
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        fiw = tuple(
            tuple(split_time_costs(layers, microbatch_of(sample, r), device)) for r in rows
        )
    finally:
        torch.set_num_threads(before)
    act, out_bytes = [], []
    x = microbatch_of(sample, rows[min(1, len(rows) - 1)])
    for layer in layers:
        held, x = activation_bytes(layer, x)
        act.append(held / leaves(x)[0].shape[0])
        out_bytes.append(boundary_bytes_per_row(as_boundary(x)))
    profile = LayerProfile(
        rows=rows,
        fiw=fiw,
        activation_bytes_per_row=tuple(act),
        output_bytes_per_row=tuple(out_bytes),
        parameter_bytes=tuple(
            sum(p.numel() * p.element_size() for p in layer.parameters()) for layer in layers
        ),
        threads=threads,
        input_bytes_per_row=float(sample[0].numel() * sample.element_size()),
        parameter_tensors=tuple(len(list(layer.parameters())) for layer in layers),
    )
    _PROFILES[key] = profile
    return profile


_PING = r"""
import os, sys, time, torch, torch.distributed as dist
from torch import nn
from torch.distributed.pipelining import PipelineStage, ScheduleGPipe
rank, path, device, m = int(sys.argv[1]), sys.argv[2], sys.argv[3], int(sys.argv[4])
torch.set_num_threads(1)
dist.init_process_group("nccl" if device.startswith("cuda") else "gloo",
                        store=dist.FileStore(path, 2), rank=rank, world_size=2)
dev = torch.device(device if not device.startswith("cuda") else f"cuda:{rank}")
sync = (lambda: torch.cuda.synchronize(dev)) if dev.type == "cuda" else (lambda: None)
out = []
for nbytes in (64, 1 << 20):
    t = torch.zeros(max(1, nbytes // 4), device=dev)
    times = []
    for i in range(21):
        t0 = time.perf_counter()
        if rank == 0:
            dist.send(t, 1); dist.recv(t, 1)
        else:
            dist.recv(t, 0); dist.send(t, 0)
        sync()
        times.append((time.perf_counter() - t0) / 2)
    out.append(sorted(times[1:])[10])
# a 2-stage GPipe step of m tiny micro-batches: torch's cost per action, messages included
stage = PipelineStage(nn.Linear(4, 4).to(dev), rank, 2, dev,
                      input_args=(torch.empty(2, 4, device=dev, requires_grad=rank > 0),),
                      output_args=(torch.empty(2, 4, device=dev, requires_grad=True),))
schedule = ScheduleGPipe(stage, m, loss_fn=lambda o, t: o.sum())
x, tgt = torch.randn(2 * m, 4, device=dev), torch.zeros(2 * m, 4, device=dev)
steps, barriers = [], []
for i in range(19):
    dist.barrier(); sync()
    t0 = time.perf_counter()
    schedule.step(*((x,) if rank == 0 else ()), target=tgt if rank == 1 else None)
    dist.barrier(); sync()
    t1 = time.perf_counter()
    dist.barrier(); sync()
    steps.append(t1 - t0)
    barriers.append(time.perf_counter() - t1)  # what the closing barrier adds to a step
# contention: both ranks compute while 4 MiB cross from rank 0 to rank 1 (as a stage's
# messages travel while it computes); what each rank's compute loses per byte
a = torch.randn(192, 192, device=dev)
def work():
    for _ in range(40):
        a @ a
    sync()
bufs = [torch.zeros(1 << 18, device=dev) for _ in range(4)]
alone, loaded = [], []
for i in range(9):
    for busy in (False, True):
        dist.barrier(); sync()
        t0 = time.perf_counter()
        if busy:
            reqs = [dist.isend(b, 1) if rank == 0 else dist.irecv(b, 0) for b in bufs]
        work()
        (loaded if busy else alone).append(time.perf_counter() - t0)
        if busy:
            for r in reqs:
                r.wait()
lost = torch.tensor([max(0.0, sorted(loaded)[4] - sorted(alone)[4]) / (4 << 20)], device=dev)
if rank == 1:
    dist.send(lost, 0)
else:
    theirs = torch.zeros(1, device=dev)
    dist.recv(theirs, 1)
    print(out[0], out[1], max(0.0, sorted(steps[3:])[8] - sorted(barriers[3:])[8]),
          float(lost), float(theirs))
dist.destroy_process_group()
"""

_CALIBRATION_MICROBATCHES = 8


@dataclass(frozen=True)
class MessageCost:
    """Stage-to-stage costs between two processes: seconds per byte of a message; torch's
    own time per schedule action (its bookkeeping and the message's latency), calibrated by
    replaying a measured 2-stage GPipe step of tiny micro-batches; and what the messages
    cost the compute they travel beside, measured as the slowdown of a matmul loop on each
    rank while 4 MiB cross between them."""

    latency: float
    per_byte: float
    per_action: float
    # compute seconds a stage loses per byte its messages carry while it computes (sending;
    # receiving): the transport's copies share the CPU with the stage (0 where they do not)
    send_per_byte: float = 0.0
    receive_per_byte: float = 0.0


def message_cost(device: str) -> MessageCost:
    """The message costs between two fresh processes on ``device``'s kind, over loopback;
    measured once per process."""
    kind = torch.device(device).type
    if kind in _MESSAGES:
        return _MESSAGES[kind]
    m = _CALIBRATION_MICROBATCHES
    with tempfile.TemporaryDirectory(prefix="skpipe-ping-") as folder:
        env = dict(os.environ, GLOO_SOCKET_IFNAME="lo", NCCL_SOCKET_IFNAME="lo",
                   OMP_NUM_THREADS="1")
        for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
            env.pop(key, None)
        store = os.path.join(folder, "store")
        procs = [
            subprocess.Popen(
                [sys.executable, "-c", _PING, str(r), store, device, str(m)],
                stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env, text=True,
            )
            for r in (0, 1)
        ]
        try:
            out, err = procs[0].communicate(timeout=120)
            procs[1].wait(timeout=30)
        finally:
            for p in procs:
                if p.poll() is None:
                    p.kill()
                    p.wait()
    if procs[0].returncode != 0:
        raise RuntimeError(f"measuring the stage-to-stage message cost failed:\n{err[-2000:]}")
    small, large, step, sending, receiving = (float(v) for v in out.split())
    unit = simulate(action_order("gpipe", 2, m, 1), [ChunkCost(1.0, 1.0, 0.0)] * 2).step_seconds
    _MESSAGES[kind] = MessageCost(
        latency=small,
        per_byte=max(0.0, (large - small) / (1 << 20)),
        per_action=step / unit,
        send_per_byte=sending,
        receive_per_byte=receiving,
    )
    return _MESSAGES[kind]


@dataclass(frozen=True)
class OptimizerCost:
    """One optimizer step: seconds per parameter byte, and per parameter tensor; and what a
    copy of the weights costs per byte (an asynchronous schedule keeps one per update)."""

    per_byte: float
    per_tensor: float
    copy_per_byte: float = 0.0

    def seconds(self, nbytes: float, tensors: int) -> float:
        return self.per_byte * nbytes + self.per_tensor * tensors


_OPTIMIZERS: dict[tuple[Any, ...], OptimizerCost] = {}
_PROBE_ELEMENTS = 1 << 20  # the parameter elements an optimizer step is timed on


def optimizer_cost(
    optimizer: Callable[..., torch.optim.Optimizer], kwargs: dict[str, Any], device: str,
    threads: int,
) -> OptimizerCost:
    """What a step of ``optimizer(**kwargs)`` costs on ``device`` with ``threads`` threads:
    timed (medians of 5, after a first step that makes its state) on one tensor of 2**20
    elements and on 32 tensors holding as many, so a stage's step is a line in its parameter
    bytes and tensors. Kept for the process."""
    dev = torch.device(device)
    key = (optimizer, repr(sorted(kwargs.items())), dev.type, threads)
    if key in _OPTIMIZERS:
        return _OPTIMIZERS[key]

    def median_seconds(work: Callable[[], object]) -> float:
        """``work``'s median time over 5 runs, after a first one (the device's queue drained)."""
        times = []
        for _ in range(6):
            if dev.type == "cuda":
                torch.cuda.synchronize(dev)
            t0 = time.perf_counter()
            work()
            if dev.type == "cuda":
                torch.cuda.synchronize(dev)
            times.append(time.perf_counter() - t0)
        return sorted(times[1:])[2]

    def timed(pieces: int) -> float:
        params = [
            nn.Parameter(torch.zeros(_PROBE_ELEMENTS // pieces, device=dev))
            for _ in range(pieces)
        ]
        for p in params:
            p.grad = torch.full_like(p, 1e-3)
        return median_seconds(optimizer(params, **kwargs).step)

    def copied() -> float:
        return median_seconds(torch.zeros(_PROBE_ELEMENTS, device=dev).clone)

    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        one, many, copy = timed(1), timed(32), copied()
    finally:
        torch.set_num_threads(before)
    per_tensor = max(0.0, (many - one) / 31)
    cost = OptimizerCost(
        per_byte=max(0.0, one - per_tensor) / (4 * _PROBE_ELEMENTS), per_tensor=per_tensor,
        copy_per_byte=copy / (4 * _PROBE_ELEMENTS),
    )
    _OPTIMIZERS[key] = cost
    return cost


def layer_list(module: nn.Module, sample: torch.Tensor) -> list[nn.Module]:
    """The layers a split can cut between (for inputs like ``sample``)."""
    named, _ = split_network(module, 2, tuple(sample.shape[1:]), sample.dtype)
    return [layer for _, layer in named]


def rows_to_measure(share_rows: int) -> tuple[int, ...]:
    """The micro-batch sizes measured: a sixteenth and a half of the rows each stage steps
    with (spanning the candidates' micro-batches), and all of them (the one-stage step)."""
    return tuple(sorted({max(1, share_rows // 16), max(1, share_rows // 2), max(1, share_rows)}))


def forget_measurements(messages: bool = True) -> None:
    """Drop what this process measured: the layer profiles, and the message costs unless
    ``messages=False``."""
    _PROFILES.clear()
    _OPTIMIZERS.clear()
    if messages:
        _MESSAGES.clear()
