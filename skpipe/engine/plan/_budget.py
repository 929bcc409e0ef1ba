"""``n_microbatches='auto'`` under a memory budget per stage.

Rule: start from the count the plain 'auto' rule picked (the largest of 4p, 2p, p that the
schedule accepts). If a stage would hold more than ``stage_memory_budget`` bytes, raise the
count (smaller micro-batches hold fewer activations) to the smallest accepted count that fits.
A stage's peak is the plan's estimate (``Plan.stage_bytes``):

    4 x parameter bytes + in_flight(m) x rows_per_microbatch(m) x activation_bytes_per_row

(with ``checkpoint='always'``, each micro-batch in flight holds only its input, and one
micro-batch's activations are rebuilt at a time: ``Plan.held_bytes_per_row``), the activation
bytes per row measured when the plan was made and ``in_flight`` the schedule's own rule (its row
in ``_schedules.SCHEDULES``). The split is the plan's: nothing is measured again.
"""

from __future__ import annotations

from . import _schedules
from ._memory import human_bytes
from ._plan import Plan


def fit_budget(plan: Plan, budget: float) -> Plan:
    """The plan stepping with the micro-batch count chosen under ``budget`` bytes per stage."""
    cfg = plan.config
    batch = cfg.share_rows  # the rows one replica's pipeline steps with
    for m in range(cfg.n_microbatches, batch + 1):
        try:
            _schedules.check_microbatches(
                cfg.schedule, cfg.n_stages, m, cfg.chunks_per_stage, batch
            )
        except ValueError:
            continue
        if max(plan.stage_bytes(m)) <= budget:
            return plan.with_microbatches(m) if m != cfg.n_microbatches else plan
    least = plan.stage_bytes(batch)
    worst = max(range(cfg.n_stages), key=lambda r: least[r])
    static = sum(
        4 * b for b, rank in zip(plan.parameter_bytes, plan.owners, strict=True) if rank == worst
    )
    more = "" if cfg.checkpoint == "always" else ", or use checkpoint='always'"
    raise ValueError(
        f"stage_memory_budget ({human_bytes(budget)}) is too small: even with one row per "
        f"micro-batch, stage {worst} needs about {human_bytes(least[worst])} (parameters, "
        f"gradients and optimizer state {human_bytes(static)}). Raise the budget or add "
        f"stages{more}."
    )
