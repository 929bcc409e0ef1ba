"""The optimizer callbacks see where the stages' optimizers live in other processes.

It is a real optimizer of the user's class, built with the fit's settings over one empty
stand-in parameter: its ``param_groups`` carry the hyperparameters (lr, momentum, betas,
weight_decay...) every stage's optimizer steps with, and torch's LR schedulers (and skorch's
``LRScheduler``) step it as they step any optimizer. What they change travels to the stages with
the next step message, as a few floats (``HyperChannel``). Its ``state_dict`` and
``load_state_dict`` are the stages' optimizer state, in the form one device's optimizer over the
whole network has (one group, the parameters in the network's order): skorch's ``Checkpoint``
and ``load_params`` read and write the real state.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from ..plan._config import TrainSpec
from ..state._named import hyperparameters, set_hyperparameters


def _same(a: Any, b: Any) -> bool:
    if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor):
        return (
            isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor) and torch.equal(a, b)
        )
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b, strict=True))
    return bool(a == b)


def driver_optimizer(
    spec: TrainSpec,
    state_dict: Callable[[], dict[str, Any]],
    load_state_dict: Callable[[dict[str, Any]], None],
) -> torch.optim.Optimizer:
    """The stand-in optimizer (see the module docstring): its ``step`` steps nothing (the
    stand-in has no gradient) but counts as a step for the schedulers' order check."""
    stand_in = nn.Parameter(torch.zeros(0))
    optimizer = spec.optimizer([stand_in], **spec.optimizer_kwargs)
    optimizer.state_dict = state_dict  # type: ignore[method-assign]
    optimizer.load_state_dict = load_state_dict  # type: ignore[method-assign,assignment]
    return optimizer


class HyperChannel:
    """What the stages were last given of the driver optimizer's hyperparameters."""

    def __init__(self, optimizer: torch.optim.Optimizer) -> None:
        self.optimizer = optimizer
        self.sent = copy.deepcopy(hyperparameters(optimizer))  # the stages were built with these

    def pending(self) -> list[dict[str, Any]] | None:
        """The hyperparameters, when a callback changed them since they were last sent."""
        now = hyperparameters(self.optimizer)
        if _same(now, self.sent):
            return None
        self.sent = copy.deepcopy(now)
        return now

    def adopt(self, groups: list[dict[str, Any]]) -> None:
        """The stages hold ``groups`` now (a loaded state): so does the driver optimizer."""
        if groups:
            set_hyperparameters(self.optimizer, groups)
            self.sent = copy.deepcopy(hyperparameters(self.optimizer))
