"""The pieces of a network cut at its ``pipe_split()`` marks, as layers (see ``_trace``).

A piece is Python code that ``torch.fx`` generated from part of the network's ``forward`` (one
version for train mode, one for eval), run against the network's own submodules and tensors,
which it holds under their names in the network. ``SplitTrace`` is the code of every piece
without the network (picklable); ``bind`` makes the pieces of a network of that structure. A
worker that receives pieces needs only this module, not the tracer.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn


@dataclass(frozen=True)
class PieceCode:
    """One piece of a traced network, without the network: its code (train and eval mode), the
    names it reads in the network (submodules it calls, tensors it reads), constants the trace
    made, and a label for the plan."""

    train: str
    eval: str
    names: tuple[tuple[str, str, Any], ...]  # (global name, 'module' | 'value', module or value)
    targets: tuple[str, ...]
    constants: dict[str, torch.Tensor] = field(default_factory=dict)
    transient: frozenset[str] = frozenset()  # targets that are tensors outside the state dict
    label: str = ""


@dataclass(frozen=True)
class SplitTrace:
    """A network cut at its ``pipe_split()`` marks: the pieces' code, bound to a network (the
    one traced, or any network of the same structure) with ``bind``. Picklable."""

    pieces: tuple[PieceCode, ...]
    module_type: str

    def bind(self, module: nn.Module) -> list[tuple[str, nn.Module]]:
        """The pieces as layers reading ``module``'s current submodules and tensors; named ''
        (their tensors carry their full names in ``module``)."""
        return [("", TracedPiece(code, module)) for code in self.pieces]


class TracedPiece(nn.Module):
    """The code of ``forward`` between two ``pipe_split()`` marks, as a layer: it holds the
    network's submodules and tensors it uses under their names in the network, and takes what
    crosses the mark before it (one tensor, or a tuple) and returns what crosses the next."""

    def __init__(self, code: PieceCode, root: nn.Module) -> None:
        super().__init__()
        self.code = code
        self.label = code.label
        for target in sorted(code.targets, key=lambda t: t.count(".")):
            _bind(self, root, target, persistent=target not in code.transient)
        for name, value in code.constants.items():
            self.register_buffer(name, value, persistent=False)
        self._compile()

    def _compile(self) -> None:
        self._forwards = {
            True: _compile(self.code.train, self.code.names),
            False: _compile(self.code.eval, self.code.names),
        }

    def forward(self, x: Any) -> Any:
        return self._forwards[self.training](self, x)

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        state.pop("_forwards", None)  # compiled code: made again where it lands
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        super().__setstate__(state)
        self._compile()

    def extra_repr(self) -> str:
        return f"label={self.label!r}"


def _bind(piece: nn.Module, root: nn.Module, target: str, persistent: bool) -> None:
    """Put ``root``'s object at ``target`` into ``piece`` under the same name: a submodule or a
    tensor itself (a parameter stays one; another tensor is a buffer, in the state dict when
    ``persistent``), with empty modules for the path above it. Nothing to do where an ancestor
    is already the network's own."""
    *path, leaf = target.split(".")
    have: nn.Module = piece
    owner = root
    for atom in path:
        owner = getattr(owner, atom)
        got = dict(have.named_children()).get(atom)
        if got is owner:
            return  # the whole submodule is the network's own
        if got is None:
            got = nn.Module()
            have.add_module(atom, got)
        have = got
    value = getattr(owner, leaf)
    if isinstance(value, nn.Module):
        have.add_module(leaf, value)
    elif isinstance(value, nn.Parameter):
        have.register_parameter(leaf, value)
    elif isinstance(value, torch.Tensor):
        have.register_buffer(leaf, value, persistent=persistent)
    else:  # pragma: no cover - torch.fx reads only modules and tensors by get_attr
        setattr(have, leaf, value)


def _compile(src: str, names: tuple[tuple[str, str, Any], ...]) -> Callable[..., Any]:
    scope: dict[str, Any] = {
        name: importlib.import_module(value) if kind == "module" else value
        for name, kind, value in names
    }
    exec(compile(src, "<skpipe traced piece>", "exec"), scope)  # noqa: S102 - code fx generated
    return scope["forward"]
