"""What crosses a chunk boundary: one tensor or a tuple of them, their per-row shapes and
bytes, and the helpers that treat both alike."""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from copy import deepcopy
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from ._construct import real_copy


@dataclass(frozen=True)
class TensorTuple:
    """A chunk boundary that carries several tensors (the layer before it returned a tuple, which
    the next layer receives as one argument, as in ``nn.Sequential``): their per-row shapes."""

    shapes: tuple[tuple[int, ...], ...]


# what crosses a chunk boundary: one tensor's per-row shape, or several
Boundary = tuple[int, ...] | TensorTuple


def boundary_tensors(
    boundary: Boundary, rows: int, device: torch.device | str, requires_grad: bool
) -> tuple[torch.Tensor, ...]:
    """Empty float32 tensors of a boundary for ``rows`` rows (stage templates, receive buffers)."""
    shapes = boundary.shapes if isinstance(boundary, TensorTuple) else (boundary,)
    return tuple(
        torch.empty((rows,) + shape, device=device, requires_grad=requires_grad)
        for shape in shapes
    )


def boundary_bytes_per_row(boundary: Boundary) -> float:
    shapes = boundary.shapes if isinstance(boundary, TensorTuple) else (boundary,)
    return float(sum(4 * math.prod(shape) for shape in shapes))


def as_boundary(x: torch.Tensor | tuple[torch.Tensor, ...]) -> Boundary:
    if isinstance(x, torch.Tensor):
        return tuple(x.shape[1:])
    return TensorTuple(tuple(tuple(t.shape[1:]) for t in x))


def leaves(x: torch.Tensor | tuple[torch.Tensor, ...]) -> tuple[torch.Tensor, ...]:
    """The tensors of what crosses a boundary."""
    return (x,) if isinstance(x, torch.Tensor) else tuple(x)


def map_boundary(x: Any, fn: Callable[[torch.Tensor], torch.Tensor]) -> Any:
    """``fn`` applied to what crosses a boundary: a tensor, or each tensor of a tuple."""
    return fn(x) if isinstance(x, torch.Tensor) else tuple(fn(t) for t in x)


def fresh_inputs(x: Any) -> Any:
    """``x`` (a tensor or a tuple of them) detached, as leaves that take gradients when
    floating: a layer's input for measuring it alone."""
    return map_boundary(x, lambda t: t.detach().requires_grad_(t.is_floating_point()))


def backward_from(out: Any) -> None:
    """Backward from the sum of a layer's outputs that take gradients (if any)."""
    graded = [t.float().sum() for t in leaves(out) if t.requires_grad]
    if graded:
        torch.stack(graded).sum().backward()


def check_boundary(out: Any, rows: int, where: str, last: bool) -> None:
    """Refuse what a chunk cannot hand to the next one (or to the loss), naming the chunk."""
    if isinstance(out, torch.Tensor) and out.dim() >= 1 and out.shape[0] == rows:
        return
    if last:
        raise TypeError(
            f"{where} is the network's output and returns {_describe(out)}: the output must be "
            "one tensor with a row per sample (the loss is computed on it). Make the last "
            "layer return one tensor."
        )
    if isinstance(out, tuple) and out and all(isinstance(t, torch.Tensor) for t in out):
        bad = [i for i, t in enumerate(out) if not t.is_floating_point()]
        if bad:
            raise TypeError(
                f"{where} returns a tuple whose tensors {bad} are not floating point: tensors "
                "crossing a stage boundary carry gradients, so they must be float. Recompute "
                "integer or boolean tensors (masks, indices) in the next layer, or cast them."
            )
        rowless = [i for i, t in enumerate(out) if t.dim() == 0 or t.shape[0] != rows]
        if not rowless:
            return
        raise TypeError(
            f"{where} returns a tuple whose tensors {rowless} have no row per sample (first "
            f"dimension {rows}): every tensor crossing a stage boundary is cut into "
            "micro-batches by rows. Broadcast them over the rows, or keep them inside a layer."
        )
    raise TypeError(
        f"{where} returns {_describe(out)}, which cannot cross a stage boundary: return one "
        "tensor, or a tuple of float tensors with a row per sample (the next layer receives "
        "the tuple as its one argument). Wrap layers that return dicts or other objects in a "
        "block that returns tensors, or change the balance."
    )


def _describe(out: Any) -> str:
    if isinstance(out, torch.Tensor):
        return f"a tensor of shape {tuple(out.shape)}"
    if isinstance(out, tuple):
        return f"a tuple of {len(out)} ({', '.join(type(t).__name__ for t in out)})"
    return f"a {type(out).__name__}"


def boundary_shapes(
    layers: Sequence[nn.Module], bounds: Sequence[tuple[int, int]], n_features: int
) -> list[Boundary]:
    """What crosses every chunk boundary, per row (len = n_chunks + 1): one tensor's shape or a
    ``TensorTuple``. Found on the meta device so that no real compute runs; falls back to a
    real two-row forward (on a copy) for layers meta cannot run."""
    shapes: list[Boundary] = [(n_features,)]
    x: Any = torch.zeros((2, n_features), device="meta")
    for k, (s, e) in enumerate(bounds):
        chunk = nn.Sequential(*layers[s:e])
        try:
            with torch.no_grad():
                out = deepcopy(chunk).to_empty(device="meta")(x)
        except Exception:  # noqa: BLE001 - meta unsupported by some layer: measure for real
            with torch.no_grad(), torch.random.fork_rng(devices=[]):
                real = map_boundary(x, lambda t: torch.zeros(t.shape, dtype=t.dtype))
                out = real_copy(chunk).eval()(real)
        check_boundary(
            out, 2, f"pipeline chunk {k} (layers {s}..{e - 1})", last=k == len(bounds) - 1
        )
        shapes.append(as_boundary(out))
        x = map_boundary(out, lambda t: torch.zeros(t.shape, device="meta", dtype=t.dtype))
    return shapes
