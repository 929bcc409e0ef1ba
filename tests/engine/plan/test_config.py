"""The frozen configuration: cross-parameter rules checked once, with the values named."""

import dataclasses

import numpy as np
import pytest

from tests.conftest import pipeline_config


def config(**kw):
    return pipeline_config(**{"schedule": "interleaved_1f1b", "launcher": "spawn", "batch_size": 10, **kw})


def test_derived_sizes_and_placement():
    cfg = config()
    assert (cfg.n_chunks, cfg.batch_size, cfg.batch_rows, cfg.microbatch_rows) == (4, 10, 12, 3)
    assert [cfg.owner(c) for c in range(4)] == [0, 1, 0, 1]
    assert cfg.chunks_of(1) == [1, 3]
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.n_stages = 3  # type: ignore[misc]


def test_numpy_integers_become_ints():
    cfg = config(n_stages=np.int64(2), n_microbatches=np.int32(4), batch_size=np.int64(10),
                 balance=(np.int64(2), 2, 2, 1))
    assert type(cfg.n_stages) is int and type(cfg.n_microbatches) is int
    assert cfg.balance == (2, 2, 2, 1) and all(type(b) is int for b in cfg.balance)


@pytest.mark.parametrize("kw,match", [
    (dict(n_microbatches=0), r"n_microbatches must be a positive int; got 0"),
    (dict(n_microbatches=2.5), r"n_microbatches must be a positive int; got 2.5"),
    (dict(batch_size=True), r"batch_size must be a positive int; got True"),
    (dict(chunks_per_stage=2.0), r"chunks_per_stage must be a positive int or 'auto'; got 2.0"),
])
def test_bad_counts_name_the_value(kw, match):
    with pytest.raises(ValueError, match=match):
        config(**kw)


def test_replicas_step_on_their_share_of_the_batch():
    cfg = config(n_replicas=3, batch_size=13, n_microbatches=2)
    assert cfg.world_size == 6 and cfg.share_rows == 5  # 13 rows: 5, 4, 4
    assert (cfg.batch_rows, cfg.microbatch_rows) == (6, 3)  # 5 padded to a multiple of 2
    assert [(cfg.replica_of(r), cfg.stage_of(r)) for r in range(6)] == [
        (0, 0), (0, 1), (1, 0), (1, 1), (2, 0), (2, 1)]
    auto = config(n_replicas=2, batch_size=16, n_microbatches="auto", schedule="1f1b")
    assert auto.n_microbatches == 8 and auto.microbatch_rows == 1  # 4p = 8 fits a share of 8


def test_replicas_need_processes_of_their_own():
    with pytest.raises(ValueError, match=r"n_replicas=2 needs one process per \(replica, stage\), but launcher='local'"):
        config(n_replicas=2, launcher="local")
    with pytest.raises(ValueError, match=r"n_replicas must be a positive int; got 0"):
        config(n_replicas=0)
