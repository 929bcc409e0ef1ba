"""Checkpoints that work with any number of stages, and resume a fit exactly.

``Checkpoint`` saves, every ``every`` epochs, the network and every stage's optimizer state —
each stage writes its own part where it lives (a spawned worker, a torchrun rank), nothing is
gathered to save — and the history and the position of the shuffling generator.
``read_checkpoint`` turns the parts into one state dict.
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
from numbers import Integral
from typing import Any

import joblib
import numpy as np
import torch
from skorch.callbacks import Callback
from skorch.history import History

from .engine.state._named import hyperparameters, read_state_files

_FILE = "checkpoint.pt"
_FORMAT = 4  # 2: one file holding everything; 3: this file names the stages' parts; 4: and
# holds the LR schedules


def params_hash(params: dict[str, Any]) -> str:
    """The parameters' part of a fit's fingerprint (callbacks excluded).

    Values are hashed by content (joblib's hash of their pickle), never by ``repr``: a
    ``RandomState``'s repr holds a memory address, its pickle its state.
    """
    clean = {
        k: v for k, v in params.items() if k != "callbacks" and not k.startswith("callbacks__")
    }
    parts = []
    for key in sorted(clean):
        try:
            parts.append((key, joblib.hash(clean[key])))
        except Exception:  # noqa: BLE001 - what pickle cannot hash (a lambda...) goes by its repr
            parts.append((key, repr(clean[key])))
    return str(joblib.hash(parts))


class CheckpointKey:
    """Where a fit's checkpoint lives and what it must match: the fingerprint (``params_digest``,
    taken before the fit draws from a RandomState it was given, and the data, hashed when first
    needed) and the pipeline layout."""

    def __init__(self, params_digest: str, X: Any, y: Any, layout: dict[str, Any]) -> None:
        self._params = params_digest
        self._X, self._y = X, y
        self._fingerprint: str | None = None
        self.layout = layout

    @property
    def fingerprint(self) -> str:
        if self._fingerprint is None:
            h = hashlib.sha256()
            h.update(self._params.encode())
            h.update(joblib.hash(self._X).encode())
            h.update(joblib.hash(self._y).encode())
            self._fingerprint = h.hexdigest()[:16]
            self._X = self._y = None
        return self._fingerprint


class Checkpoint(Callback):
    """Save the fit's full state every ``every`` epochs (see the module docstring), once every
    other callback ended the epoch (an LR scheduler's step is in the saved state, wherever the
    callbacks list puts it).

    Parameters
    ----------
    dirname : str
        Folder holding one sub-folder per fit.
    every : int, default=1
        Save after every ``every``-th epoch (and never on other epochs).
    """

    needs_weights = False  # each stage saves its own weights, where it lives

    def __init__(self, dirname: str = "skpipe-checkpoints", every: int = 1) -> None:
        self.dirname = dirname
        self.every = every

    def initialize(self) -> Checkpoint:
        if isinstance(self.every, bool) or not isinstance(self.every, Integral) or self.every < 1:
            raise ValueError(f"Checkpoint's every must be a positive int; got {self.every!r}.")
        self.path_: str | None = None
        return self

    def path_for(self, fingerprint: str) -> str:
        return os.path.join(self.dirname, fingerprint, _FILE)

    def on_epoch_end(self, net: Any, **kwargs: Any) -> None:
        epoch = len(net.history)
        if epoch % self.every != 0:
            return
        key = net.checkpoint_key
        if key is None:  # pragma: no cover - the estimator always gives one
            return
        path = self.path_for(key.fingerprint)
        folder = os.path.dirname(path)
        os.makedirs(folder, exist_ok=True)
        # each stage writes its own part where it lives; this file, written last, names them
        parts = net.runner.save_state_files(folder, f"epoch{epoch}")
        payload = {
            "format": _FORMAT,
            "epoch": epoch,
            "layout": key.layout,
            "parts": parts,
            "history": _plain(net.history.to_list()),
            "schedules": _schedules(net),
        }
        fd, tmp = tempfile.mkstemp(dir=folder, suffix=".tmp")
        os.close(fd)
        try:
            torch.save(payload, tmp)
            os.replace(tmp, path)  # atomic: a reader sees the old or the new file, whole
        except BaseException:
            if os.path.exists(tmp):
                os.remove(tmp)
            raise
        self.path_ = path
        for name in os.listdir(folder):  # the parts of earlier epochs
            if name.endswith(".pt") and name != _FILE and name not in parts:
                try:
                    os.remove(os.path.join(folder, name))
                except FileNotFoundError:  # another rank of a torchrun job removed it first
                    pass


class LoadInitState(Callback):
    """Resume a fit from the last state its ``checkpoint`` saved, if there is one.

    At the start of training it puts the saved network, optimizer state (keyed by parameter
    name, so any split of the network takes it) and history back, and the fit runs the epochs
    that are left, with the shuffling continued where the saved fit left it.
    """

    needs_weights = False  # each stage loads its own part

    def __init__(self, checkpoint: Checkpoint) -> None:
        self.checkpoint = checkpoint

    def on_train_begin(self, net: Any, **kwargs: Any) -> None:
        key = net.checkpoint_key
        if key is None:  # pragma: no cover - the estimator always gives one
            return
        payload = self.load(key.fingerprint, key.layout)
        if payload is None:
            return
        folder = os.path.dirname(self.checkpoint.path_for(key.fingerprint))
        net.runner.load_state_files(folder, payload["parts"])
        net.history_ = History(payload["history"])
        net.skip_epochs = payload["epoch"]
        net.resumed_schedules = payload["schedules"]  # put back once every callback began

    def load(self, fingerprint: str, layout: dict[str, Any]) -> dict[str, Any] | None:
        path = self.checkpoint.path_for(fingerprint)
        if not os.path.exists(path):
            return None
        payload = torch.load(path, weights_only=True)
        if payload.get("format") != _FORMAT:
            raise ValueError(
                f"checkpoint {path} was written by an older skpipe (format "
                f"{payload.get('format')}); delete it to start the fit afresh."
            )
        if payload.get("layout") != layout:
            raise ValueError(
                f"checkpoint {path} was saved with pipeline layout {payload.get('layout')} "
                "but this "
                f"fit uses {layout}; resume with the same n_stages and schedule."
            )
        return payload


def read_checkpoint(path: str) -> dict[str, Any]:
    """A checkpoint as one network: ``{'module': the whole network's state dict, 'optimizer':
    the optimizer state keyed by parameter name, 'stashes': what each stage of an asynchronous
    schedule ('2bw', 'pipedream') kept besides (its weight versions and the fit's batch count;
    empty for the other schedules), 'epoch': ..., 'history': ...}``.

    ``path`` is a checkpoint's ``checkpoint.pt`` (``Checkpoint.path_``) or its folder. The
    stages' parts are merged by parameter name (memory-mapped: a tensor is read when used), so
    ``module.load_state_dict(read_checkpoint(path)['module'])`` gives a network of the same
    architecture the checkpointed weights, on any machine, whatever split wrote them.
    """
    if os.path.isdir(path):
        path = os.path.join(path, _FILE)
    payload = torch.load(path, weights_only=True)
    if payload.get("format") != _FORMAT:
        raise ValueError(
            f"checkpoint {path} has format {payload.get('format')}; this skpipe reads format "
            f"{_FORMAT}."
        )
    folder = os.path.dirname(path)
    state = read_state_files([os.path.join(folder, n) for n in payload["parts"]])
    return {**state, "epoch": payload["epoch"], "history": payload["history"]}


def _schedules(net: Any) -> dict[str, Any]:
    """The optimizer's settings and each LR scheduler callback's state (what the next epoch's
    learning rate follows from), as a resumed fit puts them back."""
    schedulers, batch_idx = {}, {}
    for name, cb in net.callbacks_:
        scheduler = getattr(cb, "lr_scheduler_", None)
        if scheduler is not None and hasattr(scheduler, "state_dict"):
            schedulers[name] = scheduler.state_dict()
            batch_idx[name] = int(getattr(cb, "batch_idx_", 0))
    return {
        "hyperparameters": hyperparameters(net.optimizer_),
        "schedulers": schedulers,
        "batch_idx": batch_idx,
    }


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
