"""Networks split where their ``forward`` says: torch.fx tracing at torch's ``pipe_split()`` marks.

A network whose ``forward`` is arbitrary Python (a transformer with a [CLS] token, a residual
stack, skip connections across blocks) marks where it may be cut with
``torch.distributed.pipelining.pipe_split()`` (a no-op when the network runs as it is). skpipe
then cuts it there into **pieces**: piece k runs the code of ``forward`` between mark k-1 and
mark k. The pieces are the layers the plan balances over the chunks, as the layers of an
``nn.Sequential`` are; what crosses a cut is every value computed before it and used after it
(a tuple when there are several: a skip connection rides through the pieces it skips).

Marks may also come from outside the network (``split_points``, torch's ``SplitPoint`` spec:
before or after every call of a named submodule), for a network one cannot edit.

How the pieces are found:
1. ``forward`` runs once on the meta device (no memory, no values) on a copy of the network, to
   learn which modules call ``pipe_split()`` (the root's own forward, or a submodule's at any
   depth: those are traced through).
2. ``torch.fx`` traces the network symbolically, once in train mode and once in eval mode (code
   that reads ``self.training`` differs between them). Every submodule without a mark is a
   *leaf*: its call is recorded and it runs as it is (its own Python, its own train/eval mode,
   its buffers updated in place). Batch sizes stay symbolic (``x.shape[0]`` is read at run time).
3. The graph is cut at the marks; each piece is Python code generated from its part of the graph,
   run against the network's own submodules and tensors, under their names in the network
   (``blocks.3.attn.weight``): checkpoints, ``module_`` and the optimizer's state keep the
   network's names.

Why not torch's ``pipeline()`` (``torch.export``): it fixes the batch size of the example into
the graph (a [CLS] token ``expand(x.shape[0], ...)`` becomes ``expand(4, ...)``), fixes train or
eval mode inside every layer, replaces the layers by exported modules whose calls no longer match
the originals (and pass integers between stages), and its stage modules cannot be pickled to a
worker. Tracing with ``torch.fx`` keeps the user's layers as they are.

What a marked network must satisfy (else a ``TypeError`` before any worker starts names what to
change): the code of every module that calls ``pipe_split()`` is traceable by ``torch.fx`` (no
``if``/``for`` on tensor values, no ``.item()``; move such code into a submodule without marks,
which runs as it is); only tensors cross a mark (compute sizes again after it), float tensors
with a row per sample.
"""

from __future__ import annotations

import inspect
import traceback
import weakref
from collections.abc import Callable
from copy import deepcopy
from itertools import chain
from typing import Any

import torch
import torch.distributed.pipelining  # noqa: F401 - defines torch.ops.pippy._pipe_split
import torch.fx as fx
from torch import nn
from torch.nn.modules.module import register_module_forward_hook, register_module_forward_pre_hook

from ._construct import named_tensors, real_copy
from ._cut import check_crossing, cut_graph, piece_label, piece_names
from ._marks import marks_call, split_here, split_point
from ._partition import named_layers
from ._pieces import PieceCode, SplitTrace


# -- finding the pieces ---------------------------------------------------------------------------
_TRACES: weakref.WeakKeyDictionary[nn.Module, dict[Any, SplitTrace | None]] = (
    weakref.WeakKeyDictionary()
)


def split_network(
    module: nn.Module, n_chunks: int, row_shape: tuple[int, ...], dtype: torch.dtype
) -> tuple[list[tuple[str, nn.Module]], SplitTrace | None]:
    """The layers a plan balances over ``n_chunks`` chunks, with their names in ``module``, and
    the trace when they are the pieces between ``pipe_split()`` marks (None: the layers of an
    ``nn.Sequential``, or the whole module for one chunk)."""
    if n_chunks == 1:
        return named_layers(module, 1), None
    trace = trace_marks(module, row_shape, dtype)
    if trace is None:
        return named_layers(module, n_chunks), None
    return trace.bind(module), trace


def trace_marks(
    module: nn.Module, row_shape: tuple[int, ...], dtype: torch.dtype
) -> SplitTrace | None:
    """``module`` cut at its ``pipe_split()`` marks for inputs of ``row_shape`` per row (None
    when forward calls no ``pipe_split()``); kept per network. Raises TypeError naming what
    cannot be traced or cannot cross a mark."""
    marks = tuple(
        (name, split_point(m)) for name, m in module.named_modules() if split_point(m)
    )
    key = (row_shape, dtype, marks)
    kept = _TRACES.setdefault(module, {})
    if key not in kept:
        kept[key] = _trace_marks(module, row_shape, dtype)
    return kept[key]


_ROWS = 7  # rows of the probe input: unlikely to be mistaken for another dimension


def _trace_marks(
    module: nn.Module, row_shape: tuple[int, ...], dtype: torch.dtype
) -> SplitTrace | None:
    name = type(module).__name__
    twin, x = _meta_twin(module), torch.zeros((_ROWS, *row_shape), dtype=dtype, device="meta")
    try:
        stacks = _mark_stacks(twin, x)
    except (NotImplementedError, RuntimeError):  # meta cannot run some layer: a real copy can
        twin, x = real_copy(module), torch.zeros((_ROWS, *row_shape), dtype=dtype)
        stacks = _mark_stacks(twin, x)
    if not stacks:
        return None
    through = {owner for stack in stacks for owner in stack if owner}
    concrete = _defaults(twin)
    modes = {}
    for training in (True, False):
        twin.train(training)
        modes[training] = _trace(twin, through, concrete, name)
    graph = modes[True]
    seen = sum(1 for n in graph.nodes if n.target is split_here)
    if seen != len(stacks):
        raise TypeError(
            f"module {name}'s forward called pipe_split() {len(stacks)} times, but torch.fx "
            f"saw {seen} of them (inside {sorted(set(s[-1] or name for s in stacks))}): some "
            "run where tracing cannot follow (a function torch.fx does not look into, such as "
            "torch.utils.checkpoint). Call pipe_split() in the forward of a module, between "
            "its calls of submodules."
        )
    train, crossing = cut_graph(graph, name)
    evals, eval_crossing = cut_graph(modes[False], name)
    if [len(c) for c in crossing] != [len(c) for c in eval_crossing]:  # one entry per piece
        raise TypeError(
            f"module {name} is cut differently in train and eval mode (its forward's marks or "
            "what crosses them depend on self.training): keep pipe_split() calls and the "
            "values that cross them the same in both modes."
        )
    twin.train(True)
    check_crossing(twin, graph, x, crossing, name)
    constants = {
        n.target: getattr(twin, n.target)
        for n in chain(graph.nodes, modes[False].nodes)
        if n.op == "get_attr" and "." not in n.target and not hasattr(module, n.target)
    }
    kept = set(twin.state_dict(keep_vars=True))
    pieces = []
    for t, e in zip(train, evals, strict=True):
        (src_t, names_t, targets), (src_e, names_e, targets_e) = t, e
        used = list(dict.fromkeys(targets + targets_e))  # in the order forward reads them
        pieces.append(
            PieceCode(
                train=src_t,
                eval=src_e,
                names=piece_names({**dict(names_t), **dict(names_e)}),
                targets=tuple(u for u in used if u not in constants),
                transient=frozenset(
                    u for u in used
                    if u not in kept and u not in constants and _is_buffer_like(twin, u)
                ),
                constants={u: constants[u] for u in used if u in constants},
                label=piece_label(used, constants),
            )
        )
    return SplitTrace(pieces=tuple(pieces), module_type=name)


def _is_buffer_like(module: nn.Module, target: str) -> bool:
    """Whether ``target`` names a tensor that is not a parameter (a buffer, or a plain tensor
    attribute)."""
    path, _, leaf = target.rpartition(".")
    owner = module.get_submodule(path) if path else module
    value = getattr(owner, leaf, None)
    return isinstance(value, torch.Tensor) and not isinstance(value, nn.Parameter)


def _meta_twin(module: nn.Module) -> nn.Module:
    """A copy of ``module`` whose parameters and buffers are on the meta device (no memory):
    what the probe and the tracer run, so that the network itself is left as it was."""
    memo: dict[int, Any] = {}
    for _, t in named_tensors(module):
        if id(t) not in memo:
            meta = torch.empty_like(t, device="meta")
            memo[id(t)] = (
                nn.Parameter(meta, requires_grad=t.requires_grad)
                if isinstance(t, nn.Parameter)
                else meta
            )
    return deepcopy(module, memo)


def _mark_stacks(twin: nn.Module, x: torch.Tensor) -> list[tuple[str, ...]]:
    """Run ``twin`` once; for every ``pipe_split()`` call, the names of the modules whose
    forward was running (outermost first; '' is the network itself)."""
    names: dict[int, str] = {}
    for path, m in twin.named_modules(remove_duplicate=False):
        names.setdefault(id(m), path)
    stack: list[str] = []
    stacks: list[tuple[str, ...]] = []

    def enter(m: nn.Module, args: Any) -> None:
        if split_point(m) == "beginning":  # a split point: a mark in its caller's code
            stacks.append(tuple(stack))
        stack.append(names.get(id(m), "?"))

    def leave(m: nn.Module, args: Any, out: Any) -> None:
        stack.pop()
        if split_point(m) == "end":
            stacks.append(tuple(stack))

    def mark() -> None:
        stacks.append(tuple(stack))

    pre, post = register_module_forward_pre_hook(enter), register_module_forward_hook(leave)
    try:
        with marks_call(mark), torch.no_grad(), torch.random.fork_rng(devices=[]):
            twin(x)
    finally:
        pre.remove()
        post.remove()
    return stacks


def _defaults(module: nn.Module) -> dict[str, Any]:
    """forward's parameters after the first that have defaults: traced with those values (the
    network is called with one input)."""
    params = list(inspect.signature(module.forward).parameters.values())[1:]
    return {
        p.name: p.default
        for p in params
        if p.default is not inspect.Parameter.empty
        and p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)
    }


class _Tracer(fx.Tracer):
    """Traces into the modules that call ``pipe_split()`` (and the network); every other
    submodule is a leaf, called as it is."""

    def __init__(self, through: set[str]) -> None:
        super().__init__()
        self.through = through
        self.record_stack_traces = True

    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        return module_qualified_name not in self.through

    def call_module(
        self, m: nn.Module, forward: Callable[..., Any], args: tuple[Any, ...], kwargs: Any
    ) -> Any:
        where = split_point(m)  # a split point given from outside: marked around the call
        if where == "beginning":
            self.create_proxy("call_function", split_here, (), {})
        out = super().call_module(m, forward, args, kwargs)
        if where == "end":
            self.create_proxy("call_function", split_here, (), {})
        return out


def _trace(twin: nn.Module, through: set[str], concrete: dict[str, Any], name: str) -> fx.Graph:
    tracer = _Tracer(through)
    mark = lambda: tracer.create_proxy("call_function", split_here, (), {})  # noqa: E731
    try:
        with marks_call(mark), torch.random.fork_rng(devices=[]):
            return tracer.trace(twin, concrete_args=concrete or None)
    except Exception as exc:  # noqa: BLE001 - whatever torch.fx cannot follow
        where = _user_frame(exc)
        inside = ", ".join(sorted(through)) or "none"
        raise TypeError(
            f"module {name} calls pipe_split(), so skpipe traces its forward (and the forward "
            f"of its submodules that call it: {inside}) with torch.fx, which failed{where}: "
            f"{type(exc).__name__}: {exc}. Tracing cannot follow Python that depends on tensor "
            "values (if/for/while on them, .item(), len() of a tensor). Move that code into a "
            "submodule without pipe_split() calls (such submodules run as they are, untraced), "
            "or use n_stages=1."
        ) from None


def _user_frame(exc: BaseException) -> str:
    """' at file:line (code)' of the last frame of the traceback outside torch, if any."""
    frames = [
        f
        for f in traceback.extract_tb(exc.__traceback__)
        if "/torch/" not in f.filename and "/skpipe/engine/" not in f.filename
    ]
    if not frames:
        return ""
    f = frames[-1]
    return f" at {f.filename}:{f.lineno} ({(f.line or '').strip()})"
