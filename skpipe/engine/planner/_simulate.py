"""Replay a schedule's real order of work with measured costs: predicted step time, idle share
and each process's peak activation memory.

The order is torch's own: each schedule class's per-rank action lists (``pipeline_order``, as
``torch.distributed.pipelining._schedule_visualizer.get_schedule_ops`` builds them from mock
stages), not a derivation by hand. Where a class's list is not a complete order of its work
(torch 2.13's ``Schedule1F1B`` lists micro-batch indices shifted by one on later ranks: its
runtime does not use the list), the schedule's local stand-in (the looped class that runs the
same chunks and micro-batches, ``_schedules.SCHEDULES[...].local_stand_in``) gives the order.

Replaying: every rank works through its list in order; an action starts when its rank is free
and what it needs is done: a forward needs the previous chunk's forward of that micro-batch
(plus one message when that chunk lives on another rank), a backward (full 'B' or input-only
'I') needs its own forward and the next chunk's backward (plus a message), a weight-gradient
'W' its 'I'. DualPipeV's overlapped forward+backward pairs run their two halves one after the
other. Activations are held from a forward to the end of that micro-batch's backward ('B', or
'W' after 'I'). An asynchronous schedule's update 'U' (``planner._async``) follows its
micro-batch's backward on the same rank.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from functools import lru_cache
from typing import Any
from unittest import mock

from ..plan import _schedules

Action = tuple[str, int, int]  # (kind 'F' | 'B' | 'I' | 'W' | 'U', chunk, micro-batch)


@dataclass(frozen=True)
class ChunkCost:
    """Seconds per micro-batch of one chunk: forward, input gradient, weight gradient (as a
    zero-bubble schedule splits the backward), the activation bytes its forward holds until its
    backward, and the full backward as the other schedules run it (None: the two halves)."""

    forward: float
    input_grad: float
    weight_grad: float
    activation_bytes: float = 0.0
    full_backward: float | None = None
    update: float = 0.0  # an asynchronous schedule's weight update ('U'), where it has one

    @property
    def backward(self) -> float:
        if self.full_backward is not None:
            return self.full_backward
        return self.input_grad + self.weight_grad


@dataclass(frozen=True)
class Simulation:
    step_seconds: float
    busy_seconds: list[float]  # compute per rank
    peak_activation_bytes: list[float]  # per rank
    finish_seconds: tuple[float, ...] = ()  # when each rank's last action ends

    @property
    def bubble(self) -> float:
        """Idle share of the ranks over the step."""
        if self.step_seconds <= 0:
            return 0.0
        return 1.0 - sum(self.busy_seconds) / (len(self.busy_seconds) * self.step_seconds)


_STAGE: Any = None


def _torch_order(name: str, ranks: int, m: int, per_rank: int) -> list[list[Action]]:
    from torch.distributed.pipelining import PipelineStage
    from torch.distributed.pipelining.schedules import (
        PipelineScheduleSingle,
        get_schedule_class,
    )

    cls = get_schedule_class(name)
    global _STAGE
    if _STAGE is None:  # a stand-in stage, made once (making one takes ~10 ms)
        _STAGE = mock.create_autospec(PipelineStage, instance=True)
    stage = _STAGE
    stage.group_rank = 0
    stage.group_size = ranks
    stage.submod = None
    stage.num_stages = ranks * per_rank
    if issubclass(cls, PipelineScheduleSingle):
        schedule = cls(stage, m)
    else:
        schedule = cls([stage] * per_rank, m)
    order = schedule.pipeline_order
    if order is None:
        raise ValueError(f"torch's {name} schedule lists no order of its work")
    out = []
    for rank in range(ranks):
        actions: list[Action] = []
        for a in order.get(rank, []):
            if a is None:
                continue
            for part in a.sub_actions or (a,):
                kind = part.computation_type.value
                if kind in ("F", "B", "I", "W"):
                    actions.append((kind, part.stage_index, int(part.microbatch_index)))
        out.append(actions)
    return out


def _complete(
    order: Sequence[Sequence[Action]], owners: Sequence[int], m: int
) -> bool:
    """Every chunk's forward and backward of every micro-batch, once, on the rank holding it."""
    seen: dict[Action, int] = {}
    for rank, actions in enumerate(order):
        for a in actions:
            if a in seen or not (0 <= a[1] < len(owners)) or owners[a[1]] != rank:
                return False
            if not (0 <= a[2] < m):
                return False
            seen[a] = rank
    for c in range(len(owners)):
        for mb in range(m):
            full = ("B", c, mb) in seen
            split = ("I", c, mb) in seen and ("W", c, mb) in seen
            if ("F", c, mb) not in seen or full == split:
                return False
    return True


@lru_cache(maxsize=256)
def action_order(
    schedule: str, n_stages: int, n_microbatches: int, chunks_per_stage: int, local: bool = False
) -> tuple[tuple[Action, ...], ...]:
    """Per process, the actions it runs in order (one process with every chunk when
    ``local``)."""
    spec = _schedules.SCHEDULES[schedule]
    n_chunks = n_stages * chunks_per_stage
    if local or n_stages == 1:
        # every chunk in one process: the stand-in class's order on a world of one
        name = spec.local_stand_in or spec.torch_name
        order = _torch_order(name, 1, n_microbatches, n_chunks)
        if not _complete(order, [0] * n_chunks, n_microbatches):
            raise ValueError(f"torch's {name} gives no complete order for {n_chunks} chunks")
        return tuple(tuple(r) for r in order)
    owners = [
        _schedules.chunk_owner(c, n_stages, chunks_per_stage, spec.placement)
        for c in range(n_chunks)
    ]
    order = _torch_order(spec.torch_name, n_stages, n_microbatches, chunks_per_stage)
    if not _complete(order, owners, n_microbatches) and spec.local_stand_in:
        order = _torch_order(spec.local_stand_in, n_stages, n_microbatches, chunks_per_stage)
    if not _complete(order, owners, n_microbatches):
        raise ValueError(
            f"torch's order for schedule '{schedule}' (p={n_stages}, m={n_microbatches}, "
            f"v={chunks_per_stage}) is not a complete order of its work"
        )
    return tuple(tuple(r) for r in order)


def simulate(
    order: Sequence[Sequence[Action]],
    costs: Sequence[ChunkCost],
    message_seconds: Sequence[float] = (),
) -> Simulation:
    """Replay ``order`` (per process) with ``costs`` per chunk; ``message_seconds[c]`` is the
    time for chunk c's output (or its gradient) to reach chunk c+1 on another process."""
    n_chunks = len(costs)
    rank_of = {a[1]: r for r, actions in enumerate(order) for a in actions}
    done: dict[Action, float] = {}
    free = [0.0] * len(order)
    nxt = [0] * len(order)
    busy = [0.0] * len(order)
    held = [0.0] * len(order)
    peak = [0.0] * len(order)

    def hop(c: int) -> float:
        """Message time from chunk c to c+1 (nothing when one process holds both)."""
        if rank_of.get(c) == rank_of.get(c + 1) or c >= len(message_seconds):
            return 0.0
        return message_seconds[c]

    def ready(a: Action) -> float | None:
        kind, c, mb = a
        need: list[tuple[Action, float]] = []
        if kind == "F":
            if c > 0:
                need.append((("F", c - 1, mb), hop(c - 1)))
        elif kind in ("B", "I"):
            need.append((("F", c, mb), 0.0))
            if c < n_chunks - 1:
                later = ("B", c + 1, mb) if ("B", c + 1, mb) in done else ("I", c + 1, mb)
                need.append((later, hop(c)))
        elif kind == "U":  # an asynchronous stage's update after micro-batch mb's backward
            need.append((("B", c, mb), 0.0))
        else:  # W
            need.append((("I", c, mb), 0.0))
        t = 0.0
        for dep, extra in need:
            if dep not in done:
                if dep[0] == "I" and ("B", dep[1], dep[2]) in done:
                    dep = ("B", dep[1], dep[2])
                else:
                    return None
            t = max(t, done[dep] + extra)
        return t

    remaining = sum(len(r) for r in order)
    while remaining:
        progressed = False
        for r, actions in enumerate(order):
            while nxt[r] < len(actions):
                a = actions[nxt[r]]
                t = ready(a)
                if t is None:
                    break
                kind, c, mb = a
                cost = costs[c]
                duration = {
                    "F": cost.forward,
                    "B": cost.backward,
                    "I": cost.input_grad,
                    "W": cost.weight_grad,
                    "U": cost.update,
                }[kind]
                start = max(free[r], t)
                done[a] = free[r] = start + duration
                busy[r] += duration
                if kind == "F":
                    held[r] += cost.activation_bytes
                    peak[r] = max(peak[r], held[r])
                elif kind in ("B", "W"):
                    held[r] -= cost.activation_bytes
                nxt[r] += 1
                remaining -= 1
                progressed = True
        if not progressed:
            stuck = [actions[nxt[r]] for r, actions in enumerate(order) if nxt[r] < len(actions)]
            raise RuntimeError(f"the schedule's order cannot proceed: waiting actions {stuck}")
    return Simulation(max(free) if free else 0.0, busy, peak, tuple(free))
