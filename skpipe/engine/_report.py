"""The plan of a fit as a user reads it: per stage and chunk, what it holds and costs."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any


@dataclass
class ChunkReport:
    stage: int
    chunk: int
    layers: str
    n_layers: int
    parameters: int
    parameter_MiB: float
    activation_MiB_per_microbatch: float
    fwd_bwd_ms: float | None


@dataclass
class PlanReport:
    """What a fit will do (``est.plan(X, y)``) or did (``est.plan_``).

    ``chunks`` lists each chunk's stage, layers, parameter count and memory, the activation
    memory held for backward per micro-batch (measured on a micro-batch of the data), and its
    measured forward+backward time when ``balance='time'``. ``bubble`` is the schedule's
    theoretical idle fraction and ``predicted_step_ms`` the step time it implies from the
    slowest stage's measured time (when measured). ``mesh`` says which rank holds which replica
    and stage, on which device (micro-batch and batch rows are per replica).
    """

    schedule: str
    n_stages: int
    chunks_per_stage: int
    n_microbatches: int
    microbatch_rows: int
    batch_rows: int
    launcher: str
    devices: tuple[str, ...]
    chunks: list[ChunkReport]
    bubble: float
    predicted_step_ms: float | None
    n_replicas: int = 1
    # one row per rank of the (replica x stage) mesh: {'rank', 'replica', 'stage', 'device'}
    mesh: list[dict[str, Any]] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def to_frame(self) -> Any:  # a pandas DataFrame; pandas is imported on demand
        import pandas as pd

        return pd.DataFrame([asdict(c) for c in self.chunks])

    def __str__(self) -> str:
        head = (
            f"schedule {self.schedule!r}: {self.n_stages} stage(s) x {self.chunks_per_stage} "
            f"chunk(s), {self.n_microbatches} micro-batch(es) of {self.microbatch_rows} rows "
            f"(batch padded to {self.batch_rows}), launcher {self.launcher!r} "
            f"on {list(self.devices)}"
        )
        cols = ["stage", "chunk", "layers", "params", "param MiB", "act MiB/mb", "f+b ms"]
        rows = [
            [
                str(c.stage),
                str(c.chunk),
                c.layers,
                f"{c.parameters:,}",
                f"{c.parameter_MiB:.3f}",
                f"{c.activation_MiB_per_microbatch:.3f}",
                "-" if c.fwd_bwd_ms is None else f"{c.fwd_bwd_ms:.3f}",
            ]
            for c in self.chunks
        ]
        widths = [max(len(h), *(len(r[i]) for r in rows)) for i, h in enumerate(cols)]

        def line(r: list[str]) -> str:
            return "  ".join(
                v.rjust(w) if i != 2 else v.ljust(w)
                for i, (v, w) in enumerate(zip(r, widths, strict=True))
            )

        mesh = []
        if self.n_replicas > 1:
            mesh.append(
                f"mesh: {self.n_replicas} replicas x {self.n_stages} stage(s), each replica "
                f"steps on its share of a batch ({self.batch_rows} rows padded); rank = "
                f"replica x {self.n_stages} + stage"
            )
            for r in range(self.n_replicas):
                ranks = [m for m in self.mesh if m["replica"] == r]
                where = ", ".join(
                    f"stage {m['stage']} rank {m['rank']} on {m['device']}" for m in ranks
                )
                mesh.append(f"  replica {r}: {where}")
        tail = f"expected bubble: {self.bubble:.1%}"
        if self.predicted_step_ms is not None:
            tail += f"; predicted step time: {self.predicted_step_ms:.2f} ms"
        return "\n".join([head, *mesh, line(cols), *[line(r) for r in rows], tail])

    def _repr_pretty_(self, p: Any, cycle: bool) -> None:  # IPython's hook
        p.text(str(self))
