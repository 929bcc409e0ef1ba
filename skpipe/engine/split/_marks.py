"""Where a network may be cut: torch's ``pipe_split()`` marks in its ``forward``, and marks given
from outside (``split_points``: before or after every call of a named submodule). The tracer
(``_trace``) finds them and records each as a call of ``split_here``."""

from __future__ import annotations

import difflib
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from typing import Any

import torch
import torch.distributed.pipelining  # noqa: F401 - defines torch.ops.pippy._pipe_split
from torch import nn


def split_here() -> None:
    """What a traced graph records where ``forward`` called ``pipe_split()`` (a no-op)."""


@contextmanager
def marks_call(fn: Callable[[], Any]) -> Iterator[None]:
    """``pipe_split()`` calls ``fn`` instead of torch's no-op op while this lasts (it looks the
    op up on ``torch.ops.pippy`` at every call, wherever it was imported from)."""
    namespace: Any = torch.ops.pippy
    original = namespace._pipe_split
    namespace._pipe_split = fn
    try:
        yield
    finally:
        namespace._pipe_split = original


# -- marks given from outside the network: split points -------------------------------------------
SPLIT_POINTS = ("beginning", "end")
_SPLIT_ATTR = "_skpipe_split_point"  # on a submodule: 'beginning' or 'end' (travels, pickles)


def mark_split_points(module: nn.Module, split_points: Mapping[str, Any] | None) -> None:
    """Mark the submodules named in ``split_points`` as cut points: before ('beginning') or
    after ('end') every call of them, as if ``pipe_split()`` were called there (torch's
    ``SplitPoint.BEGINNING``/``END`` are taken too). The mark is an attribute of the submodule,
    so it travels and pickles with the network; marks of an earlier call are removed first.
    Raises ValueError naming an unknown submodule or a bad value."""
    for m in module.modules():
        if hasattr(m, _SPLIT_ATTR):
            delattr(m, _SPLIT_ATTR)
    names = [n for n, _ in module.named_modules() if n]
    for name, where in (split_points or {}).items():
        kind = getattr(where, "name", where)
        kind = kind.lower() if isinstance(kind, str) else kind
        if kind not in SPLIT_POINTS:
            raise ValueError(
                f"split_points[{name!r}] must be 'beginning', 'end' or a "
                f"torch.distributed.pipelining.SplitPoint; got {where!r}."
            )
        if not isinstance(name, str) or name not in names:
            close = difflib.get_close_matches(str(name), names, n=3)
            hint = f" Did you mean {', '.join(map(repr, close))}?" if close else (
                f" Its submodules: {', '.join(names[:8])}{'...' if len(names) > 8 else ''}."
            )
            raise ValueError(
                f"split_points names {name!r}, which is not a submodule of "
                f"{type(module).__name__}.{hint}"
            )
        setattr(module.get_submodule(name), _SPLIT_ATTR, kind)


def split_point(m: nn.Module) -> str | None:
    """'beginning' or 'end' where ``split_points`` marked ``m``."""
    return getattr(m, _SPLIT_ATTR, None)
