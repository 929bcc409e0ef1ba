"""PipeNetClassifier: labels of any type in, the same labels out; probabilities from softmax."""

from __future__ import annotations

from typing import Any

import numpy as np
from sklearn.base import ClassifierMixin
from sklearn.utils.multiclass import check_classification_targets
from sklearn.utils.validation import column_or_1d
from torch import nn

from ._base import BasePipeNet
from ._docs import ATTRIBUTES_DOC, PARAMETERS_DOC


class PipeNetClassifier(ClassifierMixin, BasePipeNet):
    __doc__ = (
        """A neural-network classifier whose ``fit`` can train with pipeline parallelism.

    The network (``module``, by default :class:`skpipe.modules.MLP`) outputs one logit per
    class and is trained with cross-entropy (``nn.CrossEntropyLoss``, the default
    ``criterion``). With ``n_stages=1`` it trains in this process; with ``n_stages > 1`` it is
    split into stages trained by torch's pipeline schedules, and the result is the same network
    a single device would have trained.
"""
        + PARAMETERS_DOC
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
