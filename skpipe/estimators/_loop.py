"""skorch inside, not above: a skorch ``NeuralNet`` serves as the training loop of one fit.

It brings the loop the user watches (epochs, callbacks, history, ``verbose`` printing, early
stopping), all in the user's process; every step it takes is handed to the engine's runner.
"""

from __future__ import annotations

from typing import Any

import torch
from skorch import NeuralNet
from skorch.dataset import unpack_data

from ._data import BatchIterator


class TrainingLoop(NeuralNet):
    """A NeuralNet whose module, criterion and optimizer are given, and whose steps go to
    ``runner_`` (set before ``initialize``)."""

    runner_: Any

    def initialize_module(self) -> TrainingLoop:
        self.module_ = self.module
        return self

    def initialize_criterion(self) -> TrainingLoop:
        self.criterion_ = self.criterion
        return self

    def initialize_optimizer(self, triggered_directly: object = None) -> TrainingLoop:
        # With every stage in this process the runner's optimizer is the real one, so
        # callbacks such as LRScheduler work; workers keep theirs to themselves.
        self.optimizer_ = self.runner_.optimizer
        return self

    def get_iterator(self, dataset: Any, training: bool = False) -> BatchIterator:
        prefix = "iterator_train" if training else "iterator_valid"
        kwargs = self.get_params_for(prefix)
        kwargs.setdefault("batch_size", self.batch_size)
        if kwargs["batch_size"] == -1:
            kwargs["batch_size"] = len(dataset)
        iterator = BatchIterator(dataset, **kwargs)
        if training:
            # a resumed fit continues the shuffling where the checkpointed fit left it
            iterator.skip_epochs(getattr(self, "skip_epochs_", 0))
        return iterator

    def train_step(self, batch: Any, **fit_params: Any) -> dict[str, torch.Tensor]:
        Xi, yi = unpack_data(batch)
        steps = getattr(self, "steps_", 0)
        if steps == 1 and getattr(self, "timeline_steps_", 0):
            # record from the second step: the first one also pays one-off set-up costs
            self.runner_.record_timeline(self.timeline_steps_)
        self.steps_ = steps + 1
        loss, y_pred = self.runner_.train_step(Xi, yi)
        return {"loss": loss, "y_pred": y_pred}

    # scikit-learn's callbacks (ProgressBar...) see one sub-task per epoch
    def on_epoch_begin(self, net: Any, **kwargs: Any) -> None:
        super().on_epoch_begin(net, **kwargs)
        ctx = getattr(self, "sklearn_ctx_", None)
        if ctx is not None:
            self.epoch_ctx_ = ctx.subcontext(task_name="epoch")
            self.epoch_ctx_.call_on_fit_task_begin(estimator=self.estimator_)

    def on_epoch_end(self, net: Any, **kwargs: Any) -> None:
        super().on_epoch_end(net, **kwargs)
        ctx = getattr(self, "epoch_ctx_", None)
        if ctx is not None:
            ctx.call_on_fit_task_end(estimator=self.estimator_)
            self.epoch_ctx_ = None

    def validation_step(self, batch: Any, **fit_params: Any) -> dict[str, torch.Tensor]:
        Xi, yi = unpack_data(batch)
        y_pred = self.runner_.predict(Xi)
        with torch.no_grad():
            loss = self.criterion_(y_pred, yi)
        return {"loss": loss, "y_pred": y_pred}

    def evaluation_step(self, batch: Any, training: bool = False) -> torch.Tensor:
        Xi, _ = unpack_data(batch)
        return self.runner_.predict(Xi)


class ClassifierTrainingLoop(TrainingLoop):
    """Scoring callbacks (``EpochScoring('accuracy')``) see class indices, as y does here."""

    def predict(self, X: Any) -> Any:
        return self.predict_proba(X).argmax(axis=1)
