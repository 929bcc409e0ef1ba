"""Checkpoints that work with any number of stages, and resume a fit exactly.

``Checkpoint`` saves, every ``every`` epochs, the whole network (gathered from the stages),
every stage's optimizer state, the history and the position of the shuffling generator.
``LoadInitState`` resumes from it: the fit continues at the next epoch and ends with the
parameters an uninterrupted fit with the same seed would have.

Each fit writes under ``dirname/<fingerprint>/``, where the fingerprint hashes the estimator's
parameters and the training data, so the fits of a grid search (candidates and folds, in
parallel or not) never write to the same path, and a rerun of the same fit finds its own
checkpoint. Files are written atomically and read with ``torch.load(weights_only=True)``.

Examples
--------
>>> from skpipe import PipeNetClassifier
>>> from skpipe.callbacks import Checkpoint, LoadInitState
>>> ckpt = Checkpoint("checkpoints")
>>> est = PipeNetClassifier(callbacks=[ckpt, LoadInitState(ckpt)], random_state=0)
"""

from __future__ import annotations

import hashlib
import os
import tempfile
from typing import Any

import numpy as np
import torch
from skorch.callbacks import Callback

_FILE = "checkpoint.pt"


def fit_fingerprint(params: dict[str, Any], X: Any, y: Any) -> str:
    """A short hash of the estimator's parameters (callbacks excluded) and the data."""
    import joblib

    clean = {k: v for k, v in params.items() if k != "callbacks" and not k.startswith("callbacks__")}
    h = hashlib.sha256()
    h.update(joblib.hash(sorted((k, repr(v)) for k, v in clean.items())).encode())
    h.update(joblib.hash(X).encode())
    h.update(joblib.hash(np.asarray(y)).encode())
    return h.hexdigest()[:16]


class Checkpoint(Callback):
    """Save the fit's full state every ``every`` epochs (see the module docstring).

    Parameters
    ----------
    dirname : str
        Folder holding one sub-folder per fit.
    every : int, default=1
        Save after every ``every``-th epoch (and never on other epochs).
    """

    def __init__(self, dirname: str = "skpipe-checkpoints", every: int = 1) -> None:
        self.dirname = dirname
        self.every = every

    def initialize(self) -> Checkpoint:
        if not isinstance(self.every, int) or self.every < 1:
            raise ValueError(f"Checkpoint's every must be a positive int; got {self.every!r}.")
        self.path_: str | None = None
        return self

    def path_for(self, fingerprint: str) -> str:
        return os.path.join(self.dirname, fingerprint, _FILE)

    def on_epoch_end(self, net: Any, **kwargs: Any) -> None:
        epoch = len(net.history)
        if epoch % self.every != 0:
            return
        state = net.runner_.get_state()
        payload = {
            "format": 1,
            "epoch": epoch,
            "layout": net.layout_,
            "module": state["module"],
            "optimizers": state["optimizers"],
            "history": _plain(net.history.to_list()),
        }
        path = self.path_for(net.fingerprint_)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=os.path.dirname(path), suffix=".tmp")
        os.close(fd)
        try:
            torch.save(payload, tmp)
            os.replace(tmp, path)  # atomic: a reader sees the old or the new file, whole
        except BaseException:
            if os.path.exists(tmp):
                os.remove(tmp)
            raise
        self.path_ = path


class LoadInitState(Callback):
    """Resume a fit from the last state its ``checkpoint`` saved, if there is one."""

    def __init__(self, checkpoint: Checkpoint) -> None:
        self.checkpoint = checkpoint

    def load(self, fingerprint: str, layout: dict[str, Any]) -> dict[str, Any] | None:
        path = self.checkpoint.path_for(fingerprint)
        if not os.path.exists(path):
            return None
        payload = torch.load(path, weights_only=True)
        if payload.get("layout") != layout:
            raise ValueError(
                f"checkpoint {path} was saved with pipeline layout {payload.get('layout')} but this "
                f"fit uses {layout}; resume with the same n_stages, schedule and balance."
            )
        return payload


def _plain(obj: Any) -> Any:
    """History as lists, dicts, str, int and float only (what weights_only loading accepts)."""
    if isinstance(obj, dict):
        return {str(k): _plain(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_plain(v) for v in obj]
    if isinstance(obj, (np.floating, np.integer, np.bool_)):
        return obj.item()
    if isinstance(obj, (str, int, float, bool)) or obj is None:
        return obj
    return repr(obj)
