"""Networks built where they run: construction on the meta device, recorded, replayed per stage.

The driver builds the user's network on the meta device (no memory, no values), with a dispatch
mode watching every tensor operation its constructor runs. What it keeps is the *recipe* of each
tensor: the operations that created and changed its storage, in order, and for every random
operation the CPU generator's state just before it. The random operations also run once for real
on a throw-away tensor of the same layout, so the generator advances exactly as in an eager
construction (and the next random operation's state is the one eager construction would see).

A stage worker is sent its chunks (meta layers, a few bytes) and the recipe of their tensors
only; replaying it on the CPU gives, bit for bit, the values an eager ``module(**kwargs)`` under
the same seed would have given those layers, whatever the constructor did (``reset_parameters``,
a parent's ``__init__`` re-initialising its children, ``orthogonal_``, ``xavier_*``...).
So each process holds only its own layers, and ``n_stages=1`` and ``n_stages=p`` start from the
same weights.

What a module must satisfy (else ``DeferralError`` says why and skpipe builds it eagerly in the
driver and ships the chunks, as before): its constructor runs on the meta device (no
``.item()``, no value-dependent branches, no explicit ``device='cpu'`` tensors combined with
parameters), and random initialisation uses torch's default generator (no ``generator=``).
Tensors made from Python data (``torch.tensor([...])``) are built for real on the CPU and travel
with the layer.
"""

from __future__ import annotations

import math
import weakref
from collections.abc import Callable, Iterator, Mapping
from copy import deepcopy
from dataclasses import dataclass, field
from itertools import chain
from typing import Any

import torch
from torch import nn
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

_META = torch.device("meta")


class DeferralError(RuntimeError):
    """The network cannot be built on the meta device and replayed per stage (the reason says
    which operation); skpipe then builds it eagerly."""


@dataclass(frozen=True)
class TensorRef:
    """A tensor of the recording: its storage's key and its view of that storage."""

    key: int
    size: tuple[int, ...]
    stride: tuple[int, ...]
    offset: int
    dtype: torch.dtype


@dataclass(frozen=True)
class _Op:
    """One recorded operation, ready to replay: the op's name, its arguments (TensorRefs for
    meta tensors), the generator state before it (random ops), what it reads, writes and
    creates."""

    name: tuple[str, str, str]  # namespace, op, overload
    args: tuple[Any, ...]  # meta tensors replaced by TensorRefs
    kwargs: dict[str, Any]
    rng: torch.Tensor | None
    reads: frozenset[int]
    writes: frozenset[int]
    creates: tuple[TensorRef | None, ...]  # per output leaf: a storage it creates, or None

    def op(self) -> Any:
        namespace, name, overload = self.name
        return getattr(getattr(getattr(torch.ops, namespace), name), overload)


def _map(obj: Any, fn: Callable[[Any], Any]) -> Any:
    """``obj`` with ``fn`` applied to every leaf of its tuples, lists and dicts."""
    if isinstance(obj, (tuple, list)):
        return type(obj)(_map(v, fn) for v in obj)
    if isinstance(obj, dict):
        return {k: _map(v, fn) for k, v in obj.items()}
    return fn(obj)


def _key(t: torch.Tensor) -> int:
    # torch keeps one Python object per storage (views share it); the recording holds every
    # one it saw, so the ids stay unique
    return id(t.untyped_storage())


def _ref(t: torch.Tensor) -> TensorRef:
    return TensorRef(_key(t), tuple(t.shape), tuple(t.stride()), int(t.storage_offset()), t.dtype)


def _on_meta(leaf: Any) -> bool:
    # not ``.is_meta``: while recording, that reads False (see _Construction)
    return isinstance(leaf, torch.Tensor) and leaf.device.type == "meta"


_IS_META = torch.Tensor.is_meta


class _Construction(TorchFunctionMode):
    """Two things the constructor must not see while it runs on meta: tensors made from Python
    data are built on the CPU (meta would drop their values), and ``tensor.is_meta`` reads
    False, because some of torch's initialisers (``trunc_normal_``, ``orthogonal_``,
    ``sparse_``, ``dirac_``) return at once on meta, drawing nothing, where eager construction
    draws: the recording has to see their draws to replay them."""

    _FROM_DATA = (torch.tensor, torch.as_tensor, torch.asarray)

    def __torch_function__(
        self, func: Any, types: Any, args: tuple[Any, ...] = (), kwargs: Any = None
    ) -> Any:
        if getattr(func, "__self__", None) is _IS_META:
            return False
        kwargs = kwargs or {}
        if func in self._FROM_DATA and kwargs.get("device") is None:
            kwargs = {**kwargs, "device": "cpu"}
        return func(*args, **kwargs)


class _Recorder(TorchDispatchMode):
    """Logs every operation that touches a meta tensor (see the module's doc)."""

    def __init__(self) -> None:
        super().__init__()
        self.ops: list[_Op] = []
        self.origin: dict[int, int] = {}  # storage key -> index of the op that created it
        self.storages: list[Any] = []  # every meta storage, alive: keys stay unique

    def __torch_dispatch__(
        self, func: Any, types: Any, args: tuple[Any, ...] = (), kwargs: Any = None
    ) -> Any:
        kwargs = kwargs or {}
        leaves = tree_flatten((args, kwargs))[0]
        meta_device = any(isinstance(a, torch.device) and a.type == "meta" for a in leaves)
        if not meta_device and not any(_on_meta(a) for a in leaves):
            return func(*args, **kwargs)  # real tensors only: a constant being made
        rng = None
        if torch.Tag.nondeterministic_seeded in func.tags:
            if kwargs.get("generator") is not None:
                raise DeferralError(
                    f"{func} draws from a generator of its own (generator=...); only torch's "
                    "default generator can be replayed per stage"
                )
            rng = torch.get_rng_state()
            _advance(func, args, kwargs)
        try:
            out = func(*args, **kwargs)
        except Exception as exc:  # noqa: BLE001 - whatever meta cannot do
            raise DeferralError(f"{func} cannot run on the meta device ({exc})") from None
        reads = frozenset(_key(a) for a in leaves if _on_meta(a))
        writes = set(_mutated_keys(str(func), args, kwargs))
        creates: list[TensorRef | None] = []
        for t in tree_flatten(out)[0]:
            if _on_meta(t) and _key(t) not in self.origin and _key(t) not in reads:
                self.origin[_key(t)] = len(self.ops)
                self.storages.append(t.untyped_storage())
                writes.add(_key(t))
                creates.append(_ref(t))
            else:
                creates.append(None)
        self.ops.append(
            _Op(
                name=_op_name(str(func)),
                args=_map(args, _encode),
                kwargs=_map(kwargs, _encode),
                rng=rng,
                reads=reads,
                writes=frozenset(writes),
                creates=tuple(creates),
            )
        )
        return out


def _op_name(qualified: str) -> tuple[str, str, str]:
    """``'aten.uniform_.default'`` -> (namespace, op, overload)."""
    namespace, name, overload = qualified.split(".")
    return namespace, name, overload


def _mutated_keys(qualified: str, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Iterator[int]:
    """Storage keys of the meta tensors an op writes: by aten's naming rule, an op whose name
    ends in '_' writes its first argument (every tensor of it, for the _foreach_ ops), and
    ``out=`` tensors are written."""
    written: list[Any] = []
    if _op_name(qualified)[1].endswith("_") and args:
        written.append(args[0])
    written.append(kwargs.get("out"))
    for t in tree_flatten(written)[0]:
        if _on_meta(t):
            yield _key(t)


def _encode(leaf: Any) -> Any:
    return _ref(leaf) if _on_meta(leaf) else leaf


def _scratch(leaf: Any) -> Any:
    if _on_meta(leaf):
        scratch = torch.empty_strided(leaf.shape, leaf.stride(), dtype=leaf.dtype, device="cpu")
        return scratch.zero_()
    if isinstance(leaf, torch.device) and leaf.type == "meta":
        return torch.device("cpu")
    return leaf


def _advance(func: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
    """Run a random op on throw-away CPU tensors of the same layouts: the default generator
    moves on exactly as it would have in an eager construction."""
    with torch.no_grad():
        func(*_map(args, _scratch), **_map(kwargs, _scratch))


@dataclass
class Blueprint:
    """The recording of one construction: what every meta tensor of the network was made of."""

    ops: list[_Op]
    origin: dict[int, int]
    storages: list[Any] = field(repr=False)

    def program(self, modules: Mapping[Any, nn.Module]) -> Program:
        """What rebuilds the meta tensors of ``modules`` (layers of the recorded network, by
        any key): the ops their storages depend on, and where each tensor goes."""
        targets: dict[tuple[Any, str], TensorRef] = {}
        for mk, module in modules.items():
            for name, t in named_tensors(module):
                if not t.is_meta:
                    continue
                if _key(t) not in self.origin:
                    raise DeferralError(
                        f"{name!r} of {type(module).__name__} was not made by an operation the "
                        "recording saw (a tensor made outside the constructor?)"
                    )
                targets[(mk, name)] = _ref(t)
        needed = {ref.key for ref in targets.values()}
        chosen = []
        for index in range(len(self.ops) - 1, -1, -1):
            op = self.ops[index]
            if op.writes & needed:
                chosen.append(index)
                needed |= op.reads
        missing = [k for k in needed if k not in self.origin]
        if missing:  # pragma: no cover - a read storage the recording never saw made
            raise DeferralError("an operation reads a tensor made outside the constructor")
        return Program(ops=tuple(self.ops[i] for i in sorted(chosen)), targets=targets)


@dataclass(frozen=True)
class Program:
    """Replays the recorded ops some layers need, on the CPU, and puts the tensors in place.
    Picklable: it travels to a stage worker with the (meta) layers it is for."""

    ops: tuple[_Op, ...]
    targets: dict[tuple[Any, str], TensorRef]

    @property
    def nbytes(self) -> int:
        """Bytes of the tensors it makes in place."""
        return sum(math.prod(r.size) * r.dtype.itemsize for r in self.targets.values())

    def apply(self, modules: Mapping[Any, nn.Module]) -> None:
        """Give the meta tensors of ``modules`` (the same layers, or copies of them) their
        values. The default generator is left as it was."""
        storages: dict[int, Any] = {}
        with torch.no_grad(), torch.random.fork_rng(devices=[]):
            for op in self.ops:
                args = _map(op.args, lambda leaf: _resolve(leaf, storages))
                kwargs = _map(op.kwargs, lambda leaf: _resolve(leaf, storages))
                if op.rng is not None:
                    torch.set_rng_state(op.rng)
                out = op.op()(*args, **kwargs)
                for ref, t in zip(op.creates, tree_flatten(out)[0], strict=True):
                    if ref is not None:
                        storages[ref.key] = t.untyped_storage()
        done: dict[int, torch.Tensor] = {}
        for (mk, name), ref in self.targets.items():
            put_tensor(modules[mk], name, _view(storages[ref.key], ref), done)
        for mk, module in modules.items():
            left = [name for name, t in named_tensors(module) if t.is_meta]
            if left:  # pragma: no cover - every meta tensor was a target
                raise DeferralError(f"tensors {left[:3]} of layer {mk} were left on meta")


def _view(storage: Any, ref: TensorRef) -> torch.Tensor:
    return torch.empty(0, dtype=ref.dtype).set_(storage, ref.offset, ref.size, ref.stride)


def _resolve(leaf: Any, storages: dict[int, Any]) -> Any:
    if isinstance(leaf, TensorRef):
        return _view(storages[leaf.key], leaf)
    if isinstance(leaf, torch.device) and leaf.type == "meta":
        return torch.device("cpu")
    return leaf


def named_tensors(module: nn.Module) -> Iterator[tuple[str, torch.Tensor]]:
    """Every parameter and buffer of ``module`` by name, shared ones under each of their names."""
    return chain(
        module.named_parameters(remove_duplicate=False),
        module.named_buffers(remove_duplicate=False),
    )


def put_tensor(
    module: nn.Module, name: str, value: torch.Tensor, done: dict[int, torch.Tensor]
) -> None:
    """Replace the tensor ``name`` of ``module`` by ``value`` (a parameter stays a parameter;
    a tensor shared by two names stays shared)."""
    path, _, leaf = name.rpartition(".")
    owner = module.get_submodule(path) if path else module
    old = getattr(owner, leaf)
    new = done.get(id(old))
    if new is None:
        new = (
            nn.Parameter(value, requires_grad=old.requires_grad)
            if isinstance(old, nn.Parameter)
            else value
        )
        done[id(old)] = new
    setattr(owner, leaf, new)  # nn.Module keeps a parameter a parameter, a buffer a buffer


# -- the network's side ---------------------------------------------------------------------------
# storage key -> its recording; a recording lives as long as the network it built
_BLUEPRINTS: weakref.WeakValueDictionary[int, Blueprint] = weakref.WeakValueDictionary()
_KEPT: weakref.WeakKeyDictionary[nn.Module, Blueprint] = weakref.WeakKeyDictionary()


def build_deferred(factory: Callable[[], nn.Module]) -> nn.Module:
    """``factory()`` built on the meta device, its construction recorded (see the module's doc).
    Raises DeferralError when the constructor cannot be recorded."""
    recorder = _Recorder()
    try:
        with torch.device(_META), _Construction(), recorder:
            module = factory()
    except DeferralError:
        raise
    except Exception as exc:  # noqa: BLE001 - the constructor failed on meta, not on its inputs
        raise DeferralError(f"its constructor failed on the meta device ({exc!r})") from None
    if any(isinstance(p, nn.parameter.UninitializedParameter) for p in module.parameters()):
        raise DeferralError("it has lazy layers, whose shapes are set by the first batch")
    blueprint = Blueprint(ops=recorder.ops, origin=recorder.origin, storages=recorder.storages)
    for key in blueprint.origin:
        _BLUEPRINTS[key] = blueprint
    _KEPT[module] = blueprint
    return module


def is_deferred(module: nn.Module) -> bool:
    """Whether some tensor of ``module`` still waits on the meta device for its values."""
    return any(t.is_meta for _, t in named_tensors(module))


def blueprint_of(module: nn.Module) -> Blueprint:
    for name, t in named_tensors(module):
        if t.is_meta:
            found = _BLUEPRINTS.get(_key(t))
            if found is None:
                raise DeferralError(
                    f"{type(module).__name__}'s {name!r} is on the meta device but was not built "
                    "by skpipe's recorded construction, so its values are unknown"
                )
            return found
    raise ValueError("the module has no meta tensors")  # pragma: no cover - callers check


def program_for(modules: Mapping[Any, nn.Module]) -> Program | None:
    """The replay program of the meta tensors of ``modules`` (None when they have none)."""
    deferred = [m for m in modules.values() if is_deferred(m)]
    if not deferred:
        return None
    return blueprint_of(deferred[0]).program(modules)


def materialize(module: nn.Module) -> nn.Module:
    """Give ``module``'s meta tensors their values in place (a no-op for a built module); the
    recording is let go once nothing of the network waits on it."""
    materialize_all({0: module})
    _KEPT.pop(module, None)
    return module


def materialize_all(modules: Mapping[Any, nn.Module]) -> None:
    """Give the meta tensors of ``modules`` (layers of one recorded network) their values in
    place, with one replay."""
    program = program_for(modules)
    if program is not None:
        program.apply(modules)


def real_copy(module: nn.Module) -> nn.Module:
    """A copy of ``module`` with values: a deep copy, replayed where it is on meta. What the
    plan and the planner measure (one layer or chunk at a time)."""
    program = program_for({0: module})
    copy = deepcopy(module)
    if program is not None:
        program.apply({0: copy})
    return copy
