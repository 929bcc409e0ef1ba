"""skpipe: scikit-learn estimators that train neural networks with pipeline parallelism."""

from . import datasets, modules
from .engine._workers import shutdown_workers
from .estimators import PipeNetClassifier, PipeNetRegressor

__version__ = "0.1.0"

__all__ = ["PipeNetClassifier", "PipeNetRegressor", "datasets", "modules", "shutdown_workers"]
