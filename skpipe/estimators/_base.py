"""The scikit-learn face shared by both estimators: parameters, validation, fit -> engine, predict.

The path of a fit, like ``MLPClassifier._fit``: validate the parameters and the data into one
frozen ``FitInputs``; build the network; hold the devices; make the plan (once); train with the
runner the plan's launcher names, inside a skorch loop; store what comes back.
"""

from __future__ import annotations

import copy
import dataclasses
from collections.abc import Callable
from typing import Any

import numpy as np
import torch
from sklearn.base import clone
from sklearn.callback import CallbackSupportMixin, with_callbacks
from sklearn.utils.validation import check_random_state, validate_data
from torch import nn

from ..callbacks import CheckpointKey, params_hash
from ..engine.plan._budget import fit_budget
from ..engine.plan._config import PipelineConfig, TrainSpec
from ..engine.plan._microbatch import reduction_of
from ..engine.parallel._tensor import with_tensor_plan
from ..engine.plan._plan import Plan, make_plan
from ..engine.plan._report import PlanReport
from ..engine.plan._timeline import Timeline
from ..engine.planner._planner import Choice, annotated, chosen_sizes
from ..engine.runners._runners import held_devices, make_runner, runner_class
from ..engine.split._marks import mark_split_points
from ..engine.state._portable import PortableModule
from ..modules import MLP
from ._checks import (check_batchnorm_rows, check_network_fits_data, check_optimizer, grad_clips,
                      uses_checkpoints)
from ._data import FitInputs, rows_to_tensor, weighted_rows
from ._layout import choose_layout, layout_config, provisional_schedule
from ._loop import run_loop
from ._params import (
    NOT_DEFERRED,
    PARAMETER_CONSTRAINTS,
    PrefixedParamsMixin,
    build_criterion,
    build_network,
)
from ._predict import PredictMixin


class BasePipeNet(CallbackSupportMixin, PredictMixin, PrefixedParamsMixin):
    """Base of PipeNetClassifier and PipeNetRegressor; not meant to be used directly."""

    _parameter_constraints: dict[str, Any] = PARAMETER_CONSTRAINTS

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
        tensor_parallel: int = 1,
        tp_plan: dict[str, Any] | None = None,
        shard: str = "none",
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
        self.tensor_parallel = tensor_parallel
        self.tp_plan = tp_plan
        self.shard = shard
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
                if self.verbose and built.startswith(NOT_DEFERRED):
                    print(f"[skpipe] {built}", flush=True)
            mark_split_points(module, self.split_points)
            inputs, choice = self._choose_layout(module, inputs)
            if choice is not None and choice.advice and self.verbose:
                print(f"[skpipe] {choice.advice}", flush=True)
            # concurrent fits (GridSearchCV(n_jobs>1)) never share a device
            with held_devices(inputs.config, self.devices) as config:
                plan = self._make_plan(module, config, inputs, planned=chosen_sizes(choice))
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
        digest = params_hash(self.get_params()) if uses_checkpoints(self.callbacks) else None
        X, y = validate_data(self, X, y, reset=not warm, **self._X_CHECKS, **self._Y_CHECKS)
        X = self._to_csr(X)
        X, y, weights = weighted_rows(X, y, sample_weight)
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
            grad_clips=grad_clips(self.callbacks),
        )
        check_optimizer(spec)
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
        """The validated configuration for ``n_stages`` stages and ``schedule``."""
        return layout_config(self, n_stages, schedule, batch)

    def _choose_layout(
        self, module: nn.Module, inputs: FitInputs, predict: bool = False
    ) -> tuple[FitInputs, Choice | None]:
        """The layout the fit runs with ('auto' parameters chosen by the planner)."""
        batch = inputs.config.batch_size
        measured_on = rows_to_tensor(inputs.X, slice(0, min(batch, inputs.X.shape[0])))
        # the planner counts the tensor shards' messages by the plan the fit splits by
        first = with_tensor_plan(inputs.config, module, self.tp_plan)
        config, choice = choose_layout(
            self, module, measured_on, lambda n, s: self._config(n, s, batch), first,
            (inputs.spec.optimizer, inputs.spec.optimizer_kwargs), predict,
        )
        if config is first:
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
        """The network, under the fit's seed, and where its values are made (for the report)."""
        return build_network(
            type(self).__name__,
            self.module,
            self._params_for("module"),
            (inputs.X.shape[1], inputs.n_outputs),
            elsewhere=inputs.config.launcher in ("spawn", "torchrun") or self.n_stages == "auto",
        )

    def _make_plan(
        self, module: nn.Module, config: PipelineConfig, inputs: FitInputs,
        planned: tuple[int, ...] | None = None,
    ) -> Plan:
        """The plan of the fit, with the micro-batch count chosen under the memory budget
        (unless the planner chose it, and the split it predicted for: ``planned``), and the
        network checked against the data on the plan's sample (before any worker)."""
        n_rows = len(inputs.y) if self.train_split is None else None
        step = self._params_for("iterator_train").get("batch_size")
        check_batchnorm_rows(module, config, n_rows, step)  # measuring would run into it first
        config = with_tensor_plan(config, module, self.tp_plan)
        plan = make_plan(module, config, inputs.sample, planned)
        budget = self.stage_memory_budget
        if (
            budget is not None
            and planned is None
            and self.n_microbatches == "auto"
            and config.n_stages > 1
        ):
            plan = fit_budget(plan, float(budget))
            check_batchnorm_rows(module, plan.config, n_rows, step)
        check_network_fits_data(
            type(self).__name__, plan, inputs.criterion, inputs.y, inputs.n_outputs
        )
        return plan

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
        return run_loop(
            self, runner, inputs.X, inputs.y,
            criterion=inputs.criterion, seed=inputs.seed, sample_weight=inputs.sample_weight,
            batch_size=plan.config.batch_size, epochs=epochs, checkpoint_key=key, report=report,
            history=self.history_ if warm else None, progress=progress,
            routed={k: v for k, v in self._prefixed_params().items()
                    if k.startswith(("callbacks__", "iterator_"))},
        )

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
        inputs, choice = est._choose_layout(module, inputs, predict=True)
        plan = est._make_plan(module, inputs.config, inputs, planned=chosen_sizes(choice))
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
