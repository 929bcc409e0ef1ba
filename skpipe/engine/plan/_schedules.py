"""One table row per schedule: everything skpipe knows about each of torch's schedules.

A row holds torch's name for the schedule (its class comes from torch's own
``get_schedule_class``), how chunks are placed on ranks, how many chunks a rank holds, the rule
torch applies to the micro-batch count, how many micro-batches a stage holds at its peak, and the
schedule that stands in for it when every stage lives in one process. Everything else in this
module is a pure function of numbers: no process, no tensor. The rules mirror what torch 2.13's
``torch.distributed.pipelining`` accepts, so a bad combination is refused in the user's process,
with the values named, before any worker starts.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from numbers import Integral
from typing import Any, Literal

Placement = Literal["single", "loop", "v"]

# (schedule name, n_stages, n_microbatches, n_chunks) -> why torch refuses it, or None
MicrobatchRule = Callable[[str, int, int, int], "str | None"]


def _any_count(name: str, p: int, m: int, n_chunks: int) -> str | None:
    return None


def _at_least_stages(name: str, p: int, m: int, n_chunks: int) -> str | None:
    if m < p:
        return (
            f"n_microbatches ({m}) must be >= n_stages ({p}) for schedule '{name}'; raise "
            "n_microbatches or lower n_stages."
        )
    return None


def _whole_rounds(name: str, p: int, m: int, n_chunks: int) -> str | None:
    rounds = max(1, m // p)
    if m % rounds != 0:
        return (
            f"n_microbatches ({m}) must be a multiple of the number of rounds ({rounds} = "
            f"n_microbatches // n_stages) for schedule '{name}'; use a multiple of n_stages "
            f"({p}) such as {p * rounds}."
        )
    return None


def _two_versions(name: str, p: int, m: int, n_chunks: int) -> str | None:
    if m < p:
        return (
            f"schedule='2bw' needs n_microbatches >= n_stages (got n_microbatches={m} for "
            f"n_stages={p}): with fewer, a stage has micro-batches of three batches in flight "
            "at once, and two weight versions are not enough. Raise n_microbatches or use "
            "schedule='pipedream', which stashes as many versions as it needs."
        )
    return None


def _at_least_chunks(name: str, p: int, m: int, n_chunks: int) -> str | None:
    if m < n_chunks:
        return (
            f"n_microbatches ({m}) must be >= the number of model chunks ({n_chunks} = 2 x "
            f"n_stages) for schedule '{name}'; raise n_microbatches."
        )
    return None


def _all_microbatches(p: int, chunks: int, m: int) -> int:
    """Fill-drain schedules run every forward before any backward."""
    return m


def _one_per_chunk_in_pipe(p: int, chunks: int, m: int) -> int:
    """1F1B-like schedules hold at most one micro-batch per chunk of the pipe in flight."""
    return min(m, p * chunks)


@dataclass(frozen=True)
class ScheduleSpec:
    """What skpipe knows about one of torch's schedules."""

    name: str
    torch_name: str  # the name torch's get_schedule_class takes
    placement: Placement
    min_chunks: int
    max_chunks: int | None
    zero_bubble: bool
    microbatch_rule: MicrobatchRule
    in_flight: Callable[
        [int, int, int], int
    ]  # (n_stages, chunks_per_stage, m) -> micro-batches held
    # With every stage in one process (world size 1), torch's single-stage classes cannot hold
    # more than one stage and the V classes hold exactly two: the local home runs this looped
    # schedule with the same stages and micro-batches instead. The arithmetic (and so every
    # number) is the same; only the order of work inside the one process differs.
    local_stand_in: str | None = None
    # skpipe's own asynchronous schedules (engine/asyncpipe): no flush between batches, and so
    # not what one device trains; torch has no class for them
    asynchronous: bool = False
    # (n_stages, stage) -> copies of the stage's weights held besides the live ones (the
    # asynchronous schedules' stashed versions)
    weight_copies: Callable[[int, int], int] = lambda p, s: 0
    # copies of the stage's gradients held besides the one accumulating, when the fit clips
    # by the global norm (2bw: a batch's gradient waits for the norm over the stages)
    clip_copies: int = 0
    # what the schedule trains, where it is not what one device trains (plan() shows it)
    semantics: str = ""

    @property
    def torch_class(self) -> str:
        """The name of torch's class for this schedule."""
        return self.schedule_class(local=False).__name__

    def schedule_class(self, *, local: bool) -> Any:
        """torch's class that runs this schedule (its stand-in when every stage is local)."""
        if self.asynchronous:
            raise ValueError(f"schedule '{self.name}' is skpipe's own: torch has no class for it")
        from torch.distributed.pipelining.schedules import get_schedule_class

        name = self.local_stand_in if local and self.local_stand_in else self.torch_name
        return get_schedule_class(name)


SCHEDULES: dict[str, ScheduleSpec] = {
    spec.name: spec
    for spec in (
        ScheduleSpec(
            "gpipe", "GPipe", "single", 1, 1, False, _any_count, _all_microbatches, "LoopedBFS"
        ),
        ScheduleSpec(
            "1f1b",
            "1F1B",
            "single",
            1,
            1,
            False,
            _at_least_stages,
            _one_per_chunk_in_pipe,
            "Interleaved1F1B",
        ),
        ScheduleSpec(
            "interleaved_1f1b",
            "Interleaved1F1B",
            "loop",
            2,
            None,
            False,
            _whole_rounds,
            _one_per_chunk_in_pipe,
        ),
        ScheduleSpec(
            "looped_bfs", "LoopedBFS", "loop", 2, None, False, _any_count, _all_microbatches
        ),
        ScheduleSpec(
            "interleaved_zero_bubble",
            "InterleavedZeroBubble",
            "loop",
            2,
            None,
            True,
            _whole_rounds,
            _one_per_chunk_in_pipe,
        ),
        ScheduleSpec(
            "zbv",
            "ZBVZeroBubble",
            "v",
            2,
            2,
            True,
            _any_count,
            _one_per_chunk_in_pipe,
            "InterleavedZeroBubble",
        ),
        ScheduleSpec(
            "dualpipev",
            "DualPipeV",
            "v",
            2,
            2,
            True,
            _at_least_chunks,
            _one_per_chunk_in_pipe,
            "InterleavedZeroBubble",
        ),
        ScheduleSpec(
            "2bw", "", "single", 1, 1, False, _two_versions, _one_per_chunk_in_pipe,
            asynchronous=True,
            weight_copies=lambda p, s: 1,
            clip_copies=1,
            semantics=(
                "does not train what one device trains: batch t's gradient is taken at the "
                "weights before the last update, W_{t+1} = step(W_t, grad L_t(W_{t-1})) (one "
                "update of delay on every stage)"
            ),
        ),
        ScheduleSpec(
            "pipedream", "", "single", 1, 1, False, _any_count, _one_per_chunk_in_pipe,
            asynchronous=True,
            weight_copies=lambda p, s: p - s - 1,
            semantics=(
                "does not train what one device trains: every stage updates after each "
                "micro-batch, on the micro-batch's own mean loss, and stage s runs micro-batch "
                "g on its weights after max(0, g - (p - s) + 1) updates (p - s - 1 updates "
                "behind: p - 1 on the first stage, none on the last)"
            ),
        ),
    )
}

# torch's schedules, each training exactly what one device trains
SCHEDULE_NAMES: tuple[str, ...] = tuple(n for n, s in SCHEDULES.items() if not s.asynchronous)
# skpipe's asynchronous ones (PipeDream-2BW, PipeDream): faster, and not the same training
ASYNC_SCHEDULE_NAMES: tuple[str, ...] = tuple(n for n, s in SCHEDULES.items() if s.asynchronous)


def resolve_chunks(schedule: str, chunks_per_stage: int | str) -> int:
    """Number of model chunks each pipeline rank holds."""
    spec = SCHEDULES[schedule]
    if chunks_per_stage == "auto":
        return spec.min_chunks
    if not isinstance(chunks_per_stage, Integral):
        raise ValueError(
            f"chunks_per_stage must be a positive int or 'auto'; got {chunks_per_stage!r}."
        )
    chunks = int(chunks_per_stage)
    if chunks < spec.min_chunks or (spec.max_chunks is not None and chunks > spec.max_chunks):
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
            f"chunks_per_stage ({chunks}) is not allowed for schedule "
            f"'{schedule}', which needs {need} chunk(s) per stage; {hint}, or leave "
            "chunks_per_stage='auto'."
        )
    return chunks


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
    return [
        c for c in range(n_chunks) if chunk_owner(c, n_stages, chunks_per_stage, placement) == rank
    ]


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
    why = SCHEDULES[schedule].microbatch_rule(
        schedule, n_stages, n_microbatches, n_stages * chunks_per_stage
    )
    if why is not None:
        raise ValueError(why)


def state_copies(schedule: str, config: Any, stage: int) -> int:
    """Copies of stage ``stage``'s parameter bytes it holds for training under ``schedule``
    (``config``: a ``PipelineConfig``, for the stages and the clipping): weights, gradients,
    two Adam moments, the weight versions an asynchronous schedule stashes, and the gradient
    a '2bw' stage holds while the global norm of the fit's clipping is summed (the next
    batch's gradient accumulating meanwhile)."""
    spec = SCHEDULES[schedule]
    clip = spec.clip_copies if config.clips_gradients else 0
    return 4 + spec.weight_copies(config.n_stages, stage) + clip


def in_flight(schedule: str, n_stages: int, chunks_per_stage: int, n_microbatches: int) -> int:
    """Micro-batches whose activations a stage holds at its peak."""
    return SCHEDULES[schedule].in_flight(n_stages, chunks_per_stage, n_microbatches)


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


def bubble_fraction(
    schedule: str, n_stages: int, n_microbatches: int, chunks_per_stage: int
) -> float:
    """Theoretical idle fraction of a step, assuming equal stages and B = 2F (W = B/2 split).

    GPipe / 1F1B: (p-1)/(m+p-1). Interleaved with v chunks: (p-1)/(v*m+p-1). Zero-bubble
    schedules, with backward split into input and weight halves, fill most of the ramp; we use
    the ZB-H1 figure (p-1)/(3*(m+p-1)) for the interleaved zero-bubble and V shapes.
    """
    p, m, v = n_stages, n_microbatches, chunks_per_stage
    spec = SCHEDULES[schedule]
    if p == 1 or spec.asynchronous:  # asynchronous: one fill and drain per epoch, not per step
        return 0.0
    if spec.zero_bubble:
        return (
            (p - 1) / (3 * (v * m + p - 1))
            if spec.placement == "loop"
            else (p - 1) / (3 * (m + p - 1))
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
