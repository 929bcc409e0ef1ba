"""skpipe: scikit-learn estimators that train neural networks with pipeline parallelism.

Names are imported on first use, so that a stage worker (which imports ``skpipe.engine``) does
not pay for scikit-learn and skorch.
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.2.0"  # the one place: pyproject.toml and docs/conf.py read it

_LAZY = {
    "PipeNetClassifier": "skpipe.estimators",
    "PipeNetRegressor": "skpipe.estimators",
    "shutdown_workers": "skpipe.engine.workers._pool",
    "datasets": "skpipe.datasets",
    "modules": "skpipe.modules",
}

__all__ = sorted(_LAZY)


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        module = importlib.import_module(_LAZY[name])
        value = module if module.__name__ == f"skpipe.{name}" else getattr(module, name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'skpipe' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY))
