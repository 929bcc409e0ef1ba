"""The asynchronous schedules' order of work: 1F1B across batch boundaries, the version every
action uses, where each stage updates, and what cannot run."""

import pytest

from skpipe.engine.asyncpipe._ticks import Tick, async_order, check_async, stashed_copies
from skpipe.engine.plan._schedules import SCHEDULES


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


@pytest.mark.parametrize("p", [2, 3, 4, 6])
def test_two_versions_are_enough_for_2bw_and_pipedream_stashes_what_is_in_flight(p):
    # 2bw: the live weights and one stashed copy, as PipeDream-2BW; pipedream: stage s keeps
    # p - s - 1 copies besides its live weights (the first p - 1, the last none)
    assert stashed_copies("2bw", p, p, 5) == [1] * p
    assert stashed_copies("2bw", p, 2 * p, 5) == [1] * p
    assert stashed_copies("pipedream", p, p, 4) == [p - s - 1 for s in range(p)]
    # the schedule table (plan()'s memory estimate and its report) says the same
    for name in ("2bw", "pipedream"):
        assert [SCHEDULES[name].weight_copies(p, s) for s in range(p)] == stashed_copies(
            name, p, p, 5)


def test_what_cannot_run_is_refused_by_name():
    with pytest.raises(ValueError, match=r"schedule='2bw' needs n_microbatches >= n_stages "
                                         r"\(got n_microbatches=2 for n_stages=4\)"):
        check_async("2bw", 4, 2)
    with pytest.raises(ValueError, match=r"one of \('2bw', 'pipedream'\); got '1f1b'"):
        async_order("1f1b", 2, 2, 1)
    check_async("pipedream", 4, 1)  # stashing keeps what it needs
    assert Tick("F", 0, 0, 0).kind == "F"
