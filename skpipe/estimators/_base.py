"""The scikit-learn face shared by both estimators: parameters, validation, fit -> engine, predict."""

from __future__ import annotations

import copy
import dataclasses
import difflib
import inspect
import signal
import threading
from collections.abc import Callable
from numbers import Integral, Real
from typing import Any

import numpy as np
import scipy.sparse as sp
import torch
from skorch.history import History
from sklearn.base import BaseEstimator, clone, is_classifier
from sklearn.callback import CallbackSupportMixin, with_callbacks
from sklearn.utils._param_validation import Interval, StrOptions
from sklearn.utils.validation import check_is_fitted, check_random_state, validate_data
from torch import nn

from ..engine import _schedules
from ..engine._budget import fit_budget
from ..engine._config import CHECKPOINTS, LAUNCHERS, PRECISIONS, TrainSpec, make_config
from ..engine._devices import auto_gpu_pool, execution_devices, resolve_devices
from ..engine._leases import lease_devices
from ..engine._microbatch import reduction_of
from ..engine._plan import Plan, make_plan
from ..engine._report import PlanReport, build_report
from ..engine._timeline import Timeline
from ..engine._runner import make_runner, resolve_launcher
from ..callbacks import Checkpoint, LoadInitState, fit_fingerprint
from ..modules import MLP
from ._data import rows_to_tensor
from ._loop import ClassifierTrainingLoop, TrainingLoop

PREFIXES = ("module", "optimizer", "criterion", "iterator_train", "iterator_valid", "callbacks")

# Sizes the estimator passes to a module class whose constructor declares them.
SIZE_ARGS = ("n_features_in", "n_outputs")


class _UserInterrupt(KeyboardInterrupt):
    """Ctrl-C from the user, told apart from skorch's EarlyStopping (which raises
    KeyboardInterrupt to end training early)."""


class _InterruptGuard:
    """While active in the main thread, SIGINT raises _UserInterrupt instead of KeyboardInterrupt."""

    def __enter__(self) -> _InterruptGuard:
        self._previous = None
        if threading.current_thread() is threading.main_thread():
            previous = signal.getsignal(signal.SIGINT)
            if previous is signal.default_int_handler:

                def handler(signum: int, frame: object) -> None:
                    raise _UserInterrupt()

                self._previous = signal.signal(signal.SIGINT, handler)
        return self

    def __exit__(self, *exc: object) -> None:
        if self._previous is not None:
            signal.signal(signal.SIGINT, self._previous)


class BasePipeNet(CallbackSupportMixin, BaseEstimator):
    """Base of PipeNetClassifier and PipeNetRegressor; not meant to be used directly."""

    _parameter_constraints: dict[str, list[Any]] = {
        "module": "no_validation",  # checked in _make_module with a clearer message
        "criterion": "no_validation",
        "optimizer": [callable],
        "lr": [Interval(Real, 0, None, closed="neither")],
        "max_epochs": [Interval(Integral, 1, None, closed="left")],
        "batch_size": [Interval(Integral, 1, None, closed="left"), StrOptions({"all"})],
        "callbacks": [list, None],
        "train_split": [callable, None],
        "warm_start": ["boolean"],
        "random_state": ["random_state"],
        "verbose": ["verbose"],
        "devices": [StrOptions({"auto"}), list, tuple, str],
        "n_stages": [Interval(Integral, 1, None, closed="left")],
        "n_microbatches": [Interval(Integral, 1, None, closed="left"), StrOptions({"auto"})],
        "schedule": [StrOptions(set(_schedules.SCHEDULE_NAMES))],
        "chunks_per_stage": [Interval(Integral, 1, None, closed="left"), StrOptions({"auto"})],
        "balance": [StrOptions({"uniform", "parameters", "time"}), list, tuple],
        "checkpoint": [StrOptions(set(CHECKPOINTS))],
        "launcher": [StrOptions(set(LAUNCHERS))],
        "precision": [StrOptions(set(PRECISIONS))],
        "max_grad_norm": [Interval(Real, 0, None, closed="neither"), None],
        "timeout": [Interval(Real, 0, None, closed="neither")],
        "timeline_steps": [Interval(Integral, 0, None, closed="left")],
        "stage_memory_budget": [Interval(Real, 0, None, closed="neither"), None],
    }

    def __init__(
        self,
        module: type[nn.Module] | nn.Module = MLP,
        *,
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
        n_microbatches: int | str = "auto",
        schedule: str = "1f1b",
        chunks_per_stage: int | str = "auto",
        balance: str | list[int] | tuple[int, ...] = "uniform",
        checkpoint: str = "never",
        launcher: str = "auto",
        precision: str = "float32",
        max_grad_norm: float | None = None,
        timeout: float = 300.0,
        timeline_steps: int = 0,
        stage_memory_budget: float | None = None,
        **kwargs: Any,
    ) -> None:
        self.module = module
        self.criterion = criterion
        self.optimizer = optimizer
        self.lr = lr
        self.max_epochs = max_epochs
        self.batch_size = batch_size
        self.callbacks = callbacks
        self.train_split = train_split
        self.warm_start = warm_start
        self.random_state = random_state
        self.verbose = verbose
        self.devices = devices
        self.n_stages = n_stages
        self.n_microbatches = n_microbatches
        self.schedule = schedule
        self.chunks_per_stage = chunks_per_stage
        self.balance = balance
        self.checkpoint = checkpoint
        self.launcher = launcher
        self.precision = precision
        self.max_grad_norm = max_grad_norm
        self.timeout = timeout
        self.timeline_steps = timeline_steps
        self.stage_memory_budget = stage_memory_budget
        # Prefixed parameters (module__*, ...) are stored as given, like every parameter; a name
        # that is not one is reported by fit, with the closest valid name.
        for key, value in kwargs.items():
            setattr(self, key, value)

    # -- parameters --------------------------------------------------------------------------
    @classmethod
    def _check_prefixed_name(cls, key: str) -> None:
        prefix, sep, rest = key.partition("__")
        if sep and prefix in PREFIXES and rest:
            return
        names = cls._get_param_names() + [p + "__" for p in PREFIXES]
        close = difflib.get_close_matches(key, names, n=1)
        if not close:
            for p in PREFIXES:  # module_hidden -> module__hidden
                if key.startswith(p + "_") and not key.startswith(p + "__"):
                    close = [p + "__" + key[len(p) :].lstrip("_")]
        hint = f" Did you mean {close[0]!r}?" if close else ""
        raise TypeError(
            f"{cls.__name__} got an unexpected parameter {key!r}.{hint} Prefixed parameters "
            f"are routed by prefix: {', '.join(p + '__*' for p in PREFIXES)}."
        )

    def _prefixed_params(self) -> dict[str, Any]:
        """Parameters given beyond the signature: the prefixed ones, and any unknown name
        (kept so that clone carries it to fit, which reports it)."""
        names = set(self._get_param_names())
        return {
            k: v
            for k, v in vars(self).items()
            if k not in names and not k.startswith("_") and not k.endswith("_")
        }

    def _params_for(self, prefix: str) -> dict[str, Any]:
        head = prefix + "__"
        return {k[len(head) :]: v for k, v in self._prefixed_params().items() if k.startswith(head)}

    def get_params(self, deep: bool = True) -> dict[str, Any]:
        params = super().get_params(deep=False)
        params.update(self._prefixed_params())
        return params

    def set_params(self, **params: Any) -> BasePipeNet:
        """Set parameters, including prefixed ones (``module__hidden_layer_sizes``); like the
        constructor, it stores what it is given and ``fit`` validates it."""
        for key, value in params.items():
            setattr(self, key, value)
        return self

    # -- what subclasses define ----------------------------------------------------------------
    def _validate_targets(self, y: np.ndarray, reset: bool) -> tuple[np.ndarray, int]:
        """Encoded targets for training and the number of network outputs."""
        raise NotImplementedError

    def _default_criterion(self) -> nn.Module:
        raise NotImplementedError

    # -- building the parts ------------------------------------------------------------------
    def _make_module(self, n_features: int, n_outputs: int) -> nn.Module:
        module = self.module
        kwargs = self._params_for("module")
        if isinstance(module, nn.Module):
            if kwargs:
                raise ValueError(
                    f"module__ parameters {sorted(kwargs)} were given, but module is an "
                    f"instance ({type(module).__name__}); pass the class to have skpipe build "
                    "it with those parameters."
                )
            return copy.deepcopy(module)
        if not (isinstance(module, type) and issubclass(module, nn.Module)):
            raise TypeError(
                f"The 'module' parameter of {type(self).__name__} must be a torch.nn.Module "
                f"subclass or instance. Got {module!r} instead."
            )
        signature = inspect.signature(module.__init__)
        accepted = set(signature.parameters) - {"self"}
        takes_any = any(p.kind is p.VAR_KEYWORD for p in signature.parameters.values())
        for key in kwargs:
            if key not in accepted and not takes_any:
                close = difflib.get_close_matches(key, sorted(accepted - set(SIZE_ARGS)), n=1)
                hint = f" Did you mean 'module__{close[0]}'?" if close else ""
                raise ValueError(
                    f"module__{key} is not a parameter of {module.__name__} (its parameters: "
                    f"{sorted(accepted)}).{hint}"
                )
        sizes = {"n_features_in": n_features, "n_outputs": n_outputs}
        for name, value in sizes.items():
            if name in accepted and name not in kwargs:
                kwargs[name] = value
        return module(**kwargs)

    def _make_criterion(self) -> nn.Module:
        criterion = self.criterion
        kwargs = self._params_for("criterion")
        if criterion is None:
            if kwargs:
                return type(self._default_criterion())(**kwargs)
            return self._default_criterion()
        if isinstance(criterion, nn.Module):
            return copy.deepcopy(criterion)
        if isinstance(criterion, type) and issubclass(criterion, nn.Module):
            return criterion(**kwargs)
        raise TypeError(
            f"The 'criterion' parameter of {type(self).__name__} must be None, a torch.nn.Module "
            f"subclass or instance. Got {criterion!r} instead."
        )

    def _validate_prefixed(self) -> None:
        for key in self._prefixed_params():
            self._check_prefixed_name(key)

    # -- fit -----------------------------------------------------------------------------------
    # How X is checked everywhere, and what y must be (set by the subclasses).
    _X_CHECKS: dict[str, Any] = dict(
        accept_sparse=["csr", "csc", "coo"], dtype=np.float32, ensure_all_finite=True
    )
    _Y_CHECKS: dict[str, Any] = {}

    def _validate_X_y(self, X: Any, y: Any, reset: bool) -> tuple[Any, np.ndarray]:
        X, y = validate_data(self, X, y, reset=reset, **self._X_CHECKS, **self._Y_CHECKS)
        return self._to_csr(X), y

    @with_callbacks
    def fit(self, X: Any, y: Any) -> BasePipeNet:
        """Train the network on ``X`` and ``y``.

        Parameters
        ----------
        X : array-like or sparse matrix of shape (n_samples, n_features)
            Any numeric dtype; cast to float32 inside. Sparse rows are densified per batch.
        y : array-like of shape (n_samples,) or (n_samples, n_targets)
            Class labels of any type (classifier) or numeric targets (regressor).

        Returns
        -------
        self : object
            The fitted estimator.
        """
        before = dict(self.__dict__)
        try:
            return self._fit(X, y)
        except BaseException:
            # a failed or interrupted fit leaves the estimator exactly as it was
            self.__dict__.clear()
            self.__dict__.update(before)
            raise

    def _prepare(self, X: Any, y: Any, warm: bool) -> dict[str, Any]:
        """Validate parameters and data; resolve the configuration. Raises before any worker."""
        self._validate_params()
        self._validate_prefixed()
        X, y = self._validate_X_y(X, y, reset=not warm)
        y_enc, n_outputs = self._validate_targets(y, reset=not warm)

        rng = check_random_state(self.random_state)
        seed = int(rng.randint(np.iinfo(np.int32).max))
        n_samples = X.shape[0]
        batch = n_samples if self.batch_size == "all" else min(int(self.batch_size), n_samples)
        launcher = resolve_launcher(self.launcher, self.n_stages)
        if launcher == "torchrun":
            from ..engine._torchrun import agree_seed

            seed = agree_seed(seed)
        devices = resolve_devices(self.devices, self.n_stages, launcher)
        config = make_config(
            n_stages=self.n_stages,
            n_microbatches=self.n_microbatches,
            schedule=self.schedule,
            chunks_per_stage=self.chunks_per_stage,
            balance=self.balance if isinstance(self.balance, str) else tuple(self.balance),
            checkpoint=self.checkpoint,
            launcher=launcher,
            devices=devices,
            batch_size=batch,
            precision=self.precision,
            max_grad_norm=self.max_grad_norm,
            timeout=float(self.timeout),
        )
        criterion = self._make_criterion()
        reduction_of(criterion)  # refused here, before any worker starts
        optimizer_kwargs = {"lr": self.lr, **self._params_for("optimizer")}
        spec = TrainSpec(
            optimizer=self.optimizer, optimizer_kwargs=optimizer_kwargs, criterion=copy.deepcopy(criterion)
        )
        sample = rows_to_tensor(X, slice(0, min(config.microbatch_rows, n_samples)))
        if self.stage_memory_budget is not None and self.n_microbatches == "auto" and self.n_stages > 1:
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(seed)
                probe = copy.deepcopy(self.module_) if warm else self._make_module(X.shape[1], n_outputs)
            config = fit_budget(probe, config, sample, float(self.stage_memory_budget), batch)
            sample = rows_to_tensor(X, slice(0, min(config.microbatch_rows, n_samples)))
        return dict(X=X, y_enc=y_enc, n_outputs=n_outputs, seed=seed, batch=batch, launcher=launcher,
                    devices=devices, config=config, criterion=criterion, spec=spec, sample=sample)

    def plan(self, X: Any, y: Any) -> PlanReport:
        """The plan a fit on ``X, y`` would use, without training (the estimator is unchanged).

        Per stage and chunk: the layers, parameter count and memory, the activation memory
        held per micro-batch (measured on one micro-batch of X), the measured forward+backward
        time when ``balance='time'``; the schedule's expected bubble and predicted step time.
        ``print`` it for a table; ``.to_frame()`` / ``.to_dict()`` for code.

        Parameters
        ----------
        X : array-like or sparse matrix of shape (n_samples, n_features)
        y : array-like of shape (n_samples,) or (n_samples, n_targets)

        Returns
        -------
        plan : PlanReport
        """
        est = clone(self)
        p = est._prepare(X, y, warm=False)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(p["seed"])
            module = est._make_module(p["X"].shape[1], p["n_outputs"])
        return self._report(p["config"], p["sample"], module)

    @staticmethod
    def _report(config: Any, sample: torch.Tensor, module: nn.Module, plan: Plan | None = None,
                layers: list[nn.Module] | None = None) -> PlanReport:
        """The plan report, measured on CPU copies so that no training state is touched.

        ``plan`` and ``layers``: the split the stages were built from (a fit); without them the
        split is made here (``plan()`` before any fit).
        """
        if config.n_stages == 1:
            whole = copy.deepcopy(module).cpu()
            params = sum(q.numel() for q in whole.parameters())
            one = Plan(1, [(0, 1)], [], [0], [params], None, [type(whole).__name__])
            return build_report(one, [whole], config, sample)
        if plan is None:
            plan, layers = make_plan(copy.deepcopy(module).cpu(), config, sample)
        assert layers is not None
        return build_report(plan, [copy.deepcopy(layer).cpu() for layer in layers], config, sample)

    def _fit(self, X: Any, y: Any) -> BasePipeNet:
        warm = self.warm_start and hasattr(self, "module_")
        p = self._prepare(X, y, warm)
        X, y_enc, n_outputs, seed, batch = p["X"], p["y_enc"], p["n_outputs"], p["seed"], p["batch"]
        launcher, devices, config = p["launcher"], p["devices"], p["config"]
        criterion, spec, sample = p["criterion"], p["spec"], p["sample"]
        callback_ctx = self._init_callback_context(max_subtasks=self.max_epochs)
        callback_ctx.call_on_fit_task_begin(estimator=self, X=X, y=y)

        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            if warm:
                module = copy.deepcopy(self.module_)
            else:
                module = self._make_module(X.shape[1], n_outputs)
            # concurrent fits (GridSearchCV(n_jobs>1)) never share a device
            lease = (
                lease_devices(devices, config.timeout, choose_from=auto_gpu_pool(self.devices, devices))
                if launcher != "torchrun"
                else None
            )
            try:
                if lease is not None:
                    config = dataclasses.replace(config, devices=execution_devices(lease.devices))
                runner = make_runner(module, config, spec, sample, seed)
                try:
                    # the report describes the very split the stages were built from
                    report = self._report(config, sample, module, runner.plan, runner.layers)
                    history = self._run_loop(runner, criterion, X, y_enc, seed, batch, warm, callback_ctx)
                    timeline = None
                    if self.timeline_steps:
                        timeline = Timeline(runner.spans(), config.n_stages, config.n_microbatches,
                                            config.chunks_per_stage, config.schedule)
                    runner.finish()
                finally:
                    runner.close()
            finally:
                if lease is not None:
                    lease.release()

        module.eval()
        self.module_ = module
        self.criterion_ = criterion
        self.history_ = history
        self.n_iter_ = len(history)
        self.config_ = config
        self.plan_ = report
        self.timeline_ = timeline
        callback_ctx.call_on_fit_task_end(estimator=self, X=X, y=y)
        return self

    def _run_loop(
        self,
        runner: Any,
        criterion: nn.Module,
        X: Any,
        y: np.ndarray,
        seed: int,
        batch: int,
        warm: bool,
        callback_ctx: Any = None,
    ) -> Any:
        loop = ClassifierTrainingLoop if is_classifier(self) else TrainingLoop
        net = loop(
            module=runner.module,
            criterion=criterion,
            optimizer=self.optimizer,
            lr=self.lr,
            max_epochs=self.max_epochs,
            batch_size=batch,
            callbacks=self.callbacks,
            train_split=self.train_split,
            verbose=self.verbose,
            device=None,
            iterator_train__shuffle=True,
            iterator_train__seed=seed,
            **{k: v for k, v in self._prefixed_params().items() if k.startswith(("callbacks__", "iterator_"))},
        )
        net.runner_ = runner
        net.timeline_steps_ = self.timeline_steps
        net.sklearn_ctx_ = callback_ctx
        net.estimator_ = self
        net.initialize()
        if warm and getattr(self, "history_", None) is not None:
            net.history_ = copy.deepcopy(self.history_)
        epochs = self.max_epochs
        resume = [cb for _, cb in net.callbacks_ if isinstance(cb, (Checkpoint, LoadInitState))]
        if resume:
            net.fingerprint_ = fit_fingerprint(self.get_params(), X, y)
            plan = runner.plan
            net.layout_ = {
                "n_stages": runner.config.n_stages,
                "placement": runner.config.placement,
                "bounds": [list(b) for b in plan.bounds] if plan is not None else [],
            }
            for cb in resume:
                payload = cb.load(net.fingerprint_, net.layout_) if isinstance(cb, LoadInitState) else None
                if payload is not None:
                    runner.set_state({"module": payload["module"], "optimizers": payload["optimizers"]})
                    net.history_ = History(payload["history"])
                    net.skip_epochs_ = payload["epoch"]
                    epochs = max(0, self.max_epochs - payload["epoch"])
        with _InterruptGuard():
            net.notify("on_train_begin", X=X, y=y)
            try:
                net.fit_loop(X, y, epochs=epochs)
            except _UserInterrupt:
                raise KeyboardInterrupt("fit interrupted by the user; the estimator is unchanged")
            except KeyboardInterrupt:
                pass  # skorch's EarlyStopping ends training this way
            net.notify("on_train_end", X=X, y=y)
        return net.history

    # -- inference -----------------------------------------------------------------------------
    def _forward(self, X: Any) -> np.ndarray:
        """Network outputs for validated X, in batches, on the CPU."""
        module = self.module_
        module.eval()
        n = X.shape[0]
        step = max(1024, int(self.batch_size) if self.batch_size != "all" else n)
        outs = []
        with torch.inference_mode():
            for start in range(0, n, step):
                xb = rows_to_tensor(X, slice(start, min(start + step, n)))
                outs.append(module(xb).float().numpy())
        if not outs:
            return np.empty((0, 0), dtype=np.float32)
        return np.concatenate(outs, axis=0)

    def forward_pipelined(self, X: Any, *, batch_size: int = 4096) -> np.ndarray:
        """Raw network outputs for X computed by the pipeline's stages (forward only).

        For inputs too large for one device: the fitted network is split as in ``fit`` and
        each batch flows through the stages' workers (warm ones when a fit left them up). The
        numbers are those of ``module_`` (logits for the classifier).

        Parameters
        ----------
        X : array-like or sparse matrix of shape (n_samples, n_features)
        batch_size : int, default=4096
            Rows sent through the pipeline at a time.

        Returns
        -------
        outputs : ndarray of shape (n_samples, n_outputs)
        """
        X = self._validate_X_predict(X)
        config = self.config_
        if config.n_stages == 1:
            return self._forward(X)
        spec = TrainSpec(optimizer=torch.optim.SGD, optimizer_kwargs={"lr": 0.0}, criterion=self.criterion_)
        module = copy.deepcopy(self.module_)
        runner = make_runner(module, config, spec, rows_to_tensor(X, slice(0, min(8, X.shape[0]))))
        try:
            outs = [
                runner.predict(rows_to_tensor(X, slice(s, min(s + batch_size, X.shape[0])))).numpy()
                for s in range(0, X.shape[0], batch_size)
            ]
            if hasattr(runner, "_finished"):
                runner._finished = True  # nothing was trained: the workers stay warm
        finally:
            runner.close()
        return np.concatenate(outs, axis=0)

    def _validate_X_predict(self, X: Any) -> Any:
        check_is_fitted(self, "module_")
        return self._to_csr(validate_data(self, X, reset=False, **self._X_CHECKS))

    def __sklearn_tags__(self):  # noqa: ANN204
        tags = super().__sklearn_tags__()
        tags.input_tags.sparse = True
        tags.non_deterministic = False
        return tags

    def _to_csr(self, X: Any) -> Any:
        return X.tocsr() if sp.issparse(X) else X
