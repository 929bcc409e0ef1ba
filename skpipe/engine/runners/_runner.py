"""The one interface every home of the stages offers the estimator.

A runner is built from a plan (made before it) and the network the plan splits; it trains one
batch at a time while the caller owns the loop, and is used as a context manager: leaving the
block normally keeps spawned workers warm for the next fit, leaving it by an exception stops them.
"""

from __future__ import annotations

import os
from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from typing import Any, ClassVar

import torch
from torch import nn

from ..plan._config import TrainSpec
from ..plan._plan import Plan
from ..plan._timeline import Span
from ..split._construct import is_deferred, materialize
from ..state._named import (
    cpu_copy,
    merge_by_name,
    read_state_files,
    state_by_name,
    state_for,
    write_state_file,
)


class Runner(ABC):
    """Trains the network of ``plan`` one batch at a time.

    ``train_step`` returns the batch loss and the outputs of the real rows (on the CPU);
    ``predict`` runs forward only in eval mode; ``collect`` returns the whole trained network on
    the CPU; ``get_state``/``set_state`` move the network and the optimizer state (keyed by
    parameter name) for checkpoints; ``record_timeline``/``spans`` record what the stages did;
    ``close(keep_warm=...)`` releases workers and devices (always safe to call).
    """

    # Whether this home takes a device lease (a torchrun job owns its devices by itself) ...
    leases_devices: ClassVar[bool] = True
    # ... and whether the stages train ``module``'s own layers in this process: where they do
    # not, callbacks see the weights through pull_weights / push_weights, and gradients are
    # not shown to them (on_grad_computed).
    weights_in_driver: ClassVar[bool] = True
    # whether what callbacks change in ``module`` must be sent to the stages (push_weights)
    pushes_weights: ClassVar[bool] = False

    def __init__(self, plan: Plan, module: nn.Module, spec: TrainSpec, seed: int = 0) -> None:
        self.plan = plan
        self.config = plan.config
        self.module = module
        self.spec = spec
        self.seed = seed

    @staticmethod
    def agree_seed(seed: int) -> int:
        """The seed every process of the fit uses (this process's own, unless a job agrees one)."""
        return seed

    @property
    @abstractmethod
    def optimizer(self) -> torch.optim.Optimizer:
        """The optimizer callbacks step and read: the stages' own where they live in this
        process, else one carrying their hyperparameters (``_hyper.driver_optimizer``)."""

    @abstractmethod
    def train_step(
        self,
        x: torch.Tensor,
        y: torch.Tensor,
        w: torch.Tensor | None = None,
        on_grads: Callable[[], None] | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """One optimizer step on a batch; ``w`` the rows' sample weights (None: unweighted);
        ``on_grads`` called with the batch's gradients in ``module``, before clipping and the
        step (only where ``weights_in_driver``)."""

    def pull_weights(self) -> None:  # noqa: B027 - in this process: module is the trained network
        """Bring the stages' current weights into ``module`` (for the callbacks to read)."""

    def push_weights(  # noqa: B027 - in this process: the callbacks wrote the trained network
        self, values: dict[str, torch.Tensor], requires_grad: dict[str, bool]
    ) -> None:
        """Give the stages what callbacks changed in ``module``: tensors by name, and every
        parameter's requires_grad."""

    # -- skpipe's asynchronous schedules: an epoch's batches overlap ---------------------------
    @property
    def asynchronous(self) -> bool:
        """Whether the schedule is one of skpipe's asynchronous ones ('2bw', 'pipedream')."""
        from ..plan._schedules import SCHEDULES

        return SCHEDULES[self.config.schedule].asynchronous

    @property
    def prefetches(self) -> bool:
        """Whether a synchronous step takes the next batch along (``prefetch``), so that the
        stages compute it while the driver's callbacks run."""
        return False

    def begin_epoch(self, n_batches: int) -> None:  # noqa: B027 - synchronous: nothing to fill
        """An epoch of ``n_batches`` training batches begins (asynchronous: the pipe fills)."""

    def prefetch(self, x: Any, y: Any, w: Any) -> None:  # noqa: B027 - synchronous: no use
        """The batch after the one the next ``train_step`` takes (asynchronous: it goes ahead
        with that step, so that the first stage never waits for it); None at the epoch's end."""

    def end_epoch(self) -> None:  # noqa: B027 - synchronous: every step ended drained
        """The epoch's batches are all given: wait for the drain (every update done)."""

    @abstractmethod
    def predict(self, x: torch.Tensor) -> torch.Tensor: ...

    @abstractmethod
    def record_timeline(self, steps: int) -> None:
        """Record the spans of the next ``steps`` steps."""

    @abstractmethod
    def spans(self) -> list[Span]: ...

    @abstractmethod
    def track_memory(self, on: bool = True) -> None:
        """Measure the activations held for backward during each step."""

    @abstractmethod
    def stats(self) -> list[dict[str, float]]:
        """Per rank: ``{'peak_activation_bytes': ...}`` (after ``track_memory``)."""

    @abstractmethod
    def _rank_states(self, optimizers: bool) -> list[tuple[dict[int, Any], dict[str, Any] | None]]:
        """Per rank: (its chunks' state dicts, its optimizer's state dict or None), on the CPU."""

    @abstractmethod
    def _load_rank_states(self, states: Sequence[tuple[dict[int, Any], dict[str, Any]]]) -> None:
        """Give every rank its chunks' state dicts and its optimizer state back."""

    def drop_training_state(self) -> None:  # noqa: B027 - in this process: kept with the runner
        """Free the stages' gradients and optimizer state (they will not train again)."""

    def close(self, keep_warm: bool = False) -> None:  # noqa: B027 - nothing to release by default
        """Release workers and devices; ``keep_warm`` lets healthy workers wait for the next fit."""

    # -- derived from the above ------------------------------------------------------------
    def collect(self, last: bool = False) -> nn.Module:
        """The whole trained network, on the CPU (the same object that was handed in).
        ``last``: the runner will not train again, so stages may drop their gradients and
        optimizer state before sending their weights (the fit's peak memory is then training's,
        not training's plus the gathered copy)."""
        if last:
            self.drop_training_state()
        self._load_chunks(self._rank_states(optimizers=False))
        return self.module.to("cpu")

    def collect_with_optimizer(self) -> tuple[nn.Module, dict[str, Any]]:
        """``collect()`` and the optimizer's state keyed by parameter name, in one gathering."""
        ranks = self._rank_states(optimizers=True)
        self._load_chunks(ranks)
        return self.module.to("cpu"), self._named(ranks)

    def get_state(self) -> dict[str, Any]:
        """``{'module': state dict of the whole network, 'optimizer': state keyed by name}``."""
        ranks = self._rank_states(optimizers=True)
        self._load_chunks(ranks)
        return {"module": cpu_copy(self.module.state_dict()), "optimizer": self._named(ranks)}

    def set_state(self, state: dict[str, Any]) -> None:
        """Put a ``get_state`` result back, whatever split it was taken from."""
        # a network whose layers live elsewhere may still be on meta here: take the tensors
        # as they are; one trained in this process keeps its parameters (its optimizer's)
        self.module.load_state_dict(state["module"], assign=is_deferred(self.module))
        self._send_states(state["optimizer"], with_chunks=True)

    def save_state_files(self, folder: str, tag: str) -> list[str]:
        """Write the network and optimizer state under ``folder`` as checkpoint parts (see
        ``state._named.write_state_file``); their file names. Here: one part, from this process;
        runners whose stages live elsewhere write one part per stage, where it lives."""
        name = f"state-{tag}.pt"
        state = self.get_state()
        write_state_file(os.path.join(folder, name), state["module"], state["optimizer"])
        return [name]

    def load_state_files(self, folder: str, names: Sequence[str]) -> None:
        """Put the checkpoint parts ``names`` back, whatever split wrote them."""
        self.set_state(read_state_files([os.path.join(folder, n) for n in names]))

    def load_optimizer_state(self, named: dict[str, Any]) -> None:
        """Give every rank its share of an optimizer state keyed by parameter name (the weights
        stay as they are)."""
        self._send_states(named, with_chunks=False)

    def _load_chunks(self, ranks: Sequence[tuple[dict[int, Any], Any]]) -> None:
        """Copy the chunk state dicts gathered from the ranks into the layers of ``module``."""
        # the ranks hold disjoint chunks: one load, one mapping of names
        merged = {c: state for states, _ in ranks for c, state in states.items()}
        self.plan.load_chunk_states(self.module, merged)
        materialize(self.module)  # what state dicts leave out (non-persistent buffers)

    def _named(self, ranks: Sequence[tuple[Any, dict[str, Any] | None]]) -> dict[str, Any]:
        """The ranks' optimizer states merged into one, keyed by parameter name."""
        names = self._ranks_parameter_names()
        return merge_by_name(
            state_by_name(opt, names[r]) for r, (_, opt) in enumerate(ranks) if opt is not None
        )

    def _send_states(self, named: dict[str, Any], with_chunks: bool) -> None:
        ranks = []
        for r, rank_names in enumerate(self._ranks_parameter_names()):
            chunks = (
                {c: chunk.state_dict() for c, chunk in self.plan.chunks(self.module, r).items()}
                if with_chunks
                else {}
            )
            ranks.append((chunks, state_for(named, rank_names)))
        self._load_rank_states(ranks)

    def _ranks_parameter_names(self) -> list[list[str]]:
        return [self.plan.rank_parameter_names(r) for r in range(self.config.n_stages)]

    def __enter__(self) -> Runner:
        return self

    def __exit__(self, exc_type: object, *exc: object) -> None:
        self.close(keep_warm=exc_type is None)


class InProcessState:
    """For homes whose stages train ``module``'s own layers in this process (one device, or every
    stage here): weights need no moving, only the one optimizer's state is read and written."""

    plan: Plan

    @property
    def optimizer(self) -> torch.optim.Optimizer:
        raise NotImplementedError

    def _ranks_parameter_names(self) -> list[list[str]]:
        return [self.plan.rank_parameter_names()]

    def _rank_states(self, optimizers: bool) -> list[tuple[dict[int, Any], dict[str, Any] | None]]:
        return [({}, cpu_copy(self.optimizer.state_dict()) if optimizers else None)]

    def _load_rank_states(self, states: Sequence[tuple[dict[int, Any], dict[str, Any]]]) -> None:
        self.optimizer.load_state_dict(states[0][1])
