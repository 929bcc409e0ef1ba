"""The micro-batch count under a memory budget, from the plan's own measurements."""

import pytest
import torch
from torch import nn

from skpipe.engine.plan._budget import fit_budget
from skpipe.engine.plan._plan import make_plan
from tests.conftest import pipeline_config


def plan_for(schedule="1f1b", m="auto", batch=64):
    cfg = pipeline_config(n_microbatches=m, schedule=schedule, batch_size=batch)
    net = nn.Sequential(nn.Linear(8, 256), nn.Tanh(), nn.Linear(256, 256), nn.Tanh(), nn.Linear(256, 3))
    return make_plan(net, cfg, torch.randn(batch, 8))


def test_stage_bytes_follow_the_schedules_in_flight_rule():
    plan = plan_for("gpipe", m=4)
    static = [4 * sum(b for b, r in zip(plan.parameter_bytes, plan.owners) if r == s) for s in (0, 1)]
    per_row = [sum(a for a, r in zip(plan.activation_bytes_per_row, plan.owners) if r == s) for s in (0, 1)]
    # the whole step's inputs (8 floats a row) on the first stage, its targets (as many bytes
    # as the 3 outputs) on the last
    ends = [64 * 8 * 4, 64 * 3 * 4]
    # GPipe holds every micro-batch: 4 x 16 rows; 1F1B on 2 stages at most 2 x 16 rows
    assert plan.stage_bytes() == pytest.approx(
        [static[s] + 64 * per_row[s] + ends[s] for s in (0, 1)])
    one_f = plan_for("1f1b", m=4)
    assert one_f.stage_bytes() == pytest.approx(
        [static[s] + 32 * per_row[s] + ends[s] for s in (0, 1)])


def test_a_generous_budget_keeps_the_plan_and_a_tight_one_raises_m():
    plan = plan_for()
    assert fit_budget(plan, 1e12) is plan
    need = plan.stage_bytes()
    tight = fit_budget(plan, max(need) * 0.99)
    assert tight.config.n_microbatches > plan.config.n_microbatches
    assert max(tight.stage_bytes()) <= max(need) * 0.99
    assert tight.bounds == plan.bounds  # the same split: nothing measured again
    assert tight.config.batch_rows % tight.config.n_microbatches == 0


def test_an_impossible_budget_says_by_how_much_in_units_that_show_it():
    with pytest.raises(ValueError, match=r"stage_memory_budget \(1000 B\) is too small: even with "
                                         r"one row per micro-batch, stage \d needs about [\d.]+ "
                                         r"MiB \(parameters, gradients and optimizer state "
                                         r"[\d.]+ MiB\).*or use checkpoint='always'"):
        fit_budget(plan_for(), 1000)


def test_human_bytes():
    from skpipe.engine.plan._memory import human_bytes

    assert [human_bytes(b) for b in (512, 12_600, 1.5 * 2**20, 2.1 * 2**30)] == [
        "512 B", "12.3 KiB", "1.5 MiB", "2.10 GiB"]


def test_replicas_hold_the_activations_of_their_share_only():
    net = nn.Sequential(nn.Linear(8, 256), nn.Tanh(), nn.Linear(256, 256), nn.Tanh(), nn.Linear(256, 3))
    # both step in micro-batches of 16 rows: 64 rows in 4, or each replica's 32 rows in 2
    one = make_plan(net, pipeline_config(n_microbatches=4, batch_size=64), torch.randn(64, 8))
    two = make_plan(net, pipeline_config(n_microbatches=2, batch_size=64, n_replicas=2,
                                         launcher="spawn", devices=("cpu",) * 4), torch.randn(64, 8))
    assert two.config.microbatch_rows == one.config.microbatch_rows == 16
    # 1F1B: 2 in flight of 16 rows; the step's inputs and targets: a replica holds its 32 rows
    ends = lambda rows: [rows * 8 * 4, rows * 3 * 4]  # noqa: E731
    assert [b - e for b, e in zip(two.stage_bytes(), ends(32))] == pytest.approx(
        [b - e for b, e in zip(one.stage_bytes(), ends(64))])
    assert two.stage_bytes(4) < two.stage_bytes(2)  # 4 micro-batches of a replica's 32: 8 rows
    budget = max(two.stage_bytes(4)) + 1
    assert fit_budget(two, budget).config.n_microbatches == 4
    assert fit_budget(two, budget).config.microbatch_rows == 8


@pytest.mark.distributed
@pytest.mark.parametrize("schedule", ["gpipe", "1f1b", "zbv"])
def test_recomputation_lowers_the_estimate_which_stays_above_the_measured_peaks(schedule):
    """checkpoint='always' / 'except_last' change what the plan estimates (and the budget
    checks); every estimate stays above each spawned stage's measured activation peak, or
    within 5 % of it (the last stage also holds what the loss saves, which the plan leaves
    out)."""
    import torch

    from skpipe.engine.plan._config import TrainSpec
    from skpipe.engine.plan._plan import make_plan
    from skpipe.engine.runners._runners import make_runner
    from skpipe.modules import MLP
    from tests.conftest import pipeline_config

    torch.manual_seed(0)
    x, y = torch.randn(64, 32), torch.randint(0, 3, (64,))
    spec = TrainSpec(optimizer=torch.optim.SGD, optimizer_kwargs={"lr": 0.1},
                     criterion=torch.nn.CrossEntropyLoss())
    estimates = {}
    for policy in ("never", "except_last", "always"):
        cfg = pipeline_config(n_stages=2, n_microbatches=4, batch_size=64, checkpoint=policy,
                              schedule=schedule, launcher="spawn")
        net = MLP(32, 3, hidden_layer_sizes=(512,) * 4)
        plan = make_plan(net, cfg, x[:16])
        static = [4 * sum(b for b, o in zip(plan.parameter_bytes, plan.owners) if o == s)
                  for s in range(2)]
        estimates[policy] = [b - s for b, s in zip(plan.stage_bytes(), static)]
        with make_runner(plan, net, spec, 0) as runner:
            runner.track_memory(True)
            runner.train_step(x, y)
            measured = [s["peak_activation_bytes"] for s in runner.stats()]
        assert all(e >= 0.95 * m for e, m in zip(estimates[policy], measured)), (
            policy, estimates[policy], measured)
    assert sum(estimates["always"]) < sum(estimates["never"])
    assert sum(estimates["always"]) <= sum(estimates["except_last"]) <= sum(estimates["never"])
