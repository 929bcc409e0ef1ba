"""A synchronous step's next batch sent along with it (``P.SyncStep``): the spawned stages
compute its forward and backward while the driver runs the step's callbacks. What they train
must be what plain steps train, whatever happens between two steps: a callback that writes the
weights (the batch computed ahead is dropped and computed again, with the random state it had),
an interrupted fit continued with ``partial_fit``."""

import numpy as np
import pytest
import torch
from skorch.callbacks import Callback

from skpipe import PipeNetClassifier
from skpipe.engine.plan import _config as engine_config

pytestmark = pytest.mark.distributed

rng = np.random.RandomState(0)
X = rng.normal(size=(200, 6)).astype(np.float32)
Y = (X[:, 0] + X[:, 1] > 0).astype(np.int64)
PARAMS = dict(
    module__hidden_layer_sizes=(16, 16), module__dropout=0.3, optimizer=torch.optim.Adam,
    lr=0.01, max_epochs=3, batch_size=32, train_split=None, random_state=0, launcher="spawn",
    verbose=0,
)


class _AfterTrainingBatches(Callback):
    """Counts the fit's training batches; ``after(net)`` once each has ended."""

    def initialize(self):
        self.seen_ = 0
        return self

    def on_batch_end(self, net, training=False, **kwargs):
        if training:
            self.seen_ += 1
            self.after(net)


class ShrinkAt(_AfterTrainingBatches):
    """Writes the weights after the training batches given (counted over the fit)."""

    def __init__(self, at=(2, 5, 9)):
        self.at = at

    def after(self, net):
        if self.seen_ in self.at:
            with torch.no_grad():
                for p in net.module_.parameters():
                    p.mul_(0.9)


class InterruptAt(_AfterTrainingBatches):
    """Interrupts the fit after its ``at``-th training batch."""

    needs_weights = False

    def __init__(self, at=4):
        self.at = at

    def after(self, net):
        if self.seen_ == self.at:
            raise KeyboardInterrupt


def _fit(ahead, monkeypatch, **params):
    monkeypatch.setattr(engine_config, "STEP_AHEAD", ahead)
    return PipeNetClassifier(**{**PARAMS, **params}).fit(X, Y)


def _same(a, b):
    for (name, x), (_, y) in zip(a.module_.state_dict().items(),
                                 b.module_.state_dict().items(), strict=True):
        torch.testing.assert_close(x, y, atol=1e-6, rtol=0, msg=name)


@pytest.mark.parametrize("layout", [dict(n_stages=2), dict(n_stages=1, n_replicas=2)])
def test_dropout_with_weight_writes_between_steps(layout, monkeypatch):
    plain = _fit(False, monkeypatch, callbacks=[ShrinkAt()], **layout)
    ahead = _fit(True, monkeypatch, callbacks=[ShrinkAt()], **layout)
    _same(ahead, plain)
    assert np.allclose(ahead.history_[:, "train_loss"], plain.history_[:, "train_loss"],
                       atol=1e-6)


def test_interrupted_fit_continued_with_partial_fit(monkeypatch):
    fits = {}
    for ahead in (False, True):
        est = _fit(ahead, monkeypatch, callbacks=[InterruptAt(4)], n_stages=2)
        assert len(est.history_) == 1  # stopped in its first epoch
        stopped = {k: v.clone() for k, v in est.module_.state_dict().items()}
        est.set_params(callbacks=[])
        est.partial_fit(X, Y)
        fits[ahead] = (stopped, est)
    for name, value in fits[False][0].items():
        torch.testing.assert_close(fits[True][0][name], value, atol=1e-6, rtol=0, msg=name)
    _same(fits[True][1], fits[False][1])
