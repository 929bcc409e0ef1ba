"""The estimators' parameters: what each may be (``PARAMETER_CONSTRAINTS``), the prefixed ones
(``module__*``, ``optimizer__*`` ...), and building the parts they route to (network, criterion).

Like skorch, the estimators accept parameters beyond their signature when a known prefix names
where they go; they are stored as given, and ``fit`` checks them (a name that fits no prefix
gets the closest valid name).
"""

from __future__ import annotations

import copy
import difflib
import inspect
from numbers import Integral, Real
from typing import Any

import torch
from sklearn.base import BaseEstimator
from sklearn.utils._param_validation import Interval, StrOptions
from torch import nn

from ..engine.plan import _schedules
from ..engine.plan._config import CHECKPOINTS, LAUNCHERS, PRECISIONS, SHARDS
from ..engine.split._construct import DeferralError, build_deferred

PREFIXES = ("module", "optimizer", "criterion", "iterator_train", "iterator_valid", "callbacks")

# What the estimators' batch iterator takes, per prefix (others are refused by name at fit).
ITERATOR_PARAMS = {
    "iterator_train": ("batch_size", "shuffle", "seed", "drop_last"),
    "iterator_valid": ("batch_size",),
}

# Sizes the estimator passes to a module class whose constructor declares them.
SIZE_ARGS = ("n_features_in", "n_outputs")

# What each parameter of the estimators may be (scikit-learn's ``_parameter_constraints``).
PARAMETER_CONSTRAINTS: dict[str, Any] = {
    "module": "no_validation",  # checked where the module is built, with a clearer message
    "criterion": "no_validation",
    "optimizer": [callable],
    "lr": [Interval(Real, 0, None, closed="neither")],
    "max_epochs": [Interval(Integral, 1, None, closed="left")],
    "batch_size": [Interval(Integral, 1, None, closed="left"), StrOptions({"all"})],
    "callbacks": [list, None],
    "train_split": [callable, Interval(Real, 0, 1, closed="neither"), None],
    "warm_start": ["boolean"],
    "random_state": ["random_state"],
    "verbose": ["verbose"],
    "devices": [StrOptions({"auto"}), list, tuple, str],
    "n_stages": [Interval(Integral, 1, None, closed="left"), StrOptions({"auto"})],
    "n_replicas": [Interval(Integral, 1, None, closed="left")],
    "tensor_parallel": [Interval(Integral, 1, None, closed="left")],
    "tp_plan": [dict, None],
    "shard": [StrOptions(set(SHARDS))],
    "n_microbatches": [Interval(Integral, 1, None, closed="left"), StrOptions({"auto"})],
    "schedule": [StrOptions(set(_schedules.SCHEDULES) | {"auto"})],
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

# the start of the construction note when the network could not be built where it runs
NOT_DEFERRED = "Note:"


class PrefixedParamsMixin(BaseEstimator):
    """``get_params``/``set_params`` that carry the prefixed parameters, and ``params_for``."""

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

    def set_params(self, **params: Any) -> Any:
        """Set parameters, including prefixed ones (``module__hidden_layer_sizes``).

        A name that is neither a parameter nor a routed prefix raises ``ValueError`` here, where
        the typo is made, with the closest valid name; values are stored as given and ``fit``
        validates them.
        """
        for key in params:
            unknown = self._unknown_name(key)
            if unknown is not None:
                raise ValueError(
                    f"Invalid parameter {key!r} for estimator {type(self).__name__}.{unknown} "
                    f"Valid parameters are its signature's and the prefixed ones "
                    f"({', '.join(p + '__*' for p in PREFIXES)})."
                )
        for key, value in params.items():
            setattr(self, key, value)
        return self

    def _unknown_name(self, key: str) -> str | None:
        """None for a valid parameter name; else the ' Did you mean ...?' hint (maybe empty).

        The name of the constructor's ``**kwargs`` passes like the constructor takes it
        (scikit-learn's checks set every signature name); ``fit`` reports it.
        """
        if key in self._get_param_names() or key == "kwargs":
            return None
        prefix, sep, rest = key.partition("__")
        if sep and prefix in PREFIXES and rest:
            return None
        names = self._get_param_names() + [p + "__" for p in PREFIXES]
        close = difflib.get_close_matches(key, names, n=1)
        if not close:
            for p in PREFIXES:  # module_hidden -> module__hidden
                if key.startswith(p + "_") and not key.startswith(p + "__"):
                    close = [p + "__" + key[len(p) :].lstrip("_")]
        return f" Did you mean {close[0]!r}?" if close else ""

    def _validate_prefixed(self) -> None:
        for key in self._prefixed_params():
            hint = "" if key == "kwargs" else self._unknown_name(key)
            if hint is not None:
                raise TypeError(
                    f"{type(self).__name__} got an unexpected parameter {key!r}.{hint} Prefixed "
                    f"parameters are routed by prefix: {', '.join(p + '__*' for p in PREFIXES)}."
                )
        batch = self._params_for("iterator_train").get("batch_size")
        for prefix, accepted in ITERATOR_PARAMS.items():
            for key in self._params_for(prefix):
                if key not in accepted:
                    raise ValueError(
                        f"{prefix}__{key} is not a setting of skpipe's batch iterator (it cuts "
                        f"batches from the arrays itself, without a DataLoader); {prefix} takes "
                        f"{', '.join(prefix + '__' + a for a in accepted)}."
                    )
        if batch is not None:
            if isinstance(batch, bool) or not isinstance(batch, Integral) or batch < 1:
                raise ValueError(
                    f"iterator_train__batch_size must be a positive int; got {batch!r}."
                )
            if self.batch_size != "all" and batch > self.batch_size:
                raise ValueError(
                    f"iterator_train__batch_size={batch} is larger than batch_size="
                    f"{self.batch_size}: a pipelined step holds at most batch_size rows "
                    "(its shapes are fixed by it). Set batch_size instead."
                )


def build_module(
    owner: str, module: Any, kwargs: dict[str, Any], n_features: int, n_outputs: int
) -> nn.Module:
    """The network: a copy of an instance, or the class built with ``module__*`` and the sizes
    its constructor declares (``n_features_in``, ``n_outputs``)."""
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
            f"The 'module' parameter of {owner} must be a torch.nn.Module "
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
    kwargs = dict(kwargs)
    for name, value in (("n_features_in", n_features), ("n_outputs", n_outputs)):
        if name in accepted and name not in kwargs:
            kwargs[name] = value
    built: nn.Module = module(**kwargs)
    return built


def build_network(
    owner: str,
    module: Any,
    params: dict[str, Any],
    sizes: tuple[int, int],
    elsewhere: bool,
) -> tuple[nn.Module, str]:
    """The network (``build_module``) and where its values are made, for the report.

    Where its layers will live in other processes (``elsewhere``: spawned workers, torchrun
    ranks, or where the planner chooses), it is built on the meta device with its construction
    recorded, and each process makes only its own layers' values — the values eager
    construction gives (``engine/split/_construct.py``). A constructor that cannot run that way
    is built here, and the text says why (it starts with ``NOT_DEFERRED``)."""

    def build() -> nn.Module:
        return build_module(owner, module, params, *sizes)

    if isinstance(module, nn.Module):
        return build(), "the module instance given, copied to where its layers run"
    if not elsewhere:
        return build(), "built in this process"
    state = torch.get_rng_state()
    try:
        return build_deferred(build), (
            "built on the meta device; each stage's process makes only its own layers' values "
            "when it starts"
        )
    except DeferralError as exc:
        torch.set_rng_state(state)  # the eager build starts where the recording started
        name = getattr(module, "__name__", repr(module))
        return build(), (
            f"{NOT_DEFERRED} {name} is built whole in this process and its layers are "
            f"sent to the stages: it cannot be built on the meta device ({exc}). See "
            "'Training a network larger than one device' in the docs."
        )


def build_criterion(
    owner: str, criterion: Any, kwargs: dict[str, Any], default: type[nn.Module]
) -> nn.Module:
    """The loss: ``default`` when None, a copy of an instance, or the class built with
    ``criterion__*``."""
    if criterion is None:
        return default(**kwargs)
    if isinstance(criterion, nn.Module):
        return copy.deepcopy(criterion)
    if isinstance(criterion, type) and issubclass(criterion, nn.Module):
        return criterion(**kwargs)
    raise TypeError(
        f"The 'criterion' parameter of {owner} must be None, a torch.nn.Module "
        f"subclass or instance. Got {criterion!r} instead."
    )
