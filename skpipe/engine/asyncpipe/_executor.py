"""The asynchronous schedules across processes: one stage per process runs its order of work
(``_ticks.async_order``) in a thread of its own, on torch's point-to-point communication.

torch's ``PipelineStage`` keeps its receive buffers and saved activations per micro-batch of
*one* step, and its schedules flush at every step; these schedules span batches, so the stage
here sends and receives with ``torch.distributed.isend``/``irecv`` on the pipeline's process
group (gloo or NCCL, the same transport the stages use), one chunk per process.

The driver feeds batches through a ``Mailbox`` (``_mailbox``): each batch's rows (one batch
ahead, so the first stage never waits for the next batch's inputs), the optimizer settings its
update uses, and it takes each batch's loss and outputs back from the last stage. Every forward
runs on its weight version's tensors (``torch.func.functional_call``; the stage's live
parameters are only ever stepped by its optimizer), every backward on the tensors its forward
used. The newest version is the live weights' own storage; an update moves the parameters to a
copy before stepping it, so a stage holds its live weights and the older versions in use only.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torch.func import functional_call

from ..plan._microbatch import (
    WeightedLoss,
    microbatch_counts,
    pad_rows,
    real_positions,
    row_targets,
)
from ..plan._timeline import Span
from ..split._boundary import Boundary, boundary_tensors, leaves
from ._clip import GlobalNormClip, PostedNorms
from ._mailbox import BatchRows, Mailbox, PipelineFailed
from ._ticks import Tick, async_order, version


class AsyncStage:
    """One stage of an asynchronous pipeline, in this process.

    ``chunk``: the stage's layers (a ``workers._chunk.ChunkModule``: it takes each micro-batch's
    real rows); ``optimizer`` steps its parameters; ``loss`` (a ``WeightedLoss``) on the last
    stage; ``group`` the pipeline's process group (``prev``/``next``: the neighbours' ranks in
    it); ``replica_group`` the same stage of every replica, over which each update's gradient is
    summed. ``set_hyper`` gives the optimizer a batch's settings. ``clips``: the global-norm
    clips ``(max_norm, norm_type)`` of each update's gradient ('2bw' only; ``_clip``), whose
    norms are summed over ``clip_group`` (the same stages as ``group``, a group of their own).
    """

    def __init__(
        self,
        schedule: str,
        chunk: nn.Module,
        optimizer: torch.optim.Optimizer,
        *,
        stage: int,
        n_stages: int,
        n_microbatches: int,
        batch_rows: int,
        boundaries: tuple[Boundary, Boundary],
        device: torch.device,
        loss: WeightedLoss | None,
        group: Any,
        prev: int | None,
        next: int | None,
        replica_group: Any = None,
        set_hyper: Callable[[torch.optim.Optimizer, list[dict[str, Any]]], None],
        span_rank: int = 0,
        clips: Sequence[tuple[float, float]] = (),
        clip_group: Any = None,
    ) -> None:
        self.schedule = schedule
        self.chunk: Any = chunk  # its micro-batch index and real rows are set per forward
        self.optimizer = optimizer
        self.stage, self.p, self.m = stage, n_stages, n_microbatches
        self.rows = batch_rows
        self.boundaries = boundaries
        self.device = device
        self.loss = loss
        self.own_loss = None if loss is None else WeightedLoss(loss.criterion)
        self.group, self.prev, self.next = group, prev, next
        self.replica_group = replica_group
        self.set_hyper = set_hyper
        self.span_rank = span_rank
        if clips and schedule != "2bw":
            raise ValueError(f"only '2bw' clips by the global gradient norm; got {schedule!r}")
        self.clip = GlobalNormClip(clips, clip_group)
        self._pending: _Update | None = None  # an update waiting for its batch's norm
        self.params = dict(chunk.named_parameters())
        self.versions: dict[int, list[torch.Tensor]] = {0: self._snapshot()}
        self.batches_done = 0  # batches of the fit whose updates are done (drained)
        self.fed = 0  # batches the driver gave (their step messages)
        self.mailbox = Mailbox()
        self.thread: threading.Thread | None = None
        self.record: range = range(0)  # batches whose spans are recorded
        self.spans: list[Span] = []
        self.meter: Any = None  # an ActivationMeter while memory is tracked
        # work in flight, between ticks
        self._saved: dict[int, tuple[list[torch.Tensor], list[torch.Tensor], Any, int]] = {}
        self._grads: list[torch.Tensor | None] = [None] * len(self.params)
        self._forwards = 0  # forwards of the fit done: the next one's micro-batch
        self._real_since_update = 0  # real rows behind the gradient of the next update
        self._hyper_batch = -1  # the batch whose settings the optimizer holds
        self._sends: list[tuple[Any, torch.Tensor]] = []
        # receives posted one micro-batch ahead: ('F' | 'B', mb) -> (works, buffers)
        self._posted: dict[tuple[str, int], tuple[list[Any], list[torch.Tensor]]] = {}
        self._end_mb = 0  # the window's micro-batches end here
        self._outs: list[torch.Tensor] = []
        self._loss_parts: list[torch.Tensor] = []
        self._targets = torch.empty(0, dtype=torch.long)  # the batch's row of each position

    # -- versions ------------------------------------------------------------------------------
    def _snapshot(self) -> list[torch.Tensor]:
        """The live weights as a version, without a copy: tensors on the parameters' own
        storage with version counters of their own (``_update`` moves the parameters to a copy
        before the optimizer steps them, so this storage is never written again)."""
        with torch.no_grad():
            return [
                torch.empty(0, dtype=p.dtype, device=p.device).set_(
                    p.untyped_storage(), p.storage_offset(), p.size(), p.stride())
                for p in self.params.values()
            ]

    def _drop_unused_versions(self) -> None:
        """Let go of the versions no later forward uses (in-flight work holds its own)."""
        floor = version(self.schedule, self.stage, self._forwards, self.p, self.m)
        for v in [v for v in self.versions if v < floor]:
            del self.versions[v]

    def _weights(self, v: int) -> dict[str, torch.Tensor]:
        return {
            name: t.detach().requires_grad_(p.requires_grad)
            for (name, p), t in zip(self.params.items(), self.versions[v], strict=True)
        }

    def write_versions(self, values: dict[str, torch.Tensor]) -> None:
        """A callback wrote ``values`` (parameter name -> tensor) between epochs: every version
        the next forwards may use takes them too."""
        names = list(self.params)
        with torch.no_grad():
            for tensors in self.versions.values():
                for name, value in values.items():
                    if name in self.params:
                        tensors[names.index(name)].copy_(value)

    def stash(self) -> dict[str, Any]:
        """What this stage's rule needs besides its live weights and optimizer state, between
        epochs (the pipeline drained: every gradient taken is applied): the fit's batch count
        and every weight version a later forward may use, in the parameters' order."""
        if self.thread is not None:
            raise RuntimeError("an asynchronous stage's stash was asked for during an epoch")
        return {
            "stage": self.stage,
            "batches_done": self.batches_done,
            "versions": {v: [t.detach().cpu() for t in ts] for v, ts in self.versions.items()},
        }

    def load_stash(self, stash: dict[str, Any]) -> None:
        """Continue the rule where a saved ``stash`` of this stage left it."""
        if self.thread is not None:
            raise RuntimeError("an asynchronous stage's stash was loaded during an epoch")
        saved = {int(v): ts for v, ts in stash["versions"].items()}
        shapes = [tuple(p.shape) for p in self.params.values()]
        for v, ts in saved.items():
            if [tuple(t.shape) for t in ts] != shapes:
                raise ValueError(
                    f"the checkpoint's weight version {v} of stage {self.stage} does not match "
                    "its parameters' shapes; resume with the same network and split"
                )
        newest = max(saved)  # the live weights, which the checkpoint's tensors already set
        self.versions = {v: [t.to(self.device).clone() for t in ts]
                         for v, ts in saved.items() if v != newest}
        self.versions[newest] = self._snapshot()
        self.batches_done = self.fed = int(stash["batches_done"])
        self._forwards = self.batches_done * self.m

    # -- driving (the thread that answers the driver) ------------------------------------------
    def begin(self, n_batches: int) -> None:
        """Start the stage's thread on the next ``n_batches`` batches of the fit (an epoch)."""
        if self.thread is not None:
            raise RuntimeError("an asynchronous epoch began before the last one ended")
        ticks = async_order(self.schedule, self.p, self.m, n_batches, self.batches_done)[
            self.stage]
        self.thread = threading.Thread(
            target=self._run, args=(ticks, n_batches), name="skpipe-async-stage", daemon=True
        )
        self.thread.start()

    def give(self, hyper: list[dict[str, Any]] | None, rows: dict[int, BatchRows]) -> int:
        """The next batch's step: the settings its update uses and the rows of the batches
        given (it and, one ahead, the next). Returns the batch's index in the fit."""
        batch = self.fed
        self.fed += 1
        self.mailbox.give(batch, hyper, rows)
        return batch

    def result(self, batch: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The loss and outputs of ``batch`` (last stage), once its forwards are done."""
        return self.mailbox.result(batch)

    def end(self) -> None:
        """Wait for the epoch's drain (every update done); raise what the thread raised."""
        thread, self.thread = self.thread, None
        if thread is not None:
            while thread.is_alive():
                thread.join(timeout=0.5)
        if self.mailbox.error is not None:
            raise PipelineFailed(self.mailbox.error)

    # -- the stage's thread --------------------------------------------------------------------
    def _run(self, ticks: list[Tick], n_batches: int) -> None:
        import traceback

        try:
            if self.meter is not None:
                with self.meter.track():
                    self._run_ticks(ticks)
            else:
                self._run_ticks(ticks)
            for work, _ in self._sends:
                work.wait()
            self._sends.clear()
            self.batches_done += n_batches
        except BaseException:  # noqa: BLE001 - the driver gets it with the next message
            self.mailbox.fail(traceback.format_exc())

    def _receive(self, kind: str, mb: int, like: Sequence[torch.Tensor] | None = None
                 ) -> list[torch.Tensor]:
        """What the neighbour sends for micro-batch ``mb`` (its activations for 'F', from the
        previous stage; its gradients for 'B', from the next), posted ahead where it could be;
        the receive of the next micro-batch is posted now, so that it arrives during the work."""
        posted = self._posted.pop((kind, mb), None)
        works, buffers = posted if posted is not None else self._post(kind, mb, like)
        for work in works:
            work.wait()
        if mb + 1 < self._end_mb and (kind == "F" or like is None):
            self._posted[(kind, mb + 1)] = self._post(kind, mb + 1, like)
        return buffers

    def _post(self, kind: str, mb: int, like: Sequence[torch.Tensor] | None
              ) -> tuple[list[Any], list[torch.Tensor]]:
        size = self.rows // self.m
        if kind == "F":
            buffers = list(boundary_tensors(self.boundaries[0], size, self.device, False))
            peer = self.prev
        else:
            buffers = [torch.empty_like(t) for t in like] if like is not None else list(
                boundary_tensors(self.boundaries[1], size, self.device, False))
            peer = self.next
        works = [dist.irecv(t, group_src=peer, group=self.group) for t in buffers]
        return works, buffers

    def _run_ticks(self, ticks: list[Tick]) -> None:
        self._end_mb = max((t.mb for t in ticks), default=-1) + 1
        for tick in ticks:
            batch, k = divmod(tick.mb, self.m)
            pending = self._pending
            if pending is not None and (tick.kind == "U" or tick.version >= pending.version):
                self._pending = None
                self._apply(pending)
            t0 = time.time()
            if tick.kind == "F":
                self._forward(tick, batch, k)
            elif tick.kind == "B":
                self._backward(tick, batch, k)
            else:
                self._update(tick, batch)
            if tick.kind != "U" and batch in self.record:
                self.spans.append(Span(batch, self.span_rank, self.stage, tick.kind, k, t0,
                                       time.time()))
            self._drop_unused_versions()
            self._sends = [(w, t) for w, t in self._sends if not w.is_completed()]
        if self._pending is not None:  # the drain: every update of the epoch is done
            pending, self._pending = self._pending, None
            self._apply(pending)

    def _forward(self, tick: Tick, batch: int, k: int) -> None:
        rows = self.mailbox.rows(batch)
        size = self.rows // self.m
        counts = microbatch_counts(rows.n_real, self.m)
        self.chunk.calls = k  # which micro-batch of its batch: recomputation, BatchNorm rows
        self.chunk.real_rows = counts
        if self.prev is None:
            x = pad_rows(_given(rows.x, "the batch's inputs").to(self.device), self.rows, self.m)
            inputs = [x[k * size:(k + 1) * size]]
        else:
            inputs = [t.requires_grad_(True) for t in self._receive("F", tick.mb)]
        weights = self._weights(tick.version)
        out = functional_call(self.chunk, weights, tuple(inputs))
        if self.next is None:
            out = self._loss(out, rows, batch, k, counts)
        else:
            for t in leaves(out):
                t = t.detach().contiguous()
                self._sends.append((dist.isend(t, group_dst=self.next, group=self.group), t))
        self._saved[tick.mb] = (inputs, list(weights.values()), out, counts[k])
        self._forwards += 1
        if k == self.m - 1:
            self.mailbox.drop_rows(batch)

    def _loss(self, out: Any, rows: BatchRows, batch: int, k: int,
              counts: list[int]) -> torch.Tensor:
        """The last stage's loss of micro-batch k: its part of the batch's loss ('2bw', summed
        over the batch's micro-batches), or its own mean ('pipedream', one update each); the
        batch's loss and outputs go to the driver after its last micro-batch."""
        loss = _given(self.loss, "a loss (it holds the last chunk)")
        own_loss = _given(self.own_loss, "a loss (it holds the last chunk)")
        size = self.rows // self.m
        y = _given(rows.y, "the batch's targets").to(self.device)
        w = None if rows.w is None else rows.w.to(self.device)
        if k == 0:
            loss.set_batch(y, rows.n_real, w, total_rows=rows.total_rows,
                                total_weight=rows.total_weight, denominator=rows.denominator)
            self._outs, self._loss_parts = [], []
            self._targets = row_targets(rows.n_real, self.rows, self.device, self.m)
        idx = self._targets[k * size:(k + 1) * size]
        part = loss(out, idx)
        self._loss_parts.append(part.detach().float())
        self._outs.append(out.detach())
        if self.schedule == "pipedream":  # the micro-batch's own mean drives its update
            start = sum(counts[:k])
            real = slice(start, start + counts[k])
            own_loss.set_batch(y[real], counts[k], None if w is None else w[real])
            local = torch.full((size,), -1, dtype=torch.long, device=self.device)
            local[: counts[k]] = torch.arange(counts[k], device=self.device)
            part = own_loss(out, local)
        if k == self.m - 1:
            whole = torch.cat(self._outs)
            if rows.n_real != self.rows:
                whole = whole[real_positions(rows.n_real, self.rows, self.m, whole.device)]
            self.mailbox.put_result(batch, torch.stack(self._loss_parts).sum(), whole)
        return part

    def _backward(self, tick: Tick, batch: int, k: int) -> None:
        inputs, held, out, real = self._saved.pop(tick.mb)
        outs = list(leaves(out))
        grad_outs: list[torch.Tensor] | None = None
        if self.next is not None:
            grad_outs = self._receive("B", tick.mb)
        wants = [t for t in inputs if t.requires_grad] + [t for t in held if t.requires_grad]
        grads = list(torch.autograd.grad(outs, wants, grad_outs, allow_unused=True))
        n_in = sum(t.requires_grad for t in inputs)
        if self.prev is not None:
            for g, t in zip(grads[:n_in], inputs, strict=False):
                g = torch.zeros_like(t) if g is None else g.contiguous()
                self._sends.append((dist.isend(g, group_dst=self.prev, group=self.group), g))
        it = iter(grads[n_in:])
        for i, t in enumerate(held):
            if not t.requires_grad:
                continue
            g = next(it)
            before = self._grads[i]
            if g is not None:  # summed in place: the first is the backward's own new tensor
                self._grads[i] = g if before is None else before.add_(g)
        self._real_since_update += real

    def _update(self, tick: Tick, batch: int) -> None:
        """The stage's update: its batch's settings, the gradient summed over the replicas,
        the optimizer's step (none for a micro-batch without rows: nothing was learned), and
        the new weights kept as the next version. Where the gradient is clipped by its global
        norm, the step waits (``_pending``) until the stages' parts of the norm are in."""
        hyper = None
        if batch != self._hyper_batch:
            hyper = self.mailbox.hyper(batch)
            self._hyper_batch = batch
        grads = self._grads
        self._grads = [None] * len(grads)
        if self.replica_group is not None:
            _sum_over(grads, list(self.params.values()), self.replica_group)
        update = _Update(tick.version, grads, hyper,
                         self._real_since_update > 0 or self.replica_group is not None)
        self._real_since_update = 0
        if self.clip:
            update.norms = self.clip.post(grads, self.device)
            self._pending = update
        else:
            self._apply(update)

    def _apply(self, update: _Update) -> None:
        if update.hyper is not None:
            self.set_hyper(self.optimizer, update.hyper)
        scale = 1.0 if update.norms is None else self.clip.coefficient(update.norms)
        if update.step:
            # the versions still used keep the weights' storage; the parameters move to a copy,
            # which the optimizer steps (live + the stashed versions: no copy besides)
            self._drop_unused_versions()
            with torch.no_grad():
                for p, g in zip(self.params.values(), update.grads, strict=True):
                    copy = p.detach().clone()
                    p.set_(copy.untyped_storage(), 0, copy.size(), copy.stride())
                    if g is not None and scale != 1.0:
                        g.mul_(scale)
                    p.grad = g
            self.optimizer.step()
            self.optimizer.zero_grad(set_to_none=True)
        self.versions[update.version] = self._snapshot()


@dataclass
class _Update:
    """A stage's update, between its batch's last backward and its optimizer step."""

    version: int  # the version it makes
    grads: list[torch.Tensor | None]
    hyper: list[dict[str, Any]] | None  # the batch's optimizer settings (None: unchanged)
    step: bool  # False: no rows behind it, nothing learned
    norms: PostedNorms | None = None


def _sum_over(grads: list[torch.Tensor | None], params: Sequence[torch.Tensor], group: Any) -> None:
    """Sum each gradient over the replicas (in place; a missing one counts as zeros)."""
    full = [torch.zeros_like(p) if g is None else g for g, p in zip(grads, params, strict=True)]
    if not full:
        return
    flat = torch.cat([g.reshape(-1) for g in full])
    dist.all_reduce(flat, group=group)
    offset = 0
    for i, g in enumerate(full):
        n = g.numel()
        grads[i] = flat[offset:offset + n].view_as(g)
        offset += n


def _given(value: Any, what: str) -> Any:
    if value is None:
        raise RuntimeError(f"the asynchronous stage needs {what}, and was given None")
    return value
