"""The planner's prediction of an asynchronous schedule's step: the executor's own order (1F1B
across batches) replayed, so a batch costs each stage its busy time with no fill or drain; an
update per batch ('2bw') or per micro-batch ('pipedream'); the stashed weights in memory."""

import pytest

from skpipe.engine.planner import _planner as PL
from tests.conftest import pipeline_config
from tests.engine.planner.test_planner import FREE, profile

F, IG, WG = 1e-5, 1e-5, 1e-5  # per row and layer: B = IG + WG = 2F
PARAMS = 1_000_000


def predict(schedule, p=4, m=4, replicas=1, optimizer=None, message=FREE):
    prof = profile([(F, IG, WG)] * (2 * p), params=PARAMS)
    prof = PL.LayerProfile(**{**prof.__dict__, "parameter_tensors": (2,) * (2 * p)})
    cfg = pipeline_config(n_stages=p, batch_size=64, launcher="spawn", n_replicas=replicas,
                          devices=("cpu",) * (p * replicas))
    return PL.predict(prof, cfg, schedule, m, 1, message, local=False, optimizer=optimizer)


@pytest.mark.parametrize("p", [2, 4])
def test_a_batch_costs_each_stage_its_busy_time_with_no_fill_or_drain(p):
    rows = 64 // 4
    busy = 4 * 2 * rows * (F + IG + WG)  # m micro-batches, two layers per stage, F + B
    step, bubble, _ = predict("2bw", p=p)
    assert step == pytest.approx(busy)
    assert bubble == pytest.approx(0.0, abs=1e-9)
    assert predict("pipedream", p=p)[0] == pytest.approx(busy)
    # the synchronous 1F1B fills and drains every batch: (m + p - 1) / m of it
    assert predict("1f1b", p=p)[0] == pytest.approx(busy * (4 + p - 1) / 4)


def test_2bw_updates_once_per_batch_and_pipedream_after_every_micro_batch():
    opt = PL.OptimizerCost(per_byte=1e-9, per_tensor=1e-5, copy_per_byte=1e-10)
    # two layers per stage: 2 x PARAMS bytes and 4 tensors; the update also copies the weights
    update = 2 * PARAMS * 1e-9 + 4 * 1e-5 + 2 * PARAMS * 1e-10
    assert predict("2bw", optimizer=opt)[0] - predict("2bw")[0] == pytest.approx(update)
    assert predict("pipedream", optimizer=opt)[0] - predict("pipedream")[0] == pytest.approx(
        4 * update)


def test_replicas_wait_for_their_gradient_sum_at_each_update():
    ring = PL.MessageCost(latency=1e-4, per_byte=1e-9, per_action=0.0)
    step = predict("2bw", replicas=2, message=ring)[0]
    free = predict("2bw", replicas=2)[0]
    # a ring all-reduce over 2 replicas: 2 latencies and the stage's bytes once (the stages'
    # own messages, 8 rows x 32 bytes per hop, add a few microseconds)
    assert step - free == pytest.approx(2 * 1e-4 + 2 * PARAMS * 1e-9, abs=5e-6)


def test_memory_counts_the_stashed_weight_versions():
    sync, two = predict("1f1b")[2], predict("2bw")[2]
    stage_bytes = 2 * PARAMS
    # one stashed copy; the activations in flight are 1F1B's within one micro-batch's
    # (16 rows x 2 layers x 1000 bytes)
    assert [a - b for a, b in zip(two, sync)] == pytest.approx([stage_bytes] * 4, abs=32000)
    # pipedream keeps p - s - 1 copies on stage s, in the same order of work as 2bw
    assert [a - b for a, b in zip(predict("pipedream")[2], two)] == pytest.approx(
        [(4 - s - 1 - 1) * stage_bytes for s in range(4)])


def test_auto_never_considers_an_asynchronous_schedule_but_a_named_one_is_predicted():
    prof = profile([(F, IG, WG)] * 8)
    cfg = pipeline_config(n_stages=2, batch_size=64, launcher="spawn")
    assert not {"2bw", "pipedream"} & {c.schedule for c in PL.candidates(
        prof, cfg, message=FREE, local=False)}
    named = PL.candidates(prof, cfg, message=FREE, local=False, schedules=("2bw",),
                          fixed_microbatches=4)
    assert [(c.schedule, c.n_microbatches, c.chosen) for c in named] == [("2bw", 4, True)]
