"""A stage host's asynchronous pipeline: the ``asyncpipe`` executor built from the host's
chunk, optimizer, loss and process groups, and the step that gives it a batch (from a spawned
worker's ``AsyncStep`` message or from a torchrun rank's own loop)."""

from __future__ import annotations

from typing import Any

from ..asyncpipe._executor import AsyncStage
from ..asyncpipe._mailbox import BatchRows
from ..parallel._groups import side_group
from ..state._named import set_hyperparameters


def async_stage(host: Any, replica_group: Any) -> AsyncStage:
    """The executor of ``host`` (a ``StageHost`` of an asynchronous schedule: one chunk)."""
    cfg = host.config
    (c,) = host.chunk_ids
    # a clip's norms are summed over the stages by the stage's thread, on a group of their own
    # (under torchrun the main thread uses the pipeline's group meanwhile)
    clip_group = side_group([[cfg.rank_of(r, s) for s in range(cfg.n_stages)]
                             for r in range(cfg.n_replicas)]) if host.clips else None
    return AsyncStage(
        cfg.schedule,
        host.chunks[c],
        host.optimizer,
        stage=host.rank,
        n_stages=cfg.n_stages,
        n_microbatches=cfg.n_microbatches,
        batch_rows=cfg.batch_rows,
        boundaries=(host.shapes[c], host.shapes[c + 1]),
        device=host.device,
        loss=host.loss if host.holds_last else None,
        group=host.group,
        prev=cfg.owner(c - 1) if c > 0 else None,
        next=cfg.owner(c + 1) if c + 1 < cfg.n_chunks else None,
        replica_group=replica_group,
        set_hyper=set_hyperparameters,
        span_rank=host.replica * cfg.n_stages + host.rank,
        clips=host.clips,
        clip_group=clip_group,
    )


def step(pipe: AsyncStage, holds_last: bool, hyper: Any, rows: dict[int, BatchRows]) -> Any:
    """Give the next batch to ``pipe``; where the last chunk lives, wait for its loss and
    outputs (the driver's loop goes on once it has them, while the stages go on working)."""
    batch = pipe.give(hyper, rows)
    if not holds_last:
        return None
    return pipe.result(batch)
