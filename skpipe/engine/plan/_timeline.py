"""Record what each stage really did: forward, backward (full or input-only) and weight-gradient
spans, per micro-batch, with wall-clock times; the idle time between them is derived.

Recording wraps the methods of torch's ``PipelineStage`` objects of one process (the instances'
public methods, nothing of torch's module state) for a chosen number of steps; outside those
steps nothing is wrapped. On a GPU every span ends with a synchronisation, so that it times the
kernels and not their launch.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from ._schedules import bubble_fraction

COMPUTE = ("F", "B", "I", "W")


@dataclass(frozen=True)
class Span:
    step: int
    rank: int
    chunk: int
    kind: str  # 'F', 'B' (full backward), 'I' (input grad), 'W' (weight grad), 'wait' (idle)
    microbatch: int
    start: float
    end: float


class Recorder:
    """Wraps one process's stages while ``steps_left > 0``."""

    def __init__(
        self, rank: int, stage_of: Callable[[int], int] | None = None, device: str = "cpu"
    ) -> None:
        self.rank = rank
        dev = torch.device(device)
        self._sync: Callable[[], None] = (
            (lambda: torch.cuda.synchronize(dev)) if dev.type == "cuda" else (lambda: None)
        )
        # the pipeline stage a chunk belongs to (all chunks share one process with 'local')
        self.stage_of = stage_of or (lambda chunk: rank)
        self.steps_left = 0
        self.step = 0
        self.spans: list[Span] = []

    def _wrap(
        self,
        chunk: int,
        kind: str,
        fn: Callable[..., Any],
        kind_of: Callable[..., str] | None = None,
    ) -> Callable[..., Any]:
        def wrapped(mb: int, *args: Any, **kwargs: Any) -> Any:
            self._sync()
            t0 = time.time()
            try:
                return fn(mb, *args, **kwargs)
            finally:
                self._sync()
                k = kind_of(*args, **kwargs) if kind_of else kind
                self.spans.append(
                    Span(self.step, self.stage_of(chunk), chunk, k, int(mb), t0, time.time())
                )

        return wrapped

    def install(self, stages: dict[int, Any]) -> Callable[[], None]:
        """Wrap the stages for one step; returns the undo function."""
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

        def uninstall() -> None:
            for stage, name in undo:
                delattr(stage, name)  # the class's method shows through again

        return uninstall


@dataclass
class Timeline:
    """The recorded spans of a fit, with the schedule's theoretical bubble beside the measured
    one."""

    spans: list[Span]
    n_stages: int
    n_microbatches: int
    chunks_per_stage: int
    schedule: str
    n_replicas: int = 1
    # rows are the ranks of the (replica x stage x tensor) mesh, as the processes are numbered:
    # rank = (replica x n_stages + stage) x tensor_parallel + tensor shard
    tensor_parallel: int = 1

    @classmethod
    def of(cls, spans: list[Span], config: Any) -> Timeline:
        """The timeline of spans recorded under ``config`` (a PipelineConfig)."""
        return cls(spans, config.n_stages, config.n_microbatches, config.chunks_per_stage,
                   config.schedule, getattr(config, "n_replicas", 1),
                   getattr(config, "tensor_parallel", 1))

    @property
    def n_ranks(self) -> int:
        return self.n_stages * self.n_replicas * self.tensor_parallel

    def rank_label(self, rank: int) -> str:
        """'stage s' (and its replica and tensor shard, where there are several) of a row."""
        t = self.tensor_parallel
        shard, stage, replica = rank % t, rank // t % self.n_stages, rank // t // self.n_stages
        label = f"stage {stage}" + (f" shard {shard}" if t > 1 else "")
        return f"replica {replica} {label}" if self.n_replicas > 1 else label

    @property
    def theoretical_bubble(self) -> float:
        return bubble_fraction(
            self.schedule, self.n_stages, self.n_microbatches, self.chunks_per_stage
        )

    def steps(self) -> list[int]:
        return sorted({s.step for s in self.spans})

    def median_step_ms(self) -> float:
        """Wall time of a recorded step (first span's start to last span's end), median."""
        lengths = []
        for step in self.steps():
            spans = [s for s in self.spans if s.step == step]
            lengths.append(max(s.end for s in spans) - min(s.start for s in spans))
        lengths.sort()
        return 1e3 * lengths[len(lengths) // 2] if lengths else float("nan")

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
                fractions.append(1.0 - busy / (self.n_ranks * (end - start)))
        return sum(fractions) / len(fractions) if fractions else float("nan")

    def waits(self) -> list[Span]:
        """The idle time of each rank within each recorded step (between its compute spans,
        from the step's first span on any rank to its last): waiting on another stage."""
        out = []
        for step in self.steps():
            spans = [s for s in self.spans if s.step == step and s.kind in COMPUTE]
            start = min(s.start for s in spans)
            end = max(s.end for s in spans)
            for rank in sorted({s.rank for s in spans}):
                t = start
                for s in sorted((s for s in spans if s.rank == rank), key=lambda s: s.start):
                    if s.start > t:
                        out.append(Span(step, rank, -1, "wait", -1, t, s.start))
                    t = max(t, s.end)
                if end > t:
                    out.append(Span(step, rank, -1, "wait", -1, t, end))
        return out

    def to_frame(self) -> Any:
        """The spans as a pandas DataFrame (one row per span)."""
        import pandas as pd

        return pd.DataFrame([s.__dict__ for s in self.spans])
