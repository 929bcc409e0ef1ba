"""Clipping a '2bw' batch's gradient by its global norm over every stage, without a flush.

A synchronous schedule clips after the whole pipeline's backward; '2bw' overlaps batches, and
its stages finish a batch's backward at different times (the last stage first, the first stage
p - 1 backwards later). Batch t's update makes W_{t+1}, which no forward needs before batch
t + 2's: so each stage sums its own part of the norm when its share of batch t is done, starts
the reduction over the pipeline's stages without waiting for it (``post``), goes on with its
work, and finishes the update (``coefficient``, then the optimizer's step) only before the
first forward on W_{t+1}, its next update or the epoch's drain, whichever comes first. In the
1F1B order that is at least m - p + s + 1 >= s + 1 actions later on stage s, while the first
stage's part arrives s backwards after stage s's: nothing waits in the steady state.

The factor is the one ``torch.nn.utils.clip_grad_norm_`` (and a synchronous fit) gives the
whole batch's gradient: each clip in order (the callbacks' ``GradientNormClipping``, then
``max_grad_norm``) on the norm the clips before it left, a norm scaling with the gradient.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from math import inf
from typing import Any

import torch
import torch.distributed as dist


@dataclass
class PostedNorms:
    """One batch's norms on their way: per clip, this stage's part and its reduction."""

    parts: list[torch.Tensor]
    works: list[Any]


class GlobalNormClip:
    """The clips ``(max_norm, norm_type)`` of a pipeline's stages, over ``group`` (the stages)."""

    def __init__(self, clips: Sequence[tuple[float, float]], group: Any) -> None:
        self.clips = [(float(c), float(t)) for c, t in clips]
        self.group = group

    def __bool__(self) -> bool:
        return bool(self.clips)

    def post(self, grads: Sequence[torch.Tensor | None], device: torch.device) -> PostedNorms:
        """Sum this stage's part of each clip's norm and start its reduction over the stages
        (every stage posts every batch's, in the order of the batches)."""
        parts, works = [], []
        for _, norm_type in self.clips:
            acc = torch.zeros((), dtype=torch.float64, device=device)
            for g in grads:
                if g is None or g.numel() == 0:
                    continue
                a = g.detach().double().abs()
                if norm_type == inf:
                    torch.maximum(acc, a.max(), out=acc)
                else:
                    acc.add_(a.pow(norm_type).sum())
            op = dist.ReduceOp.MAX if norm_type == inf else dist.ReduceOp.SUM
            works.append(dist.all_reduce(acc, op=op, group=self.group, async_op=True))
            parts.append(acc)
        return PostedNorms(parts, works)

    def coefficient(self, posted: PostedNorms) -> float:
        """What the batch's gradient is multiplied by (1.0 where no clip bites), once every
        stage's part has arrived."""
        scale = 1.0
        for (max_norm, norm_type), acc, work in zip(self.clips, posted.parts, posted.works,
                                                     strict=True):
            work.wait()
            total = float(acc) if norm_type == inf else float(acc) ** (1.0 / norm_type)
            coef = max_norm / (scale * total + 1e-6)
            if coef < 1.0:
                scale *= coef
        return scale
