"""What a fit is given, validated (``FitInputs``, weighted rows), and arrays to tensors one batch
at a time (sparse matrices are densified per batch)."""

from __future__ import annotations

import math
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
import scipy.sparse as sp
import torch
from sklearn.utils.validation import _check_sample_weight
from torch import nn
from torch.utils.data import Subset

from ..engine.plan._config import PipelineConfig, TrainSpec


@dataclass(frozen=True)
class FitInputs:
    """Everything a fit needs, validated: made before any device is held or worker started."""

    X: Any  # float32 array or CSR matrix
    y: np.ndarray  # encoded targets
    n_outputs: int
    seed: int
    config: PipelineConfig
    criterion: nn.Module
    spec: TrainSpec
    sample: torch.Tensor  # the first rows of X, to measure the chunks on
    checkpoint_digest: str | None  # the parameters' hash, when the fit uses checkpoints
    sample_weight: np.ndarray | None  # per row of X, mean 1; None when every row weighs the same


def weighted_rows(X: Any, y: Any, sample_weight: Any) -> tuple[Any, Any, np.ndarray | None]:
    """``X``, ``y`` and the weights checked (negative, non-finite and all-zero weights and a
    wrong length refused by name), without the rows of weight 0: a row that is not there."""
    if sample_weight is None:
        return X, y, None
    weights = _check_sample_weight(sample_weight, X, dtype=np.float64, ensure_non_negative=True)
    keep = weights > 0
    if keep.all():
        return X, y, weights
    return X[keep], y[keep], weights[keep]


def rows_to_tensor(X: np.ndarray | sp.spmatrix, rows: np.ndarray | slice) -> torch.Tensor:
    """Rows of a validated float32 array or CSR matrix as a dense float32 tensor."""
    part: Any = X[rows]
    if sp.issparse(part):
        part = part.toarray()
    dense = np.ascontiguousarray(part, dtype=np.float32)
    if not dense.flags.writeable:  # a view of a read-only memmap (joblib): copy these rows
        dense = dense.copy()
    return torch.from_numpy(dense)


def _arrays(dataset: Any) -> tuple[Any, np.ndarray | None, np.ndarray | None]:
    """(X, y, row indices or None) behind a skorch Dataset or a Subset of one."""
    indices = None
    if isinstance(dataset, Subset):
        indices = np.asarray(dataset.indices)
        dataset = dataset.dataset
    X = dataset.X
    y = getattr(dataset, "y", None)
    return X, y, indices


class BatchIterator:
    """Slices shuffled rows into batches; what skorch's DataLoader does per sample, per batch.

    ``seed`` fixes the order of every epoch; the generator carries over between epochs, so the
    epochs differ from one another but repeat exactly from fit to fit. With ``weights`` (one per
    row of the whole data) each batch also carries its rows' sample weights.
    """

    def __init__(
        self,
        dataset: object,
        batch_size: int,
        shuffle: bool = False,
        seed: int | None = None,
        drop_last: bool = False,
        weights: np.ndarray | None = None,
    ) -> None:
        self.X, self.y, self.indices = _arrays(dataset)
        self.weights = weights
        # dense arrays become tensors once (sharing memory): a batch is then one index_select
        self._tensors = None
        if isinstance(self.X, np.ndarray) and isinstance(self.y, np.ndarray):
            with warnings.catch_warnings():
                # joblib hands large arrays to its workers as read-only memmaps; batches are
                # copied out of them (index_select), never written
                warnings.simplefilter("ignore", UserWarning)
                self._tensors = tuple(
                    None if a is None else torch.from_numpy(np.ascontiguousarray(a))
                    for a in (self.X, self.y, weights)
                )
        self.n = len(self.indices) if self.indices is not None else self.X.shape[0]
        self.batch_size = batch_size
        self.shuffle = shuffle
        self.drop_last = drop_last
        self.rng = np.random.RandomState(seed)

    def skip_epochs(self, n: int) -> None:
        """Advance the shuffling generator past ``n`` epochs (to resume a fit exactly)."""
        if self.shuffle:
            for _ in range(n):
                self.rng.permutation(self.n)

    def __len__(self) -> int:
        if self.drop_last:
            return self.n // self.batch_size
        return math.ceil(self.n / self.batch_size)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, ...]]:
        order: np.ndarray | None = None
        if self.shuffle:
            order = self.rng.permutation(self.n)
            if self.indices is not None:
                order = self.indices[order]
        elif self.indices is not None:
            order = self.indices
        stop = len(self) * self.batch_size
        if self._tensors is not None:
            yield from self._tensor_batches(self._tensors, order, min(stop, self.n))
            return
        for start in range(0, min(stop, self.n), self.batch_size):
            end = min(start + self.batch_size, self.n)
            rows = slice(start, end) if order is None else order[start:end]
            xb = rows_to_tensor(self.X, rows)
            yb = None if self.y is None else torch.from_numpy(np.ascontiguousarray(self.y[rows]))
            if self.weights is None:
                yield xb, yb  # type: ignore[misc]
            else:
                yield xb, yb, torch.from_numpy(np.ascontiguousarray(self.weights[rows]))  # type: ignore[misc]

    def _tensor_batches(
        self, tensors: tuple[Any, ...], order: np.ndarray | None, stop: int
    ) -> Iterator[tuple[torch.Tensor, ...]]:
        """The batches of dense data, cut from the tensors made once (same rows, same order)."""
        X, y, w = tensors
        index = None if order is None else torch.from_numpy(np.ascontiguousarray(order))
        for start in range(0, stop, self.batch_size):
            end = min(start + self.batch_size, self.n)
            if index is None:
                parts = [t[start:end].clone() for t in (X, y, w) if t is not None]
            else:
                rows = index[start:end]
                parts = [t.index_select(0, rows) for t in (X, y, w) if t is not None]
            yield tuple(parts)
