"""PipeNetRegressor: 1-D or 2-D numeric targets; predictions take the shape of y."""

from __future__ import annotations

from typing import Any

import numpy as np
from sklearn.base import RegressorMixin
from torch import nn

from ._base import BasePipeNet
from ._docs import ATTRIBUTES_DOC, PARAMETERS_DOC


class PipeNetRegressor(RegressorMixin, BasePipeNet):
    __doc__ = (
        """A neural-network regressor whose ``fit`` can train with pipeline parallelism.

    The network (``module``, by default :class:`skpipe.modules.MLP`) outputs one value per
    target column and is trained with the mean squared error (``nn.MSELoss``, the default
    ``criterion``). With ``n_stages > 1`` it is split into stages trained by torch's pipeline
    schedules (and with ``n_replicas > 1`` into that many data-parallel copies of the
    pipeline), and the result is the same network a single device would have trained.
"""
        + PARAMETERS_DOC
        + """
    Attributes
    ----------
    n_outputs_ : int
        Number of target columns seen in ``fit``.
    y_ndim_ : int
        Dimensions of the ``y`` seen in ``fit`` (1 or 2): predictions take that shape."""
        + ATTRIBUTES_DOC
        + """

    See Also
    --------
    PipeNetClassifier : The same for class labels.

    Examples
    --------
    >>> import numpy as np
    >>> from skpipe import PipeNetRegressor
    >>> rng = np.random.RandomState(0)
    >>> X = rng.normal(size=(200, 3))
    >>> y = X @ np.array([1.0, -2.0, 0.5])
    >>> reg = PipeNetRegressor(lr=0.01, max_epochs=50, random_state=0).fit(X, y)
    >>> reg.predict(X[:2]).shape
    (2,)
    """
    )

    _DEFAULT_CRITERION = nn.MSELoss

    def __sklearn_tags__(self):  # noqa: ANN204
        tags = super().__sklearn_tags__()
        tags.target_tags.multi_output = True
        return tags

    _Y_CHECKS = dict(multi_output=True, y_numeric=True)

    def partial_fit(self, X: Any, y: Any, sample_weight: Any = None) -> PipeNetRegressor:
        """One pass over ``X, y``, continuing from the state of the previous calls.

        The network, the optimizer's state and the history carry over from call to call (as
        ``MLPRegressor.partial_fit``); a pipelined fit keeps its warm workers between calls.

        Parameters
        ----------
        X : array-like or sparse matrix of shape (n_samples, n_features)
            The rows of this call.
        y : array-like of shape (n_samples,) or (n_samples, n_targets)
            Their targets.
        sample_weight : array-like of shape (n_samples,), default=None
            Weights of the rows, as in :meth:`fit`.

        Returns
        -------
        self : object
            The estimator, trained one more epoch.
        """
        return self._partial_fit(X, y, sample_weight)

    def _validate_targets(
        self, y: np.ndarray, reset: bool, classes: Any = None
    ) -> tuple[np.ndarray, int]:
        y = np.asarray(y, dtype=np.float32)
        if reset:
            self.y_ndim_ = y.ndim
            self.n_outputs_ = 1 if y.ndim == 1 else y.shape[1]
        elif (1 if y.ndim == 1 else y.shape[1]) != self.n_outputs_:
            raise ValueError(
                f"y has {1 if y.ndim == 1 else y.shape[1]} target column(s) but the fitted "
                f"network has n_outputs_={self.n_outputs_}."
            )
        return y.reshape(len(y), -1), self.n_outputs_

    def predict(self, X: Any) -> np.ndarray:
        """Predicted targets, shaped like the ``y`` given to ``fit``.

        Parameters
        ----------
        X : array-like or sparse matrix of shape (n_samples, n_features)
            The rows to predict.

        Returns
        -------
        ndarray of shape (n_samples,) or (n_samples, n_targets)
            The predicted targets.
        """
        X = self._validate_X_predict(X)
        out = self._forward(X).astype(np.float64)
        return out.ravel() if self.y_ndim_ == 1 else out
