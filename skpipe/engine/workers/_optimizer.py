"""The optimizer a stage steps: torch's over the stage's parameters, or, for a stage of
parameter-free layers (an activation alone), one that steps nothing."""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from ..plan._config import TrainSpec


def stage_optimizer(spec: TrainSpec, params: Sequence[nn.Parameter]) -> torch.optim.Optimizer:
    return spec.optimizer(params, **spec.optimizer_kwargs) if params else NoParameters()


class NoParameters(torch.optim.Optimizer):
    """The optimizer of a stage without parameters: nothing to step, an empty state (torch's
    optimizers refuse an empty parameter list)."""

    def __init__(self) -> None:  # noqa: D107 - torch's __init__ refuses no parameters
        self.state = defaultdict(dict)
        self.param_groups: list[dict[str, Any]] = []
        self.defaults: dict[str, Any] = {}

    def zero_grad(self, set_to_none: bool = True) -> None:
        pass

    def step(self, closure: Any = None) -> Any:
        return None

    def state_dict(self) -> dict[str, Any]:
        return {"state": {}, "param_groups": [{"params": []}]}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        pass
