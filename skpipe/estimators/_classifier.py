"""PipeNetClassifier: labels of any type in, the same labels out; probabilities from softmax."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np
import torch
from sklearn.base import ClassifierMixin
from sklearn.utils._param_validation import StrOptions
from sklearn.utils.class_weight import compute_class_weight
from sklearn.utils.multiclass import check_classification_targets
from sklearn.utils.validation import column_or_1d
from torch import nn

from ..modules import MLP
from ._base import BasePipeNet
from ._docs import ATTRIBUTES_DOC, PARAMETERS_DOC


class PipeNetClassifier(ClassifierMixin, BasePipeNet):
    __doc__ = (
        """A neural-network classifier whose ``fit`` can train with pipeline parallelism.

    The network (``module``, by default :class:`skpipe.modules.MLP`) outputs one logit per
    class and is trained with cross-entropy (``nn.CrossEntropyLoss``, the default
    ``criterion``). With ``n_stages=1`` it trains in this process; with ``n_stages > 1`` it is
    split into stages trained by torch's pipeline schedules (and with ``n_replicas > 1`` into
    that many data-parallel copies of the pipeline), and the result is the same network a
    single device would have trained.
"""
        + PARAMETERS_DOC.replace(
            "    criterion :",
            """    class_weight : dict, 'balanced' or None, default=None
        Weight of each class, multiplying the sample weights of its rows (as
        ``LogisticRegression``): a dict ``{label: weight}`` (classes not named weigh 1) or
        'balanced' (n_samples / (n_classes * count of the class)).
    criterion :""",
            1,
        )
        + """
    Attributes
    ----------
    classes_ : ndarray of shape (n_classes,)
        The class labels seen in ``fit``, sorted."""
        + ATTRIBUTES_DOC
        + """

    See Also
    --------
    PipeNetRegressor : The same for numeric targets.

    Examples
    --------
    >>> from sklearn.datasets import load_iris
    >>> from skpipe import PipeNetClassifier
    >>> X, y = load_iris(return_X_y=True)
    >>> clf = PipeNetClassifier(lr=0.01, max_epochs=30, random_state=0).fit(X, y)
    >>> clf.score(X, y) > 0.9
    True
    """
    )

    _DEFAULT_CRITERION = nn.CrossEntropyLoss

    _parameter_constraints: dict[str, Any] = {
        **BasePipeNet._parameter_constraints,
        "class_weight": [dict, StrOptions({"balanced"}), None],
    }

    # Spelled out, as scikit-learn's estimators spell theirs (MLPClassifier, MLPRegressor):
    # BasePipeNet's parameters plus class_weight (tests/test_docstrings.py keeps them in step).
    def __init__(
        self,
        module: type[nn.Module] | nn.Module = MLP,
        *,
        class_weight: dict[Any, float] | str | None = None,
        criterion: type[nn.Module] | nn.Module | None = None,
        optimizer: Callable[..., torch.optim.Optimizer] = torch.optim.Adam,
        lr: float = 0.001,
        max_epochs: int = 100,
        batch_size: int | str = 64,
        callbacks: list[Any] | None = None,
        train_split: Callable[..., Any] | None = None,
        warm_start: bool = False,
        random_state: int | np.random.RandomState | None = None,
        verbose: int = 0,
        devices: str | list[str] | tuple[str, ...] = "auto",
        n_stages: int = 1,
        n_replicas: int = 1,
        tensor_parallel: int = 1,
        tp_plan: dict[str, Any] | None = None,
        shard: str = "none",
        n_microbatches: int | str = "auto",
        schedule: str = "1f1b",
        chunks_per_stage: int | str = "auto",
        balance: str | list[int] | tuple[int, ...] = "uniform",
        split_points: dict[str, Any] | None = None,
        checkpoint: str = "never",
        launcher: str = "auto",
        precision: str = "float32",
        max_grad_norm: float | None = None,
        timeout: float = 300.0,
        timeline_steps: int = 0,
        stage_memory_budget: float | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(
            module,
            criterion=criterion,
            optimizer=optimizer,
            lr=lr,
            max_epochs=max_epochs,
            batch_size=batch_size,
            callbacks=callbacks,
            train_split=train_split,
            warm_start=warm_start,
            random_state=random_state,
            verbose=verbose,
            devices=devices,
            n_stages=n_stages,
            n_replicas=n_replicas,
            tensor_parallel=tensor_parallel,
            tp_plan=tp_plan,
            shard=shard,
            n_microbatches=n_microbatches,
            schedule=schedule,
            chunks_per_stage=chunks_per_stage,
            balance=balance,
            split_points=split_points,
            checkpoint=checkpoint,
            launcher=launcher,
            precision=precision,
            max_grad_norm=max_grad_norm,
            timeout=timeout,
            timeline_steps=timeline_steps,
            stage_memory_budget=stage_memory_budget,
            **kwargs,
        )
        self.class_weight = class_weight


    def _row_weights(self, y_enc: np.ndarray, weights: np.ndarray | None) -> np.ndarray | None:
        """Sample weights times the weight of each row's class (``class_weight``), as
        ``LogisticRegression`` combines them."""
        if self.class_weight is not None:
            per_class = self._class_weights(y_enc, weights)
            rows = per_class[y_enc]
            weights = rows if weights is None else weights * rows
        if weights is not None and not weights.any():
            raise ValueError(
                f"class_weight={self.class_weight!r} with these sample weights gives every row "
                "weight zero: there is nothing to train on."
            )
        return super()._row_weights(y_enc, weights)

    def _class_weights(self, y_enc: np.ndarray, weights: np.ndarray | None) -> np.ndarray:
        if isinstance(self.class_weight, dict):
            unknown = [k for k in self.class_weight if k not in set(self.classes_.tolist())]
            if unknown:
                raise ValueError(
                    f"class_weight names class(es) {unknown} that y does not have "
                    f"(classes_={self.classes_.tolist()})."
                )
            bad = {k: v for k, v in self.class_weight.items() if not (np.isfinite(v) and v >= 0)}
            if bad:
                raise ValueError(
                    f"class_weight must map classes to non-negative finite weights; got {bad}."
                )
        given = self.class_weight
        by_index: dict[int, float] | str = (
            {i: float(given.get(c, 1.0)) for i, c in enumerate(self.classes_.tolist())}
            if isinstance(given, dict)
            else "balanced"
        )
        per_class = compute_class_weight(
            by_index, classes=np.arange(len(self.classes_)), y=y_enc, sample_weight=weights
        )
        return np.asarray(per_class, dtype=np.float64)

    def _validate_targets(
        self, y: np.ndarray, reset: bool, classes: Any = None
    ) -> tuple[np.ndarray, int]:
        y = column_or_1d(y, warn=True)
        check_classification_targets(y)
        if reset:
            given = classes is not None
            found = np.unique(classes if given else y)
            if len(found) < 2:
                only = found[0].item() if isinstance(found[0], np.generic) else found[0]
                where = "classes" if given else "y"
                raise ValueError(
                    f"{where} has only one class ({only!r}); {type(self).__name__} needs at "
                    "least 2 classes to train."
                )
            self.classes_ = found
        unknown = np.setdiff1d(np.unique(y), self.classes_)
        if unknown.size:
            source = "the classes given" if classes is not None else "classes_"
            raise ValueError(
                f"y contains classes {unknown.tolist()} not in {source} "
                f"({self.classes_.tolist()}, set by the first fit or partial_fit); a continued "
                "fit cannot add classes."
            )
        return np.searchsorted(self.classes_, y).astype(np.int64), len(self.classes_)

    def partial_fit(
        self, X: Any, y: Any, classes: Any = None, sample_weight: Any = None
    ) -> PipeNetClassifier:
        """One pass over ``X, y``, continuing from the state of the previous calls.

        The network, the optimizer's state and the history carry over from call to call (as
        ``MLPClassifier.partial_fit``); a pipelined fit keeps its warm workers between calls.

        Parameters
        ----------
        X : array-like or sparse matrix of shape (n_samples, n_features)
            The rows of this call.
        y : array-like of shape (n_samples,)
            Their labels.
        classes : array-like of shape (n_classes,), default=None
            Every class the calls will see; required on the first call, ignored after.
        sample_weight : array-like of shape (n_samples,), default=None
            Weights of the rows, as in :meth:`fit`.

        Returns
        -------
        self : object
            The estimator, trained one more epoch.
        """
        first = not hasattr(self, "module_")
        if first and classes is None:
            raise ValueError(
                "classes must be given on the first call to partial_fit: every class the calls "
                "will see (e.g. classes=np.unique(y_all))."
            )
        return self._partial_fit(X, y, sample_weight, classes if first else None)

    def predict_proba(self, X: Any) -> np.ndarray:
        """Class probabilities, rows summing to 1, columns in the order of ``classes_``.

        Parameters
        ----------
        X : array-like or sparse matrix of shape (n_samples, n_features)
            The rows to classify.

        Returns
        -------
        ndarray of shape (n_samples, n_classes)
            The probability of each class for each row.
        """
        X = self._validate_X_predict(X)
        logits = self._forward(X).astype(np.float64)
        if isinstance(self.criterion_, nn.NLLLoss):
            proba = np.exp(logits)
        else:
            logits -= logits.max(axis=1, keepdims=True)
            proba = np.exp(logits)
        proba /= proba.sum(axis=1, keepdims=True)
        return proba

    def predict_log_proba(self, X: Any) -> np.ndarray:
        """Logarithm of :meth:`predict_proba`.

        Parameters
        ----------
        X : array-like or sparse matrix of shape (n_samples, n_features)
            The rows to classify.

        Returns
        -------
        ndarray of shape (n_samples, n_classes)
            The log-probability of each class for each row.
        """
        with np.errstate(divide="ignore"):
            return np.log(self.predict_proba(X))

    def predict(self, X: Any) -> np.ndarray:
        """Predicted class labels, of the same type as the ``y`` given to ``fit``.

        Parameters
        ----------
        X : array-like or sparse matrix of shape (n_samples, n_features)
            The rows to classify.

        Returns
        -------
        ndarray of shape (n_samples,)
            The most probable class of each row.
        """
        proba = self.predict_proba(X)
        return self.classes_[np.argmax(proba, axis=1)]
