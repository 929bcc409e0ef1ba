"""The asynchronous schedules run with every stage in this process: the order of ``_ticks``
executed as written, each forward on its weight version's tensors (``functional_call``, never
by swapping ``.data``), each backward on the same tensors, each update on the stage's own
optimizer. What the multi-process executor must reproduce, and what its tests compare with."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import nn
from torch.func import functional_call

from ._ticks import Tick, async_order

Loss = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


class _Stage:
    """One stage: its chunk, optimizer, weight versions and the work in flight."""

    def __init__(self, chunk: nn.Module, optimizer: torch.optim.Optimizer,
                 ticks: list[Tick]) -> None:
        self.chunk = chunk
        self.optimizer = optimizer
        self.ticks = ticks
        self.next = 0
        self.names = [n for n, p in chunk.named_parameters() if p.requires_grad]
        self.params = dict(chunk.named_parameters())
        self.versions = {0: self._snapshot()}
        # the last tick that reads each version: dropped after it
        self.last_use = {t.version: i for i, t in enumerate(ticks) if t.kind in "FB"}
        self.saved: dict[int, tuple[Any, list[torch.Tensor], torch.Tensor]] = {}
        self.grads: dict[str, torch.Tensor] = {}

    def _snapshot(self) -> dict[str, torch.Tensor]:
        return {n: self.params[n].detach().clone() for n in self.names}

    def weights(self, version: int) -> dict[str, torch.Tensor]:
        return {n: t.detach().requires_grad_(True) for n, t in self.versions[version].items()}

    def update(self, version: int) -> None:
        for n in self.names:
            self.params[n].grad = self.grads.pop(n, None)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.versions[version] = self._snapshot()

    def release(self, index: int, version: int) -> None:
        if self.last_use.get(version) == index:
            self.versions.pop(version, None)


def run_in_process(
    schedule: str,
    chunks: Sequence[nn.Module],
    optimizers: Sequence[torch.optim.Optimizer],
    batches: Sequence[tuple[torch.Tensor, torch.Tensor]],
    n_microbatches: int,
    loss_fn: Loss,
) -> list[float]:
    """Train ``chunks`` (stage s holds ``chunks[s]`` and steps ``optimizers[s]``) on ``batches``
    with ``schedule``; ``loss_fn(output, target)`` is a mean over rows. Returns each batch's
    loss (on the weights its micro-batches ran on); the chunks end with the last update's
    weights. '2bw' weighs each micro-batch's loss by its share of the batch's rows, so its
    gradient is the batch's; 'pipedream' steps on each micro-batch's own mean."""
    p, m = len(chunks), n_microbatches
    two_bw = schedule == "2bw"
    order = async_order(schedule, p, m, len(batches))
    stages = [_Stage(c, o, t) for c, o, t in zip(chunks, optimizers, order, strict=True)]
    parts = [list(zip(x.tensor_split(m), y.tensor_split(m), strict=True)) for x, y in batches]
    acts: dict[tuple[int, int], torch.Tensor] = {}  # (stage, mb) -> output for the next stage
    back: dict[tuple[int, int], torch.Tensor] = {}  # (stage, mb) -> gradient of its input
    losses = [0.0] * len(batches)
    remaining = sum(len(t) for t in order)
    while remaining:
        progressed = False
        for s, st in enumerate(stages):
            while st.next < len(st.ticks):
                t = st.ticks[st.next]
                batch, k = divmod(t.mb, m)
                if t.kind == "F":
                    if s > 0 and (s - 1, t.mb) not in acts:
                        break
                    x, y = parts[batch][k]
                    inp = x if s == 0 else acts.pop((s - 1, t.mb)).requires_grad_(True)
                    weights = st.weights(t.version)
                    out = functional_call(st.chunk, weights, (inp,))
                    if s == p - 1:
                        # 2bw: each micro-batch's share of the batch's loss; pipedream: its own
                        rows = batches[batch][0].shape[0]
                        share = y.shape[0] / rows if two_bw else 1.0
                        loss = loss_fn(out, y) * share
                        losses[batch] += float(loss.detach()) * (1.0 if two_bw else 1 / m)
                        out = loss
                    else:
                        acts[(s, t.mb)] = out.detach()
                    st.saved[t.mb] = (inp, list(weights.values()), out)
                elif t.kind == "B":
                    if s < p - 1 and (s + 1, t.mb) not in back:
                        break
                    inp, held, out = st.saved.pop(t.mb)
                    grad_out = None if s == p - 1 else back.pop((s + 1, t.mb))
                    wants = ([inp] if s > 0 else []) + held
                    grads = torch.autograd.grad(out, wants, grad_out)
                    if s > 0:
                        back[(s, t.mb)] = grads[0]
                    for n, g in zip(st.names, grads[1:] if s > 0 else grads, strict=True):
                        st.grads[n] = g if n not in st.grads else st.grads[n] + g
                else:
                    st.update(t.version)
                if t.kind in "FB":
                    st.release(st.next, t.version)
                st.next += 1
                remaining -= 1
                progressed = True
        if not progressed:  # pragma: no cover - async_order's orders always proceed
            raise RuntimeError("the asynchronous order cannot proceed")
    return losses
