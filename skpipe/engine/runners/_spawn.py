"""One worker process per pipeline rank, started (or taken warm) from the user's process; the
training loop stays in this process and every step is one message to each worker."""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from typing import Any, ClassVar

import torch
from torch import nn

from ..plan import _config
from ..plan._config import TrainSpec
from ..plan._microbatch import class_weight_sum, class_weighted, replica_shares
from ..plan._plan import Plan
from ..plan._timeline import Span
from ..parallel._tensor import stage_styles
from ..split._construct import program_for
from ..state._named import state_by_name, state_for
from ..workers import _protocol as P
from ..workers._pool import STARTUP_TIMEOUT, acquire_group, release_group
from ._hyper import HyperChannel, driver_optimizer
from ._runner import Runner


class SpawnRunner(Runner):
    """Drives one worker per rank of the (replica x stage) mesh: with one replica, one per
    pipeline stage."""

    weights_in_driver: ClassVar[bool] = False
    pushes_weights: ClassVar[bool] = True

    def __init__(self, plan: Plan, module: nn.Module, spec: TrainSpec, seed: int = 0) -> None:
        super().__init__(plan, module, spec, seed)
        cfg = self.config
        self.first = cfg.owner(0)
        self.last = cfg.owner(cfg.n_chunks - 1)
        self.group = acquire_group(cfg.world_size, cfg.devices, cfg.timeout)
        try:
            # a network built on meta travels as its layers' shapes and the recipe of their
            # values (each worker makes its own); a built one travels with its weights
            stages = [plan.chunks(module, s) for s in range(cfg.n_stages)]
            programs = [program_for(chunks) for chunks in stages]
            styles = [
                stage_styles(stages[s], plan.state_names(module, s), cfg.tp_plan)
                if cfg.tensor_parallel > 1
                else None
                for s in range(cfg.n_stages)
            ]
            setups = [
                P.Setup(
                    chunks=stages[cfg.stage_of(rank)],
                    config=cfg,
                    spec=spec,
                    shapes=list(plan.shapes),
                    device=cfg.devices[rank],
                    seed=seed,
                    program=programs[cfg.stage_of(rank)],
                    tensor_styles=styles[cfg.stage_of(rank)],
                )
                for rank in range(cfg.world_size)
            ]
            self.group.ask_all(setups, timeout=max(cfg.timeout, STARTUP_TIMEOUT))
        except BaseException:
            self.group.close()
            raise
        # the hyperparameters live here (callbacks change them); the state in the workers
        self._optimizer = driver_optimizer(spec, self._optimizer_state, self._load_optimizer)
        self.hyper = HyperChannel(self._optimizer)
        # an asynchronous epoch: the batch after the next step's, and whether it went ahead
        self._upcoming: tuple[Any, Any, Any] | None = None
        self._ahead: list[P.Step] | None = None

    @property
    def optimizer(self) -> torch.optim.Optimizer:
        return self._optimizer

    def _parameter_names(self) -> list[str]:
        """The network's parameters in the order one device's optimizer holds them."""
        return [name for name, _ in self.module.named_parameters()]

    def _optimizer_state(self) -> dict[str, Any]:
        """The stages' optimizer state as one device's optimizer over the network has it (with
        the settings the driver's callbacks made: ``_rank_states`` sends them first)."""
        return state_for(self._named(self._rank_states(optimizers=True)), self._parameter_names())

    def _load_optimizer(self, state: dict[str, Any]) -> None:
        self.load_optimizer_state(state_by_name(state, self._parameter_names()))

    def _send_hyper(self) -> None:
        """Give the stages the hyperparameters callbacks changed since the last step (before
        their state is saved or read)."""
        groups = self.hyper.pending()
        if groups is not None:
            self.group.ask_all(P.Hyper(groups))

    def _adopt_hyper(self) -> None:
        """After the stages loaded a state: its hyperparameters are the driver's too."""
        replies = self.group.ask(self._owners(), P.Hyper(None))
        self.hyper.adopt(next((groups for groups in replies if groups), []))

    def pull_weights(self) -> None:
        self._load_chunks(self._rank_states(optimizers=False))

    def push_weights(
        self, values: dict[str, torch.Tensor], requires_grad: dict[str, bool]
    ) -> None:
        cfg = self.config
        messages = []
        for stage in range(cfg.n_stages):
            names = self.plan.state_names(self.module, stage)
            messages.append(P.SetWeights(
                {c: {k: values[q] for k, q in keys.items() if q in values}
                 for c, keys in names.items()},
                {c: {k: requires_grad[q] for k, q in keys.items() if q in requires_grad}
                 for c, keys in names.items()},
            ))
        self.group.ask_all([messages[cfg.stage_of(rank)] for rank in range(cfg.world_size)])

    def _rows_for(
        self,
        rank: int,
        shares: list[slice],
        x: torch.Tensor,
        y: torch.Tensor | None,
        w: torch.Tensor | None,
    ) -> tuple[Any, Any, Any, int]:
        """What ``rank`` needs of a batch: its replica's share of the inputs where it holds the
        first chunk, of the targets and weights where it holds the last; and the share's rows."""
        cfg = self.config
        rows = shares[cfg.replica_of(rank)]
        stage = cfg.stage_of(rank)
        first, last = stage == self.first, stage == self.last

        def part(t: torch.Tensor | None, needed: bool) -> Any:
            return t[rows].numpy() if needed and t is not None else None

        return part(x, first), part(y, last), part(w, last), rows.stop - rows.start

    def _last_ranks(self) -> list[int]:
        """The rank holding the last chunk in each replica, in replica order."""
        return [self.config.rank_of(r, self.last) for r in range(self.config.n_replicas)]

    def _owners(self) -> list[int]:
        """The rank that sends (and writes) each stage's state: replica 0's tensor shard 0."""
        return [self.config.rank_of(0, s) for s in range(self.config.n_stages)]

    def train_step(
        self,
        x: torch.Tensor,
        y: torch.Tensor,
        w: torch.Tensor | None = None,
        on_grads: Callable[[], None] | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        if on_grads is not None:  # the estimator refuses such callbacks before any worker
            raise RuntimeError("spawned stages do not show their gradients to this process")
        hyper = self.hyper.pending()
        if self.asynchronous:
            replies = self._step_with_next(P.AsyncStep, x, y, w, hyper)
        elif self.prefetches:
            replies = self._step_with_next(P.SyncStep, x, y, w, hyper)
        else:
            replies = self.group.ask_all(self._steps(x, y, w, hyper))
        self._optimizer.step()  # steps nothing; LR schedulers check that a step came first
        parts = [replies[r] for r in self._last_ranks()]
        loss = torch.stack([torch.from_numpy(loss) for loss, _ in parts]).sum()
        return loss, torch.cat([torch.from_numpy(out) for _, out in parts])

    def _steps(self, x: torch.Tensor, y: torch.Tensor, w: torch.Tensor | None,
               hyper: Any = None) -> list[P.Step]:
        """Each rank's step message for a batch: its replica's share of what it needs."""
        n = x.shape[0]
        total_weight = None if w is None else float(w.sum())
        shares = replica_shares(n, self.config.n_replicas)
        denominator = None
        if self.config.n_replicas > 1 and class_weighted(self.spec.criterion):
            denominator = class_weight_sum(self.spec.criterion, y)
        messages = []
        for rank in range(self.config.world_size):
            xs, ys, ws, n_share = self._rows_for(rank, shares, x, y, w)
            messages.append(P.Step(xs, ys, n_share, ws, n, total_weight, hyper, denominator))
        return messages

    # -- asynchronous epochs: the stages run on while this loop waits for each batch's loss;
    # -- synchronous ones: each step's next batch goes along, computed while the callbacks run
    @property
    def prefetches(self) -> bool:
        return _config.STEP_AHEAD and not self.asynchronous

    def begin_epoch(self, n_batches: int) -> None:
        self._ahead = self._upcoming = None
        if self.asynchronous:
            self.group.ask_all(P.AsyncBegin(n_batches))

    def prefetch(self, x: Any, y: Any, w: Any) -> None:
        self._upcoming = None if x is None else (x, y, w)

    def _step_with_next(self, kind: type, x: torch.Tensor, y: torch.Tensor,
                        w: torch.Tensor | None, hyper: Any) -> list[Any]:
        """Give the stages this batch (unless it went ahead) and the next one, in a ``kind``
        message (``P.AsyncStep`` or ``P.SyncStep``); the replies."""
        now = None if self._ahead is not None else self._steps(x, y, w)
        ahead = None if self._upcoming is None else self._steps(*self._upcoming)
        self._ahead, self._upcoming = ahead, None
        return self.group.ask_all([
            kind(hyper, None if now is None else now[rank],
                 None if ahead is None else ahead[rank])
            for rank in range(self.config.world_size)
        ])

    def end_epoch(self) -> None:
        if self.asynchronous:
            self.group.ask_all(P.AsyncEnd())

    def predict(self, x: torch.Tensor) -> torch.Tensor:
        """Every replica forwards its share of the rows."""
        shares = replica_shares(x.shape[0], self.config.n_replicas)
        messages = []
        for rank in range(self.config.world_size):
            xs, _, _, n_share = self._rows_for(rank, shares, x, None, None)
            messages.append(P.Forward(xs, n_share))
        replies = self.group.ask_all(messages)
        return torch.cat([torch.from_numpy(replies[r]) for r in self._last_ranks()])

    def record_timeline(self, steps: int) -> None:
        self.group.ask_all(P.RecordTimeline(steps))

    def spans(self) -> list[Span]:
        return [s for spans in self.group.ask_all(P.Spans()) for s in spans]

    def track_memory(self, on: bool = True) -> None:
        self.group.ask_all(P.TrackMemory(on))

    def stats(self) -> list[dict[str, float]]:
        return list(self.group.ask_all(P.Stats()))

    def drop_training_state(self) -> None:
        self.group.ask_all(P.DropTrainingState())

    def _rank_states(self, optimizers: bool) -> list[tuple[dict[int, Any], dict[str, Any] | None]]:
        # the replicas hold the same weights and optimizer state: the first one's suffice;
        # where shards hold it, all of them gather it and the owners send it
        cfg = self.config
        ranks = cfg.state_ranks() if cfg.collective_state else self._owners()
        if optimizers:
            self._send_hyper()
            replies = dict(zip(ranks, self.group.ask(ranks, P.GetState()), strict=True))
            return [replies[r] for r in self._owners()]
        replies = dict(zip(ranks, self.group.ask(ranks, P.Collect()), strict=True))
        return [(replies[r], None) for r in self._owners()]

    def save_state_files(self, folder: str, tag: str) -> list[str]:
        """One part per stage, written by the worker that holds it (replica 0's: the replicas
        hold the same state); nothing of it passes through this process."""
        cfg = self.config
        names = [f"stage{s}-{tag}.pt" for s in range(cfg.n_stages)]
        self._send_hyper()
        ranks = cfg.state_ranks() if cfg.collective_state else self._owners()
        per_stage = [
            P.SaveStage(
                os.path.join(folder, names[s]),
                self.plan.state_names(self.module, s),
                self.plan.rank_parameter_names(s),
            )
            for s in range(cfg.n_stages)
        ]
        self.group.ask(ranks, [per_stage[cfg.stage_of(r)] for r in ranks])
        return names

    def load_state_files(self, folder: str, names: Sequence[str]) -> None:
        """Every worker reads its own tensors from the parts (memory-mapped), by name."""
        cfg = self.config
        paths = [os.path.join(folder, n) for n in names]
        per_stage = [
            P.LoadStage(
                paths, self.plan.state_names(self.module, s), self.plan.rank_parameter_names(s)
            )
            for s in range(cfg.n_stages)
        ]
        self.group.ask_all([per_stage[cfg.stage_of(rank)] for rank in range(cfg.world_size)])
        self._adopt_hyper()

    def _load_rank_states(self, states: Sequence[tuple[dict[int, Any], dict[str, Any]]]) -> None:
        cfg = self.config
        self.group.ask_all(
            [P.SetState(*states[cfg.stage_of(rank)]) for rank in range(cfg.world_size)]
        )
        self._adopt_hyper()

    def close(self, keep_warm: bool = False) -> None:
        """Healthy workers go back warm when asked; any other end stops them."""
        if keep_warm and self.group.alive():
            release_group(self.group)
        else:
            self.group.close()
