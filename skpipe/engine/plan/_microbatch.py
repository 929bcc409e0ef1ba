"""Fixed-shape batches and exact loss weights.

torch's stages freeze their shapes at the first step and refuse uneven micro-batches, so every
training batch is padded to one fixed row count that splits evenly into ``m`` micro-batches.
Each micro-batch holds the real rows one device's micro-batch would (``real_positions``), then
padding. Padding rows never reach the loss: the schedule's target is the row index of each row
(-1 for padding), and each micro-batch's loss is weighted by its share of real rows, so the
summed gradient equals the gradient of the loss over the real batch, whatever the micro-batch
sizes; nor BatchNorm's statistics (``workers._chunk``).
"""

from __future__ import annotations

import copy
import math

import torch
from torch import nn


def step_rows(batch_size: int, n_microbatches: int) -> int:
    """Rows of every padded training batch: batch_size rounded up to a multiple of m."""
    return math.ceil(batch_size / n_microbatches) * n_microbatches


def replica_shares(n_rows: int, n_replicas: int) -> list[slice]:
    """The contiguous rows of a batch each replica takes: as even as can be, the first
    ``n_rows % n_replicas`` replicas one row more (a replica may get none of a small last batch)."""
    base, extra = divmod(n_rows, n_replicas)
    out, start = [], 0
    for r in range(n_replicas):
        end = start + base + (1 if r < extra else 0)
        out.append(slice(start, end))
        start = end
    return out


def microbatch_counts(n_real: int, n_microbatches: int) -> list[int]:
    """Real rows of each micro-batch of a step of ``n_real`` rows: as ``tensor_split`` cuts
    them on one device (the first ``n_real % m`` micro-batches one row more)."""
    base, extra = divmod(n_real, n_microbatches)
    return [base + (1 if j < extra else 0) for j in range(n_microbatches)]


def real_positions(
    n_real: int, rows: int, n_microbatches: int, device: torch.device | str = "cpu"
) -> torch.Tensor:
    """Where the ``n_real`` rows sit in a padded step of ``rows`` rows: each micro-batch of
    ``rows / m`` rows holds its share of the real rows (``microbatch_counts``) first, then
    padding; so every micro-batch sees the rows one device's would."""
    size = rows // n_microbatches
    starts = torch.arange(n_microbatches, device=device) * size
    counts = torch.tensor(microbatch_counts(n_real, n_microbatches), device=device)
    within = torch.arange(n_real, device=device) - torch.repeat_interleave(
        torch.cumsum(counts, 0) - counts, counts
    )
    return torch.repeat_interleave(starts, counts) + within


def pad_rows(x: torch.Tensor, rows: int, n_microbatches: int = 1) -> torch.Tensor:
    """``x`` laid out in a step of ``rows`` rows (``real_positions``), zeros elsewhere (``x``
    itself when it fills the step)."""
    n = x.shape[0]
    if n == rows:
        return x
    if n > rows:
        raise ValueError(f"a batch of {n} rows does not fit the fixed step size of {rows} rows")
    out = x.new_zeros((rows,) + tuple(x.shape[1:]))
    out[real_positions(n, rows, n_microbatches, x.device)] = x
    return out


def row_targets(
    n_real: int, rows: int, device: torch.device | str = "cpu", n_microbatches: int = 1
) -> torch.Tensor:
    """Row index of each position of a padded step (``pad_rows``), -1 for padding."""
    idx = torch.full((rows,), -1, dtype=torch.long, device=device)
    idx[real_positions(n_real, rows, n_microbatches, device)] = torch.arange(
        n_real, device=device
    )
    return idx


def reduction_of(criterion: nn.Module) -> str:
    reduction = getattr(criterion, "reduction", "mean")
    if reduction not in ("mean", "sum"):
        raise ValueError(
            f"criterion {type(criterion).__name__} has reduction={reduction!r}; skpipe needs a "
            "criterion that reduces with 'mean' or 'sum' to weight micro-batches exactly."
        )
    return reduction


def class_weighted(criterion: nn.Module) -> bool:
    """Whether ``criterion``'s mean is over its class weights, not its rows: CrossEntropyLoss or
    NLLLoss with ``weight`` and reduction 'mean' divide by the batch's sum of weight[y_i]."""
    return (
        isinstance(criterion, (nn.CrossEntropyLoss, nn.NLLLoss))
        and getattr(criterion, "weight", None) is not None
        and getattr(criterion, "reduction", "mean") == "mean"
    )


def class_weight_sum(criterion: nn.Module, y: torch.Tensor) -> float:
    """The denominator of a class-weighted mean over targets ``y`` (ignored targets left out)."""
    weight: torch.Tensor = criterion.weight  # type: ignore[assignment]
    ignore = getattr(criterion, "ignore_index", -100)
    y = y[y != ignore]
    return float(weight.to(y.device)[y].double().sum()) if y.numel() else 0.0


class WeightedLoss:
    """Loss of one micro-batch, weighted so that micro-batch losses sum to the batch loss.

    ``set_batch(y, n_real, w)`` before each step; the schedule then calls ``self(output, idx)``
    once per micro-batch with the row indices of that micro-batch. With per-row weights ``w`` the
    batch loss is sum(w_i * loss_i) / sum(w_i) for a 'mean' criterion and sum(w_i * loss_i) for a
    'sum' one, loss_i being row i's loss (its elements averaged, or summed, like the criterion).

    A replica holding a share of a batch passes the whole batch's ``total_rows`` (and
    ``total_weight``): its micro-batch losses are then its part of the batch loss, and the parts
    (and their gradients) of all replicas sum to the batch's. A class-weighted mean
    (``class_weighted``) divides each micro-batch's summed loss by the whole batch's class-weight
    sum instead (a replica is given it as ``denominator``).
    """

    def __init__(self, criterion: nn.Module) -> None:
        self.criterion = criterion
        self.reduction = reduction_of(criterion)
        self.summed: nn.Module | None = None  # the criterion reducing by 'sum', when class-weighted
        if class_weighted(criterion):
            self.summed = copy.copy(criterion)
            self.summed.__dict__["reduction"] = "sum"
        self._denominator = 0.0
        self.y: torch.Tensor | None = None
        self.w: torch.Tensor | None = None
        self.total_rows = 0  # rows of the whole batch (over all replicas)

    def set_batch(
        self,
        y: torch.Tensor,
        n_real: int,
        w: torch.Tensor | None = None,
        *,
        total_rows: int | None = None,
        total_weight: float | None = None,
        denominator: float | None = None,
    ) -> None:
        self.y = y
        if self.summed is not None:
            self._denominator = (
                class_weight_sum(self.criterion, y) if denominator is None else denominator
            )
        self.total_rows = n_real if total_rows is None else total_rows
        self.w = w
        if w is None:
            self._w_total = 0.0
        else:
            self._w_total = float(w.sum()) if total_weight is None else float(total_weight)

    def __call__(self, output: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
        if self.y is None:
            raise RuntimeError("WeightedLoss.set_batch must be called before the step")
        real = idx >= 0
        n = int(real.sum())
        if n == 0:
            return output.sum() * 0.0
        out, rows = (output, idx) if n == idx.shape[0] else (output[real], idx[real])
        if self.w is not None:
            if self._w_total == 0:  # a batch whose rows all weigh 0 teaches nothing
                return output.sum() * 0.0
            per_row = row_losses(self.criterion, self.reduction, out, self.y[rows])
            weighted = (per_row * self.w[rows].to(per_row.dtype)).sum()
            return weighted / self._w_total if self.reduction == "mean" else weighted
        if self.summed is not None:
            if self._denominator == 0:
                return output.sum() * 0.0
            summed: torch.Tensor = self.summed(out, self.y[rows])
            return summed / self._denominator
        loss = self.criterion(out, self.y[rows])
        if self.reduction == "mean":
            loss = loss * (n / self.total_rows)
        return loss


def row_losses(
    criterion: nn.Module, reduction: str, output: torch.Tensor, target: torch.Tensor
) -> torch.Tensor:
    """Each row's loss: the criterion without reduction, its elements averaged ('mean') or summed
    ('sum') within the row, as the criterion would over the batch."""
    unreduced = copy.copy(criterion)
    unreduced.__dict__["reduction"] = "none"  # a plain attribute on torch's losses
    losses = unreduced(output, target)
    if losses.dim() == 0 or losses.shape[0] != output.shape[0]:
        raise ValueError(
            f"criterion {type(criterion).__name__} with reduction='none' returned shape "
            f"{tuple(losses.shape)}, not one loss per row ({output.shape[0]} rows): sample "
            "weights need a criterion whose unreduced loss has the rows first."
        )
    flat = losses.reshape(losses.shape[0], -1)
    return flat.mean(dim=1) if reduction == "mean" else flat.sum(dim=1)
