"""The prediction path both estimators share: the network's outputs in batches on the CPU, or
through the pipeline's stages (``forward_pipelined``)."""

from __future__ import annotations

import copy
import dataclasses
from numbers import Integral
from typing import Any

import numpy as np
import scipy.sparse as sp
import torch
from sklearn.utils.validation import check_is_fitted, validate_data
from torch import nn

from ..engine.parallel._devices import resolve_devices
from ..engine.plan._config import PipelineConfig, TrainSpec
from ..engine.plan._plan import make_plan
from ..engine.plan._report import PlanReport
from ..engine.runners._runners import held_devices, make_runner
from ._data import rows_to_tensor

# Rows per forward call when predicting: fixed, so that predictions do not depend on batching.
PREDICT_ROWS = 128


class PredictMixin:
    """Outputs of the fitted network (``module_``) for validated X."""

    module_: nn.Module
    criterion_: nn.Module
    config_: PipelineConfig
    plan_: PlanReport
    batch_size: int | str
    devices: Any
    _X_CHECKS: dict[str, Any]

    def _forward(self, X: Any) -> np.ndarray:
        """Network outputs for validated X, where they are fastest (``predicts_on_stages``):
        through the stages on their GPUs, or with ``module_`` on the CPU."""
        if self.predicts_on_stages():
            return self.forward_pipelined(X)
        return self._forward_here(X)

    def predicts_on_stages(self) -> bool:
        """Whether ``predict``, ``predict_proba`` and ``score`` run through the pipeline's
        stages (``forward_pipelined``) rather than ``module_`` in this process.

        Through the stages when the network was trained split over GPUs and those GPUs are
        here: the whole network may not fit one of them, and a large network on the CPU is
        slow. Otherwise (trained on CPUs, or unpickled on a machine without the GPUs) with
        ``module_`` on the CPU: sending the weights back to CPU workers would cost a copy of
        them and a socket hop per stage for every row, for no faster arithmetic.
        """
        fitted = self.config_
        if fitted.n_stages == 1:
            return False
        gpus = [d for d in fitted.devices if d.startswith("cuda")]
        if not gpus or not torch.cuda.is_available():
            return False
        count = torch.cuda.device_count()
        return all(int(d.partition(":")[2] or 0) < count for d in gpus)

    def _forward_here(self, X: Any) -> np.ndarray:
        """Network outputs for validated X, on the CPU, in blocks of ``PREDICT_ROWS`` rows.

        Every block has the same number of rows (the last one padded with zeros): the matrix
        kernels then add each row's terms in the same order wherever the row sits, so a row's
        prediction does not depend on which rows share its call (a lone row would otherwise take
        another kernel and differ in the last bits).
        """
        module = self.module_
        module.eval()
        n = X.shape[0]
        outs = []
        with torch.inference_mode():
            for start in range(0, n, PREDICT_ROWS):
                xb = rows_to_tensor(X, slice(start, min(start + PREDICT_ROWS, n)))
                rows = xb.shape[0]
                if rows < PREDICT_ROWS:
                    xb = torch.cat([xb, xb.new_zeros((PREDICT_ROWS - rows,) + xb.shape[1:])])
                outs.append(module(xb)[:rows].float().numpy())
        return np.concatenate(outs, axis=0)  # validation refused an empty X

    def forward_pipelined(self, X: Any, *, batch_size: int = 4096) -> np.ndarray:
        """Raw network outputs for X computed by the pipeline's stages (forward only).

        For inputs too large for one device: the fitted network is split as in ``fit`` and
        each batch flows through the stages' workers (warm ones when a fit left them up), on
        devices held for this call as a fit holds them. The numbers are those of ``module_``
        (logits for the classifier).

        Parameters
        ----------
        X : array-like or sparse matrix of shape (n_samples, n_features)
            Rows to run through the network.
        batch_size : int, default=4096
            Rows sent through the pipeline at a time.

        Returns
        -------
        outputs : ndarray of shape (n_samples, n_outputs)
            The network's raw outputs.
        """
        X = self._validate_X_predict(X)
        if isinstance(batch_size, bool) or not isinstance(batch_size, Integral) or batch_size < 1:
            raise ValueError(
                f"forward_pipelined's batch_size must be a positive int; got {batch_size!r}."
            )
        fitted = self.config_
        if fitted.n_stages == 1:
            return self._forward_here(X)
        n = X.shape[0]
        # the fit's configuration and split (nothing is profiled again), on devices named as
        # the user named them (to hold them again)
        config = dataclasses.replace(
            fitted,
            devices=resolve_devices(
                self.devices, fitted.n_stages, fitted.launcher, fitted.n_replicas,
                fitted.tensor_parallel,
            ),
            balance=tuple(chunk.n_layers for chunk in self.plan_.chunks),
        )
        spec = TrainSpec(
            optimizer=torch.optim.SGD, optimizer_kwargs={"lr": 0.0}, criterion=self.criterion_
        )
        # spawned workers are sent copies of the layers; stages in this process (local, a
        # torchrun rank) would move module_'s own layers to their devices: they get a copy
        module = self.module_ if fitted.launcher == "spawn" else copy.deepcopy(self.module_)
        with held_devices(config, self.devices) as held:
            plan = make_plan(
                module, held, rows_to_tensor(X, slice(0, min(held.microbatch_rows, n)))
            )
            with make_runner(plan, module, spec) as runner:
                outs = [
                    runner.predict(rows_to_tensor(X, slice(s, min(s + int(batch_size), n)))).numpy()
                    for s in range(0, n, int(batch_size))
                ]
        return np.concatenate(outs, axis=0)

    def _validate_X_predict(self, X: Any) -> Any:
        check_is_fitted(self, "module_")
        return self._to_csr(validate_data(self, X, reset=False, **self._X_CHECKS))

    def _to_csr(self, X: Any) -> Any:
        return X.tocsr() if sp.issparse(X) else X
