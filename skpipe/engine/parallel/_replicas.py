"""Summing one stage's gradients over its replicas, overlapped with the backward where it can be.

Each replica's loss is already its part of the batch loss, so the step's gradient is the *sum*
of the replicas' gradients. Parameters are grouped in flat buckets (last layers first: the
backward produces their gradients first). A parameter's gradient is final once it has been
accumulated for every micro-batch of the step; when every parameter of the next bucket in order
is final, that bucket's all-reduce starts (asynchronously) while the backward goes on. Buckets
always start in the same order on every replica, so the collectives match whatever the timing.

Zero-bubble schedules write weight gradients themselves (torch's split backward sets
``param.grad`` without autograd's accumulation, which is also why DDP's hooks miss them,
pytorch#144530): there no bucket starts early, and ``finish`` sums them all once the schedule
has run, which is always correct. ``finish`` waits for every bucket; each parameter's gradient
then is its slice of the summed buffer (no copy back; a tensor shard's is copied into).
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

# Gradients are summed in flat buffers of at most this many bytes (one buffer per parameter
# larger than that): small enough that the first ones start while the backward goes on, large
# enough that gloo on loopback keeps most of its bandwidth (about 0.7 GB/s at 4 MiB and 0.4 at
# 1 MiB on the 2-core CI machine); a bounded extra copy.
BUCKET_BYTES = 4 * 2**20


def buckets(tensors: Sequence[torch.Tensor], limit: int) -> list[list[torch.Tensor]]:
    """``tensors`` in order, grouped into runs of one dtype and device of at most ``limit``
    bytes."""
    out: list[list[torch.Tensor]] = []
    size = 0
    for t in tensors:
        nbytes = _local(t).numel() * t.element_size()
        if (
            not out
            or size + nbytes > limit
            or (t.dtype, t.device) != (out[-1][0].dtype, out[-1][0].device)
        ):
            out.append([])
            size = 0
        out[-1].append(t)
        size += nbytes
    return out


class ReplicaGradients:
    """Sums the gradients of ``params`` over ``group`` each step (see the module's doc)."""

    def __init__(
        self,
        params: Sequence[nn.Parameter],
        group: dist.ProcessGroup,
        n_microbatches: int,
        *,
        overlap: bool = True,
        bucket_bytes: int = BUCKET_BYTES,
    ) -> None:
        self.group = group
        self.m = n_microbatches
        trainable = [p for p in params if p.requires_grad]
        self.buckets = buckets(list(reversed(trainable)), bucket_bytes)
        self._bucket_of = {id(p): b for b, bucket in enumerate(self.buckets) for p in bucket}
        self._hooks = (
            [p.register_post_accumulate_grad_hook(self._accumulated) for p in trainable]
            if overlap
            else []
        )
        self._active = False
        self.exposed_seconds = 0.0  # time the steps waited for the sums after their backward
        self.steps = 0

    def begin(self) -> None:
        """Before the step's schedule runs."""
        self._counts: dict[int, int] = {}
        self._final = [0] * len(self.buckets)
        self._next = 0  # the next bucket to start, in order
        self._running: list[tuple[int, torch.Tensor, Any]] = []
        self._active = True

    def _accumulated(self, p: torch.Tensor) -> None:
        if not self._active:
            return
        count = self._counts.get(id(p), 0) + 1
        self._counts[id(p)] = count
        if count == self.m:
            b = self._bucket_of[id(p)]
            self._final[b] += 1
            while self._next < len(self.buckets) and self._final[self._next] == len(
                self.buckets[self._next]
            ):
                self._start(self._next)
                self._next += 1

    def _start(self, b: int) -> None:
        grads = [_local(p.grad) for p in self.buckets[b] if p.grad is not None]
        if not grads:
            return
        flat = torch.cat([g.reshape(-1) for g in grads])
        self._running.append((b, flat, dist.all_reduce(flat, group=self.group, async_op=True)))

    def finish(self) -> None:
        """After the schedule: start what has not started, wait, write the sums back."""
        t0 = time.perf_counter()
        self._active = False
        while self._next < len(self.buckets):
            self._start(self._next)
            self._next += 1
        for b, flat, work in self._running:
            work.wait()
            start = 0
            for p in self.buckets[b]:
                if p.grad is None:
                    continue
                grad = _local(p.grad)
                n = grad.numel()
                summed = flat[start : start + n].view_as(grad)
                if grad is p.grad:  # the sum becomes the gradient: no copy back
                    p.grad = summed
                else:  # a tensor shard's local gradient
                    grad.copy_(summed)
                start += n
        self._running = []
        if self.buckets and self.buckets[0][0].device.type == "cuda":
            torch.cuda.synchronize(self.buckets[0][0].device)
        self.exposed_seconds += time.perf_counter() - t0
        self.steps += 1

    def close(self) -> None:
        for hook in self._hooks:
            hook.remove()
        self._hooks = []


def _local(t: torch.Tensor) -> torch.Tensor:
    """This rank's part of a gradient: a tensor shard's local tensor (the replicas hold the
    same shard, so summing the parts sums the shard), else the gradient itself."""
    from torch.distributed.tensor import DTensor

    return t.to_local() if isinstance(t, DTensor) else t  # the local tensor itself
