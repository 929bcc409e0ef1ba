"""The scikit-learn estimators."""

from ._classifier import PipeNetClassifier
from ._regressor import PipeNetRegressor

__all__ = ["PipeNetClassifier", "PipeNetRegressor"]
