"""One device, one process: the n_stages=1 home (micro-batches become gradient accumulation)."""

from __future__ import annotations

import time
from collections.abc import Callable

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint as activation_checkpoint

from ..plan._config import TrainSpec
from ..plan._memory import ActivationMeter, out_of_memory
from ..plan._microbatch import WeightedLoss
from ..plan._plan import Plan
from ..plan._timeline import Span
from ..split._construct import materialize
from ._runner import InProcessState, Runner


class SingleRunner(InProcessState, Runner):
    def __init__(self, plan: Plan, module: nn.Module, spec: TrainSpec, seed: int = 0) -> None:
        super().__init__(plan, module, spec, seed)
        self.device = torch.device(self.config.devices[0])
        self.module = materialize(module).to(self.device)
        self.loss = WeightedLoss(spec.criterion.to(self.device))
        self._optimizer = spec.optimizer(self.module.parameters(), **spec.optimizer_kwargs)
        self._bf16 = self.config.precision == "bf16"
        self._record_left = 0
        self._step = 0
        self._spans: list[Span] = []
        self._meter: ActivationMeter | None = None
        self._on_cpu = self.device.type == "cpu"

    @property
    def optimizer(self) -> torch.optim.Optimizer:
        return self._optimizer

    def record_timeline(self, steps: int) -> None:
        self._record_left = steps

    def spans(self) -> list[Span]:
        return list(self._spans)

    def track_memory(self, on: bool = True) -> None:
        self._meter = ActivationMeter(self.module.parameters()) if on else None

    def stats(self) -> list[dict[str, float]]:
        return [{"peak_activation_bytes": float(self._meter.peak) if self._meter else float("nan")}]

    def _span(self, kind: str, mb: int, t0: float) -> None:
        if self._record_left > 0:
            if self.device.type == "cuda":
                torch.cuda.synchronize(self.device)
            self._spans.append(Span(self._step, 0, 0, kind, mb, t0, time.time()))

    def _forward(self, x: torch.Tensor, recompute: bool = False) -> torch.Tensor:
        """The network's output; ``recompute``: keep no activations for backward, run the
        forward again there (``checkpoint``)."""
        if recompute and torch.is_grad_enabled():
            recomputed: torch.Tensor = activation_checkpoint(
                self._forward, x, use_reentrant=False
            )
            return recomputed
        if self._bf16:
            with torch.autocast(device_type=self.device.type, dtype=torch.bfloat16):
                return self.module(x).float()
        out: torch.Tensor = self.module(x)
        return out

    def train_step(
        self,
        x: torch.Tensor,
        y: torch.Tensor,
        w: torch.Tensor | None = None,
        on_grads: Callable[[], None] | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        try:
            if self._meter is not None:
                with self._meter.track():
                    return self._train_step(x, y, w, on_grads)
            return self._train_step(x, y, w, on_grads)
        except torch.OutOfMemoryError as exc:
            params = sum(p.numel() * p.element_size() for p in self.module.parameters())
            raise out_of_memory(
                exc, "the network", str(self.device), 4 * params, self.config.n_stages
            ) from None

    def _train_step(
        self,
        x: torch.Tensor,
        y: torch.Tensor,
        w: torch.Tensor | None,
        on_grads: Callable[[], None] | None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        if not self.module.training:  # predict switched it to eval (checked, not reset, per step)
            self.module.train()
        self._optimizer.zero_grad(set_to_none=True)
        if not self._on_cpu:  # batches arrive on the CPU
            x = x.to(self.device, non_blocking=True)
            y = y.to(self.device, non_blocking=True)
            w = None if w is None else w.to(self.device, non_blocking=True)
        n = x.shape[0]
        m = min(self.config.n_microbatches, n)
        policy = self.config.checkpoint  # as ChunkModule recomputes on the stages
        recompute = [policy == "always" or (policy == "except_last" and mb < m - 1)
                     for mb in range(m)]
        if m == 1:
            t0 = time.time()
            out = self._forward(x, recompute[0])
            if w is None:
                loss = self.loss.criterion(out, y)
            else:
                self.loss.set_batch(y, n, w)
                loss = self.loss(out, torch.arange(n, device=self.device))
            self._span("F", 0, t0)
            t0 = time.time()
            loss.backward()
            self._span("B", 0, t0)
        else:  # gradient accumulation, weighted so the sum is the batch loss exactly
            self.loss.set_batch(y, n, w)
            outs, total = [], torch.zeros((), device=self.device)
            for mb, idx in enumerate(torch.arange(n, device=self.device).tensor_split(m)):
                t0 = time.time()
                out_mb = self._forward(x[idx], recompute[mb])
                loss_mb = self.loss(out_mb, idx)
                self._span("F", mb, t0)
                t0 = time.time()
                loss_mb.backward()
                self._span("B", mb, t0)
                outs.append(out_mb.detach())
                total = total + loss_mb.detach()
            out, loss = torch.cat(outs), total
        if self._record_left > 0:
            self._record_left -= 1
        self._step += 1
        if on_grads is not None:
            on_grads()
        if self.config.max_grad_norm is not None:
            nn.utils.clip_grad_norm_(self.module.parameters(), self.config.max_grad_norm)
        self._optimizer.step()
        return loss.detach().cpu(), out.detach().cpu()

    @torch.no_grad()
    def predict(self, x: torch.Tensor) -> torch.Tensor:
        self.module.eval()
        return self._forward(x.to(self.device)).float().cpu()
