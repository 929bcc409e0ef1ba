"""The plan of a fit as a user reads it: per stage and chunk, what it holds and costs."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

from ._schedules import SCHEDULES


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

    When the planner chose the layout (``schedule='auto'``, ``n_stages='auto'`` or
    ``balance='auto'``): ``candidates`` lists every plan it simulated, fastest first (the choice
    has ``chosen=True``), ``predicted_step_ms`` and ``bubble`` are the choice's simulation,
    ``one_stage_step_ms`` the whole network's predicted step on one device, and ``advice`` says
    when that is faster and the network fits one device. ``measured_step_ms`` (after a fit with
    ``timeline_steps``) is the median recorded step, first compute span to last.

    ``stage_MiB`` estimates each stage process's peak training memory (4 x its parameter bytes
    — weights, gradients, two Adam moments — plus the activations its schedule holds at once);
    ``construction`` says where the layers' values were made (each stage's own process, or this
    one and sent, and why).
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
    tensor_parallel: int = 1
    shard: str = "none"
    clips_gradients: bool = False  # by the global norm (max_grad_norm or a callback)
    # one row per rank of the (replica x stage x tensor) mesh: {'rank', 'replica', 'stage',
    # 'tensor', 'device'}
    mesh: list[dict[str, Any]] = field(default_factory=list)
    # the planner's (schedule='auto' / n_stages='auto'): every plan considered, fastest first
    candidates: list[dict[str, Any]] = field(default_factory=list)
    one_stage_step_ms: float | None = None  # the whole network on one device, predicted
    advice: str | None = None  # said when one stage is predicted faster and fits
    planning_seconds: float | None = None
    measured_step_ms: float | None = None  # after a fit with timeline_steps
    # per stage: weights, gradients, two Adam moments and the activations held at its peak
    stage_MiB: list[float] = field(default_factory=list)
    construction: str | None = None  # where the layers' values were made

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
        if self.n_replicas > 1 or self.tensor_parallel > 1:
            t = self.tensor_parallel
            mesh.append(
                f"mesh: {self.n_replicas} replica{'s' if self.n_replicas > 1 else ''} x "
                f"{self.n_stages} stage(s)"
                + (f" x {t} tensor shards" if t > 1 else "")
                + f", each replica steps on its share of a batch ({self.batch_rows} rows "
                f"padded); rank = (replica x {self.n_stages} + stage)"
                + (f" x {t} + tensor shard" if t > 1 else "")
                + ("" if self.shard == "none" else
                   f"; the replicas' state sharded (shard={self.shard!r}, FSDP2)")
            )
            for r in range(self.n_replicas):
                ranks = [m for m in self.mesh if m["replica"] == r]
                where = ", ".join(
                    f"stage {m['stage']}"
                    + (f".{m.get('tensor', 0)}" if t > 1 else "")
                    + f" rank {m['rank']} on {m['device']}"
                    for m in ranks
                )
                mesh.append(f"  replica {r}: {where}")
        tail = f"expected bubble: {self.bubble:.1%}"
        spec = SCHEDULES.get(self.schedule)
        if spec is not None and spec.asynchronous:
            tail += " (asynchronous: the pipeline fills and drains once per epoch)"
            mesh.append(
                f"schedule {self.schedule!r} {spec.semantics}; each stage keeps "
                + ", ".join(str(spec.weight_copies(self.n_stages, s)) for s in
                            range(self.n_stages))
                + " stashed copies of its weights besides the live ones"
                + (
                    ", and one copy of its gradients while their global norm is summed"
                    if self.clips_gradients and spec.clip_copies
                    else ""
                )
            )
        if self.predicted_step_ms is not None:
            tail += f"; predicted step time: {self.predicted_step_ms:.2f} ms"
        if self.measured_step_ms is not None:
            tail += f"; measured: {self.measured_step_ms:.2f} ms"
        lines = [head, *mesh, line(cols), *[line(r) for r in rows], tail]
        if len(self.stage_MiB) > 1 or self.tensor_parallel > 1 or self.shard != "none":
            lines.append(
                "peak memory per stage (estimated"
                + (", per rank" if self.tensor_parallel > 1 or self.shard != "none" else "")
                + "): "
                + ", ".join(f"{mib:,.1f}" if mib >= 10 else f"{mib:.3f}" for mib in self.stage_MiB)
                + " MiB"
            )
        if self.construction:
            lines.append(f"network: {self.construction}")
        if self.candidates:
            lines += ["", *self._candidate_lines()]
        if self.advice:
            lines.append(self.advice)
        return "\n".join(lines)

    def _candidate_lines(self, shown: int = 10) -> list[str]:
        """The planner's table: the fastest plans considered, the choice marked with '*'."""
        head = ["", "schedule", "m", "chunks", "balance", "step ms", "bubble", "peak MiB", "fits"]
        picked = [c for c in self.candidates[:shown]]
        picked += [c for c in self.candidates[shown:] if c["chosen"]]
        rows = [
            [
                "*" if c["chosen"] else "",
                c["schedule"],
                str(c["n_microbatches"]),
                str(c["chunks_per_stage"]),
                str(c.get("balance", "")),
                f"{c['predicted_step_ms']:.2f}",
                f"{c['bubble']:.1%}",
                f"{c['peak_stage_MiB']:.2f}",
                "yes" if c["fits"] else "no",
            ]
            for c in picked
        ]
        widths = [max(len(h), *(len(r[i]) for r in rows)) for i, h in enumerate(head)]

        def line(r: list[str]) -> str:
            return "  ".join(
                v.ljust(w) if i < 2 or i == 4 else v.rjust(w)
                for i, (v, w) in enumerate(zip(r, widths, strict=True))
            )

        title = f"planner: {len(self.candidates)} plans simulated"
        if self.planning_seconds is not None:
            title += f" in {self.planning_seconds:.2f} s"
        if self.one_stage_step_ms is not None:
            title += f"; one stage on one device: {self.one_stage_step_ms:.2f} ms per step"
            best = next((c for c in self.candidates if c["chosen"]), None)
            if best is not None and best["predicted_step_ms"] > 0:
                ratio = self.one_stage_step_ms / best["predicted_step_ms"]
                title += f" ({ratio:.2f}x the chosen plan's)"
        more = len(self.candidates) - len(picked)
        tail = [f"({more} more in to_dict()['candidates'])"] if more > 0 else []
        return [title, line(head), *[line(r) for r in rows], *tail]

    def _repr_pretty_(self, p: Any, cycle: bool) -> None:  # IPython's hook
        p.text(str(self))
