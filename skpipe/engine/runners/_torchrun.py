"""Every rank of a torchrun (or cluster-launched) job holds one stage of one replica; all ranks
run the same loop over the same data (each replica's ranks step on its share of every batch), so
each sees the same history and ends with the whole network."""

from __future__ import annotations

import copy
import math
import os
from collections.abc import Callable, Sequence
from typing import Any, ClassVar

import torch
import torch.distributed as dist
from torch import nn

from ..parallel._groups import broadcast_object, job_world, mesh_groups
from ..parallel._tensor import stage_styles
from ..plan._config import TrainSpec
from ..plan._microbatch import class_weight_sum, class_weighted, replica_shares
from ..plan._plan import Plan
from ..plan._timeline import Span
from ..split._construct import materialize, materialize_all
from ..asyncpipe._mailbox import BatchRows
from ..workers._async import step as async_step
from ._hyper import HyperChannel, driver_optimizer
from ._runner import Runner


class TorchrunRunner(Runner):
    # the job's launcher gave each process its device: nothing to lease
    leases_devices: ClassVar[bool] = False
    # each rank trains its own stage's layers of ``module`` in place; the others are copies
    weights_in_driver: ClassVar[bool] = False

    def __init__(self, plan: Plan, module: nn.Module, spec: TrainSpec, seed: int = 0) -> None:
        super().__init__(plan, module, spec, seed)
        cfg = self.config
        job_world(cfg.devices[0], cfg.n_stages, cfg.n_replicas, cfg.tensor_parallel)
        self.rank = dist.get_rank()
        device = cfg.devices[self.rank] if cfg.devices[0] != "cpu" else "cpu"
        if device.startswith("cuda"):
            device = f"cuda:{int(os.environ.get('LOCAL_RANK', self.rank))}"
            torch.cuda.set_device(device)
        self.device = device
        self.stage = cfg.stage_of(self.rank)
        self.replica = cfg.replica_of(self.rank)
        self.tensor = cfg.tensor_of(self.rank)
        self.host = self._host(plan, module, spec)
        self.last = cfg.owner(cfg.n_chunks - 1)
        # an asynchronous schedule steps in a thread of its own: the callbacks change a
        # stand-in's settings, which go with each batch (as to spawned stages)
        self._optimizer = self.host.optimizer
        self._upcoming: tuple[Any, Any, Any] | None = None
        self._ahead = False
        if self.asynchronous:
            real = self.host.optimizer
            self._optimizer = driver_optimizer(spec, real.state_dict, real.load_state_dict)
            self.hyper = HyperChannel(self._optimizer)

    def _host(self, plan: Plan, module: nn.Module, spec: TrainSpec) -> Any:
        from ..workers._stage import StageHost

        cfg = self.config
        mesh = mesh_groups(cfg.n_replicas, cfg.n_stages, self.device, cfg.tensor_parallel)
        chunks = plan.chunks(module, self.stage)
        materialize_all(chunks)  # this rank's layers only, where the network was built on meta
        if cfg.collective_state:
            # sharding rewrites the layers it shards: shard a copy, and leave module's own
            # layers plain, their values let go (collect brings every tensor back whole)
            own, chunks = chunks, {c: copy.deepcopy(chunk) for c, chunk in chunks.items()}
            for chunk in own.values():
                chunk.to("meta")
        styles = (
            stage_styles(chunks, plan.state_names(module, self.stage), cfg.tp_plan)
            if cfg.tensor_parallel > 1
            else None
        )
        return StageHost(
            chunks,
            cfg,
            spec,
            plan.shapes,
            rank=self.stage,
            device=self.device,
            group=mesh.pipeline,
            replica=self.replica,
            replica_group=mesh.replicas,
            mesh=mesh,
            tensor_rank=self.tensor,
            tensor_styles=styles,
        )

    @staticmethod
    def agree_seed(seed: int) -> int:
        """Rank 0's seed on every rank, so that all ranks build the same network and batches."""
        return int(broadcast_object(seed))  # type: ignore[call-overload]

    @property
    def optimizer(self) -> torch.optim.Optimizer:
        return self._optimizer

    def _gather_rows(
        self, n: int, loss: torch.Tensor | None, out: torch.Tensor | None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Every replica's loss (summed) and output rows (in batch order), on every rank: the
        rank holding a replica's last chunk fills that replica's slot, the others add zeros."""
        cfg = self.config
        shares = replica_shares(n, cfg.n_replicas)
        widest = max(s.stop - s.start for s in shares)
        width = math.prod(self.plan.output_shape)
        buf = torch.zeros((cfg.n_replicas, 1 + widest * width), device=self.device)
        if self.stage == self.last and self.tensor == 0:  # a stage's shards agree
            slot = buf[self.replica]
            if loss is not None:
                slot[0] = loss.reshape(())
            if out is not None and out.numel():
                slot[1 : 1 + out.numel()] = out.reshape(-1).to(buf.dtype)
        dist.all_reduce(buf)
        buf = buf.cpu()
        outs = [
            buf[r, 1 : 1 + (s.stop - s.start) * width].reshape(
                (s.stop - s.start,) + self.plan.output_shape
            )
            for r, s in enumerate(shares)
        ]
        return buf[:, 0].sum(), torch.cat(outs)

    def train_step(
        self,
        x: torch.Tensor,
        y: torch.Tensor,
        w: torch.Tensor | None = None,
        on_grads: Callable[[], None] | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        if on_grads is not None:  # the estimator refuses such callbacks before any rank trains
            raise RuntimeError("a torchrun rank holds one stage's gradients, not the network's")
        n = x.shape[0]
        mine = self._share(x, y, w)
        if self.asynchronous:
            loss, out = self._async_step(mine)
        else:
            loss, out = self.host.train_step(
                mine.x, mine.y, mine.n_real, mine.w, total_rows=n,
                total_weight=mine.total_weight, denominator=mine.denominator,
            )
        return self._gather_rows(n, loss, out)

    def _share(self, x: torch.Tensor, y: torch.Tensor, w: torch.Tensor | None) -> BatchRows:
        """This rank's replica's share of a batch, with the whole batch's figures."""
        n = x.shape[0]
        rows = replica_shares(n, self.config.n_replicas)[self.replica]
        denominator = None
        if self.config.n_replicas > 1 and class_weighted(self.spec.criterion):
            denominator = class_weight_sum(self.spec.criterion, y)
        return BatchRows(
            rows.stop - rows.start, x[rows], y[rows], None if w is None else w[rows],
            total_rows=n, total_weight=None if w is None else float(w.sum()),
            denominator=denominator,
        )

    # -- asynchronous epochs: this rank's stage runs on while the loop waits for each loss ----
    def begin_epoch(self, n_batches: int) -> None:
        if self.asynchronous:
            self._ahead, self._upcoming = False, None
            self.host.pipe.begin(n_batches)

    def prefetch(self, x: Any, y: Any, w: Any) -> None:
        self._upcoming = None if x is None else (x, y, w)

    def _async_step(self, mine: BatchRows) -> tuple[Any, Any]:
        pipe = self.host.pipe
        rows = {} if self._ahead else {pipe.fed: mine}
        if self._upcoming is not None:
            rows[pipe.fed + 1] = self._share(*self._upcoming)
        self._ahead, self._upcoming = self._upcoming is not None, None
        result = async_step(pipe, self.host.holds_last, self.hyper.pending(), rows)
        self._optimizer.step()  # steps nothing; LR schedulers check that a step came first
        return (None, None) if result is None else result

    def end_epoch(self) -> None:
        if self.asynchronous:
            self.host.pipe.end()

    def predict(self, x: torch.Tensor) -> torch.Tensor:
        n = x.shape[0]
        rows = replica_shares(n, self.config.n_replicas)[self.replica]
        out = self.host.forward(x[rows], rows.stop - rows.start)
        return self._gather_rows(n, None, out)[1]

    def collect(self, last: bool = False) -> nn.Module:
        """The whole trained network on every rank: each tensor broadcast from the rank of
        replica 0 that holds it, one tensor at a time (on the GPU under NCCL), straight into
        the layers — no pickled copy of anyone's state (``last``: gradients and optimizer state
        are dropped first)."""
        if last:
            self.drop_training_state()
        self._broadcast_chunks(keep_own=False)
        return self.module.to("cpu")

    def pull_weights(self) -> None:
        """The other stages' weights into ``module``; this rank's own layers are the ones it
        trains (a callback's change to them is made in place, nothing to push)."""
        self._broadcast_chunks(keep_own=True)

    def _broadcast_chunks(self, keep_own: bool) -> None:
        cfg = self.config
        device = self.device if str(self.device).startswith("cuda") else "cpu"
        # replica 0's tensor shard 0 of each stage sends it (its shards gather it first)
        takes_part = self.replica == 0 or cfg.shard != "none"
        mine = self.host.state_dicts() if takes_part else {}
        layers = self.plan.chunks(self.module)
        own = set(cfg.chunks_of(self.stage)) if keep_own and not cfg.collective_state else set()
        received: dict[int, dict[str, Any]] = {}
        for stage in range(cfg.n_stages):
            for c in cfg.chunks_of(stage):
                received[c] = {}
                for key, like in layers[c].state_dict(keep_vars=True).items():
                    if c in mine:
                        t = mine[c][key].detach().to(device).contiguous()
                    else:
                        t = torch.empty(like.shape, dtype=like.dtype, device=device)
                    dist.broadcast(t, src=cfg.rank_of(0, stage))
                    received[c][key] = t.cpu()
        for c in own:
            del received[c]
        self.plan.load_chunk_states(self.module, received)
        materialize(self.module)  # what state dicts leave out (non-persistent buffers)

    def _everyone(self, mine: Any) -> list[Any]:
        everyone: list[Any] = [None] * dist.get_world_size()
        dist.all_gather_object(everyone, mine)
        return everyone

    def record_timeline(self, steps: int) -> None:
        self.host.record_timeline(steps)

    def spans(self) -> list[Span]:
        return [s for spans in self._everyone(self.host.spans()) for s in spans]

    def track_memory(self, on: bool = True) -> None:
        self.host.track_memory(on)

    def stats(self) -> list[dict[str, float]]:
        return self._everyone(self.host.stats())

    def drop_training_state(self) -> None:
        self.host.drop_training_state()

    def _rank_states(self, optimizers: bool) -> list[tuple[dict[int, Any], dict[str, Any] | None]]:
        # the replicas hold the same weights and optimizer state: the first one's travel
        cfg = self.config
        mine: tuple[dict[int, Any], dict[str, Any] | None] = ({}, None)
        if self.replica == 0 or cfg.shard != "none":
            mine = (self.host.state_dicts(), self.host.optimizer_state() if optimizers else None)
        everyone = self._everyone(mine)
        return [everyone[cfg.rank_of(0, s)] for s in range(cfg.n_stages)]

    def save_state_files(self, folder: str, tag: str) -> list[str]:
        """One part per stage, written by replica 0's rank of that stage; every rank returns
        once all parts are written."""
        cfg = self.config
        names = [f"stage{s}-{tag}.pt" for s in range(cfg.n_stages)]
        if self.replica == 0 or cfg.shard != "none":  # the owner writes what shards gather
            self.host.save_part(
                os.path.join(folder, names[self.stage]),
                self.plan.state_names(self.module, self.stage),
                self.plan.rank_parameter_names(self.stage),
            )
        dist.barrier()
        return names

    def load_state_files(self, folder: str, names: Sequence[str]) -> None:
        self.host.load_parts(
            [os.path.join(folder, n) for n in names],
            self.plan.state_names(self.module, self.stage),
            self.plan.rank_parameter_names(self.stage),
        )

    def _load_rank_states(self, states: Sequence[tuple[dict[int, Any], dict[str, Any]]]) -> None:
        chunks, optimizer = states[self.stage]
        self.host.load_state(chunks, optimizer)

    def close(self, keep_warm: bool = False) -> None:
        self.host.close()
