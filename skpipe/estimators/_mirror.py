"""The weights a callback sees are the weights being trained.

Where the stages train in other processes (spawned workers; the other ranks of a torchrun job),
``net.module_`` in this process is not the trained network. Before a hook of a callback that
reads or writes the weights, the stages' weights are brought into it (once per step at most);
after the hook, what the callbacks changed (values, and which parameters train) goes back to the
stages before the next step. A fit whose callbacks all leave the weights alone pays nothing:
the scoring, logging, LR-scheduling and checkpointing callbacks of skorch and skpipe are known
not to touch them, and a user's callback says so with a class attribute ``needs_weights = False``.
Any other callback is mirrored at the hooks it defines (EarlyStopping only with
``load_best=True``).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch
from skorch.callbacks import (
    BatchScoring,
    Callback,
    EarlyStopping,
    EpochScoring,
    EpochTimer,
    GradientNormClipping,
    LRScheduler,
    PassthroughScoring,
    PrintLog,
    ProgressBar,
)
from torch import nn

HOOKS = (
    "on_train_begin",
    "on_epoch_begin",
    "on_batch_begin",
    "on_batch_end",
    "on_epoch_end",
    "on_train_end",
)

# skorch's callbacks that never read or write net.module_ (scorers with a named scoring
# go through net.predict, which runs on the stages)
_LEAVE_WEIGHTS = (EpochTimer, PassthroughScoring, PrintLog, ProgressBar, LRScheduler)


def needs_weights(cb: Any) -> bool:
    """Whether callback ``cb`` reads or writes the network's weights."""
    declared = getattr(cb, "needs_weights", None)
    if declared is not None:
        return bool(declared)
    if isinstance(cb, EarlyStopping):
        return bool(cb.load_best)
    if isinstance(cb, (EpochScoring, BatchScoring)):
        return callable(cb.scoring)  # a function of the net may read its module
    if isinstance(cb, GradientNormClipping):
        return False  # gradients, not weights (see _checks.grad_clips)
    return not isinstance(cb, _LEAVE_WEIGHTS)


def hooks_of(cb: Any) -> set[str]:
    """The hooks ``cb`` defines (those it inherits from skorch's Callback do nothing)."""
    cls = type(cb)
    return {h for h in HOOKS if getattr(cls, h, None) is not getattr(Callback, h)}


def reads_gradients(cb: Any) -> bool:
    """Whether callback ``cb`` (or callback class) defines ``on_grad_computed``."""
    cls = cb if isinstance(cb, type) else type(cb)
    return getattr(cls, "on_grad_computed", None) is not Callback.on_grad_computed


class WeightMirror:
    """Keeps ``runner.module`` the trained network around the hooks that need it."""

    def __init__(self, runner: Any, callbacks: list[tuple[str, Any]]) -> None:
        self.runner = runner
        self.hooks: set[str] = set()
        if not runner.weights_in_driver:
            for _, cb in callbacks:
                if needs_weights(cb):
                    self.hooks |= hooks_of(cb)
        # torchrun ranks train their own layers of module in place: nothing to send back
        self.pushes = runner.pushes_weights
        self.stale = True

    @contextmanager
    def around(self, hook: str) -> Iterator[None]:
        if hook not in self.hooks:
            yield
            return
        module: nn.Module = self.runner.module
        if self.stale:
            self.runner.pull_weights()
            self.stale = False
        if not self.pushes:
            yield
            return
        before, flags = self._snapshot(module)
        try:
            yield
        except KeyboardInterrupt:  # EarlyStopping ends the fit this way, after its hook
            self._push(module, before, flags)
            raise
        self._push(module, before, flags)

    def _snapshot(self, module: nn.Module) -> tuple[dict[str, torch.Tensor], dict[str, bool]]:
        """A copy of the network's tensors and which parameters train, to see what a hook
        changed (exactly: in-place writes through ``.data`` too)."""
        values = {k: t.detach().clone() for k, t in module.state_dict(keep_vars=True).items()}
        return values, {n: p.requires_grad for n, p in module.named_parameters()}

    def _push(
        self, module: nn.Module, before: dict[str, torch.Tensor], flags: dict[str, bool]
    ) -> None:
        changed, now = self._changes(module, before, flags)
        if changed or now != flags:
            self.runner.push_weights(changed, now)

    def _changes(
        self, module: nn.Module, before: dict[str, torch.Tensor], flags: dict[str, bool]
    ) -> tuple[dict[str, torch.Tensor], dict[str, bool]]:
        """The tensors a hook changed, and which parameters train now."""
        changed = {
            k: t.detach()
            for k, t in module.state_dict(keep_vars=True).items()
            if k not in before or t.shape != before[k].shape or not torch.equal(t, before[k])
        }
        return changed, {n: p.requires_grad for n, p in module.named_parameters()}
