"""The planner: every valid candidate simulated from a profile, the fastest that fits chosen,
and one stage named when it would be faster."""

import pytest

from skpipe.engine.planner import _planner as PL
from skpipe.engine.plan._schedules import SCHEDULE_NAMES, SCHEDULES, check_microbatches
from tests.conftest import pipeline_config

FREE = PL.MessageCost(0.0, 0.0, 0.0)


def profile(fiw, act=1000.0, params=4000, out=32.0):
    """A synthetic profile: the same (F, I, W) seconds per row at any size, per layer (the full
    backward B is I + W)."""
    n = len(fiw)
    fiw = [layer if len(layer) == 4 else (*layer, layer[1] + layer[2]) for layer in fiw]
    at = lambda rows: tuple(tuple(x * rows for x in layer) for layer in fiw)  # noqa: E731
    return PL.LayerProfile(rows=(1, 2), fiw=(at(1), at(2)), activation_bytes_per_row=(act,) * n,
                           output_bytes_per_row=(out,) * n, parameter_bytes=(params,) * n,
                           threads=1)


def test_every_candidate_is_one_torch_accepts_and_the_fastest_is_chosen():
    cfg = pipeline_config(n_stages=2, batch_size=64, launcher="spawn")
    found = PL.candidates(profile([(1e-4, 1e-4, 1e-4)] * 8), cfg, message=FREE, local=False)
    assert {c.schedule for c in found} == set(SCHEDULE_NAMES)  # never an asynchronous one
    for c in found:
        check_microbatches(c.schedule, 2, c.n_microbatches, c.chunks_per_stage, 64)
        spec = SCHEDULES[c.schedule]
        assert spec.min_chunks <= c.chunks_per_stage <= (spec.max_chunks or 4)
    assert [c.chosen for c in found].count(True) == 1 and found[0].chosen
    assert found[0].predicted_step_ms == min(c.predicted_step_ms for c in found)


def test_heavy_weight_gradients_choose_a_zero_bubble_schedule():
    cfg = pipeline_config(n_stages=4, batch_size=64, launcher="spawn")
    heavy_w = PL.candidates(profile([(1e-4, 1e-4, 4e-4)] * 8), cfg, message=FREE, local=False)
    assert SCHEDULES[heavy_w[0].schedule].zero_bubble


def test_a_budget_rules_out_plans_that_hold_too_much():
    cfg = pipeline_config(n_stages=2, batch_size=64, launcher="spawn")
    prof = profile([(1e-4, 1e-4, 1e-4)] * 4, act=1e5)
    free = PL.candidates(prof, cfg, message=FREE, local=False)
    budget = sorted(c.peak_stage_MiB for c in free)[len(free) // 2] * 2**20
    tight = PL.candidates(prof, cfg, message=FREE, local=False, budget=budget)
    assert tight[0].chosen and tight[0].peak_stage_MiB * 2**20 <= budget
    assert any(not c.fits for c in tight)
    assert all(c.fits for c in tight[: sum(c.fits for c in tight)])  # the fitting ones first


def test_numbers_the_user_gave_are_kept():
    cfg = pipeline_config(n_stages=2, batch_size=64, launcher="spawn")
    found = PL.candidates(profile([(1e-4, 1e-4, 1e-4)] * 8), cfg, message=FREE, local=False,
                          fixed_microbatches=4, fixed_chunks=2, schedules=("interleaved_1f1b", "zbv"))
    assert {(c.schedule, c.n_microbatches, c.chunks_per_stage) for c in found} == {
        ("interleaved_1f1b", 4, 2), ("zbv", 4, 2)}


def test_messages_make_more_chunks_cost_more():
    cfg = pipeline_config(n_stages=2, batch_size=64, launcher="spawn")
    prof = profile([(1e-4, 1e-4, 1e-4)] * 8)
    slow = PL.MessageCost(0.0, 0.0, 0.002)
    step = {(c.schedule, c.n_microbatches, c.chunks_per_stage): c.predicted_step_ms
            for c in PL.candidates(prof, cfg, message=slow, local=False)}
    # each action pays torch's per-action time: 4 chunks x 2 per micro-batch cost more than 1 x 2
    assert step[("interleaved_1f1b", 4, 4)] > step[("1f1b", 4, 1)]


def test_advice_names_one_stage_when_it_is_faster_and_fits():
    cfg = pipeline_config(n_stages=2, batch_size=64, launcher="spawn")
    best = PL.Candidate("1f1b", 4, 1, 5.0, 0.2, 1.0, True, chosen=True)
    choice = PL.Choice(cfg, (best,), one_stage_ms=2.0, one_stage_fits=True, seconds=0.1)
    assert "one stage would be faster here: 2.00 ms per step" in choice.advice
    assert "5.00 ms for the best pipelined plan (1f1b, n_microbatches=4)" in choice.advice
    assert PL.Choice(cfg, (best,), 2.0, one_stage_fits=False, seconds=0.1).advice is None
    assert PL.Choice(cfg, (best,), 9.0, one_stage_fits=True, seconds=0.1).advice is None


def test_replicas_wait_for_their_gradient_sum_and_spawned_stages_for_the_driver(monkeypatch):
    """A ring of two replicas sends each stage's gradient bytes once: all of it after a
    zero-bubble schedule, what the backward does not hide (at least the last bucket) after the
    others; spawned stages also wait for the driver's step message and its reply, unless the
    next batch goes along with each step (the default: it is computed while they travel)."""
    from skpipe.engine.plan import _config

    msg = PL.MessageCost(0.0, 1e-9, 0.0)  # 1 ns per byte
    prof = profile([(1e-4, 1e-4, 1e-4)] * 4, params=4_000_000, out=32.0)
    one = pipeline_config(n_stages=2, batch_size=64, launcher="spawn")
    two = pipeline_config(n_stages=2, batch_size=128, n_replicas=2, launcher="spawn",
                          devices=("cpu",) * 4)
    gap = {}
    for schedule, m, v in (("zbv", 4, 2), ("1f1b", 4, 1)):
        gap[schedule] = (PL.predict(prof, two, schedule, m, v, msg, local=False)[0]
                         - PL.predict(prof, one, schedule, m, v, msg, local=False)[0])
    assert gap["zbv"] == pytest.approx(8e6 * 1e-9)  # 2 layers x 4 MB per stage, all waited
    assert gap["1f1b"] == pytest.approx(4 * 2**20 * 1e-9)  # the last bucket
    spawned = PL.predict(prof, one, "1f1b", 4, 1, msg, local=False)[0]
    in_job = PL.predict(prof, pipeline_config(n_stages=2, batch_size=64, launcher="torchrun"),
                        "1f1b", 4, 1, msg, local=False)[0]
    assert spawned == pytest.approx(in_job)  # the next batch went ahead
    monkeypatch.setattr(_config, "STEP_AHEAD", False)
    waiting = PL.predict(prof, one, "1f1b", 4, 1, msg, local=False)[0]
    assert waiting - in_job == pytest.approx(64 * 32 * 1e-9)  # the outputs' reply
    # the planner cannot import parallel/ (the floors): its bucket is the replicas' own
    from skpipe.engine.parallel._replicas import BUCKET_BYTES

    assert PL.REPLICA_BUCKET_BYTES == BUCKET_BYTES


def test_each_stage_steps_its_optimizer_after_its_last_action():
    """The step ends when the last stage's optimizer step does; one process steps every stage
    one after the other; one stage steps every parameter."""
    prof = profile([(1e-4, 1e-4, 1e-4)] * 4, params=1_000_000)
    prof = PL.LayerProfile(**{**prof.__dict__, "parameter_tensors": (2,) * 4})
    opt = PL.OptimizerCost(per_byte=1e-8, per_tensor=1e-4)
    stage = 2 * 1_000_000 * 1e-8 + 4 * 1e-4  # two layers per stage
    cfg = pipeline_config(n_stages=2, batch_size=64, launcher="spawn")
    bare = PL.predict(prof, cfg, "1f1b", 4, 1, FREE, local=False)[0]
    stepped = PL.predict(prof, cfg, "1f1b", 4, 1, FREE, local=False, optimizer=opt)[0]
    # stage 0 ends last in 1F1B (its last backward comes after stage 1's), then steps
    assert stepped - bare == pytest.approx(stage)
    local = pipeline_config(n_stages=2, batch_size=64, launcher="local")
    gap = (PL.predict(prof, local, "1f1b", 4, 1, FREE, local=True, optimizer=opt)[0]
           - PL.predict(prof, local, "1f1b", 4, 1, FREE, local=True)[0])
    assert gap == pytest.approx(2 * stage)
    assert PL.one_stage_ms(prof, 64, opt) - PL.one_stage_ms(prof, 64) == pytest.approx(
        1e3 * 2 * stage)


def test_messages_cost_the_compute_beside_them_only_between_processes():
    prof = profile([(1e-4, 1e-4, 1e-4)] * 4, out=1000.0)
    busy = PL.MessageCost(0.0, 0.0, 0.0, send_per_byte=1e-8, receive_per_byte=1e-8)
    spawn = pipeline_config(n_stages=2, batch_size=64, launcher="spawn")
    free = PL.predict(prof, spawn, "gpipe", 4, 1, FREE, local=False)[0]
    slowed = PL.predict(prof, spawn, "gpipe", 4, 1, busy, local=False)[0]
    # each of 4 micro-batches of 16 rows: 16 kB sent and received in its forward and backward
    assert slowed > free + 4 * 16 * 1000 * 1e-8
    local = pipeline_config(n_stages=2, batch_size=64, launcher="local")
    assert (PL.predict(prof, local, "gpipe", 4, 1, busy, local=True)[0]
            == PL.predict(prof, local, "gpipe", 4, 1, FREE, local=True)[0])
