"""skorch inside, not above: a skorch ``NeuralNet`` serves as the training loop of one fit.

It brings the loop the user watches (epochs, callbacks, history, ``verbose`` printing, early
stopping), all in the user's process; every step it takes is handed to the engine's runner. Its
collaborators come through its constructor: the runner, the number of steps to record, the
scikit-learn callback context, the estimator it trains for, the key of its checkpoints and the
history a warm start continues.
"""

from __future__ import annotations

import copy
import signal
import threading
import warnings
from typing import Any

import numpy as np
import torch
from sklearn.base import is_classifier
from skorch import NeuralNet
from skorch.callbacks import EpochScoring
from skorch.dataset import ValidSplit, unpack_data
from skorch.exceptions import DeviceWarning
from skorch.utils import TeeGenerator
from skorch.history import History

from ..callbacks import Checkpoint
from ..engine.plan._microbatch import WeightedLoss
from ..engine.state._named import set_hyperparameters
from ._data import BatchIterator
from ._mirror import WeightMirror, reads_gradients


class UserInterrupt(KeyboardInterrupt):
    """Ctrl-C from the user, told apart from skorch's EarlyStopping (which raises
    KeyboardInterrupt to end training early)."""


class _InterruptGuard:
    """While active in the main thread, SIGINT raises UserInterrupt instead of KeyboardInterrupt."""

    def __enter__(self) -> _InterruptGuard:
        self._previous: Any = None
        if threading.current_thread() is threading.main_thread():
            previous = signal.getsignal(signal.SIGINT)
            if previous is signal.default_int_handler:

                def handler(signum: int, frame: object) -> None:
                    raise UserInterrupt()

                self._previous = signal.signal(signal.SIGINT, handler)
        return self

    def __exit__(self, *exc: object) -> None:
        if self._previous is not None:
            signal.signal(signal.SIGINT, self._previous)


class TrainingLoop(NeuralNet):
    """A NeuralNet whose module, criterion and optimizer are given, and whose steps go to
    ``runner``."""

    def __init__(
        self,
        *args: Any,
        runner: Any,
        timeline_steps: int = 0,
        progress: Any = None,
        estimator: Any = None,
        checkpoint_key: Any = None,
        plan: Any = None,
        initial_history: History | None = None,
        sample_weight: np.ndarray | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(*args, **kwargs)
        self.runner = runner
        self.timeline_steps = timeline_steps
        self.progress = progress
        self.estimator = estimator
        self.checkpoint_key = checkpoint_key
        self.plan = plan  # the PlanReport of this fit, for callbacks that show or log it
        self.initial_history = initial_history
        self.sample_weight = sample_weight  # one per row of the X given to run(), or None
        self.skip_epochs = 0  # epochs a resumed fit already ran (set by LoadInitState)
        self.resumed_schedules: dict[str, Any] | None = None  # ... and its LR schedules
        # steps taken, in a list: skorch's __setattr__ costs microseconds on every assignment
        self.steps_taken = [0]
        self.epoch_progress: Any = None

    def initialize_module(self) -> TrainingLoop:
        self.module_ = self.module
        return self

    def initialize_criterion(self) -> TrainingLoop:
        self.criterion_ = self.criterion
        return self

    def initialize_optimizer(self, triggered_directly: object = None) -> TrainingLoop:
        # the stages' own optimizer, or one carrying their hyperparameters (spawned stages)
        self.optimizer_ = self.runner.optimizer
        if self.initial_history:  # warm start: a fresh optimizer, whose LR schedulers resume
            for group in self.optimizer_.param_groups:  # at the history's epoch
                group.setdefault("initial_lr", group["lr"])
        return self

    def initialize_callbacks(self) -> TrainingLoop:
        super().initialize_callbacks()
        self.mirror = WeightMirror(self.runner, self.callbacks_)
        # gradients are shown where the network trains in this process; elsewhere the
        # stages clip them (GradientNormClipping, refused otherwise before any worker)
        self.shows_gradients = self.runner.weights_in_driver and any(
            reads_gradients(cb) for _, cb in self.callbacks_
        )
        return self

    def notify(self, method_name: str, **cb_kwargs: Any) -> None:
        with self.mirror.around(method_name):
            if method_name != "on_epoch_end":
                super().notify(method_name, **cb_kwargs)
                return
            # skpipe's Checkpoint saves the epoch once every other callback ended it (an LR
            # scheduler's step included), whatever their order
            getattr(self, method_name)(self, **cb_kwargs)
            ordered = sorted(self.callbacks_, key=lambda item: isinstance(item[1], Checkpoint))
            for _, cb in ordered:
                getattr(cb, method_name)(self, **cb_kwargs)

    def initialize_history(self) -> TrainingLoop:
        self.history_ = copy.deepcopy(self.initial_history) or History()
        return self

    def run(self, X: Any, y: Any) -> History:
        """Train for what is left of ``max_epochs``; Ctrl-C stops the fit, EarlyStopping ends it."""
        with _InterruptGuard():
            self.notify("on_train_begin", X=X, y=y)  # LoadInitState resumes here
            self.resume_schedules()
            try:
                self.fit_loop(X, y, epochs=max(0, self.max_epochs - self.skip_epochs))
            except UserInterrupt:
                raise KeyboardInterrupt(
                    "fit interrupted by the user; the estimator is unchanged"
                ) from None
            except KeyboardInterrupt:
                pass  # skorch's EarlyStopping ends training this way
            self.notify("on_train_end", X=X, y=y)
        return self.history_

    def load_params(self, *args: Any, **kwargs: Any) -> None:
        """skorch's, which warns that the loop has no device: the tensors load on the CPU, and
        the stages (wherever they are) take them from the network."""
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeviceWarning)
            super().load_params(*args, **kwargs)

    def resume_schedules(self) -> None:
        """A resumed fit's optimizer settings and LR schedulers' states, as the checkpointed
        fit left them (after every callback built its scheduler in on_train_begin)."""
        saved = self.resumed_schedules
        if saved is None:
            return
        set_hyperparameters(self.optimizer_, saved["hyperparameters"])
        for name, cb in self.callbacks_:
            state = saved["schedulers"].get(name)
            if state is not None and getattr(cb, "lr_scheduler_", None) is not None:
                cb.lr_scheduler_.load_state_dict(state)
                cb.batch_idx_ = saved["batch_idx"].get(name, cb.batch_idx_)

    def get_iterator(self, dataset: Any, training: bool = False) -> BatchIterator:
        prefix = "iterator_train" if training else "iterator_valid"
        kwargs = self.get_params_for(prefix)
        kwargs.setdefault("batch_size", self.batch_size)
        if kwargs["batch_size"] == -1:
            kwargs["batch_size"] = len(dataset)
        iterator = BatchIterator(dataset, weights=self.sample_weight, **kwargs)
        if training:
            # a resumed fit continues the shuffling where the checkpointed fit left it
            iterator.skip_epochs(self.skip_epochs)
        return iterator

    def run_single_epoch(self, iterator: Any, training: bool, prefix: str, step_fn: Any,
                         **fit_params: Any) -> None:
        """skorch's epoch; with an asynchronous schedule, the stages are told how many
        training batches come, each step takes the next batch along (``_Ahead``), and the
        epoch ends once the pipeline drained. Spawned synchronous stages take the next batch
        along too (``Runner.prefetches``)."""
        runner = self.runner
        if not (training and iterator is not None
                and (runner.asynchronous or runner.prefetches)):
            super().run_single_epoch(iterator, training, prefix, step_fn, **fit_params)
            return
        expected = len(iterator)
        runner.begin_epoch(expected)
        ahead = _Ahead(iterator, runner.prefetch)
        super().run_single_epoch(ahead, training, prefix, step_fn, **fit_params)
        if not runner.asynchronous:
            return
        if ahead.count != expected:
            raise RuntimeError(
                f"the training iterator gave {ahead.count} batches where its len() said "
                f"{expected}; an asynchronous schedule lays an epoch's work out beforehand"
            )
        self.runner.end_epoch()

    def train_step(self, batch: Any, **fit_params: Any) -> dict[str, torch.Tensor]:
        Xi, yi, wi = _unpack(batch)
        if self.steps_taken[0] == 1 and self.timeline_steps:
            # record from the second step: the first one also pays one-off set-up costs
            self.runner.record_timeline(self.timeline_steps)
        self.steps_taken[0] += 1
        on_grads = None
        if self.shows_gradients:
            def on_grads() -> None:
                self.notify(
                    "on_grad_computed",
                    named_parameters=TeeGenerator(self.get_all_learnable_params()),
                    batch=batch,
                    training=True,
                )
        loss, y_pred = self.runner.train_step(Xi, yi, wi, on_grads)
        self.mirror.stale = True
        return {"loss": loss, "y_pred": y_pred}

    # scikit-learn's callbacks (ProgressBar...) see one sub-task per epoch
    def on_epoch_begin(self, net: Any, **kwargs: Any) -> None:
        super().on_epoch_begin(net, **kwargs)
        if self.progress is not None:
            self.epoch_progress = self.progress.subcontext(task_name="epoch")
            self.epoch_progress.call_on_fit_task_begin(estimator=self.estimator)

    def on_epoch_end(self, net: Any, **kwargs: Any) -> None:
        super().on_epoch_end(net, **kwargs)
        if self.epoch_progress is not None:
            self.epoch_progress.call_on_fit_task_end(estimator=self.estimator)
            self.epoch_progress = None

    def validation_step(self, batch: Any, **fit_params: Any) -> dict[str, torch.Tensor]:
        Xi, yi, wi = _unpack(batch)
        y_pred = self.runner.predict(Xi)
        with torch.no_grad():
            if wi is None:
                loss = self.criterion_(y_pred, yi)
            else:  # the validation loss weighs rows as training does
                weighted = WeightedLoss(self.criterion_)
                weighted.set_batch(yi, len(yi), wi)
                loss = weighted(y_pred, torch.arange(len(yi)))
        return {"loss": loss, "y_pred": y_pred}

    def evaluation_step(self, batch: Any, training: bool = False) -> torch.Tensor:
        Xi = _unpack(batch)[0]
        out: torch.Tensor = self.runner.predict(Xi)
        return out


class _Ahead:
    """The batches of ``iterator``, each yielded once the next one (or None, at the end) was
    handed to ``prefetch`` as (X, y, sample weights)."""

    def __init__(self, iterator: Any, prefetch: Any) -> None:
        self.iterator = iterator
        self.prefetch = prefetch
        self.count = 0

    def __iter__(self) -> Any:
        batches = iter(self.iterator)
        current = next(batches, None)
        while current is not None:
            upcoming = next(batches, None)
            self.prefetch(*(_unpack(upcoming) if upcoming is not None else (None, None, None)))
            self.count += 1
            yield current
            current = upcoming


def _unpack(batch: Any) -> tuple[Any, Any, Any]:
    """(X, y, sample weights or None) of a batch from ``BatchIterator``."""
    if isinstance(batch, (tuple, list)) and len(batch) == 3:
        return batch[0], batch[1], batch[2]
    Xi, yi = unpack_data(batch)
    return Xi, yi, None


class ClassifierTrainingLoop(TrainingLoop):
    """A classifier to scikit-learn's scorers: ``EpochScoring('accuracy')`` sees class indices,
    as y does here, and probability scorers (``'roc_auc'``, ``'neg_log_loss'``) the estimator's
    probabilities; with a validation split, ``valid_acc`` is recorded, as skorch's
    ``NeuralNetClassifier`` does."""

    @property
    def _default_callbacks(self) -> list[tuple[str, Any]]:
        defaults = list(super()._default_callbacks)
        scoring = ("valid_acc", EpochScoring(
            "accuracy", name="valid_acc", lower_is_better=False, on_train=False
        ))
        return defaults[:-1] + [scoring] + defaults[-1:]  # print_log stays last

    @property
    def classes_(self) -> np.ndarray:
        return np.arange(len(self.estimator.classes_))

    def __sklearn_tags__(self):  # noqa: ANN204 - sklearn's Tags type is private
        tags = super().__sklearn_tags__()
        tags.estimator_type = "classifier"
        return tags

    def predict(self, X: Any) -> Any:
        return self.predict_proba(X).argmax(axis=1)


def probabilities(out: torch.Tensor) -> torch.Tensor:
    """The network's outputs as class probabilities, as the estimator's ``predict_proba`` makes
    them: a softmax of the logits (of the log-probabilities, for NLLLoss: the same as exp)."""
    return torch.softmax(out, dim=-1)


def run_loop(
    estimator: Any,
    runner: Any,
    X: Any,
    y: np.ndarray,
    *,
    criterion: torch.nn.Module,
    seed: int,
    sample_weight: np.ndarray | None,
    batch_size: int,
    epochs: int,
    checkpoint_key: Any,
    report: Any,
    history: History | None,
    progress: Any,
    routed: dict[str, Any],
) -> History:
    """The epochs of one fit: a skorch loop with the estimator's settings, each step handed to
    ``runner``; ``history`` is the one a warm start continues, ``routed`` the ``callbacks__*``
    and ``iterator_*`` parameters."""
    classifier = is_classifier(estimator)
    loop = ClassifierTrainingLoop if classifier else TrainingLoop
    train_split = estimator.train_split
    if isinstance(train_split, float):  # a fraction, as skorch's ValidSplit takes it
        train_split = ValidSplit(train_split, stratified=classifier, random_state=seed)
    # the fit's own shuffling, unless the user set it (iterator_train__shuffle / __seed)
    routed = {"iterator_train__shuffle": True, "iterator_train__seed": seed, **routed}
    extra = {"predict_nonlinearity": probabilities} if classifier else {}
    net = loop(
        module=runner.module,
        criterion=criterion,
        optimizer=estimator.optimizer,
        lr=estimator.lr,
        max_epochs=epochs,
        batch_size=batch_size,
        callbacks=estimator.callbacks,
        train_split=train_split,
        verbose=estimator.verbose,
        device=None,
        runner=runner,
        timeline_steps=estimator.timeline_steps,
        progress=progress,
        estimator=estimator,
        checkpoint_key=checkpoint_key,
        plan=report,
        initial_history=history,
        sample_weight=sample_weight,
        **extra,
        **routed,
    )
    net.initialize()
    return net.run(X, y)
