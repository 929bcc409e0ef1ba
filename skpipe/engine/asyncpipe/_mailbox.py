"""Between the driver and an asynchronous stage's thread: what one process needs of a batch
(``BatchRows``), and the ``Mailbox`` that carries batches' rows and settings in and their
losses and outputs out, with the first error, which wakes every waiter."""

from __future__ import annotations

import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch


@dataclass(frozen=True)
class BatchRows:
    """What one process needs of a batch: the inputs (first stage), the targets and sample
    weights (last stage), the rows of this replica's share and the whole batch's figures."""

    n_real: int
    x: torch.Tensor | None = None
    y: torch.Tensor | None = None
    w: torch.Tensor | None = None
    total_rows: int | None = None
    total_weight: float | None = None
    denominator: float | None = None


class PipelineFailed(RuntimeError):
    """The stage's thread failed; the driver is told with the original traceback."""


class Mailbox:
    """Between the thread that answers the driver and the thread that runs the stage: batches'
    rows and settings in, losses and outputs out, and the first error, which wakes everyone."""

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._rows: dict[int, BatchRows] = {}
        self._hyper: dict[int, list[dict[str, Any]] | None] = {}
        self._results: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
        self.error: str | None = None

    def _wait(self, ready: Callable[[], bool]) -> None:
        while not ready():
            if self.error is not None:
                raise PipelineFailed(self.error)
            self._cond.wait(timeout=0.5)
        if self.error is not None:
            raise PipelineFailed(self.error)

    def give(self, batch: int, hyper: list[dict[str, Any]] | None,
             rows: dict[int, BatchRows]) -> None:
        with self._cond:
            if self.error is not None:  # the stage failed: the driver hears of it now
                raise PipelineFailed(self.error)
            self._hyper[batch] = hyper
            self._rows.update(rows)
            self._cond.notify_all()

    def rows(self, batch: int) -> BatchRows:
        with self._cond:
            self._wait(lambda: batch in self._rows)
            return self._rows[batch]

    def drop_rows(self, batch: int) -> None:
        with self._cond:
            self._rows.pop(batch, None)

    def hyper(self, batch: int) -> list[dict[str, Any]] | None:
        with self._cond:
            self._wait(lambda: batch in self._hyper)
            return self._hyper.pop(batch)

    def put_result(self, batch: int, loss: torch.Tensor, out: torch.Tensor) -> None:
        with self._cond:
            self._results[batch] = (loss, out)
            self._cond.notify_all()

    def result(self, batch: int) -> tuple[torch.Tensor, torch.Tensor]:
        with self._cond:
            self._wait(lambda: batch in self._results)
            return self._results.pop(batch)

    def fail(self, text: str) -> None:
        with self._cond:
            if self.error is None:
                self.error = text
            self._cond.notify_all()
