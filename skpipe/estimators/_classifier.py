"""PipeNetClassifier: labels of any type in, the same labels out; probabilities from softmax."""

from __future__ import annotations

from typing import Any

import numpy as np
from sklearn.base import ClassifierMixin
from sklearn.utils.multiclass import check_classification_targets
from sklearn.utils.validation import column_or_1d
from torch import nn

from ._base import BasePipeNet


class PipeNetClassifier(ClassifierMixin, BasePipeNet):
    """A neural-network classifier whose ``fit`` can train with pipeline parallelism.

    The network (``module``, by default :class:`skpipe.modules.MLP`) outputs one logit per
    class and is trained with cross-entropy. With ``n_stages=1`` it trains in this process;
    with ``n_stages > 1`` it is split into stages trained by torch's pipeline schedules, and the
    result is the same network a single device would have trained.

    Parameters
    ----------
    module : nn.Module subclass or instance, default=skpipe.modules.MLP
        A class is built with the ``module__*`` parameters, plus ``n_features_in`` and
        ``n_outputs`` (the number of classes) when its constructor declares them.
    criterion : nn.Module subclass or instance, default=None
        None means ``nn.CrossEntropyLoss``; ``criterion__*`` parameters are passed to a class.
    optimizer : callable, default=torch.optim.Adam
        Built as ``optimizer(params, lr=lr, **optimizer__*)``.
    lr : float, default=0.001
    max_epochs : int, default=100
    batch_size : int or 'all', default=64
    callbacks : list of skorch callbacks, default=None
        Run in this process, whatever the number of stages (``EpochScoring``,
        ``EarlyStopping``, ``PrintLog``...).
    train_split : callable, default=None
        A skorch split such as ``skorch.dataset.ValidSplit(5)``; None trains on all of X.
    warm_start : bool, default=False
        Continue from the fitted network (a new optimizer is built).
    random_state : int, RandomState or None, default=None
        Fixes weight initialisation and shuffling: two fits with the same seed are identical.
    verbose : int, default=0
        1 prints skorch's epoch table.
    devices : 'auto' or list of str, default='auto'
        One device per stage ('cpu', 'cuda:0', ...); with one stage the first is used.
    n_stages : int, default=1
        Pipeline depth: the number of workers (devices) the network is split across.
    n_microbatches : int or 'auto', default='auto'
        Micro-batches per batch; 'auto' picks the largest of 4p, 2p, p the schedule accepts.
    schedule : str, default='1f1b'
        'gpipe', '1f1b', 'interleaved_1f1b', 'looped_bfs', 'interleaved_zero_bubble', 'zbv'
        or 'dualpipev' (torch.distributed.pipelining's schedules).
    chunks_per_stage : int or 'auto', default='auto'
        Model chunks per worker for the looped/interleaved schedules (2 for the V schedules).
    balance : 'uniform', 'parameters', 'time' or list of int, default='uniform'
        How layers are divided among chunks.
    checkpoint : {'never', 'except_last', 'always'}, default='never'
        Activation recomputation per micro-batch, as torchgpipe defines the modes.
    launcher : {'auto', 'spawn', 'local', 'torchrun'}, default='auto'
        Where the stages live: worker processes, this process, or a torchrun job.
    precision : {'float32', 'bf16'}, default='float32'
        'bf16' runs the forward under bfloat16 autocast.
    max_grad_norm : float or None, default=None
        Clip gradients by their global norm across all stages.
    timeout : float, default=300.0
        Seconds the driver waits for a worker before declaring it hung.
    timeline_steps : int, default=0
        Record what each stage does during this many steps (from the second one) into
        ``timeline_`` (see :func:`skpipe.viz.plot_timeline`).
    stage_memory_budget : float or None, default=None
        Bytes each stage may hold; with ``n_microbatches='auto'`` the micro-batch count is raised
        until the estimated peak (parameters, gradients, optimizer state and the activations of
        the micro-batches in flight) fits, or ``fit`` says by how much it cannot.
    **kwargs
        Prefixed parameters: ``module__*``, ``optimizer__*``, ``criterion__*``,
        ``iterator_train__*``, ``iterator_valid__*``, ``callbacks__*``.

    Attributes
    ----------
    classes_ : ndarray of shape (n_classes,)
    module_ : nn.Module
        The whole trained network, on the CPU.
    history_ : skorch.History
    n_features_in_ : int
    feature_names_in_ : ndarray of str
        Only when X had string column names.
    n_iter_ : int
        Epochs run.
    plan_ : PlanReport
        The plan the fit used (see :meth:`plan`).
    timeline_ : Timeline or None
        The recorded spans when ``timeline_steps > 0``.
    config_ : PipelineConfig
        The resolved configuration (micro-batch count, chunks, devices, launcher).

    Examples
    --------
    >>> from sklearn.datasets import load_iris
    >>> from skpipe import PipeNetClassifier
    >>> X, y = load_iris(return_X_y=True)
    >>> clf = PipeNetClassifier(lr=0.01, max_epochs=30, random_state=0).fit(X, y)
    >>> clf.score(X, y) > 0.9
    True
    """

    def _default_criterion(self) -> nn.Module:
        return nn.CrossEntropyLoss()

    _Y_CHECKS = dict(y_numeric=False)

    def _validate_targets(self, y: np.ndarray, reset: bool) -> tuple[np.ndarray, int]:
        y = column_or_1d(y, warn=True)
        check_classification_targets(y)
        if reset:
            classes, encoded = np.unique(y, return_inverse=True)
            if len(classes) < 2:
                only = classes[0].item() if isinstance(classes[0], np.generic) else classes[0]
                raise ValueError(
                    f"y has only one class ({only!r}); {type(self).__name__} needs at "
                    "least 2 classes to train."
                )
            self.classes_ = classes
        else:
            unknown = np.setdiff1d(np.unique(y), self.classes_)
            if unknown.size:
                raise ValueError(
                    f"y contains classes {unknown.tolist()} not seen in the first fit "
                    f"(classes_={self.classes_.tolist()}); warm_start cannot add classes."
                )
            encoded = np.searchsorted(self.classes_, y)
        return encoded.astype(np.int64), len(self.classes_)

    def predict_proba(self, X: Any) -> np.ndarray:
        """Class probabilities, rows summing to 1, columns in the order of ``classes_``.

        Parameters
        ----------
        X : array-like or sparse matrix of shape (n_samples, n_features)

        Returns
        -------
        proba : ndarray of shape (n_samples, n_classes)
        """
        X = self._validate_X_predict(X)
        logits = self._forward(X).astype(np.float64)
        if logits.size == 0:
            return np.empty((0, len(self.classes_)))
        if isinstance(self.criterion_, nn.NLLLoss):
            proba = np.exp(logits)
        else:
            logits -= logits.max(axis=1, keepdims=True)
            proba = np.exp(logits)
        proba /= proba.sum(axis=1, keepdims=True)
        return proba

    def predict_log_proba(self, X: Any) -> np.ndarray:
        """Logarithm of :meth:`predict_proba`."""
        with np.errstate(divide="ignore"):
            return np.log(self.predict_proba(X))

    def predict(self, X: Any) -> np.ndarray:
        """Predicted class labels, of the same type as the ``y`` given to ``fit``.

        Parameters
        ----------
        X : array-like or sparse matrix of shape (n_samples, n_features)

        Returns
        -------
        y_pred : ndarray of shape (n_samples,)
        """
        proba = self.predict_proba(X)
        return self.classes_[np.argmax(proba, axis=1)]
