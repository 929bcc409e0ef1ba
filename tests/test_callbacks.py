"""The (setting x launcher) matrix: every training setting and skorch callback does on two
pipelined stages — in this process (``local``) and in spawned workers (``spawn``) — what it does
on one device: the trained parameters (and what the callbacks wrote) equal the one-device fit's.

``SETTINGS`` has a row per setting; ``PARAMETERS`` a row per constructor parameter (a setting to
fit with, or where else it is tested), and a guard test fails when a new parameter has none.
"""

import inspect
import os
from functools import partial

import numpy as np
import pytest
import torch
from sklearn.datasets import load_breast_cancer
from sklearn.preprocessing import StandardScaler
from skorch.callbacks import (
    Callback,
    Checkpoint,
    EarlyStopping,
    Freezer,
    GradientNormClipping,
    Initializer,
    LoadInitState,
    LRScheduler,
    ParamMapper,
    TrainEndCheckpoint,
    Unfreezer,
    WarmRestartLR,
)
from torch import nn
from torch.optim import lr_scheduler as sched

from skpipe import PipeNetClassifier
from skpipe.engine.plan import _config as engine_config

X_ALL, Y_ALL = load_breast_cancer(return_X_y=True)
X = StandardScaler().fit_transform(X_ALL).astype(np.float32)[:240]
Y = Y_ALL[:240]

MODES = {
    "one device": dict(n_stages=1),
    "local": dict(n_stages=2, launcher="local"),
    "spawn": dict(n_stages=2, launcher="spawn"),
    # each step's next batch sent along and computed while the callbacks run (P.SyncStep)
    "spawn, next batch ahead": dict(n_stages=2, launcher="spawn"),
}
BASE = dict(
    module__hidden_layer_sizes=(16, 16), optimizer=torch.optim.SGD, lr=0.05,
    optimizer__momentum=0.9, max_epochs=4, batch_size=32, n_microbatches=2, random_state=0,
)


class ShrinkOnEpochBegin(Callback):
    """A user's callback that writes the weights (in on_epoch_begin)."""

    def on_epoch_begin(self, net, **kwargs):
        with torch.no_grad():
            for p in net.module_.parameters():
                p.mul_(0.9)


class ShrinkEveryThirdBatch(Callback):
    """A user's callback that writes the weights between two steps of an epoch."""

    def initialize(self):
        self.batches_ = 0
        return self

    def on_batch_end(self, net, training=False, **kwargs):
        if training:
            self.batches_ += 1
            if self.batches_ % 3 == 0:
                with torch.no_grad():
                    for p in net.module_.parameters():
                        p.mul_(0.8)


class RecordNorms(Callback):
    """A user's callback that reads the weights (in on_epoch_end)."""

    def initialize(self):
        self.norms_ = []
        return self

    def on_epoch_end(self, net, **kwargs):
        self.norms_.append(float(sum(p.detach().norm() for p in net.module_.parameters())))


def warmup_cosine(optimizer, last_epoch=-1):
    """Warm-up then cosine: the recipe a transformer is trained with."""
    warm = sched.LinearLR(optimizer, start_factor=0.1, total_iters=2)
    cosine = sched.CosineAnnealingLR(optimizer, T_max=3)
    return sched.SequentialLR(optimizer, [warm, cosine], milestones=[2])


class BatchNormNet(nn.Sequential):
    def __init__(self, n_features_in, n_outputs):
        super().__init__(
            nn.Linear(n_features_in, 16), nn.BatchNorm1d(16), nn.ReLU(),
            nn.Linear(16, 16), nn.BatchNorm1d(16), nn.ReLU(), nn.Linear(16, n_outputs),
        )


def _lr(policy, **kw):
    return lambda d: dict(callbacks=[LRScheduler(policy, **kw)])


# setting -> (tmp dir -> estimator parameters)
SETTINGS = {
    "StepLR by epoch": _lr("StepLR", step_size=1, gamma=0.5),
    "StepLR by batch": _lr("StepLR", step_size=3, gamma=0.9, step_every="batch"),
    "CosineAnnealingLR": _lr(sched.CosineAnnealingLR, T_max=4),
    "OneCycleLR (Adam betas)": lambda d: dict(
        optimizer=torch.optim.Adam, optimizer__momentum=None, optimizer__betas=(0.9, 0.99),
        callbacks=[LRScheduler(sched.OneCycleLR, max_lr=0.05, total_steps=40,
                               step_every="batch")],
    ),
    "OneCycleLR (SGD momentum)": _lr(
        sched.OneCycleLR, max_lr=0.1, total_steps=40, step_every="batch"
    ),
    "ReduceLROnPlateau on valid_loss": lambda d: dict(
        train_split=0.25,
        callbacks=[LRScheduler(sched.ReduceLROnPlateau, monitor="valid_loss", patience=0,
                               factor=0.3, threshold=1.0)],
    ),
    "LambdaLR": _lr(sched.LambdaLR, lr_lambda=lambda epoch: 1.0 / (1 + epoch)),
    "SequentialLR warm-up then cosine": _lr(warmup_cosine),
    "CosineAnnealingWarmRestarts": _lr(sched.CosineAnnealingWarmRestarts, T_0=2),
    "WarmRestartLR": _lr(WarmRestartLR, base_period=2),
    "CyclicLR": _lr(sched.CyclicLR, base_lr=0.01, max_lr=0.1, step_size_up=3,
                    step_every="batch"),
    "EarlyStopping(load_best=True)": lambda d: dict(
        lr=0.3, max_epochs=8, train_split=0.25,
        callbacks=[EarlyStopping(patience=2, load_best=True)],
    ),
    "Freezer": lambda d: dict(callbacks=[Freezer(["0.*"])]),
    "Freezer on the whole first stage": lambda d: dict(
        callbacks=[Freezer(["0.*", "2.*"])], schedule="zbv"
    ),
    "Freezer then Unfreezer": lambda d: dict(
        callbacks=[Freezer(["2.*"]), Unfreezer(["2.*"], at=3)]
    ),
    "Initializer": lambda d: dict(
        callbacks=[Initializer("*.weight", fn=partial(nn.init.uniform_, a=-0.1, b=0.1))]
    ),
    "ParamMapper": lambda d: dict(
        callbacks=[ParamMapper("*.bias", fn=lambda p: p.data.fill_(0.5), at=2)]
    ),
    "user callback writes weights": lambda d: dict(callbacks=[ShrinkOnEpochBegin()]),
    "user callback writes weights between steps": lambda d: dict(
        callbacks=[ShrinkEveryThirdBatch()]
    ),
    "user callback reads weights": lambda d: dict(callbacks=[("norms", RecordNorms())]),
    "GradientNormClipping": lambda d: dict(callbacks=[GradientNormClipping(0.05)]),
    "GradientNormClipping inf-norm": lambda d: dict(
        callbacks=[GradientNormClipping(0.01, gradient_clip_norm_type=float("inf"))]
    ),
    "criterion__weight": lambda d: dict(criterion__weight=torch.tensor([1.0, 4.0])),
    "criterion__weight with label smoothing": lambda d: dict(
        criterion__weight=torch.tensor([1.0, 4.0]), criterion__label_smoothing=0.1,
        n_microbatches=4,
    ),
    "iterator_train__batch_size below batch_size, BatchNorm": lambda d: dict(
        module=BatchNormNet, module__hidden_layer_sizes=None, batch_size=40, iterator_train__batch_size=24, n_microbatches=4,
    ),
    "ragged last batch, BatchNorm": lambda d: dict(
        module=BatchNormNet, module__hidden_layer_sizes=None, batch_size=52, n_microbatches=4,
    ),
    "iterator_train__shuffle=False": lambda d: dict(iterator_train__shuffle=False),
    "iterator_train__seed": lambda d: dict(iterator_train__seed=5),
    "skorch Checkpoint + TrainEndCheckpoint": lambda d: dict(
        callbacks=[Checkpoint(dirname=os.path.join(d, "cp"), monitor=None),
                   TrainEndCheckpoint(dirname=os.path.join(d, "end"))],
    ),
    "skorch Checkpoint, then LoadInitState resumes (load_params)": lambda d: dict(
        _twice=True,
        callbacks=[cp := Checkpoint(dirname=os.path.join(d, "resume"), monitor=None),
                   LoadInitState(cp)],
    ),
    "max_grad_norm": lambda d: dict(max_grad_norm=0.05),
    "class_weight='balanced'": lambda d: dict(class_weight="balanced", n_microbatches=4),
    "checkpoint='always'": lambda d: dict(checkpoint="always"),
}

# constructor parameter -> a setting in SETTINGS, or where that parameter is tested instead
PARAMETERS = {
    "module": "ragged last batch, BatchNorm",
    "criterion": "criterion__weight",
    "class_weight": "class_weight='balanced'",
    "optimizer": "OneCycleLR (Adam betas)",
    "lr": "StepLR by epoch",
    "max_epochs": "EarlyStopping(load_best=True)",
    "batch_size": "ragged last batch, BatchNorm",
    "callbacks": "StepLR by epoch",
    "train_split": "ReduceLROnPlateau on valid_loss",
    "max_grad_norm": "max_grad_norm",
    "checkpoint": "checkpoint='always'",
    "warm_start": "tests/estimators/test_partial_fit.py (warm start continues on every launcher)",
    "random_state": "the matrix's rows (every fit is seeded)",
    "verbose": "tests/test_visibility.py",
    "devices": "tests/test_gpu.py and tests/engine/parallel/test_devices.py",
    "n_stages": "the matrix's launchers",
    "n_replicas": "tests/test_replicas.py (and the LR schedule with replicas in this file)",
    "tensor_parallel": "tests/test_parallel3d.py (the LR schedule and Freezer on tensor shards)",
    "tp_plan": "tests/test_parallel3d.py",
    "shard": "tests/test_parallel3d.py (the LR schedule and Freezer on sharded replicas)",
    "n_microbatches": "criterion__weight with label smoothing",
    "schedule": "tests/engine/test_transparency.py (every schedule trains what one device does)",
    "chunks_per_stage": "tests/engine/test_transparency.py",
    "balance": "tests/engine/split/test_partition.py",
    "split_points": "tests/engine/split/test_trace.py",
    "launcher": "the matrix's launchers",
    "precision": "tests/engine/test_transparency.py (bf16)",
    "timeout": "tests/engine/test_faults.py",
    "timeline_steps": "tests/test_visibility.py",
    "stage_memory_budget": "tests/engine/plan/test_budget.py",
}


def _fit(setting, mode, tmp_path):
    """The fitted estimator, its parameters, and the folder its callbacks wrote to."""
    folder = tmp_path / mode.replace(" ", "_")
    folder.mkdir(exist_ok=True)
    params = {**BASE, **SETTINGS[setting](str(folder)), **MODES[mode]}
    if mode == "one device" and "BatchNorm" not in setting:
        # the whole batch at once: what micro-batches must add up to (BatchNorm's statistics
        # are per micro-batch by definition, so there one device takes the same micro-batches)
        params["n_microbatches"] = 1
    params = {k: v for k, v in params.items() if v is not None}  # None: not this row's
    if params.pop("_twice", False):  # a first fit writes what the second one resumes from
        PipeNetClassifier(**params).fit(X, Y)
        params["callbacks"] = SETTINGS[setting](str(folder))["callbacks"]
    return PipeNetClassifier(**params).fit(X, Y), params, folder


def test_every_constructor_parameter_has_a_row():
    names = set(inspect.signature(PipeNetClassifier.__init__).parameters) - {"self", "kwargs"}
    assert names == set(PARAMETERS), (
        f"parameters without a row: {sorted(names - set(PARAMETERS))}; rows for no parameter: "
        f"{sorted(set(PARAMETERS) - names)}"
    )
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    for name, where in PARAMETERS.items():
        files = [w for w in where.split() if w.startswith("tests/")]
        assert where in SETTINGS or "matrix" in where or files, (name, where)
        for f in files:
            assert os.path.exists(os.path.join(root, f)), (name, f)


@pytest.fixture(scope="module")
def one_device(tmp_path_factory):
    """The one-device fits, made once per setting."""
    cache = {}

    def get(setting):
        if setting not in cache:
            cache[setting] = _fit(setting, "one device", tmp_path_factory.mktemp("one"))
        return cache[setting]

    return get


@pytest.mark.parametrize("mode", ["local", "spawn", "spawn, next batch ahead"])
@pytest.mark.parametrize("setting", list(SETTINGS))
def test_setting_trains_what_one_device_trains(setting, mode, one_device, tmp_path, monkeypatch):
    ref, ref_params, ref_folder = one_device(setting)
    monkeypatch.setattr(engine_config, "STEP_AHEAD", mode == "spawn, next batch ahead")
    est, params, folder = _fit(setting, mode, tmp_path)
    _same_state(est.module_.state_dict(), ref.module_.state_dict())
    assert np.allclose(est.history_[:, "train_loss"], ref.history_[:, "train_loss"], atol=1e-5)
    # what the callbacks read and wrote is what they read and wrote on one device
    for (_, cb), (_, ref_cb) in zip(_named(params), _named(ref_params), strict=True):
        if isinstance(cb, RecordNorms):
            assert np.allclose(cb.norms_, ref_cb.norms_, atol=1e-5)
    for name in ("cp/params.pt", "cp/optimizer.pt", "end/train_end_params.pt"):
        if (ref_folder / name).exists():
            _same_state(
                torch.load(folder / name, weights_only=False),
                torch.load(ref_folder / name, weights_only=False),
            )


def _named(params):
    return [cb if isinstance(cb, tuple) else (None, cb) for cb in params.get("callbacks") or []]


def _same_state(state, ref_state):
    """Nested dicts of tensors (a state dict, an optimizer's) equal to 1e-5."""
    if isinstance(ref_state, torch.Tensor):
        torch.testing.assert_close(state, ref_state, atol=1e-5, rtol=0)
    elif isinstance(ref_state, dict):
        assert state.keys() == ref_state.keys()
        for key in ref_state:
            _same_state(state[key], ref_state[key])
    elif isinstance(ref_state, (list, tuple)):
        assert len(state) == len(ref_state)
        for a, b in zip(state, ref_state, strict=True):
            _same_state(a, b)
    else:
        assert state == ref_state or (isinstance(state, float) and np.isclose(state, ref_state))


@pytest.mark.distributed
@pytest.mark.parametrize("n_stages", [1, 2])
def test_lr_schedule_with_replicas(n_stages, one_device, tmp_path):
    """Every replica's stages step with the scheduled rates (the same few floats reach all)."""
    setting = "OneCycleLR (SGD momentum)"
    ref = one_device(setting)[0]
    params = {**BASE, **SETTINGS[setting](str(tmp_path)), "n_replicas": 2, "n_stages": n_stages}
    est = PipeNetClassifier(**params).fit(X, Y)
    _same_state(est.module_.state_dict(), ref.module_.state_dict())


class Counted(nn.Linear):
    """Counts its forwards in training (a recomputed forward counts again)."""

    calls = 0

    def forward(self, x):
        if self.training:
            type(self).calls += 1
        return super().forward(x)


@pytest.mark.parametrize("launcher", ["auto", "local"])
def test_checkpoint_always_recomputes_with_one_stage_too(launcher):
    def forwards(checkpoint):
        Counted.calls = 0
        net = nn.Sequential(Counted(30, 8), nn.ReLU(), Counted(8, 2))
        PipeNetClassifier(net, max_epochs=1, batch_size=60, n_microbatches=2, checkpoint=checkpoint,
                          n_stages=1 if launcher == "auto" else 2, launcher=launcher,
                          random_state=0).fit(X, Y)
        return Counted.calls

    # 4 steps x 2 micro-batches x 2 layers, each once more in backward when recomputing
    assert forwards("always") - forwards("never") == 16


@pytest.mark.distributed
def test_warm_start_and_partial_fit_continue_the_lr_schedule():
    """A warm-started fit (a fresh optimizer, as MLPClassifier's) resumes its LR scheduler at
    the history's epoch, on spawned stages as on one device; partial_fit continues the
    optimizer's state and settings."""

    def fits(**mode):
        est = PipeNetClassifier(**{**BASE, **mode, "max_epochs": 2}, warm_start=True,
                                callbacks=[LRScheduler("StepLR", step_size=1, gamma=0.5)])
        est.fit(X, Y).fit(X, Y).partial_fit(X, Y)
        return est

    ref, est = fits(n_microbatches=1), fits(n_stages=2, launcher="spawn")
    np.testing.assert_allclose(est.history_[:, "event_lr"], ref.history_[:, "event_lr"])
    assert len(est.history_) == 5
    _same_state(est.module_.state_dict(), ref.module_.state_dict())


@pytest.mark.parametrize("callback", [Checkpoint(), TrainEndCheckpoint(), LoadInitState(Checkpoint())])
def test_skorch_checkpoints_are_refused_under_torchrun_by_name(callback):
    """Every torchrun rank runs the callbacks: skorch's would write the same files from each."""
    from skpipe.estimators._checks import check_callbacks_fit

    check_callbacks_fit([callback], weights_in_driver=False, launcher="spawn")  # one writer
    with pytest.raises(ValueError, match=rf"skorch's {type(callback).__name__}, but with "
                                         r"launcher='torchrun'.*Use skpipe.callbacks.Checkpoint"):
        check_callbacks_fit([callback], weights_in_driver=False, launcher="torchrun")
