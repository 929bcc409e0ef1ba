"""The order of work of the asynchronous schedules, pure: per stage, 1F1B across batch
boundaries (the pipeline fills once and drains once for all the batches it is given), with
the weight version every forward and backward uses and where each stage updates its weights.

``'2bw'`` (PipeDream-2BW, Narayanan et al., ICML 2021): gradients are accumulated over a
batch's micro-batches; a stage updates once its share of a batch is done. Batch t runs on
W_{t-1} (W_{-1} = W_0) and W_{t+1} = opt_step(W_t, grad L_t(W_{t-1})): one step of delay, the
same on every stage; a stage holds two versions.

``'pipedream'`` (weight stashing, Narayanan et al., SOSP 2019): a stage updates after every
micro-batch's backward; micro-batch g's forward at stage s runs on the weights after
``version(s, g) = max(0, g - (p - s) + 1)`` of its updates (p - s: the stage's micro-batches
in flight), and its backward on the same (stashed) weights. Stage s's delay is p - s - 1
updates: p - 1 on the first stage, none on the last.

Batches (t) and micro-batches (g) are counted over the whole fit: the order of one epoch starts
where the last one ended (``start``), so an epoch boundary changes nothing in the rules (the
pipeline drains there, and the versions the rules still need are kept across it).
"""

from __future__ import annotations

from dataclasses import dataclass

from ..plan._schedules import ASYNC_SCHEDULE_NAMES, SCHEDULES

ASYNC_SCHEDULES = ASYNC_SCHEDULE_NAMES  # ('2bw', 'pipedream')


@dataclass(frozen=True)
class Tick:
    """One action of one stage: 'F' or 'B' of global micro-batch ``mb`` (batch ``mb // m``)
    on weight version ``version`` (the stage's weights after that many updates), or 'U': the
    stage's update number ``version`` (after micro-batch ``mb``'s backward)."""

    kind: str
    stage: int
    mb: int
    version: int


def check_async(schedule: str, n_stages: int, n_microbatches: int) -> None:
    """Refuse what an asynchronous schedule cannot run, naming the values."""
    if schedule not in ASYNC_SCHEDULES:
        raise ValueError(f"schedule must be one of {ASYNC_SCHEDULES}; got {schedule!r}")
    if n_stages < 1 or n_microbatches < 1:
        raise ValueError(
            f"n_stages and n_microbatches must be positive; got {n_stages} and {n_microbatches}"
        )
    why = SCHEDULES[schedule].microbatch_rule(schedule, n_stages, n_microbatches, n_stages)
    if why is not None:
        raise ValueError(why)


def warmup(stage: int, n_stages: int, total: int) -> int:
    """Forwards stage ``stage`` runs before its first backward: the micro-batches in flight."""
    return min(n_stages - stage, total)


def version(schedule: str, stage: int, mb: int, n_stages: int, m: int) -> int:
    """The weight version micro-batch ``mb``'s forward and backward use on ``stage`` (``mb``
    counted over the whole fit)."""
    if schedule == "2bw":
        return max(0, mb // m - 1)
    return max(0, mb - (n_stages - stage) + 1)


def updates_after(schedule: str, mb: int, m: int) -> int:
    """The updates a stage has made once micro-batch ``mb``'s backward is done (and, for 2bw,
    its batch's update, where ``mb`` is the batch's last)."""
    return mb // m + (1 if mb % m == m - 1 else 0) if schedule == "2bw" else mb + 1


def async_order(
    schedule: str, n_stages: int, m: int, n_batches: int, start: int = 0
) -> list[list[Tick]]:
    """Per stage, its actions for ``n_batches`` batches of ``m`` micro-batches, the first being
    batch ``start`` of the fit: warm-up forwards, then one backward and one forward alternately,
    then the drain; an update after each batch's last backward ('2bw') or after every backward
    ('pipedream')."""
    check_async(schedule, n_stages, m)
    total = m * n_batches
    first = start * m
    order: list[list[Tick]] = []
    for s in range(n_stages):
        w = warmup(s, n_stages, total)
        kinds = ["F"] * w
        for _ in range(total - w):
            kinds += ["B", "F"]
        kinds += ["B"] * w
        ticks: list[Tick] = []
        f = b = first
        for kind in kinds:
            if kind == "F":
                ticks.append(Tick("F", s, f, version(schedule, s, f, n_stages, m)))
                f += 1
                continue
            ticks.append(Tick("B", s, b, version(schedule, s, b, n_stages, m)))
            if schedule == "pipedream" or b % m == m - 1:
                ticks.append(Tick("U", s, b, updates_after(schedule, b, m)))
            b += 1
        order.append(ticks)
    return order


def stashed_copies(schedule: str, n_stages: int, m: int, n_batches: int) -> list[int]:
    """The most copies of its weights each stage holds besides its live ones, as the executor
    keeps them: the newest version is the live weights themselves; at an update, the versions
    no later forward uses are let go, then the live weights move to a copy that the optimizer
    steps, the old storage staying as the version the forwards in flight (and to come) use."""
    out = []
    for s, ticks in enumerate(async_order(schedule, n_stages, m, n_batches)):
        kept, forwards, most = {0}, 0, 0
        for t in ticks:
            forwards += t.kind == "F"
            floor = version(schedule, s, forwards, n_stages, m)
            kept = {v for v in kept if v >= floor}
            if t.kind == "U":
                most = max(most, len(kept))  # every one of them is now a copy
                kept.add(t.version)
        out.append(most)
    return out
