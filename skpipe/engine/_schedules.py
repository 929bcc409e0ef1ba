"""Our schedule names, torch's classes, chunk placement and the schedules' constraints.

Everything here is a pure function of numbers: no process, no tensor. The rules mirror what
torch 2.13's ``torch.distributed.pipelining`` schedules accept, so that a bad combination is
rejected in the user's process, with the values named, before any worker starts.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

Placement = Literal["single", "loop", "v"]


@dataclass(frozen=True)
class ScheduleSpec:
    """What skpipe knows about one of torch's schedules."""

    name: str
    torch_class: str
    placement: Placement
    min_chunks: int
    max_chunks: int | None
    zero_bubble: bool


SCHEDULES: dict[str, ScheduleSpec] = {
    "gpipe": ScheduleSpec("gpipe", "ScheduleGPipe", "single", 1, 1, False),
    "1f1b": ScheduleSpec("1f1b", "Schedule1F1B", "single", 1, 1, False),
    "interleaved_1f1b": ScheduleSpec(
        "interleaved_1f1b", "ScheduleInterleaved1F1B", "loop", 2, None, False
    ),
    "looped_bfs": ScheduleSpec("looped_bfs", "ScheduleLoopedBFS", "loop", 2, None, False),
    "interleaved_zero_bubble": ScheduleSpec(
        "interleaved_zero_bubble", "ScheduleInterleavedZeroBubble", "loop", 2, None, True
    ),
    "zbv": ScheduleSpec("zbv", "ScheduleZBVZeroBubble", "v", 2, 2, True),
    "dualpipev": ScheduleSpec("dualpipev", "ScheduleDualPipeV", "v", 2, 2, True),
}

SCHEDULE_NAMES: tuple[str, ...] = tuple(SCHEDULES)

# With every stage in one process (world size 1), torch's single-stage classes cannot hold more
# than one stage, and the V classes hold exactly two. The local home then runs the looped
# runtime with the same stages and micro-batches: the arithmetic (and so every number) is the
# same, only the order of work inside the one process differs, which no process can observe.
LOCAL_EQUIVALENT: dict[str, str] = {
    "gpipe": "ScheduleLoopedBFS",
    "1f1b": "ScheduleInterleaved1F1B",
    "zbv": "ScheduleInterleavedZeroBubble",
    "dualpipev": "ScheduleInterleavedZeroBubble",
}


def resolve_chunks(schedule: str, chunks_per_stage: int | str) -> int:
    """Number of model chunks each pipeline rank holds."""
    spec = SCHEDULES[schedule]
    if chunks_per_stage == "auto":
        return spec.min_chunks
    assert isinstance(chunks_per_stage, int)
    if chunks_per_stage < spec.min_chunks or (
        spec.max_chunks is not None and chunks_per_stage > spec.max_chunks
    ):
        if spec.max_chunks == spec.min_chunks:
            need = f"exactly {spec.min_chunks}"
        else:
            need = f"at least {spec.min_chunks}"
        hint = (
            "use schedule='gpipe' or '1f1b' for one chunk per stage"
            if spec.min_chunks > 1
            else "use an interleaved schedule for several chunks per stage"
        )
        raise ValueError(
            f"chunks_per_stage ({chunks_per_stage}) is not allowed for schedule "
            f"'{schedule}', which needs {need} chunk(s) per stage; {hint}, or leave "
            "chunks_per_stage='auto'."
        )
    return chunks_per_stage


def chunk_owner(chunk: int, n_stages: int, chunks_per_stage: int, placement: Placement) -> int:
    """The pipeline rank that holds model chunk ``chunk``.

    ``loop`` places chunk c on rank c % p; ``v`` places rank r's two chunks at r and 2p-1-r.
    """
    if placement == "v":
        return chunk if chunk < n_stages else 2 * n_stages - 1 - chunk
    return chunk % n_stages


def chunks_of_rank(
    rank: int, n_stages: int, chunks_per_stage: int, placement: Placement
) -> list[int]:
    """The chunk indices a rank holds, in increasing order."""
    n_chunks = n_stages * chunks_per_stage
    return [c for c in range(n_chunks) if chunk_owner(c, n_stages, chunks_per_stage, placement) == rank]


def check_microbatches(
    schedule: str, n_stages: int, n_microbatches: int, chunks_per_stage: int, batch_size: int
) -> None:
    """Raise ValueError, naming the values, when torch would refuse this combination."""
    if n_microbatches > batch_size:
        raise ValueError(
            f"n_microbatches ({n_microbatches}) must be <= batch_size ({batch_size}): each "
            "micro-batch needs at least one row; lower n_microbatches or raise batch_size."
        )
    if n_stages == 1:
        return
    n_chunks = n_stages * chunks_per_stage
    if schedule == "1f1b" and n_microbatches < n_stages:
        raise ValueError(
            f"n_microbatches ({n_microbatches}) must be >= n_stages ({n_stages}) for schedule "
            "'1f1b'; raise n_microbatches or lower n_stages."
        )
    if schedule in ("interleaved_1f1b", "interleaved_zero_bubble"):
        rounds = max(1, n_microbatches // n_stages)
        if n_microbatches % rounds != 0:
            raise ValueError(
                f"n_microbatches ({n_microbatches}) must be a multiple of the number of rounds "
                f"({rounds} = n_microbatches // n_stages) for schedule '{schedule}'; use a "
                f"multiple of n_stages ({n_stages}) such as {n_stages * rounds}."
            )
    if schedule == "dualpipev" and n_microbatches < n_chunks:
        raise ValueError(
            f"n_microbatches ({n_microbatches}) must be >= the number of model chunks "
            f"({n_chunks} = 2 x n_stages) for schedule 'dualpipev'; raise n_microbatches."
        )


def auto_microbatches(schedule: str, n_stages: int, chunks_per_stage: int, batch_size: int) -> int:
    """The rule behind ``n_microbatches='auto'``.

    One stage: 1 (nothing to overlap). Otherwise the largest of 4p, 2p, p (p = n_stages; for
    dualpipev at least 2p) that fits in the batch and that the schedule accepts; 4p keeps the
    GPipe/1F1B bubble (p-1)/(m+p-1) under 1/5. Falls back to the largest accepted count <= batch.
    """
    if n_stages == 1:
        return 1
    candidates = [4 * n_stages, 2 * n_stages, n_stages] + list(range(batch_size, 0, -1))
    for m in candidates:
        if m > batch_size:
            continue
        try:
            check_microbatches(schedule, n_stages, m, chunks_per_stage, batch_size)
        except ValueError:
            continue
        return m
    raise ValueError(
        f"no micro-batch count fits batch_size ({batch_size}) for schedule '{schedule}' with "
        f"n_stages ({n_stages}); raise batch_size."
    )


def bubble_fraction(schedule: str, n_stages: int, n_microbatches: int, chunks_per_stage: int) -> float:
    """Theoretical idle fraction of a step, assuming equal stages and B = 2F (W = B/2 split).

    GPipe / 1F1B: (p-1)/(m+p-1). Interleaved with v chunks: (p-1)/(v*m+p-1). Zero-bubble
    schedules, with backward split into input and weight halves, fill most of the ramp; we use
    the ZB-H1 figure (p-1)/(3*(m+p-1)) for the interleaved zero-bubble and V shapes.
    """
    p, m, v = n_stages, n_microbatches, chunks_per_stage
    if p == 1:
        return 0.0
    spec = SCHEDULES[schedule]
    if spec.zero_bubble:
        return (p - 1) / (3 * (v * m + p - 1)) if spec.placement == "loop" else (p - 1) / (
            3 * (m + p - 1)
        )
    if spec.placement == "loop":
        return (p - 1) / (v * m + p - 1)
    return (p - 1) / (m + p - 1)


def theoretical_step_time(
    schedule: str, n_stages: int, n_microbatches: int, chunks_per_stage: int, f: float, b: float
) -> float:
    """Ideal time of one step when every rank spends f (forward) and b (backward) per micro-batch
    on its whole share of the model: busy time m*(f+b) divided by (1 - bubble)."""
    busy = n_microbatches * (f + b)
    return busy / (1.0 - bubble_fraction(schedule, n_stages, n_microbatches, chunks_per_stage))
