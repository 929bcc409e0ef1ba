"""schedule='auto' and n_stages='auto' as a user meets them: a planned fit trains what one
device trains, plan() says what was considered and why, the numbers given are kept, the fewest
stages that fit a budget are taken, and one stage is named when it would be faster."""

import numpy as np
import pytest
import torch

import skpipe
from skpipe import PipeNetClassifier

rng = np.random.RandomState(0)
X = rng.normal(size=(96, 8)).astype(np.float32)
Y = rng.randint(0, 3, size=96)


def make(**kw):
    p = dict(module__hidden_layer_sizes=(32, 32, 32, 32), module__activation="tanh", lr=0.01,
             max_epochs=2, batch_size=32, random_state=0)
    p.update(kw)
    return PipeNetClassifier(**p)


def test_a_planned_fit_trains_like_one_device_and_says_what_it_considered():
    ref = make().fit(X, Y)
    est = make(n_stages=2, schedule="auto", launcher="local").fit(X, Y)
    for k, v in ref.module_.state_dict().items():
        torch.testing.assert_close(est.module_.state_dict()[k], v, atol=1e-5, rtol=0, msg=k)
    report = est.plan_
    chosen = [c for c in report.candidates if c["chosen"]]
    assert len(chosen) == 1 and chosen[0] == report.to_dict()["candidates"][0]
    assert (est.config_.schedule, est.config_.n_microbatches, est.config_.chunks_per_stage) == (
        chosen[0]["schedule"], chosen[0]["n_microbatches"], chosen[0]["chunks_per_stage"])
    assert report.predicted_step_ms == chosen[0]["predicted_step_ms"]
    text = str(report)
    assert f"planner: {len(report.candidates)} plans simulated" in text
    assert "*  " + chosen[0]["schedule"] in text


def test_plan_before_fit_and_the_numbers_given_are_kept():
    est = make(n_stages=2, schedule="auto", launcher="local", n_microbatches=4, chunks_per_stage=2)
    report = est.plan(X, Y)
    assert not hasattr(est, "plan_")
    assert {(c["n_microbatches"], c["chunks_per_stage"]) for c in report.candidates} == {(4, 2)}
    assert report.n_microbatches == 4 and report.chunks_per_stage == 2


def test_n_stages_auto_takes_the_fewest_stages_that_fit():
    est = make(n_stages="auto", schedule="auto", launcher="local", stage_memory_budget=1e12)
    assert est.plan(X, Y).n_stages == 1  # the whole network fits one device
    # 4 x parameters (weights, gradients, Adam) of one 32x32 layer is 17 KiB: a budget of
    # 40 KiB per stage cannot hold the whole network (~70 KiB), two stages can
    two = make(n_stages="auto", schedule="auto", launcher="local", stage_memory_budget=40 * 1024)
    report = two.plan(X, Y)
    assert report.n_stages >= 2
    assert all(c["peak_stage_MiB"] * 2**20 <= 40 * 1024 for c in report.candidates if c["fits"])
    fitted = two.fit(X, Y)
    assert fitted.config_.n_stages == report.n_stages


def test_n_stages_auto_needs_a_budget():
    with pytest.raises(ValueError, match=r"n_stages='auto' takes the fewest stages .* stage_memory_budget is None"):
        make(n_stages="auto").fit(X, Y)


@pytest.mark.distributed
def test_one_stage_is_named_when_faster_and_the_measured_step_is_set_beside(capsys):
    """A small MLP on spawned workers is message-bound: the verbose fit says one stage would be
    faster, with both predicted times; a timeline puts the measured step beside the prediction."""
    est = make(n_stages=2, schedule="auto", launcher="spawn", verbose=1, timeline_steps=2)
    est.fit(X, Y)
    out = capsys.readouterr().out
    assert "[skpipe] one stage would be faster here:" in out
    assert est.plan_.advice in str(est.plan_)
    assert est.plan_.one_stage_step_ms < est.plan_.predicted_step_ms
    assert est.plan_.measured_step_ms > 0 and "measured:" in str(est.plan_)
    skpipe.shutdown_workers()


def test_balance_auto_tries_every_rule_and_trains_like_one_device():
    net = torch.nn.Sequential(torch.nn.Linear(8, 256), torch.nn.Tanh(), torch.nn.Linear(256, 8),
                              torch.nn.Tanh(), torch.nn.Linear(8, 8), torch.nn.Tanh(),
                              torch.nn.Linear(8, 3))
    plain = dict(module=net, lr=0.01, max_epochs=2, batch_size=32, random_state=0)
    ref = PipeNetClassifier(**plain).fit(X, Y)
    est = PipeNetClassifier(**plain, n_stages=2, schedule="1f1b", balance="auto", launcher="local")
    report = est.plan(X, Y)
    assert {c["balance"] for c in report.candidates} == {"uniform", "parameters", "time"}
    assert {c["schedule"] for c in report.candidates} == {"1f1b"}  # the schedule given is kept
    chosen = next(c for c in report.candidates if c["chosen"])
    assert f"  {chosen['balance']}" in str(report)
    est.fit(X, Y)
    assert est.config_.balance == chosen["balance"]
    for k, v in ref.module_.state_dict().items():
        torch.testing.assert_close(est.module_.state_dict()[k], v, atol=1e-5, rtol=0, msg=k)


def test_the_plan_takes_the_split_the_planner_predicted(monkeypatch):
    """One split for the prediction and the fit: the plan does not measure the layers again
    (here a re-measurement would put the split elsewhere)."""
    from skpipe.engine.split import _partition

    monkeypatch.setattr(_partition, "time_costs",
                        lambda layers, *a, **k: [1.0] * (len(layers) - 1) + [100.0])
    net = torch.nn.Sequential(torch.nn.Linear(8, 256), torch.nn.Tanh(), torch.nn.Linear(256, 8),
                              torch.nn.Tanh(), torch.nn.Linear(8, 8), torch.nn.Tanh(),
                              torch.nn.Linear(8, 3))
    est = PipeNetClassifier(net, n_stages=2, schedule="auto", balance="time", launcher="local",
                            batch_size=32)
    report = est.plan(X, Y)
    chosen = next(c for c in report.candidates if c["chosen"])
    assert [c.n_layers for c in report.chunks] == list(chosen["sizes"]) != [6, 1]


def test_plan_gives_one_peak_per_stage_and_recomputation_lowers_it():
    """The summary line and the planner's chosen row give the same peak; checkpoint='always'
    lowers what the planner predicts a stage holds (and costs a forward more per backward)."""
    kw = dict(module__hidden_layer_sizes=(256,) * 6, n_stages=2, schedule="auto",
              launcher="local", batch_size=64)
    plans = {ck: make(checkpoint=ck, **kw).plan(X, Y) for ck in ("never", "always")}
    for report in plans.values():
        chosen = next(c for c in report.candidates if c["chosen"])
        assert max(report.stage_MiB) == pytest.approx(chosen["peak_stage_MiB"])
        assert f"{chosen['peak_stage_MiB']:.2f}" in str(report)
    lowest = {ck: min(c["peak_stage_MiB"] for c in p.candidates) for ck, p in plans.items()}
    assert lowest["always"] < lowest["never"]
    fastest = {ck: min(c["predicted_step_ms"] for c in p.candidates) for ck, p in plans.items()}
    assert fastest["always"] > fastest["never"]
