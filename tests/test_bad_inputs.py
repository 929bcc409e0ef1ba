"""The bad-input matrix: every case raises the right error type, its message names the parameter
or input and the value given, and (with launcher='spawn') no worker was started."""

import time

import numpy as np
import pytest
import torch
from torch import nn
from torch.distributed.pipelining import pipe_split

import skpipe
from skpipe import PipeNetClassifier, PipeNetRegressor
from skpipe.modules import FTTransformer
from tests.conftest import worker_pids

rng = np.random.RandomState(0)
X = rng.normal(size=(40, 5))
Y = np.arange(40) % 3


class Pair(nn.Module):
    def forward(self, x):
        return x, x


class WithMask(nn.Module):
    def forward(self, x):
        return x, x > 0


class TakeFirst(nn.Module):
    def forward(self, pair):
        return pair[0]


class NotSequential(nn.Module):
    def __init__(self, n_features_in, n_outputs):
        super().__init__()
        self.lin = nn.Linear(n_features_in, n_outputs)

    def forward(self, x):
        return self.lin(x)


class Marked(nn.Module):
    """Split at its pipe_split() marks; ``case`` picks what its forward does wrong."""

    def __init__(self, n_features_in, n_outputs, case="branch"):
        super().__init__()
        self.a, self.b = nn.Linear(n_features_in, 4), nn.Linear(4, n_outputs)
        self.case = case

    def forward(self, x):
        h = self.a(x)
        if self.case == "branch" and h.sum() > 0:
            h = -h
        n = x.shape[0]
        pipe_split()
        out = self.b(torch.tanh(h))
        if self.case == "size":
            out = out.view(n, -1)
        if self.case == "tied":
            out = out + nn.functional.linear(h, self.a.weight.t())[:, : out.shape[1]]
        return out


def with_nan(X):
    X = X.copy(); X[1, 1] = np.nan; return X


def with_inf(X):
    X = X.copy(); X[2, 0] = -np.inf; return X


SPAWN = dict(n_stages=2, launcher="spawn", n_microbatches=2, max_epochs=1)

CASES = [
    # (id, estimator params, X, y, error type, message pattern)
    ("nan-X", SPAWN, with_nan(X), Y, ValueError, r"Input X contains NaN"),
    ("inf-X", SPAWN, with_inf(X), Y, ValueError, r"Input X contains infinity"),
    ("one-class", SPAWN, X, np.zeros(40), ValueError, r"only one class \(0.0\)"),
    ("empty-X", SPAWN, X[:0], Y[:0], ValueError, r"0 sample\(s\)"),
    ("lengths", SPAWN, X, Y[:30], ValueError, r"inconsistent numbers of samples: \[40, 30\]"),
    ("complex-X", SPAWN, X + 1j, Y, ValueError, r"[Cc]omplex"),
    ("continuous-y", SPAWN, X, X[:, 0], ValueError, r"Unknown label type: continuous"),
    ("stages>layers", dict(SPAWN, n_stages=4, n_microbatches=4), X, Y, ValueError, r"3 splittable layers, fewer than the 4 pipeline chunks"),
    ("stages>devices", dict(SPAWN, n_stages=3, devices=["cpu", "cpu"], module__hidden_layer_sizes=(4, 4)), X, Y, ValueError, r"n_stages \(3\) is larger than the number of devices given \(2"),
    ("mb>batch", dict(SPAWN, batch_size=4, n_microbatches=8), X, Y, ValueError, r"n_microbatches \(8\) must be <= batch_size \(4\)"),
    ("1f1b-mb<stages", dict(SPAWN, n_stages=3, n_microbatches=2, module__hidden_layer_sizes=(4, 4)), X, Y, ValueError, r"n_microbatches \(2\) must be >= n_stages \(3\) for schedule '1f1b'"),
    ("dualpipev-mb", dict(SPAWN, schedule="dualpipev", n_microbatches=2, module__hidden_layer_sizes=(4, 4)), X, Y, ValueError, r"n_microbatches \(2\) must be >= the number of model chunks \(4"),
    ("zb-rounds", dict(SPAWN, schedule="interleaved_zero_bubble", n_microbatches=5, module__hidden_layer_sizes=(4, 4)), X, Y, ValueError, r"n_microbatches \(5\) must be a multiple of the number of rounds \(2"),
    ("unknown-schedule", dict(SPAWN, schedule="pipedream2"), X, Y, ValueError, r"The 'schedule' parameter of PipeNetClassifier must be .*Got 'pipedream2' instead"),
    ("interleaved-1-chunk", dict(SPAWN, schedule="interleaved_1f1b", chunks_per_stage=1), X, Y, ValueError, r"chunks_per_stage \(1\) is not allowed for schedule 'interleaved_1f1b'"),
    ("zbv-3-chunks", dict(SPAWN, schedule="zbv", chunks_per_stage=3), X, Y, ValueError, r"chunks_per_stage \(3\) is not allowed for schedule 'zbv', which needs exactly 2"),
    ("balance-sum", dict(SPAWN, balance=[1, 1]), X, Y, ValueError, r"balance \[1, 1\] must list 2 positive layer counts .*\(3\); got 2 counts summing to 2"),
    ("balance-length", dict(SPAWN, balance=[1, 1, 1]), X, Y, ValueError, r"balance \[1, 1, 1\] has 3 entries but the pipeline has 2 chunks"),
    ("unsplittable", dict(SPAWN, module=NotSequential), X, Y, TypeError, r"module NotSequential cannot be split into 2 pipeline chunks"),
    ("marked-control-flow", dict(SPAWN, module=Marked), X, Y, TypeError, r"module Marked calls pipe_split\(\), so skpipe traces its forward .* failed at .*test_bad_inputs.py:\d+ \(if self.case == .branch. and h.sum\(\) > 0:\): TraceError"),
    ("marked-int-crosses", dict(SPAWN, module=Marked, module__case="size"), X, Y, TypeError, r"`getitem` \(made by `n = x.shape\[0\]` at .*\) is made before pipe_split\(\) number 1 of module Marked and used after it, but it is of type int"),
    ("marked-tied-across", dict(SPAWN, module=Marked, module__case="tied"), X, Y, ValueError, r"parameter 'a.weight' is used by pipeline chunk 0 and chunk 1"),
    ("split_points-unknown", dict(SPAWN, split_points={"3": "end"}), X, Y, ValueError, r"split_points names '3', which is not a submodule of MLP. Its submodules: 0, 1, 2"),
    ("split_points-value", dict(SPAWN, split_points={"1": "middle"}), X, Y, ValueError, r"split_points\['1'\] must be 'beginning', 'end' or a torch.distributed.pipelining.SplitPoint; got 'middle'"),
    ("split_points-type", dict(SPAWN, split_points=["1"]), X, Y, ValueError, r"The 'split_points' parameter of PipeNetClassifier must be an instance of 'dict' or None. Got \['1'\] instead"),
    ("stage-output-tuple", dict(SPAWN, module=nn.Sequential(nn.Linear(5, 3), Pair(), nn.Identity())), X, Y, TypeError, r"pipeline chunk 1 \(layers 2..2\) is the network's output and returns a tuple of 2"),
    ("stage-output-int", dict(SPAWN, module=nn.Sequential(nn.Linear(5, 3), WithMask(), TakeFirst())), X, Y, TypeError, r"pipeline chunk 0 \(layers 0..1\) returns a tuple whose tensors \[1\] are not floating point"),
    ("lr<=0", dict(SPAWN, lr=-0.5), X, Y, ValueError, r"The 'lr' parameter of PipeNetClassifier must be a float in the range \(0.0, inf\). Got -0.5 instead"),
    ("batch_size=0", dict(SPAWN, batch_size=0), X, Y, ValueError, r"The 'batch_size' parameter .*Got 0 instead"),
    ("max_epochs=0", dict(SPAWN, max_epochs=0), X, Y, ValueError, r"The 'max_epochs' parameter .*Got 0 instead"),
    ("n_stages=0", dict(SPAWN, n_stages=0), X, Y, ValueError, r"The 'n_stages' parameter .*Got 0 instead"),
    ("auto-stages-no-budget", dict(SPAWN, n_stages="auto"), X, Y, ValueError, r"n_stages='auto' takes the fewest stages whose plan fits stage_memory_budget, but stage_memory_budget is None"),
    ("n_stages-string", dict(SPAWN, n_stages="many"), X, Y, ValueError, r"The 'n_stages' parameter .*Got 'many' instead"),
    ("n_replicas=0", dict(SPAWN, n_replicas=0), X, Y, ValueError, r"The 'n_replicas' parameter .*Got 0 instead"),
    ("replicas-local", dict(SPAWN, n_replicas=2, launcher="local"), X, Y, ValueError, r"n_replicas=2 needs one process per \(replica, stage\), but launcher='local' runs everything in this process"),
    ("replicas>batch", dict(SPAWN, n_replicas=5, batch_size=4), X, Y, ValueError, r"n_replicas \(5\) must be <= batch_size \(4\)"),
    ("mb>share", dict(SPAWN, n_replicas=2, batch_size=6, n_microbatches=4), X, Y, ValueError, r"n_microbatches \(4\) must be <= the rows each replica takes of a batch \(3: batch_size=6 over n_replicas=2\)"),
    ("replicas>devices", dict(SPAWN, n_replicas=2, devices=["cpu", "cpu", "cpu"]), X, Y, ValueError, r"n_replicas \(2\) x n_stages \(2\) needs 4 devices, one per \(replica, stage\).*devices lists 3"),
    ("tensor_parallel=0", dict(SPAWN, tensor_parallel=0), X, Y, ValueError, r"The 'tensor_parallel' parameter .*Got 0 instead"),
    ("tp-width", dict(SPAWN, tensor_parallel=2, module__hidden_layer_sizes=(15, 8)), X, Y, ValueError, r"tensor_parallel=2 must divide the width colwise layer '0' is split along \(out_features=15\)"),
    ("tp-width-3", dict(SPAWN, tensor_parallel=3, module__hidden_layer_sizes=(9, 9, 8)), X, Y, ValueError, r"tensor_parallel=3 must divide the width colwise layer '4' is split along \(out_features=8\)"),
    ("tp-heads", dict(SPAWN, tensor_parallel=2, module=FTTransformer, module__d_token=12, module__n_heads=3, module__n_blocks=1), X, Y, ValueError, r"tensor_parallel=2 must divide the number of heads of '1.attention' \(n_heads=3\)"),
    ("tp_plan-missing", dict(SPAWN, tensor_parallel=2, module__hidden_layer_sizes=(8, 8), tp_plan={"lin": "colwise"}), X, Y, ValueError, r"tp_plan names submodule 'lin', which MLP does not have; its submodules: \['0', '1', '2'"),
    ("tp_plan-close", dict(SPAWN, tensor_parallel=2, module=NotSequential, tp_plan={"lin2": "colwise"}), X, Y, ValueError, r"tp_plan names submodule 'lin2', which NotSequential does not have; closest: \['lin'\]"),
    ("tp_plan-style", dict(SPAWN, tensor_parallel=2, module__hidden_layer_sizes=(8, 8), tp_plan={"0": "columnwise"}), X, Y, ValueError, r"tp_plan\['0'\] is 'columnwise', which is not one of \['colwise', 'rowwise', 'replicate'\] or a torch ParallelStyle"),
    ("tp_plan-type", dict(SPAWN, tp_plan=["0"]), X, Y, ValueError, r"The 'tp_plan' parameter .*Got \['0'\] instead"),
    ("tp-no-plan", dict(SPAWN, n_stages=1, tensor_parallel=2, module=NotSequential), X, Y, ValueError, r"tensor_parallel=2 needs a plan of which layers to split, and skpipe has none for NotSequential: give tp_plan"),
    ("tp-not-linear", dict(SPAWN, tensor_parallel=2, module__hidden_layer_sizes=(8, 8), tp_plan={"1": "colwise"}), X, Y, ValueError, r"tp_plan splits '1' colwise, but it is a ReLU"),
    ("tp-local", dict(SPAWN, tensor_parallel=2, launcher="local"), X, Y, ValueError, r"tensor_parallel=2 needs one process per rank of the \(replica x stage x tensor\) mesh, but launcher='local'"),
    ("tp-async", dict(SPAWN, tensor_parallel=2, schedule="2bw"), X, Y, ValueError, r"schedule='2bw' is skpipe's own asynchronous executor, .* does not run tensor_parallel=2"),
    ("tp-zero-bubble", dict(SPAWN, tensor_parallel=2, schedule="zbv"), X, Y, ValueError, r"tensor_parallel=2 does not run under schedule='zbv'"),
    ("tp-devices", dict(SPAWN, tensor_parallel=2, devices=["cpu", "cpu"]), X, Y, ValueError, r"n_replicas \(1\) x n_stages \(2\) x tensor_parallel \(2\) needs 4 devices, one per rank"),
    ("shard", dict(SPAWN, shard="zero3"), X, Y, ValueError, r"The 'shard' parameter .*Got 'zero3' instead"),
    ("shard-no-replicas", dict(SPAWN, shard="full"), X, Y, ValueError, r"shard='full' shards the state over the replicas, but n_replicas=1"),
    ("shard-local", dict(SPAWN, n_stages=1, n_replicas=2, shard="optimizer", launcher="local"), X, Y, ValueError, r"needs one process per .*launcher='local' runs everything in this process"),
    ("shard-zero-bubble", dict(SPAWN, n_replicas=2, shard="full", schedule="interleaved_zero_bubble"), X, Y, ValueError, r"shard='full' does not run under schedule='interleaved_zero_bubble'"),
    ("timeout<=0", dict(SPAWN, timeout=0), X, Y, ValueError, r"The 'timeout' parameter .*Got 0 instead"),
    ("max_grad_norm<=0", dict(SPAWN, max_grad_norm=-1.0), X, Y, ValueError, r"The 'max_grad_norm' parameter .*Got -1.0 instead"),
    ("launcher", dict(SPAWN, launcher="slurm"), X, Y, ValueError, r"The 'launcher' parameter .*Got 'slurm' instead"),
    ("checkpoint", dict(SPAWN, checkpoint="sometimes"), X, Y, ValueError, r"The 'checkpoint' parameter .*Got 'sometimes' instead"),
    ("precision", dict(SPAWN, precision="fp8"), X, Y, ValueError, r"The 'precision' parameter .*Got 'fp8' instead"),
    ("unknown-module-param", dict(SPAWN, module__hidden_sizes=(3,)), X, Y, ValueError, r"module__hidden_sizes is not a parameter of MLP.*Did you mean 'module__hidden_layer_sizes'"),
    ("unknown-param", dict(SPAWN, n_stage=2), X, Y, TypeError, r"unexpected parameter 'n_stage'. Did you mean 'n_stages'"),
    ("module-not-module", dict(SPAWN, module="resnet"), X, Y, TypeError, r"The 'module' parameter of PipeNetClassifier must be a torch.nn.Module subclass or instance. Got 'resnet' instead"),
    ("criterion-type", dict(SPAWN, criterion="mse"), X, Y, TypeError, r"The 'criterion' parameter .*Got 'mse' instead"),
    ("criterion-reduction", dict(SPAWN, criterion=nn.CrossEntropyLoss(reduction="none")), X, Y, ValueError, r"criterion CrossEntropyLoss has reduction='none'"),
    ("missing-gpu", dict(SPAWN, devices=["cuda:3", "cuda:4"]), X, Y, ValueError, r"devices entry 'cuda:3' names a GPU this machine does not have"),
    ("bad-device", dict(SPAWN, devices=["abacus", "cpu"]), X, Y, ValueError, r"devices entry 'abacus' is not a torch device"),
    ("torchrun-without-group", dict(SPAWN, launcher="torchrun"), X, Y, RuntimeError, r"launcher='torchrun' needs a process group"),
    ("optimizer", dict(SPAWN, optimizer="adam"), X, Y, ValueError, r"The 'optimizer' parameter .*Got 'adam' instead"),
    ("timeline_steps<0", dict(SPAWN, timeline_steps=-1), X, Y, ValueError, r"The 'timeline_steps' parameter .*Got -1 instead"),
    ("stage_memory_budget<=0", dict(SPAWN, stage_memory_budget=-5.0), X, Y, ValueError, r"The 'stage_memory_budget' parameter .*Got -5.0 instead"),
    ("random_state", dict(SPAWN, random_state="seed"), X, Y, ValueError, r"The 'random_state' parameter .*Got 'seed' instead"),
    ("verbose", dict(SPAWN, verbose="loud"), X, Y, ValueError, r"The 'verbose' parameter .*Got 'loud' instead"),
    ("warm_start", dict(SPAWN, warm_start="yes"), X, Y, ValueError, r"The 'warm_start' parameter .*Got 'yes' instead"),
    ("callbacks", dict(SPAWN, callbacks="ProgressBar"), X, Y, ValueError, r"The 'callbacks' parameter .*Got 'ProgressBar' instead"),
    ("train_split", dict(SPAWN, train_split=5), X, Y, ValueError, r"The 'train_split' parameter .*Got 5 instead"),
    ("output-width", dict(SPAWN, module=nn.Sequential(nn.Linear(5, 8), nn.ReLU(), nn.Linear(8, 5))), X, Y, ValueError, r"The network outputs 5 values per row but y has 3 classes: PipeNetClassifier passes n_outputs=3"),
    ("criterion-targets", dict(SPAWN, criterion=nn.MSELoss), X, Y, ValueError, r"criterion MSELoss cannot compare the network's outputs \(shape \(4, 3\), torch.float32\) with the targets PipeNetClassifier passes it \(shape \(4,\), torch.int64"),
    ("iterator-batch>batch", dict(SPAWN, iterator_train__batch_size=80), X, Y, ValueError, r"iterator_train__batch_size=80 is larger than batch_size=64: .* Set batch_size instead"),
    ("iterator-unknown", dict(SPAWN, iterator_train__num_workers=2), X, Y, ValueError, r"iterator_train__num_workers is not a setting of skpipe's batch iterator"),
    ("optimizer-setting", dict(SPAWN, optimizer__momentum=0.9), X, Y, ValueError, r"optimizer Adam cannot be built with the fit's settings \(lr=0.001, momentum=0.9; .*unexpected keyword argument 'momentum'"),
    ("criterion-mean-not-rows", dict(SPAWN, criterion=nn.NLLLoss, criterion__ignore_index=1), X, Y, ValueError, r"criterion NLLLoss's mean over a batch is not the mean of its rows' losses, so n_microbatches=2 .* class_weight or sample_weight"),
    ("train_split>=1", dict(SPAWN, train_split=1.0), X, Y, ValueError, r"The 'train_split' parameter .*Got 1.0 instead"),
    ("batchnorm-1-row", dict(SPAWN, module=nn.Sequential(nn.Linear(5, 8), nn.BatchNorm1d(8), nn.ReLU(), nn.Linear(8, 3)), batch_size=4, n_microbatches=4), X, Y, ValueError, r"BatchNorm needs at least 2 rows per micro-batch in training, but batch_size=4 with n_microbatches=4 makes micro-batches of 1 row"),
    ("class_weight", dict(SPAWN, class_weight="uniform"), X, Y, ValueError, r"The 'class_weight' parameter of PipeNetClassifier must be .*Got 'uniform' instead"),
    ("module-params-with-instance", dict(SPAWN, module=nn.Sequential(nn.Linear(5, 3), nn.ReLU(), nn.Linear(3, 3)), module__hidden_layer_sizes=(3,)), X, Y, ValueError, r"module__ parameters \['hidden_layer_sizes'\] were given, but module is an instance \(Sequential\)"),
]


def test_every_validated_parameter_has_a_bad_value_in_the_matrix():
    """A parameter added to the estimator without a bad-input case here fails this test."""
    bad = {k for _, params, *_ in CASES for k, v in params.items() if SPAWN.get(k, object()) != v}
    covered = {k for k in bad if k in PipeNetClassifier._get_param_names()}
    assert set(PipeNetClassifier._get_param_names()) - covered == set()
    assert {"module", "criterion"} <= covered and any(k.startswith("module__") for k in bad)


@pytest.fixture
def no_worker_may_start(monkeypatch):
    """Any attempt to start a stage worker fails the test (a worker started and reaped within
    the call would not show among the live processes)."""
    from skpipe.engine.workers import _pool

    def refuse(*a, **k):
        raise AssertionError("a stage worker was started before the bad input was refused")

    monkeypatch.setattr(_pool.WorkerGroup, "__init__", refuse)


@pytest.mark.parametrize("name,params,X_,y_,error,pattern", CASES, ids=[c[0] for c in CASES])
def test_bad_input(name, params, X_, y_, error, pattern, no_worker_may_start):
    skpipe.shutdown_workers()
    t0 = time.monotonic()
    with pytest.raises(error, match=pattern):
        PipeNetClassifier(**params).fit(X_, y_)
    assert time.monotonic() - t0 < 5.0
    assert worker_pids() == []  # and none is alive


def test_nan_in_y_regressor(no_worker_may_start):
    y = X[:, 0].copy(); y[3] = np.nan
    with pytest.raises(ValueError, match=r"Input y contains NaN"):
        PipeNetRegressor(**SPAWN).fit(X, y)
    assert worker_pids() == []


def test_wrong_feature_count_at_predict():
    est = PipeNetClassifier(max_epochs=1).fit(X, Y)
    with pytest.raises(ValueError, match=r"X has 4 features, but PipeNetClassifier is expecting 5 features"):
        est.predict(X[:, :4])


def test_regressor_output_width_and_ragged_batchnorm_batches(no_worker_may_start):
    y2 = np.c_[X[:, 0], X[:, 1]]
    with pytest.raises(ValueError, match=r"The network outputs 1 values per row but y has 2 target columns"):
        PipeNetRegressor(module=nn.Sequential(nn.Linear(5, 4), nn.ReLU(), nn.Linear(4, 1)),
                         **SPAWN).fit(X, y2)
    bn = nn.Sequential(nn.Linear(5, 8), nn.BatchNorm1d(8), nn.ReLU(), nn.Linear(8, 3))
    with pytest.raises(ValueError, match=r"makes micro-batches of 1 row\(s\) \(the last batch of the 40 rows has 1\)"):
        PipeNetClassifier(module=bn, batch_size=39, max_epochs=1).fit(X, Y)
