"""The replay of torch's schedule orders with costs: it reproduces the schedules' known step
times, pays messages on the critical path, finds the bottleneck, and tracks held activations."""

import pytest

from skpipe.engine.plan._schedules import SCHEDULE_NAMES, resolve_chunks, theoretical_step_time
from skpipe.engine.planner._simulate import ChunkCost, action_order, simulate


def uniform(p, v, f, i, w, act=1.0):
    return [ChunkCost(f / v, i / v, w / v, act)] * (p * v)


@pytest.mark.parametrize("schedule", SCHEDULE_NAMES)
@pytest.mark.parametrize("p,m", [(2, 4), (4, 8), (4, 16)])
def test_uniform_costs_give_the_schedules_known_step_time(schedule, p, m):
    v = resolve_chunks(schedule, "auto")
    try:
        order = action_order(schedule, p, m, v)
    except ValueError:
        pytest.skip("torch refuses this combination")
    sim = simulate(order, uniform(p, v, 0.010, 0.010, 0.010))
    theory = theoretical_step_time(schedule, p, m, v, 0.010, 0.020)
    # exact for the GPipe-like and interleaved ones; the V ones within the closed form's slack
    assert sim.step_seconds == pytest.approx(theory, rel=0.04)
    assert sum(sim.busy_seconds) == pytest.approx(p * m * 0.030)


def test_every_rank_runs_all_its_work_in_torchs_order():
    order = action_order("interleaved_1f1b", 2, 4, 2)
    assert [a for a in order[0][:3]] == [("F", 0, 0), ("F", 0, 1), ("F", 2, 0)]
    assert sorted(order[1]) == sorted(
        (k, c, mb) for k in "FB" for c in (1, 3) for mb in range(4))
    # torch 2.13's Schedule1F1B lists shifted micro-batches: the stand-in's complete order is used
    one_f = action_order("1f1b", 2, 4, 1)
    assert sorted(one_f[1]) == sorted((k, 1, mb) for k in "FB" for mb in range(4))


def test_messages_on_the_critical_path_are_paid():
    order = action_order("gpipe", 2, 4, 1)
    costs = uniform(2, 1, 0.010, 0.010, 0.010)
    base = simulate(order, costs).step_seconds
    with_messages = simulate(order, costs, message_seconds=[0.005]).step_seconds
    assert base == pytest.approx(0.150)
    assert with_messages == pytest.approx(0.160)  # one hop forward, one back


def test_the_slowest_stage_sets_the_pace():
    order = action_order("gpipe", 2, 8, 1)
    costs = [ChunkCost(0.001, 0.001, 0.001), ChunkCost(0.010, 0.010, 0.010)]
    sim = simulate(order, costs)
    assert sim.step_seconds == pytest.approx(0.001 + 8 * 0.030 + 0.002)
    assert sim.busy_seconds == pytest.approx([8 * 0.003, 8 * 0.030])
    assert 0.4 < sim.bubble < 0.5


def test_weight_gradients_fill_the_zero_bubble_schedules_bubble():
    order = action_order("interleaved_zero_bubble", 4, 8, 2)
    split = simulate(order, uniform(4, 2, 0.010, 0.010, 0.010))
    assert split.bubble < 0.1
    # the same work with no weight gradient to defer: the bubble stays
    inputs_only = simulate(order, uniform(4, 2, 0.010, 0.020, 0.0))
    assert inputs_only.bubble > split.bubble


def test_activations_held_follow_the_schedule():
    gpipe = simulate(action_order("gpipe", 4, 8, 1), uniform(4, 1, 1, 1, 1, act=10.0))
    one_f = simulate(action_order("1f1b", 4, 8, 1), uniform(4, 1, 1, 1, 1, act=10.0))
    assert gpipe.peak_activation_bytes == [80.0] * 4  # every micro-batch until the backward
    assert max(one_f.peak_activation_bytes) < 80.0  # 1F1B frees early
    assert one_f.peak_activation_bytes[-1] == 10.0  # the last stage holds one at a time


def test_one_process_with_every_chunk_runs_them_one_after_another():
    order = action_order("1f1b", 2, 4, 1, local=True)
    assert len(order) == 1
    sim = simulate(order, uniform(2, 1, 0.010, 0.010, 0.010), message_seconds=[0.5])
    assert sim.step_seconds == pytest.approx(2 * 4 * 0.030)  # no overlap, no messages
