"""Record what each stage really did: forward, backward (full or input-only), weight-gradient
and communication-wait spans, per micro-batch, with wall-clock times.

Recording wraps the methods of torch's ``PipelineStage`` objects of one process (and torch's
wait on point-to-point work) for a chosen number of steps; outside those steps nothing is
wrapped, so leaving it on for a few steps costs a few microseconds per span.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from torch.distributed.pipelining import schedules as torch_schedules

from ._schedules import bubble_fraction

COMPUTE = ("F", "B", "I", "W")


@dataclass(frozen=True)
class Span:
    step: int
    rank: int
    chunk: int
    kind: str  # 'F', 'B' (full backward), 'I' (input grad), 'W' (weight grad), 'comm'
    microbatch: int
    start: float
    end: float


class Recorder:
    """Wraps one process's stages while ``steps_left > 0``."""

    def __init__(self, rank: int, stage_of: Callable[[int], int] | None = None) -> None:
        self.rank = rank
        # the pipeline stage a chunk belongs to (all chunks share one process with 'local')
        self.stage_of = stage_of or (lambda chunk: rank)
        self.steps_left = 0
        self.step = 0
        self.spans: list[Span] = []

    def _wrap(self, chunk: int, kind: str, fn: Callable[..., Any], kind_of: Callable[..., str] | None = None) -> Callable[..., Any]:
        def wrapped(mb: int, *args: Any, **kwargs: Any) -> Any:
            t0 = time.time()
            try:
                return fn(mb, *args, **kwargs)
            finally:
                k = kind_of(*args, **kwargs) if kind_of else kind
                self.spans.append(Span(self.step, self.stage_of(chunk), chunk, k, int(mb), t0, time.time()))

        return wrapped

    def install(self, stages: dict[int, Any]) -> Callable[[], None]:
        """Wrap the stages (and torch's p2p wait) for one step; returns the undo function."""
        undo = []
        for chunk, stage in stages.items():
            for name, kind, kind_of in (
                ("forward_one_chunk", "F", None),
                (
                    "backward_one_chunk",
                    "B",
                    lambda *a, full_backward=True, **k: "B" if full_backward else "I",
                ),
                ("backward_weight_one_chunk", "W", None),
            ):
                original = getattr(stage, name)
                setattr(stage, name, self._wrap(chunk, kind, original, kind_of))
                undo.append((stage, name))
        wait = torch_schedules._wait_batch_p2p

        def timed_wait(work: Any) -> Any:
            t0 = time.time()
            try:
                return wait(work)
            finally:
                self.spans.append(Span(self.step, self.rank, -1, "comm", -1, t0, time.time()))

        torch_schedules._wait_batch_p2p = timed_wait

        def uninstall() -> None:
            for stage, name in undo:
                delattr(stage, name)  # the class's method shows through again
            torch_schedules._wait_batch_p2p = wait

        return uninstall


@dataclass
class Timeline:
    """The recorded spans of a fit, with the schedule's theoretical bubble beside the measured one."""

    spans: list[Span]
    n_stages: int
    n_microbatches: int
    chunks_per_stage: int
    schedule: str

    @property
    def theoretical_bubble(self) -> float:
        return bubble_fraction(self.schedule, self.n_stages, self.n_microbatches, self.chunks_per_stage)

    def steps(self) -> list[int]:
        return sorted({s.step for s in self.spans})

    def measured_bubble(self) -> float:
        """Idle share of the recorded steps: 1 - busy compute time / (ranks x step wall time),
        averaged over steps."""
        fractions = []
        for step in self.steps():
            spans = [s for s in self.spans if s.step == step]
            start = min(s.start for s in spans)
            end = max(s.end for s in spans)
            busy = sum(s.end - s.start for s in spans if s.kind in COMPUTE)
            if end > start:
                fractions.append(1.0 - busy / (self.n_stages * (end - start)))
        return sum(fractions) / len(fractions) if fractions else float("nan")

    def to_frame(self):  # noqa: ANN201 - pandas is optional here
        import pandas as pd

        return pd.DataFrame([s.__dict__ for s in self.spans])
