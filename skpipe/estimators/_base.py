"""The scikit-learn face shared by both estimators: parameters, validation, fit -> engine, predict.

The path of a fit, like ``MLPClassifier._fit``: validate the parameters and the data into one
frozen ``FitInputs``; build the network; hold the devices; make the plan (once); train with the
runner the plan's launcher names, inside a skorch loop; store what comes back.
"""

from __future__ import annotations

import copy
import dataclasses
from collections.abc import Callable
from dataclasses import dataclass
from numbers import Integral, Real
from typing import Any

import numpy as np
import torch
from sklearn.base import clone, is_classifier
from sklearn.callback import CallbackSupportMixin, with_callbacks
from sklearn.utils._param_validation import Interval, StrOptions
from sklearn.utils.validation import _check_sample_weight, check_random_state, validate_data
from skorch.callbacks import LRScheduler
from torch import nn

from ..callbacks import Checkpoint, CheckpointKey, LoadInitState, params_hash
from ..engine.parallel._devices import resolve_devices
from ..engine.plan import _schedules
from ..engine.plan._budget import fit_budget
from ..engine.plan._config import (
    CHECKPOINTS,
    LAUNCHERS,
    PRECISIONS,
    PipelineConfig,
    TrainSpec,
    make_config,
)
from ..engine.plan._microbatch import reduction_of
from ..engine.plan._plan import Plan, make_plan
from ..engine.plan._report import PlanReport
from ..engine.plan._timeline import Timeline
from ..engine.planner._planner import Choice, annotated
from ..engine.runners._runners import held_devices, make_runner, resolve_launcher, runner_class
from ..engine.split._construct import DeferralError, build_deferred
from ..engine.split._trace import mark_split_points
from ..engine.state._portable import PortableModule
from ..modules import MLP
from ._checks import check_batchnorm_rows, check_network_fits_data
from ._data import rows_to_tensor
from ._layout import choose_layout, provisional_schedule
from ._loop import ClassifierTrainingLoop, TrainingLoop
from ._params import PrefixedParamsMixin, build_criterion, build_module
from ._predict import PredictMixin


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


# the start of the construction note when the network could not be built where it runs
_NOT_DEFERRED = "Note:"


class BasePipeNet(CallbackSupportMixin, PredictMixin, PrefixedParamsMixin):
    """Base of PipeNetClassifier and PipeNetRegressor; not meant to be used directly."""

    _parameter_constraints: dict[str, Any] = {
        "module": "no_validation",  # checked where the module is built, with a clearer message
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
        "n_stages": [Interval(Integral, 1, None, closed="left"), StrOptions({"auto"})],
        "n_replicas": [Interval(Integral, 1, None, closed="left")],
        "n_microbatches": [Interval(Integral, 1, None, closed="left"), StrOptions({"auto"})],
        "schedule": [StrOptions(set(_schedules.SCHEDULE_NAMES) | {"auto"})],
        "chunks_per_stage": [Interval(Integral, 1, None, closed="left"), StrOptions({"auto"})],
        "balance": [StrOptions({"uniform", "parameters", "time", "auto"}), list, tuple],
        "split_points": [dict, None],
        "checkpoint": [StrOptions(set(CHECKPOINTS))],
        "launcher": [StrOptions(set(LAUNCHERS))],
        "precision": [StrOptions(set(PRECISIONS))],
        "max_grad_norm": [Interval(Real, 0, None, closed="neither"), None],
        "timeout": [Interval(Real, 0, None, closed="neither")],
        "timeline_steps": [Interval(Integral, 0, None, closed="left")],
        "stage_memory_budget": [Interval(Real, 0, None, closed="neither"), None],
    }

    # How X is checked everywhere, and what y must be (set by the subclasses).
    # C order: every epoch's batches are cut from X without copying it again
    _X_CHECKS: dict[str, Any] = dict(
        accept_sparse=["csr", "csc", "coo"], dtype=np.float32, ensure_all_finite=True, order="C"
    )
    _Y_CHECKS: dict[str, Any] = {}
    _DEFAULT_CRITERION: type[nn.Module] = nn.MSELoss

    # fitted state (set by fit)
    module_: nn.Module
    history_: Any

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
        n_replicas: int = 1,
        n_microbatches: int | str = "auto",
        schedule: str = "1f1b",
        chunks_per_stage: int | str = "auto",
        balance: str | list[int] | tuple[int, ...] = "uniform",
        split_points: dict[str, Any] | None = None,
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
        self.n_replicas = n_replicas
        self.n_microbatches = n_microbatches
        self.schedule = schedule
        self.chunks_per_stage = chunks_per_stage
        self.balance = balance
        self.split_points = split_points
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

    # -- what subclasses define ----------------------------------------------------------------
    def _validate_targets(
        self, y: np.ndarray, reset: bool, classes: Any = None
    ) -> tuple[np.ndarray, int]:
        """Encoded targets for training and the number of network outputs (``classes``: the
        classifier's classes given to the first ``partial_fit``)."""
        raise NotImplementedError

    # -- fit -----------------------------------------------------------------------------------
    @with_callbacks
    def fit(self, X: Any, y: Any, sample_weight: Any = None) -> BasePipeNet:
        """Train the network on ``X`` and ``y``.

        Parameters
        ----------
        X : array-like or sparse matrix of shape (n_samples, n_features)
            Any numeric dtype; cast to float32 inside. Sparse rows are densified per batch.
        y : array-like of shape (n_samples,) or (n_samples, n_targets)
            Class labels of any type (classifier) or numeric targets (regressor).
        sample_weight : array-like of shape (n_samples,), default=None
            Non-negative weight of each row: each batch's loss is sum(w_i * loss_i) / sum(w_i).
            Rows of weight 0 are left out (as if absent); scaling every weight by a constant
            changes nothing.

        Returns
        -------
        self : object
            The fitted estimator.
        """
        return self._unchanged_on_failure(self._fit, X, y, sample_weight)

    def _partial_fit(
        self, X: Any, y: Any, sample_weight: Any = None, classes: Any = None
    ) -> BasePipeNet:
        return self._unchanged_on_failure(self._fit, X, y, sample_weight, True, classes)

    def _unchanged_on_failure(self, method: Callable[..., BasePipeNet], *args: Any) -> BasePipeNet:
        before = dict(self.__dict__)
        try:
            return method(*args)
        except BaseException:
            # a failed or interrupted fit leaves the estimator exactly as it was
            self.__dict__.clear()
            self.__dict__.update(before)
            raise

    def _fit(
        self, X: Any, y: Any, sample_weight: Any = None, partial: bool = False,
        classes: Any = None,
    ) -> BasePipeNet:
        """``partial``: one epoch, continuing the network, optimizer state and history."""
        warm = (self.warm_start or partial) and hasattr(self, "module_")
        inputs = self._prepare(X, y, warm, sample_weight, classes)
        epochs = 1 if partial else self.max_epochs
        progress = self._init_callback_context(max_subtasks=epochs)
        progress.call_on_fit_task_begin(estimator=self, X=inputs.X, y=y)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(inputs.seed)
            if warm:
                module, built = copy.deepcopy(self.module_), "the fitted network, continued"
            else:
                module, built = self._build_module(inputs)
                if self.verbose and built.startswith(_NOT_DEFERRED):
                    print(f"[skpipe] {built}", flush=True)
            mark_split_points(module, self.split_points)
            inputs, choice = self._choose_layout(module, inputs)
            if choice is not None and choice.advice and self.verbose:
                print(f"[skpipe] {choice.advice}", flush=True)
            # concurrent fits (GridSearchCV(n_jobs>1)) never share a device
            with held_devices(inputs.config, self.devices) as config:
                plan = self._make_plan(module, config, inputs, planned=choice is not None)
                with make_runner(plan, module, inputs.spec, inputs.seed) as runner:
                    resumed = getattr(self, "optimizer_state_", None) if partial and warm else None
                    if resumed is not None:  # the weights came with the stages; only this moves
                        runner.load_optimizer_state(resumed)
                    report = dataclasses.replace(
                        annotated(plan.report(), choice), construction=built
                    )
                    history = self._train(runner, inputs, plan, report, warm, progress, epochs)
                    spans = runner.spans() if self.timeline_steps else None
                    optimizer_state = None
                    if partial:  # one gathering brings the weights and the optimizer's state
                        module, optimizer_state = runner.collect_with_optimizer()
                    else:
                        module = runner.collect(last=True)
        module.eval()
        self.module_ = module
        self.criterion_ = inputs.criterion
        self.history_ = history
        self.n_iter_ = len(history)
        self.config_ = plan.config
        self.plan_ = report
        self.timeline_ = None if spans is None else Timeline.of(spans, plan.config)
        if self.timeline_ is not None and self.timeline_.spans:
            # the measured step beside the prediction
            self.plan_ = dataclasses.replace(
                report, measured_step_ms=self.timeline_.median_step_ms()
            )
        if partial:
            self.optimizer_state_ = optimizer_state
        else:
            self.__dict__.pop("optimizer_state_", None)
        progress.call_on_fit_task_end(estimator=self, X=inputs.X, y=y)
        return self

    def _prepare(
        self, X: Any, y: Any, warm: bool, sample_weight: Any = None, classes: Any = None
    ) -> FitInputs:
        """Validate parameters and data; resolve the configuration. Raises before any worker."""
        self._validate_params()
        self._validate_prefixed()
        digest = params_hash(self.get_params()) if self._uses_checkpoints() else None
        X, y = validate_data(self, X, y, reset=not warm, **self._X_CHECKS, **self._Y_CHECKS)
        X = self._to_csr(X)
        weights = None
        if sample_weight is not None:
            # refuses negative, non-finite and all-zero weights and a wrong length, by name
            weights = _check_sample_weight(
                sample_weight, X, dtype=np.float64, ensure_non_negative=True
            )
            keep = weights > 0  # a row of weight 0 is a row that is not there
            if not keep.all():
                X, y, weights = X[keep], y[keep], weights[keep]
        y_enc, n_outputs = self._validate_targets(y, reset=not warm, classes=classes)
        weights = self._row_weights(y_enc, weights)
        n_samples = X.shape[0]
        batch = n_samples if self.batch_size == "all" else min(int(self.batch_size), n_samples)
        # with 'auto' layouts, a provisional one validates the rest; the planner picks later
        config = self._config(
            1 if self.n_stages == "auto" else int(self.n_stages),
            provisional_schedule(self.chunks_per_stage)
            if self.schedule == "auto"
            else self.schedule,
            batch,
        )
        runner = runner_class(config.launcher)
        rng = check_random_state(self.random_state)
        seed = runner.agree_seed(int(rng.randint(np.iinfo(np.int32).max)))
        criterion = build_criterion(
            type(self).__name__,
            self.criterion,
            self._params_for("criterion"),
            self._DEFAULT_CRITERION,
        )
        reduction_of(criterion)  # refused here, before any worker starts
        spec = TrainSpec(
            optimizer=self.optimizer,
            optimizer_kwargs={"lr": self.lr, **self._params_for("optimizer")},
            criterion=copy.deepcopy(criterion),
        )
        sample = rows_to_tensor(X, slice(0, min(config.microbatch_rows, n_samples)))
        return FitInputs(
            X=X,
            y=y_enc,
            n_outputs=n_outputs,
            seed=seed,
            config=config,
            criterion=criterion,
            spec=spec,
            sample=sample,
            checkpoint_digest=digest,
            sample_weight=weights,
        )

    def _config(self, n_stages: int, schedule: str, batch: int) -> PipelineConfig:
        """The validated configuration for ``n_stages`` stages and ``schedule``, refusing
        callbacks its launcher cannot run."""
        launcher = resolve_launcher(self.launcher, n_stages, self.n_replicas)
        self._check_callbacks_fit(runner_class(launcher).optimizer_in_driver, launcher)
        return make_config(
            n_stages=n_stages,
            n_replicas=self.n_replicas,
            n_microbatches=self.n_microbatches,
            schedule=schedule,
            chunks_per_stage=self.chunks_per_stage,
            # 'auto' is the planner's to choose; 'uniform' validates the rest meanwhile
            balance=(
                ("uniform" if self.balance == "auto" else self.balance)
                if isinstance(self.balance, str)
                else tuple(self.balance)
            ),
            checkpoint=self.checkpoint,
            launcher=launcher,
            devices=resolve_devices(self.devices, n_stages, launcher, self.n_replicas),
            batch_size=batch,
            precision=self.precision,
            max_grad_norm=self.max_grad_norm,
            timeout=float(self.timeout),
        )

    def _choose_layout(
        self, module: nn.Module, inputs: FitInputs
    ) -> tuple[FitInputs, Choice | None]:
        """The layout the fit runs with ('auto' parameters chosen by the planner)."""
        batch = inputs.config.batch_size
        measured_on = rows_to_tensor(inputs.X, slice(0, min(batch, inputs.X.shape[0])))
        config, choice = choose_layout(
            self, module, measured_on, lambda n, s: self._config(n, s, batch), inputs.config
        )
        if config is inputs.config:
            return inputs, choice
        sample = rows_to_tensor(inputs.X, slice(0, min(config.microbatch_rows, inputs.X.shape[0])))
        return dataclasses.replace(inputs, config=config, sample=sample), choice

    def _row_weights(self, y_enc: np.ndarray, weights: np.ndarray | None) -> np.ndarray | None:
        """Per-row weights scaled to mean 1 (so a constant factor changes nothing, and all-equal
        weights are exactly the unweighted fit); None when every row weighs the same."""
        if weights is None or np.all(weights == weights[0]):
            return None
        return weights / weights.mean()

    def _build_module(self, inputs: FitInputs) -> tuple[nn.Module, str]:
        """The network, under the fit's seed, and where its values are made (for the report).

        Where its layers will live in other processes (spawned workers, torchrun ranks), or
        where the planner chooses, it is built on the meta device with its construction
        recorded, and each process makes only its own layers' values — the values eager
        construction gives (``engine/_construct.py``). A constructor that cannot run that way
        is built here, and the text says why."""

        def build() -> nn.Module:
            return build_module(
                type(self).__name__,
                self.module,
                self._params_for("module"),
                inputs.X.shape[1],
                inputs.n_outputs,
            )

        if isinstance(self.module, nn.Module):
            return build(), "the module instance given, copied to where its layers run"
        elsewhere = inputs.config.launcher in ("spawn", "torchrun") or self.n_stages == "auto"
        if not elsewhere:
            return build(), "built in this process"
        state = torch.get_rng_state()
        try:
            return build_deferred(build), (
                "built on the meta device; each process made its own layers' values"
            )
        except DeferralError as exc:
            torch.set_rng_state(state)  # the eager build starts where the recording started
            name = getattr(self.module, "__name__", repr(self.module))
            return build(), (
                f"{_NOT_DEFERRED} {name} is built whole in this process and its layers are "
                f"sent to the stages: it cannot be built on the meta device ({exc}). See "
                "'Training a network larger than one device' in the docs."
            )

    def _make_plan(
        self, module: nn.Module, config: PipelineConfig, inputs: FitInputs, planned: bool = False
    ) -> Plan:
        """The plan of the fit, with the micro-batch count chosen under the memory budget
        (unless the planner chose it), and the network checked against the data on the plan's
        sample (before any worker)."""
        n_rows = len(inputs.y) if self.train_split is None else None
        check_batchnorm_rows(module, config, n_rows)  # measuring would run into it first
        plan = make_plan(module, config, inputs.sample)
        budget = self.stage_memory_budget
        if (
            budget is not None
            and not planned
            and self.n_microbatches == "auto"
            and config.n_stages > 1
        ):
            plan = fit_budget(plan, float(budget))
            check_batchnorm_rows(module, plan.config, n_rows)
        check_network_fits_data(
            type(self).__name__, plan, inputs.criterion, inputs.y, inputs.n_outputs
        )
        return plan

    def _callback_list(self) -> list[Any]:
        return [cb[1] if isinstance(cb, tuple) else cb for cb in (self.callbacks or [])]

    def _uses_checkpoints(self) -> bool:
        return any(isinstance(cb, (Checkpoint, LoadInitState)) for cb in self._callback_list())

    def _check_callbacks_fit(self, optimizer_in_driver: bool, launcher: str) -> None:
        if optimizer_in_driver:
            return
        for cb in self._callback_list():
            if isinstance(cb, LRScheduler) or (
                isinstance(cb, type) and issubclass(cb, LRScheduler)
            ):
                name = cb.__name__ if isinstance(cb, type) else type(cb).__name__
                raise ValueError(
                    f"callbacks contains {name}, which steps the optimizer, but with "
                    f"launcher={launcher!r} each stage's optimizer "
                    "lives in its worker process. Use launcher='local' (every stage in this "
                    "process) or 'torchrun', or drop the scheduler."
                )

    def _train(
        self,
        runner: Any,
        inputs: FitInputs,
        plan: Plan,
        report: PlanReport,
        warm: bool,
        progress: Any,
        epochs: int,
    ) -> Any:
        key = None
        if inputs.checkpoint_digest is not None:
            layout = {"n_stages": plan.config.n_stages, "placement": plan.config.placement}
            key = CheckpointKey(
                inputs.checkpoint_digest, inputs.X, (inputs.y, inputs.sample_weight), layout
            )
        loop = ClassifierTrainingLoop if is_classifier(self) else TrainingLoop
        net = loop(
            module=runner.module,
            criterion=inputs.criterion,
            optimizer=self.optimizer,
            lr=self.lr,
            max_epochs=epochs,
            batch_size=plan.config.batch_size,
            callbacks=self.callbacks,
            train_split=self.train_split,
            verbose=self.verbose,
            device=None,
            iterator_train__shuffle=True,
            iterator_train__seed=inputs.seed,
            runner=runner,
            timeline_steps=self.timeline_steps,
            progress=progress,
            estimator=self,
            checkpoint_key=key,
            plan=report,
            initial_history=self.history_ if warm else None,
            sample_weight=inputs.sample_weight,
            **{
                k: v
                for k, v in self._prefixed_params().items()
                if k.startswith(("callbacks__", "iterator_"))
            },
        )
        net.initialize()
        return net.run(inputs.X, inputs.y)

    # -- plan ------------------------------------------------------------------------------------
    def plan(self, X: Any, y: Any) -> PlanReport:
        """The plan a fit on ``X, y`` would use, without training (the estimator is unchanged).

        Per stage and chunk: the layers, parameter count and memory, the activation memory
        held per micro-batch (measured on one micro-batch of X), the measured forward+backward
        time when ``balance='time'``; the schedule's expected bubble and predicted step time.
        With ``schedule='auto'`` or ``n_stages='auto'``, also every plan the planner simulated
        (predicted step, bubble, peak memory per stage, whether it fits; the choice marked),
        the predicted step of the whole network on one device, and a line saying so when one
        stage would be faster and fits. ``print`` it for tables; ``.to_frame()`` /
        ``.to_dict()`` for code.

        Parameters
        ----------
        X : array-like or sparse matrix of shape (n_samples, n_features)
            Training data, as ``fit`` would get it.
        y : array-like of shape (n_samples,) or (n_samples, n_targets)
            Targets, as ``fit`` would get them.

        Returns
        -------
        plan : PlanReport
            What each stage and chunk would hold and cost.
        """
        est = clone(self)
        inputs = est._prepare(X, y, warm=False)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(inputs.seed)
            module, built = est._build_module(inputs)
        mark_split_points(module, est.split_points)
        inputs, choice = est._choose_layout(module, inputs)
        plan = est._make_plan(module, inputs.config, inputs, planned=choice is not None)
        return dataclasses.replace(annotated(plan.report(), choice), construction=built)

    # -- pickling --------------------------------------------------------------------------------
    def __getstate__(self) -> dict[str, Any]:
        """The fitted network travels as numpy arrays (``engine.state._portable.PortableModule``): a
        pickle of a network of several GiB then needs no second copy of it in memory."""
        state = super().__getstate__()
        if isinstance(state.get("module_"), nn.Module):
            state = {**state, "module_": PortableModule(state["module_"])}
        return state

    def __sklearn_tags__(self):  # noqa: ANN204 - sklearn's Tags type is private
        tags = super().__sklearn_tags__()
        tags.input_tags.sparse = True
        tags.non_deterministic = False
        return tags
