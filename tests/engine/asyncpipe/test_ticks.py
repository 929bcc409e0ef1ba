"""The asynchronous schedules' order of work: 1F1B across batch boundaries, the version every
action uses, where each stage updates, and what cannot run."""

import pytest

from skpipe.engine.asyncpipe._ticks import Tick, async_order, check_async, versions_held


def test_the_pipeline_fills_once_for_all_batches():
    order = async_order("2bw", 2, 2, 3)  # 2 stages, 3 batches of 2 micro-batches
    kinds = ["".join(t.kind for t in ticks) for ticks in order]
    # stage 0 warms up with 2 forwards, then alternates across batch boundaries, drains once
    assert kinds[0] == "FF" + "BF" + "BUF" + "BF" + "BUF" + "B" + "BU"
    assert kinds[1] == "F" + "BF" + "BUF" + "BF" + "BUF" + "BF" + "BU"
    assert [t.version for t in order[0] if t.kind == "U"] == [1, 2, 3]


def test_2bw_runs_batch_t_on_the_weights_before_the_last_update():
    order = async_order("2bw", 2, 2, 3)
    on = {(t.kind, t.mb): t.version for t in order[0] if t.kind in "FB"}
    # batches 0 and 1 on W_0, batch 2 on W_1 (W_{t-1}); a backward on its forward's weights
    assert [on[("F", g)] for g in range(6)] == [0, 0, 0, 0, 1, 1]
    assert all(on[("B", g)] == on[("F", g)] for g in range(6))
    # every forward's version exists when it runs: made by an update earlier in the order
    for ticks in order:
        made = {0}
        for t in ticks:
            if t.kind == "U":
                made.add(t.version)
            elif t.kind == "F":
                assert t.version in made, t


def test_pipedream_stashes_per_stage_with_the_stages_own_delay():
    order = async_order("pipedream", 3, 2, 2)  # 4 micro-batches, updates after each
    first = {t.mb: t.version for t in order[0] if t.kind == "F"}
    last = {t.mb: t.version for t in order[2] if t.kind == "F"}
    assert first == {0: 0, 1: 0, 2: 0, 3: 1}  # p - 1 = 2 updates behind
    assert last == {0: 0, 1: 1, 2: 2, 3: 3}  # the last stage is never behind
    assert sum(t.kind == "U" for t in order[1]) == 4


def test_two_versions_are_enough_for_2bw_and_pipedream_stashes_what_is_in_flight():
    assert max(versions_held("2bw", 4, 4, 5)) <= 2
    assert versions_held("pipedream", 4, 4, 3)[0] == 4  # the first stage: p micro-batches


def test_what_cannot_run_is_refused_by_name():
    with pytest.raises(ValueError, match=r"schedule='2bw' needs n_microbatches >= n_stages "
                                         r"\(got n_microbatches=2 for n_stages=4\)"):
        check_async("2bw", 4, 2)
    with pytest.raises(ValueError, match=r"one of \('2bw', 'pipedream'\); got '1f1b'"):
        async_order("1f1b", 2, 2, 1)
    check_async("pipedream", 4, 1)  # stashing keeps what it needs
    assert Tick("F", 0, 0, 0).kind == "F"
