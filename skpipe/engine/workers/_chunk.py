"""One chunk of layers as a stage runs it: activation recomputation per micro-batch, autocast,
and BatchNorm that learns from the real rows of a micro-batch only.

A training step is padded to a fixed row count (``plan._microbatch``); each micro-batch holds its
real rows first. The stage tells the chunk how many rows of each micro-batch are real
(``real_rows``), and the chunk's BatchNorm layers then normalise, and update their running
statistics, over those rows alone (padding rows get zeros, which no loss reads): the statistics
one device's micro-batch of the same rows gives.
"""

from __future__ import annotations

import functools
import types
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm
from torch.utils.checkpoint import checkpoint as activation_checkpoint

# real rows of the micro-batch being run (None: every row is real); one thread runs a stage
_REAL_ROWS: list[int | None] = [None]


def _masked_batch_norm(self: _BatchNorm, x: torch.Tensor) -> torch.Tensor:
    """BatchNorm over the first ``_REAL_ROWS`` rows of ``x`` in training (see the module)."""
    k = _REAL_ROWS[0]
    if not self.training or k is None or k >= x.shape[0]:
        return type(self).forward(self, x)
    pad = torch.zeros_like(x[k:])
    if k == 0:
        return pad
    return torch.cat([type(self).forward(self, x[:k]), pad])


class ChunkModule(nn.Module):
    """One chunk of layers, with per-micro-batch activation recomputation and autocast.

    ``checkpoint``: 'never'; 'always' (recompute every micro-batch in backward); 'except_last'
    (every micro-batch but the last of a step, as torchgpipe defines it). Forwards of one chunk
    run in micro-batch order in every schedule, so a counter reset at each step knows the index
    (and ``real_rows``, set per step, the real rows of each micro-batch).
    """

    def __init__(
        self,
        layers: Sequence[nn.Module],
        *,
        index: int,
        checkpoint: str = "never",
        n_microbatches: int = 1,
        precision: str = "float32",
    ) -> None:
        super().__init__()
        self.layers = nn.Sequential(*layers)
        self.index = index
        self.checkpoint = checkpoint
        self.n_microbatches = n_microbatches
        self.precision = precision
        self.calls = 0
        self.real_rows: list[int] | None = None
        # the layers may be the user's own (every stage in one process): patched per instance,
        # and let go by release()
        self._masked = [
            m for m in self.layers.modules()
            if isinstance(m, _BatchNorm) and not isinstance(m, nn.SyncBatchNorm)
        ]
        for m in self._masked:
            m.forward = types.MethodType(_masked_batch_norm, m)  # type: ignore[method-assign]

    def release(self) -> None:
        """Give the BatchNorm layers their own forward back."""
        for m in self._masked:
            m.__dict__.pop("forward", None)
        self._masked = []

    def _run(self, *args: torch.Tensor, real: int | None = None) -> Any:
        # a boundary carrying several tensors reaches the first layer as one tuple, as in
        # nn.Sequential
        x: Any = args[0] if len(args) == 1 else args
        before, _REAL_ROWS[0] = _REAL_ROWS[0], real
        try:
            if self.precision == "bf16":
                with torch.autocast(device_type=args[0].device.type, dtype=torch.bfloat16):
                    out = self.layers(x)
            else:
                out = self.layers(x)
        finally:
            _REAL_ROWS[0] = before
        if isinstance(out, torch.Tensor):
            return _float32(out)
        if isinstance(out, tuple) and all(isinstance(t, torch.Tensor) for t in out):
            return tuple(_float32(t) for t in out)
        raise TypeError(  # the plan refused it already, but a layer may change its mind
            f"pipeline chunk {self.index} returned {type(out).__name__}: a stage boundary "
            "carries one tensor or a tuple of tensors."
        )

    def forward(self, *args: torch.Tensor) -> Any:
        mb = self.calls % self.n_microbatches
        self.calls += 1
        real = None
        if self.training and self.real_rows is not None and self._masked:
            real = self.real_rows[mb]
        recompute = (
            self.training
            and torch.is_grad_enabled()
            and (
                self.checkpoint == "always"
                or (self.checkpoint == "except_last" and mb != self.n_microbatches - 1)
            )
        )
        run = functools.partial(self._run, real=real)
        if recompute:
            return activation_checkpoint(run, *args, use_reentrant=False)
        return run(*args)


def _float32(t: torch.Tensor) -> torch.Tensor:
    return t.float() if t.dtype != torch.float32 and t.is_floating_point() else t
