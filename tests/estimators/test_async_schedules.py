"""skpipe's asynchronous schedules on the estimators: a pipelined fit equals a plain loop
written from the rule each schedule states (``tests/engine/asyncpipe/rules.py``, not from
skpipe's code), with SGD and Adam,
2 and 4 stages, a ragged last batch, several epochs (the rule counts batches across them).

- '2bw': W_{-1} = W_0; batch t's gradient is taken at W_{t-1}; W_{t+1} = opt_step(W_t, grad).
- 'pipedream': micro-batch g runs stage s on the stage's weights after max(0, g - (p - s) + 1)
  of its updates; each stage then steps on g's own gradient (the micro-batch's mean loss).
"""

import copy

import numpy as np
import pytest
import torch
from torch import nn
from skorch.callbacks import Callback

import skorch.callbacks

import skpipe
import skpipe.callbacks
from skpipe import PipeNetRegressor
from tests.engine.asyncpipe import rules
from tests.engine.asyncpipe.rules import params

ROWS, BATCH, EPOCHS = 60, 16, 2  # 4 batches per epoch, the last of 12 rows


def network(p, seed=0):
    torch.manual_seed(seed)
    layers = []
    for _ in range(p - 1):
        layers += [nn.Linear(5, 5), nn.Tanh()]
    return nn.Sequential(*layers, nn.Linear(5, 1))


def balance(p):
    return [2] * (p - 1) + [1]


@pytest.fixture(scope="module")
def data():
    rng = np.random.RandomState(0)
    X = rng.normal(size=(ROWS, 5)).astype(np.float32)
    return X, (X[:, 0] - 2 * X[:, 1] + 0.1 * rng.normal(size=ROWS)).astype(np.float32)


OPTIMIZERS = {
    "sgd": (torch.optim.SGD, {"lr": 0.05, "optimizer__momentum": 0.9}),
    "adam": (torch.optim.Adam, {"lr": 0.01}),
}


def make_optimizer(name, params):
    cls, kw = OPTIMIZERS[name]
    return cls(params, lr=kw["lr"], **{k.split("__")[1]: v for k, v in kw.items() if "__" in k})


def fit(net, data, schedule, p, m, opt, launcher="spawn", **kw):
    cls, settings = OPTIMIZERS[opt]
    est = PipeNetRegressor(
        module=net, optimizer=cls, **settings, max_epochs=EPOCHS, batch_size=BATCH,
        train_split=None, iterator_train__shuffle=False, n_stages=p, n_microbatches=m,
        schedule=schedule, balance=balance(p), launcher=launcher, timeout=60, **kw)
    return est.fit(*data)


def batches(data):
    X, y = (torch.from_numpy(a) for a in data)
    out = []
    for _ in range(EPOCHS):
        out += [(X[i:i + BATCH], y[i:i + BATCH, None]) for i in range(0, ROWS, BATCH)]
    return out


def reference_2bw(net, opt, data, **kw):
    """The 2bw rule (``rules.reference_2bw``) on this file's batches and optimizers."""
    return rules.reference_2bw(net, lambda ps: make_optimizer(opt, ps), batches(data), **kw)


def reference_pipedream(net, opt, data, p, m):
    """The pipedream rule on this file's batches, stages cut as ``balance(p)`` cuts them."""
    bounds = np.cumsum([0] + balance(p))
    parts = [net[int(a):int(b)] for a, b in zip(bounds[:-1], bounds[1:])]
    rules.reference_pipedream(parts, lambda ps: make_optimizer(opt, ps), batches(data), m)
    return params(net)


def assert_weights(est, expected):
    got = dict(est.module_.named_parameters())
    assert got.keys() == expected.keys()
    for name, value in expected.items():
        torch.testing.assert_close(got[name].detach(), value, atol=1e-5, rtol=0, msg=name)


@pytest.mark.distributed
@pytest.mark.parametrize("opt", sorted(OPTIMIZERS))
@pytest.mark.parametrize("p,m", [(2, 2), (4, 4)])
def test_2bw_fit_equals_its_rule(data, p, m, opt):
    net = network(p)
    expected, losses = reference_2bw(copy.deepcopy(net), opt, data)
    est = fit(net, data, "2bw", p, m, opt)
    assert_weights(est, expected)
    got = [b["train_loss"] for epoch in est.history_ for b in epoch["batches"]]
    np.testing.assert_allclose(got, losses, atol=1e-5)  # each loss on the weights it ran on
    # the rule is not the synchronous one: the delay shows in the weights
    sync = fit(network(p), data, "1f1b", p, m, opt)
    assert any(not torch.allclose(a, b, atol=1e-4) for a, b in zip(
        est.module_.parameters(), sync.module_.parameters()))


@pytest.mark.distributed
@pytest.mark.parametrize("p,m,opt,how", [
    (4, 4, "sgd", "max_grad_norm"), (2, 3, "adam", "max_grad_norm"),
    (2, 2, "sgd", "callback"), (2, 2, "sgd", "replicas"),
])
def test_2bw_clips_each_batch_by_its_global_norm(data, p, m, opt, how):
    """Each batch's gradient (taken at W_{t-1}, over every stage) clipped by its 2-norm before
    its update, as clip_grad_norm_ clips one device's: the rule with the clip, not without."""
    net = network(p)
    max_norm = 0.5 if opt == "sgd" else 0.05  # below most batches' norms: the clip bites
    expected, losses = reference_2bw(copy.deepcopy(net), opt, data, max_norm=max_norm)
    unclipped, _ = reference_2bw(copy.deepcopy(net), opt, data)
    assert any(not torch.allclose(expected[n], unclipped[n], atol=1e-3) for n in expected)
    kw = dict(max_grad_norm=max_norm)
    if how == "callback":
        kw = dict(callbacks=[skorch.callbacks.GradientNormClipping(max_norm)])
    elif how == "replicas":  # the replicas' summed gradient is the batch's: the same clip
        kw["n_replicas"] = 2
    est = fit(net, data, "2bw", p, m, opt, **kw)
    assert_weights(est, expected)
    got = [b["train_loss"] for epoch in est.history_ for b in epoch["batches"]]
    np.testing.assert_allclose(got, losses, atol=1e-5)


@pytest.mark.distributed
@pytest.mark.parametrize("opt", sorted(OPTIMIZERS))
@pytest.mark.parametrize("p,m", [(2, 2), (4, 2)])
def test_pipedream_fit_equals_its_rule(data, p, m, opt):
    net = network(p)
    expected = reference_pipedream(copy.deepcopy(net), opt, data, p, m)
    assert_weights(fit(net, data, "pipedream", p, m, opt), expected)
    skpipe.shutdown_workers()


TORCHRUN_SCRIPT = """
import copy, sys
import torch.distributed as dist
from tests.estimators import test_async_schedules as T
dist.init_process_group("gloo")
X, y = T.data.__wrapped__()
worst = 0.0
for schedule, clip in (("2bw", None), ("pipedream", None), ("2bw", 0.05)):
    net = T.network(2)
    if schedule == "2bw":
        expected = T.reference_2bw(copy.deepcopy(net), "adam", (X, y), max_norm=clip)[0]
    else:
        expected = T.reference_pipedream(copy.deepcopy(net), "adam", (X, y), 2, 2)
    est = T.fit(net, (X, y), schedule, 2, 2, "adam", launcher="torchrun", max_grad_norm=clip)
    got = dict(est.module_.named_parameters())
    worst = max([worst] + [float((got[n] - e).abs().max()) for n, e in expected.items()])
sys.stdout.write(f"rank {dist.get_rank()} max difference {worst:.3g}\\n")
sys.stdout.flush()
dist.destroy_process_group()
"""


@pytest.mark.distributed
def test_torchrun_fits_equal_the_rules(tmp_path):
    import os
    import subprocess
    import sys
    from pathlib import Path

    from tests.test_examples import free_port

    script = tmp_path / "async_fit.py"
    script.write_text(TORCHRUN_SCRIPT)
    root = str(Path(__file__).resolve().parents[2])
    env = dict(os.environ, PYTHONPATH=root + os.pathsep + os.environ.get("PYTHONPATH", ""))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2",
           "--master-addr", "127.0.0.1", "--master-port", str(free_port()), str(script)]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env, cwd=root)
    assert out.returncode == 0, out.stderr[-3000:]
    diffs = [float(line.rsplit(" ", 1)[1]) for line in out.stdout.splitlines()
             if line.startswith("rank ")]
    assert len(diffs) == 2 and max(diffs) < 1e-5, out.stdout


class WritesWeightsEachBatch(Callback):
    def on_batch_end(self, net, **kwargs):
        pass


@pytest.fixture
def no_worker_may_start(monkeypatch):
    from skpipe.engine.workers import _pool

    def refuse(*a, **k):
        raise AssertionError("a stage worker was started before the bad input was refused")

    monkeypatch.setattr(_pool.WorkerGroup, "__init__", refuse)


@pytest.mark.parametrize("kw,match", [
    (dict(schedule="2bw", n_stages=4, n_microbatches=2),
     r"schedule='2bw' needs n_microbatches >= n_stages \(got n_microbatches=2 for n_stages=4\)"
     r".*two weight versions are not enough"),
    (dict(schedule="2bw", launcher="local"),
     r"schedule='2bw' needs launcher='spawn' or 'torchrun' \(got launcher='local'\)"),
    (dict(schedule="pipedream", n_stages=1),
     r"schedule='pipedream' overlaps the batches of a pipeline and needs n_stages >= 2"),
    (dict(schedule="2bw", n_stages="auto", stage_memory_budget=10**9),
     r"schedule='2bw' needs a number of stages \(>= 2\); got n_stages='auto'"),
    (dict(schedule="pipedream", n_replicas=2),
     r"schedule='pipedream' updates after every micro-batch.*got n_replicas=2.*'2bw'"),
    (dict(schedule="2bw", checkpoint="always"),
     r"schedule='2bw' runs each forward on a stashed weight version; checkpoint='always'"),
    (dict(schedule="pipedream", max_grad_norm=1.0),
     r"schedule='pipedream' cannot clip by the global gradient norm \(got max_grad_norm\).*"
     r"Use schedule='2bw'"),
    (dict(schedule="pipedream", callbacks=[skorch.callbacks.GradientNormClipping(1.0)]),
     r"schedule='pipedream' cannot clip by the global gradient norm \(got GradientNormClipping\)"),
    (dict(schedule="2bw", callbacks=[WritesWeightsEachBatch()]),
     r"callbacks contains WritesWeightsEachBatch, which reads or writes the weights at "
     r"on_batch_end; with schedule='2bw' the batches overlap"),
    (dict(schedule="2bw", callbacks=[skorch.callbacks.Checkpoint(dirname="unused")]),
     r"callbacks contains skorch's Checkpoint, but a checkpoint of schedule='2bw' needs the "
     r"weight versions each stage stashes.*skpipe.callbacks.Checkpoint"),
])
def test_what_the_asynchronous_schedules_cannot_run_is_refused_before_any_worker(
        data, kw, match, no_worker_may_start):
    settings = dict(n_stages=2, n_microbatches=2, max_epochs=1, batch_size=BATCH)
    with pytest.raises(ValueError, match=match):
        PipeNetRegressor(module=network(2), **{**settings, **kw}).fit(*data)


@pytest.mark.distributed
def test_a_per_batch_lr_schedule_reaches_each_update(data):
    """LRScheduler stepping every batch: update t of the rule uses the rate of batch t."""
    from skorch.callbacks import LRScheduler
    from torch.optim.lr_scheduler import StepLR

    net = network(2)
    ref = copy.deepcopy(net)
    schedule = LRScheduler(policy=StepLR, step_size=1, gamma=0.7, step_every="batch")
    est = PipeNetRegressor(
        module=net, optimizer=torch.optim.SGD, lr=0.1, max_epochs=EPOCHS, batch_size=BATCH,
        train_split=None, iterator_train__shuffle=False, n_stages=2, n_microbatches=2,
        schedule="2bw", balance=balance(2), launcher="spawn", timeout=60, callbacks=[schedule],
    ).fit(*data)
    expected, _ = rules.reference_2bw(ref, lambda ps: torch.optim.SGD(ps, lr=0.1),
                                      batches(data), lr_of=lambda t: 0.1 * 0.7 ** t)
    assert_weights(est, expected)


@pytest.mark.distributed
def test_2bw_with_replicas_sums_their_gradients_per_batch(data):
    """Two replicas of a 2-stage pipeline (4 workers), each on its share of every batch: the
    summed gradient is the batch's, so the fit equals the rule on whole batches."""
    net = network(2)
    expected, _ = reference_2bw(copy.deepcopy(net), "adam", data)
    assert_weights(fit(net, data, "2bw", 2, 2, "adam", n_replicas=2), expected)


@pytest.mark.distributed
def test_2bw_weighs_rows_by_their_sample_weights(data):
    X, y = data
    w = np.random.RandomState(3).uniform(0.2, 3.0, size=ROWS).astype(np.float32)
    net = network(2)
    ref = copy.deepcopy(net)
    cls, settings = OPTIMIZERS["sgd"]
    est = PipeNetRegressor(
        module=net, optimizer=cls, **settings, max_epochs=EPOCHS, batch_size=BATCH,
        train_split=None, iterator_train__shuffle=False, n_stages=2, n_microbatches=2,
        schedule="2bw", balance=balance(2), launcher="spawn", timeout=60,
    ).fit(X, y, sample_weight=w)
    weights_of = torch.from_numpy(w)

    def weighted(t, out, target):
        start = (t % -(-ROWS // BATCH)) * BATCH  # batches per epoch: ceil(ROWS / BATCH)
        rows = weights_of[start:start + len(target)]
        return (rows[:, None] * (out - target) ** 2).sum() / rows.sum()

    expected, _ = reference_2bw(ref, "sgd", data, loss_of=weighted)
    assert_weights(est, expected)


@pytest.mark.distributed
def test_the_timeline_shows_batches_overlapping(data):
    """timeline_ records each stage's forwards and backwards by batch: with 2bw, a stage works
    on the next batch before the previous one's backwards are done."""
    est = fit(network(2), data, "2bw", 2, 2, "sgd", timeline_steps=3)
    spans = [s for s in est.timeline_.spans if s.kind in "FB"]
    assert {s.rank for s in spans} == {0, 1}
    first = [s for s in spans if s.rank == 0]
    batches_seen = sorted({s.step for s in first})
    assert len(batches_seen) >= 2
    t = batches_seen[0]
    last_backward = max(s.end for s in first if s.step == t and s.kind == "B")
    next_forward = min(s.start for s in first if s.step == t + 1 and s.kind == "F")
    assert next_forward < last_backward  # no flush between batch t and t + 1


def test_plan_predicts_the_step_of_an_asynchronous_schedule(data, monkeypatch):
    """plan() with schedule='2bw' replays the executor's order with measured layers: a step
    with no fill or drain, faster than 1f1b's on the same network, the stashed weights in the
    memory; the split stays the one given (the prediction is a report, not a choice)."""
    from skpipe.engine.planner import _planner
    from skpipe.engine.planner._measure import MessageCost

    # a fixed message cost: measuring one would start two processes
    monkeypatch.setattr(_planner, "message_cost", lambda device: MessageCost(1e-5, 1e-9, 1e-4))
    wide = nn.Sequential(nn.Linear(5, 256), nn.Tanh(), nn.Linear(256, 256), nn.Tanh(),
                         nn.Linear(256, 256), nn.Tanh(), nn.Linear(256, 1))
    kw = dict(module=wide, n_stages=4, n_microbatches=4, batch_size=BATCH, balance=[2, 2, 2, 1],
              launcher="spawn")
    two = PipeNetRegressor(schedule="2bw", **kw).plan(*data)
    assert two.predicted_step_ms is not None and two.predicted_step_ms > 0
    assert [(c["schedule"], c["n_microbatches"]) for c in two.candidates] == [("2bw", 4)]
    assert [c.n_layers for c in two.chunks] == [2, 2, 2, 1]
    assert "predicted step time" in str(two) and "fills and drains once per epoch" in str(two)
    one = PipeNetRegressor(schedule="1f1b", **kw).plan(*data)
    assert one.predicted_step_ms is None  # a synchronous schedule as given is not simulated
    # the same network planned by the planner for 1f1b: 2bw's step has no fill and drain
    planned = PipeNetRegressor(schedule="1f1b", **{**kw, "balance": "auto"}).plan(*data)
    assert two.predicted_step_ms < min(c["predicted_step_ms"] for c in planned.candidates
                                       if c["schedule"] == "1f1b")


def test_plan_memory_counts_the_gradient_a_clipped_2bw_stage_holds(data, monkeypatch):
    """plan()'s memory per stage: clipping by the global norm (max_grad_norm or the callback)
    makes a '2bw' stage hold one copy of its gradients more (the batch's, while the next
    batch's accumulates), said in the plan; a synchronous schedule's clipping costs nothing."""
    from skpipe.engine.planner import _planner
    from skpipe.engine.planner._measure import MessageCost

    monkeypatch.setattr(_planner, "message_cost", lambda device: MessageCost(1e-5, 1e-9, 1e-4))
    wide = nn.Sequential(nn.Linear(5, 512), nn.Tanh(), nn.Linear(512, 512), nn.Tanh(),
                         nn.Linear(512, 1))
    per_stage = [sum(p.numel() * 4 for p in part.parameters()) / 2**20
                 for part in (wide[:2], wide[2:4], wide[4:])]
    kw = dict(module=wide, n_stages=3, n_microbatches=3, batch_size=BATCH, balance=[2, 2, 1],
              launcher="spawn")

    def mib(**more):
        report = PipeNetRegressor(**{**kw, **more}).plan(*data)
        return np.array(report.stage_MiB), str(report)

    sync, _ = mib(schedule="1f1b")
    sync_clipped, _ = mib(schedule="1f1b", max_grad_norm=1.0)
    plain, plain_text = mib(schedule="2bw")
    clipped, clipped_text = mib(schedule="2bw", max_grad_norm=1.0)
    callback, _ = mib(schedule="2bw", callbacks=[skorch.callbacks.GradientNormClipping(1.0)])
    np.testing.assert_allclose(sync_clipped, sync)
    np.testing.assert_allclose(clipped - plain, per_stage, rtol=1e-6)
    np.testing.assert_allclose(callback, clipped)
    said = "one copy of its gradients while their global norm is summed"
    assert said in clipped_text and said not in plain_text
