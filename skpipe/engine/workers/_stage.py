"""The stages one process holds: torch PipelineStages with static shapes, the schedule, the
optimizer shard, checkpointing, and a forward-only path for prediction.

The same ``StageHost`` serves all homes: every chunk in the user's process (``local``), one rank's
chunks in a spawned worker, or one rank's chunks under ``torchrun``.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.pipelining import PipelineStage
from torch.distributed.pipelining.schedules import PipelineScheduleSingle

from ..parallel._groups import MeshGroups
from ..parallel._replicas import ReplicaGradients
from ..parallel._sharding import (
    global_norm,
    reshard,
    shard_replicas,
)
from ..parallel._tensor import shard_layers
from ..plan import _schedules
from ..plan._config import PipelineConfig, TrainSpec
from ..plan._memory import ActivationMeter
from ..plan._microbatch import (
    WeightedLoss,
    microbatch_counts,
    pad_rows,
    real_positions,
    row_targets,
)
from ..plan._timeline import Recorder, Span
from ..split._partition import Boundary, boundary_tensors, leaves
from ._async import async_stage
from ._chunk import ChunkModule
from ._optimizer import stage_optimizer
from ._stage_state import StageState
from ..state._named import (
    hyperparameters,
    set_hyperparameters,
)


class StageHost(StageState):
    """The chunks one process owns, their torch stages, schedule and optimizer."""

    def __init__(
        self,
        chunks: dict[int, nn.Sequential],
        config: PipelineConfig,
        spec: TrainSpec,
        shapes: Sequence[Boundary],
        *,
        rank: int,
        device: str,
        group: dist.ProcessGroup,
        replica: int = 0,
        replica_group: dist.ProcessGroup | None = None,
        mesh: MeshGroups | None = None,
        tensor_rank: int = 0,
        tensor_styles: dict[int, dict[str, Any]] | None = None,
    ) -> None:
        """``rank``: this process's stage in its pipeline, whose processes form ``group``;
        ``replica``: which copy of the pipeline it belongs to, and ``replica_group`` the same
        stage of every replica (None with one replica), over which gradients are summed;
        ``mesh``: its device meshes where the stage is split over tensor ranks (this rank is
        ``tensor_rank`` of them; ``tensor_styles`` per chunk: ``parallel._tensor``) or its
        replicas shard their state (``config.shard``)."""
        self.config = config
        self.rank = rank
        self.replica = replica
        self.replica_group = replica_group
        self.device = torch.device(device)
        self.group = group
        self.shapes = list(shapes)
        self.chunk_ids = sorted(chunks)
        self.world_size = dist.get_world_size(group)
        m = config.n_microbatches
        self.chunks = {
            c: ChunkModule(
                list(chunks[c]),
                index=c,
                checkpoint=config.checkpoint,
                n_microbatches=m,
                precision=config.precision,
            ).to(self.device)
            for c in self.chunk_ids
        }
        # tensor shards (DTensor), then the replicas' shards (FSDP2) of each chunk's layers
        self.tensor_rank = tensor_rank
        self.owns_state = tensor_rank == 0 and replica == 0  # writes and sends the state
        self.sharded: list[nn.Module] = []
        if mesh is not None and mesh.tensor is not None:
            for c in self.chunk_ids:
                shard_layers(self.chunks[c].layers, mesh.tensor, (tensor_styles or {}).get(c, {}))
        if mesh is not None and config.shard != "none":
            for c in self.chunk_ids:
                self.sharded += shard_replicas(self.chunks[c].layers, mesh.replica_mesh,
                                               config.shard)
        self.holds_first = 0 in self.chunks
        self.holds_last = (config.n_chunks - 1) in self.chunks
        self.loss = WeightedLoss(spec.criterion.to(self.device))
        # the global-norm clips: the callbacks' (GradientNormClipping), then max_grad_norm
        self.clips = list(spec.grad_clips) + (
            [] if config.max_grad_norm is None else [(config.max_grad_norm, 2.0)]
        )
        params = [p for c in self.chunk_ids for p in self.chunks[c].parameters()]
        self.optimizer = stage_optimizer(spec, params)
        # skpipe's own asynchronous schedules run in a thread of their own (engine/asyncpipe)
        self.pipe = async_stage(self, replica_group) if self.asynchronous else None
        self._schedule: Any = None if self.pipe else self._build_schedule()
        self.meter: ActivationMeter | None = None
        # a batch's forward and backward done, its update not yet (see compute_gradients)
        self._computed: tuple[Any, ...] | None = None
        self._recorded = False  # whether the timeline recorded that batch
        # timeline rows are ranks of the whole (replica x stage x tensor) mesh
        self.recorder = Recorder(
            config.rank_of(replica, rank, tensor_rank),
            lambda chunk: config.rank_of(replica, config.owner(chunk), tensor_rank),
            device,
        )
        # summing the gradients over the replicas, overlapped with the backward where the
        # schedule's backward lets autograd accumulate them (not the zero-bubble ones)
        self.replica_grads = (
            None
            if replica_group is None or self.pipe or self.sharded
            else ReplicaGradients(
                params,
                replica_group,
                m,
                overlap=not _schedules.SCHEDULES[self.schedule_name].zero_bubble,
            )
        )

    @property
    def asynchronous(self) -> bool:
        return _schedules.SCHEDULES[self.schedule_name].asynchronous

    def record_timeline(self, steps: int) -> None:
        """Record the spans of the next ``steps`` steps (every tensor shard its own row)."""
        self.recorder.steps_left = steps
        if self.pipe:
            self.pipe.record = range(self.pipe.fed, self.pipe.fed + steps)

    def spans(self) -> list[Span]:
        return list(self.recorder.spans) + (list(self.pipe.spans) if self.pipe else [])

    def track_memory(self, on: bool = True) -> None:
        """Measure the activations held for backward during each step (peak per process)."""
        self.meter = (
            ActivationMeter(p for c in self.chunks.values() for p in c.parameters()) if on else None
        )
        if self.pipe:
            self.pipe.meter = self.meter

    def stats(self) -> dict[str, float]:
        sums = self.replica_grads
        return {
            "peak_activation_bytes": float(self.meter.peak) if self.meter else float("nan"),
            # the wait for the replicas' gradient sums after the backward (what overlap left)
            "gradient_sync_ms_per_step": (
                1e3 * sums.exposed_seconds / sums.steps if sums and sums.steps else float("nan")
            ),
            "gradient_bytes": float(
                sum(p.numel() * p.element_size() for c in self.chunks.values()
                    for p in c.parameters())
            ),
        }

    # -- building --------------------------------------------------------------------------
    @property
    def schedule_name(self) -> str:
        """The schedule that runs: the configured one, or with one stage (a data-parallel
        replica of the whole network, nothing to interleave) GPipe's."""
        return self.config.schedule if self.config.n_stages > 1 else "gpipe"

    def _stage(self, c: int) -> PipelineStage:
        mb = self.config.microbatch_rows
        n_chunks = self.config.n_chunks
        return PipelineStage(
            self.chunks[c],
            c,
            n_chunks,
            self.device,
            input_args=boundary_tensors(self.shapes[c], mb, self.device, requires_grad=c > 0),
            output_args=boundary_tensors(self.shapes[c + 1], mb, self.device, True),
            group=self.group,
        )

    def _build_schedule(self) -> Any:  # torch's schedule base classes are private
        # with every stage in this one process, the schedule's local stand-in runs them
        local = self.world_size == 1 and self.config.n_stages > 1
        cls = _schedules.SCHEDULES[self.schedule_name].schedule_class(local=local)
        stages = [self._stage(c) for c in self.chunk_ids]
        self.stages = dict(zip(self.chunk_ids, stages, strict=True))
        m = self.config.n_microbatches
        if issubclass(cls, PipelineScheduleSingle):
            return cls(stages[0], m, loss_fn=self.loss, scale_grads=False)
        return cls(stages, m, loss_fn=self.loss, scale_grads=False)

    # -- training ----------------------------------------------------------------------------
    def train(self, mode: bool = True) -> None:
        for chunk in self.chunks.values():
            chunk.train(mode)

    def train_step(
        self,
        x: torch.Tensor | None,
        y: torch.Tensor | None,
        n_real: int,
        w: torch.Tensor | None = None,
        *,
        total_rows: int | None = None,
        total_weight: float | None = None,
        hyper: list[dict[str, Any]] | None = None,
        denominator: float | None = None,
        on_grads: Callable[[], None] | None = None,
    ) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """One optimizer step over a batch of ``n_real`` rows.

        ``x`` is needed where the first chunk lives, ``y`` (and the rows' weights ``w``, if any)
        where the last one lives. With replicas these are this replica's share of a batch of
        ``total_rows`` rows (of weight ``total_weight``). Returns the loss of these rows (their
        part of the batch loss) and their outputs on the process holding the last chunk.
        ``hyper``: the optimizer's settings, when the driver's callbacks changed them;
        ``denominator``: the whole batch's class-weight sum (``WeightedLoss``); ``on_grads``:
        called with the batch's gradients, before they are clipped and stepped.
        """
        self.compute_gradients(
            x, y, n_real, w, total_rows=total_rows, total_weight=total_weight,
            denominator=denominator,
        )
        return self.update(hyper, on_grads)

    def compute_gradients(
        self,
        x: torch.Tensor | None,
        y: torch.Tensor | None,
        n_real: int,
        w: torch.Tensor | None = None,
        *,
        total_rows: int | None = None,
        total_weight: float | None = None,
        denominator: float | None = None,
    ) -> None:
        """The first half of ``train_step``: the batch's forward and backward, and the
        gradients summed over the replicas; the weights and the optimizer are left as they are
        (``update`` steps them, ``discard_gradients`` drops what this computed)."""
        self.train(True)
        self.optimizer.zero_grad(set_to_none=True)
        m = self.config.n_microbatches
        counts = microbatch_counts(n_real, m)
        for chunk in self.chunks.values():
            chunk.calls = 0
            chunk.real_rows = counts
        rows = self.config.batch_rows
        args: tuple[torch.Tensor, ...] = ()
        if self.holds_first:
            x = _given(x, f"the batch's inputs (rank {self.rank} holds the first chunk)")
            args = (pad_rows(x.to(self.device, non_blocking=True), rows, m),)
        target = None
        losses: list[torch.Tensor] = []
        if self.holds_last:
            y = _given(y, f"the batch's targets (rank {self.rank} holds the last chunk)")
            self.loss.set_batch(
                y.to(self.device, non_blocking=True),
                n_real,
                None if w is None else w.to(self.device, non_blocking=True),
                total_rows=total_rows,
                total_weight=total_weight,
                denominator=denominator,
            )
            target = row_targets(n_real, rows, self.device, m)
        if self.replica_grads is not None:
            self.replica_grads.begin()
        uninstall = None
        if self.recorder.steps_left > 0:
            uninstall = self.recorder.install(self.stages)
        try:
            collected = losses if self.holds_last else None
            if self.meter is not None:
                with self.meter.track():
                    out = self._schedule.step(*args, target=target, losses=collected)
            else:
                out = self._schedule.step(*args, target=target, losses=collected)
        finally:
            if uninstall is not None:
                uninstall()
                self.recorder.steps_left -= 1
            self.recorder.step += 1
        self._recorded = uninstall is not None
        if self.replica_grads is not None:
            self.replica_grads.finish()  # the batch's gradient: the replicas' parts summed
        self._computed = (losses, out, n_real, rows, m)

    def update(
        self,
        hyper: list[dict[str, Any]] | None = None,
        on_grads: Callable[[], None] | None = None,
    ) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """The second half of ``train_step``: the optimizer's new settings (if any), the
        gradients clipped and stepped; the loss and outputs of the computed batch."""
        if self._computed is None:
            raise RuntimeError("a stage was asked to update before it computed a batch")
        losses, out, n_real, rows, m = self._computed
        self._computed = None
        if hyper is not None:
            self.hyperparameters(hyper)
        if on_grads is not None:
            on_grads()
        for max_norm, norm_type in self.clips:
            self.clip_gradients(max_norm, norm_type)
        self.optimizer.step()
        if not self.holds_last:
            return None, None
        total = torch.stack([loss.detach().float() for loss in losses]).sum()
        if n_real != rows:
            out = out[real_positions(n_real, rows, m, out.device)]
        return total, out.detach()

    def clip_gradients(self, max_norm: float, norm_type: float = 2.0) -> None:
        """Clip by the global ``norm_type``-norm over every stage of the pipeline (all ranks
        agree), as ``torch.nn.utils.clip_grad_norm_`` clips one device's gradients."""
        grads = [
            p.grad
            for c in self.chunk_ids
            for p in self.chunks[c].parameters()
            if p.grad is not None
        ]
        total = global_norm(grads, norm_type, self.device, self.group)
        coef = max_norm / (total + 1e-6)
        if coef < 1.0:
            for g in grads:
                g.mul_(coef)

    # -- what the driver's callbacks change ------------------------------------------------
    @property
    def computed(self) -> bool:
        """Whether a batch's gradients are computed and its update is still to come."""
        return self._computed is not None

    def discard_gradients(self) -> None:
        """Drop what ``compute_gradients`` computed: the weights and the optimizer are as if it
        had not run (its batch can be computed again)."""
        self.optimizer.zero_grad(set_to_none=True)
        if self._computed is not None:  # its place in the timeline back, its spans dropped
            rec = self.recorder
            rec.step -= 1
            if self._recorded:
                rec.steps_left += 1
                rec.spans = [span for span in rec.spans if span.step != rec.step]
        self._computed = None

    def hyperparameters(self, groups: list[dict[str, Any]] | None = None) -> list[dict[str, Any]]:
        """Give the optimizer the settings ``groups`` (None: leave them); its settings."""
        if groups is not None:
            set_hyperparameters(self.optimizer, groups)
        return hyperparameters(self.optimizer)

    # -- inference ---------------------------------------------------------------------------
    @torch.no_grad()
    def forward(self, x: torch.Tensor | None, n_rows: int) -> torch.Tensor | None:
        """Forward-only pass of ``n_rows`` rows through every chunk, in eval mode.

        Activations cross ranks with plain send/recv (torch's ``schedule.eval`` cannot run when
        adjacent stages share a rank). Returns the output where the last chunk lives.
        """
        self.train(False)
        n_chunks = self.config.n_chunks
        if n_rows == 0:  # a replica given no rows of a small batch (its ranks all know it)
            if not self.holds_last:
                return None
            return boundary_tensors(self.shapes[-1], 0, "cpu", False)[0]
        h: Any = None
        for c in range(n_chunks):
            if c not in self.chunks:
                continue
            if c == 0:
                h = _given(x, f"the rows to predict (rank {self.rank} holds the first chunk)")
                h = (h.to(self.device),)
            elif c - 1 not in self.chunks:
                h = boundary_tensors(self.shapes[c], n_rows, self.device, False)
                for t in h:
                    dist.recv(t, group_src=self.config.owner(c - 1), group=self.group)
            out = self.chunks[c](*_given(h, f"chunk {c - 1}'s output"))
            h = leaves(out)
            if c + 1 < n_chunks and c + 1 not in self.chunks:
                for t in h:
                    dist.send(t.contiguous(), group_dst=self.config.owner(c + 1), group=self.group)
        reshard(self.sharded)  # FSDP2 keeps what a forward-only pass gathered
        return h[0] if self.holds_last else None

    def drop_training_state(self) -> None:
        """Free gradients, optimizer state and gradient buckets (the host trains no more)."""
        self.optimizer.zero_grad(set_to_none=True)
        self.optimizer.state.clear()
        if self.replica_grads is not None:
            self.replica_grads.close()
            self.replica_grads = None

    def close(self) -> None:
        if self.replica_grads is not None:
            self.replica_grads.close()
        for chunk in self.chunks.values():
            chunk.release()
        self._schedule = None
        self.chunks.clear()
        self.optimizer = None  # type: ignore[assignment]


def _given(value: Any, what: str) -> Any:
    """``value``, which the caller had to pass; a clear error where it did not."""
    if value is None:
        raise RuntimeError(f"StageHost needs {what}, and was given None")
    return value
