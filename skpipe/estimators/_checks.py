"""Checks made before any worker starts: the network against the data (on the plan's sample),
and the callbacks against the launcher. Mistakes a user meets in the first hour get a message
naming the values, not torch's shapes."""

from __future__ import annotations

import warnings
from typing import Any

import numpy as np
import torch
from skorch.callbacks import Checkpoint as SkorchCheckpoint
from skorch.callbacks import GradientNormClipping, TrainEndCheckpoint
from skorch.callbacks import LoadInitState as SkorchLoadInitState
from torch import nn

from ..callbacks import Checkpoint, LoadInitState
from ..engine.plan._config import PipelineConfig, TrainSpec
from ..engine.plan._microbatch import class_weighted, reduction_of
from ..engine.plan._plan import Plan
from ._mirror import reads_gradients

_BATCH_NORMS = (
    nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, nn.SyncBatchNorm,
    nn.LazyBatchNorm1d, nn.LazyBatchNorm2d, nn.LazyBatchNorm3d,
)


def check_network_fits_data(
    owner: str,
    plan: Plan,
    criterion: nn.Module,
    y: np.ndarray,
    n_outputs: int,
) -> None:
    """Raise ValueError when the network's output width or the criterion does not fit y."""
    out_shape = plan.output_shape
    if out_shape != (n_outputs,):
        what = "classes" if owner.endswith("Classifier") else "target columns"
        raise ValueError(
            f"The network outputs {out_shape[0] if len(out_shape) == 1 else out_shape} values per "
            f"row but y has {n_outputs} {what}: {owner} passes n_outputs={n_outputs} to a module "
            f"class whose constructor takes it, and needs one output per "
            f"{'class' if what == 'classes' else 'target column'}. Build the module with "
            f"n_outputs={n_outputs} outputs."
        )
    rows = min(4, len(y))
    outputs = torch.zeros((rows,) + out_shape)
    targets = torch.from_numpy(np.ascontiguousarray(y[:rows]))
    try:
        # torch only warns when a criterion broadcasts mismatched shapes: here that is an error
        with torch.no_grad(), warnings.catch_warnings():
            warnings.simplefilter("error", UserWarning)
            loss = criterion(outputs, targets)
        if loss.dim() != 0:
            raise ValueError(f"it returned shape {tuple(loss.shape)} instead of one number")
    except (RuntimeError, ValueError, IndexError, TypeError, UserWarning) as exc:
        kind = (
            "class indices (int64, 0..n_classes-1)"
            if owner.endswith("Classifier")
            else "float32 values, one column per target"
        )
        raise ValueError(
            f"criterion {type(criterion).__name__} cannot compare the network's outputs "
            f"(shape {tuple(outputs.shape)}, {outputs.dtype}) with the targets {owner} passes it "
            f"(shape {tuple(targets.shape)}, {targets.dtype}: {kind}): {exc}"
        ) from None
    cfg = plan.config
    if cfg.n_microbatches > 1 or cfg.n_replicas > 1:
        _check_mean_splits(criterion, out_shape, y, cfg)


def _check_mean_splits(
    criterion: nn.Module, out_shape: tuple[int, ...], y: np.ndarray, cfg: PipelineConfig
) -> None:
    """A 'mean' criterion whose mean is not a plain mean over rows (and not the class-weighted
    mean the engine splits exactly) cannot be cut into micro-batches exactly: refuse it."""
    if reduction_of(criterion) != "mean" or class_weighted(criterion) or len(y) < 2:
        return
    rows = min(8, len(y))
    outputs = torch.randn((rows,) + out_shape, generator=torch.Generator().manual_seed(0))
    targets = torch.from_numpy(np.ascontiguousarray(y[:rows]))
    with torch.no_grad():
        whole = float(criterion(outputs, targets))
        half = rows // 2
        parts = sum(
            float(criterion(outputs[s], targets[s])) * len(targets[s]) / rows
            for s in (slice(0, half), slice(half, rows))
        )
    if not np.isclose(whole, parts, rtol=1e-4, atol=1e-6):
        raise ValueError(
            f"criterion {type(criterion).__name__}'s mean over a batch is not the mean of its "
            f"rows' losses, so n_microbatches={cfg.n_microbatches} with n_replicas="
            f"{cfg.n_replicas} cannot train what one device trains. Say the weighting with "
            "class_weight or sample_weight (exact for every split), or use n_microbatches=1 "
            "and n_replicas=1."
        )


def check_batchnorm_rows(
    module: nn.Module, config: PipelineConfig, n_rows: int | None, step: int | None = None
) -> None:
    """BatchNorm cannot train on a micro-batch of one row: say which parameters make one.

    ``n_rows``: the rows the fit trains on when known (no ``train_split``), for the ragged last
    batch; ``step``: the rows of a step when ``iterator_train__batch_size`` sets them. Every
    launcher cuts a step's rows into the micro-batches one device does (``real_positions``).
    """
    if not any(isinstance(m, _BATCH_NORMS) for m in module.modules()):
        return
    batch = step or config.batch_size
    batches = [batch] + ([n_rows % batch] if n_rows is not None and n_rows % batch else [])
    smallest = min(b // min(config.n_microbatches, b) for b in batches)
    if smallest < 2:
        last = (
            f" (the last batch of the {n_rows} rows has {batches[-1]})" if len(batches) > 1 else ""
        )
        raise ValueError(
            f"BatchNorm needs at least 2 rows per micro-batch in training, but batch_size="
            f"{batch} with n_microbatches={config.n_microbatches} makes micro-batches "
            f"of {smallest} row(s){last}. Lower n_microbatches or raise batch_size."
        )


def _callback_list(callbacks: list[Any] | None) -> list[Any]:
    """The callbacks given, without the names of ``(name, callback)`` pairs."""
    return [cb[1] if isinstance(cb, tuple) else cb for cb in (callbacks or [])]


def uses_checkpoints(callbacks: list[Any] | None) -> bool:
    return any(isinstance(cb, (Checkpoint, LoadInitState)) for cb in _callback_list(callbacks))


def check_optimizer(spec: TrainSpec) -> None:
    """The optimizer built with the fit's settings, here, on a stand-in parameter: a setting it
    does not take is refused by name before any worker starts."""
    try:
        spec.optimizer([nn.Parameter(torch.zeros(0))], **spec.optimizer_kwargs)
    except (TypeError, ValueError) as exc:
        name = getattr(spec.optimizer, "__name__", repr(spec.optimizer))
        given = ", ".join(f"{k}={v!r}" for k, v in spec.optimizer_kwargs.items())
        raise ValueError(
            f"optimizer {name} cannot be built with the fit's settings ({given}; optimizer__* "
            f"parameters and lr): {exc}"
        ) from None


_SKORCH_CHECKPOINTS = (SkorchCheckpoint, TrainEndCheckpoint, SkorchLoadInitState)


def grad_clips(callbacks: list[Any] | None) -> tuple[tuple[float, float], ...]:
    """The (max_norm, norm_type) of each GradientNormClipping, in order: where the gradients
    live in the stages' processes, the stages clip by the global norm as the callback would."""
    clips = []
    for cb in _callback_list(callbacks):
        if isinstance(cb, GradientNormClipping) and cb.gradient_clip_value is not None:
            clips.append((float(cb.gradient_clip_value), float(cb.gradient_clip_norm_type)))
    return tuple(clips)


def check_callbacks_fit(
    callbacks: list[Any] | None, weights_in_driver: bool, launcher: str
) -> None:
    """Refuse, by name, a callback that reads the gradients where the launcher keeps them in
    other processes (GradientNormClipping is run by the stages themselves), and skorch's
    checkpoint callbacks under torchrun (every rank would write the same files)."""
    if weights_in_driver:
        return
    for cb in _callback_list(callbacks):
        cls = cb if isinstance(cb, type) else type(cb)
        if launcher == "torchrun" and issubclass(cls, _SKORCH_CHECKPOINTS):
            raise ValueError(
                f"callbacks contains skorch's {cls.__name__}, but with launcher='torchrun' "
                "every rank runs the callbacks and would write (or read) the same files, each "
                "holding one stage's optimizer. Use skpipe.callbacks.Checkpoint and "
                "LoadInitState: each stage writes its own part, once, and a resumed fit "
                "continues exactly."
            )
        if not issubclass(cls, GradientNormClipping) and reads_gradients(cls):
            raise ValueError(
                f"callbacks contains {cls.__name__}, whose on_grad_computed reads the gradients, "
                f"but with launcher={launcher!r} they live in the stages' processes and are not "
                "shown to callbacks. Use launcher='local' (every stage in this process) or "
                "n_stages=1; to clip gradients, GradientNormClipping and max_grad_norm work "
                "with every launcher."
            )


def check_asynchronous(config: Any, callbacks: list[Any] | None, n_stages: Any = None) -> None:
    """Refuse, by name, what skpipe's asynchronous schedules ('2bw', 'pipedream') cannot run,
    before any worker starts: they overlap batches, so every stage needs a process of its own,
    and a stage steps when its own share of a batch is done, not when the pipeline's is.
    ``n_stages``: the estimator's own (the configuration's may stand in for 'auto')."""
    from ..engine.plan._schedules import SCHEDULES
    from ._mirror import hooks_of, needs_weights

    name = config.schedule
    if not SCHEDULES[name].asynchronous:
        return
    where = f"schedule={name!r}"
    if isinstance(n_stages, str):
        raise ValueError(
            f"{where} needs a number of stages (>= 2); got n_stages={n_stages!r}: the planner "
            "chooses the number of stages for the synchronous schedules only."
        )
    if config.n_stages < 2:
        raise ValueError(
            f"{where} overlaps the batches of a pipeline and needs n_stages >= 2 (a number); got "
            f"n_stages={config.n_stages}. With one stage, use schedule='gpipe' (or leave it)."
        )
    if config.launcher not in ("spawn", "torchrun"):
        raise ValueError(
            f"{where} needs launcher='spawn' or 'torchrun' (got launcher={config.launcher!r}): "
            "its stages run at the same time, each in a process of its own; with every stage in "
            "one process nothing overlaps."
        )
    if name == "pipedream" and config.n_replicas > 1:
        raise ValueError(
            f"{where} updates after every micro-batch and does not sum replicas' gradients "
            f"(got n_replicas={config.n_replicas}); use schedule='2bw', which sums them once "
            "per batch."
        )
    if config.checkpoint != "never":
        raise ValueError(
            f"{where} runs each forward on a stashed weight version; checkpoint="
            f"{config.checkpoint!r} would recompute it in the backward on the live weights. "
            "Use checkpoint='never'."
        )
    clips = ["max_grad_norm"] if config.max_grad_norm is not None else []
    clips += [type(cb).__name__ for cb in _callback_list(callbacks)
              if isinstance(cb, GradientNormClipping)]
    if clips and name == "pipedream":
        raise ValueError(
            f"{where} cannot clip by the global gradient norm (got {', '.join(clips)}): each "
            "stage updates after every micro-batch and the next forward runs on that update, "
            "so a norm over all stages would make every stage wait for the first stage's "
            "backward: the flush between micro-batches back. Use schedule='2bw', which clips "
            "each batch's gradient by its global norm without a wait, or a synchronous schedule."
        )
    saves = [type(cb).__name__ for cb in _callback_list(callbacks)
             if isinstance(cb, _SKORCH_CHECKPOINTS)]
    if saves:
        raise ValueError(
            f"callbacks contains skorch's {', '.join(saves)}, but a checkpoint of {where} needs "
            "the weight versions each stage stashes, which skorch's callbacks do not save: a "
            "resumed fit would not continue the same training. Use skpipe.callbacks.Checkpoint "
            "and LoadInitState, which save and resume them."
        )
    for cb in _callback_list(callbacks):
        batch_hooks = sorted(hooks_of(cb) & {"on_batch_begin", "on_batch_end"})
        if needs_weights(cb) and batch_hooks:
            raise ValueError(
                f"callbacks contains {type(cb).__name__}, which reads or writes the weights at "
                f"{', '.join(batch_hooks)}; with {where} the batches overlap and no single "
                "set of weights exists between two of them. Epoch hooks see the weights of the "
                "last completed update (the pipeline drains at every epoch's end); give the "
                "callback a class attribute needs_weights = False if it leaves them alone."
            )
