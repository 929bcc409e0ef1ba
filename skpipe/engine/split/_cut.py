"""A traced graph cut at its marks: the Python code of each piece, what crosses each mark (every
value made before it and used after it), and the check that only what can cross a stage boundary
does (float tensors with a row per sample), naming the line that made what cannot."""

from __future__ import annotations

import operator
import re
import types
from typing import Any

import torch
import torch.fx as fx
from torch import nn

from ._marks import split_here


def _source_line(node: fx.Node) -> str:
    """The user's line that made ``node`` (from the trace's stack), or ''."""
    lines = [ln.strip() for ln in (node.stack_trace or "").strip().splitlines()]
    for i in range(len(lines) - 2, -1, -1):
        where = re.match(r'File "(.+)", line (\d+)', lines[i])
        if where and "/torch/" not in where[1]:
            return f" (made by `{lines[i + 1]}` at {where[1]}:{where[2]})"
    return ""


PieceSource = tuple[str, dict[str, Any], list[str]]  # source, its globals, the names it reads


def cut_graph(graph: fx.Graph, name: str) -> tuple[list[PieceSource], list[list[fx.Node]]]:
    """The pieces of a traced graph (code of each), and what crosses into each piece (the
    network's input for the first)."""
    segment: dict[fx.Node, int] = {}
    parts: list[list[fx.Node]] = [[]]
    inputs, output = [], None
    for n in graph.nodes:
        if n.op == "placeholder":
            inputs.append(n)
            segment[n] = -1
        elif n.op == "output":
            output = n
        elif n.op == "call_function" and n.target is split_here:
            parts.append([])
        else:
            parts[-1].append(n)
    assert output is not None
    # a part that computes nothing (marks in a row, a mark first or last) is no piece
    parts = [p for p in parts if any(n.op != "get_attr" for n in p)]
    if len(inputs) != 1:
        raise TypeError(
            f"module {name}'s forward takes {len(inputs)} inputs without defaults; skpipe "
            "calls the network with one (the batch of X)."
        )
    for k, part in enumerate(parts):
        for n in part:
            segment[n] = k
    last = len(parts) - 1
    segment[output] = last
    # what crosses into piece k: values made before it (not tensors read by name, which every
    # piece reads itself) and used in it or after it
    reach = {
        n: max((segment.get(u, last) for u in n.users), default=-1)
        for n in segment
        if n.op != "get_attr" and n is not output
    }
    crossing = [inputs] + [
        [n for n in reach if segment[n] < k <= reach[n]] for k in range(1, len(parts))
    ]
    codes = []
    for k, part in enumerate(parts):
        outs: Any = crossing[k + 1] if k < last else output.args[0]
        codes.append(_piece_code(part, crossing[k], outs, single_out=k == last))
    for k in range(1, len(parts)):
        if not crossing[k]:
            raise TypeError(
                f"nothing computed before pipe_split() number {k} of module {name} is used "
                "after it: the pieces after it do not depend on the input."
            )
    return codes, crossing


def _piece_code(
    part: list[fx.Node], ins: list[fx.Node], outs: Any, single_out: bool
) -> PieceSource:
    g = fx.Graph()
    env: dict[fx.Node, fx.Node] = {}
    boundary = g.placeholder("boundary")
    if len(ins) == 1:
        env[ins[0]] = boundary
    else:
        for i, n in enumerate(ins):
            env[n] = g.call_function(operator.getitem, (boundary, i))
            env[n].name = n.name if n.name != "boundary" else env[n].name

    def look(n: fx.Node) -> fx.Node:
        if n not in env:  # a tensor another piece read by name: read it here too
            assert n.op == "get_attr", n
            env[n] = g.get_attr(str(n.target))
        return env[n]

    for n in part:
        env[n] = g.node_copy(n, look)
    if single_out:
        g.output(fx.graph.map_arg(outs, look))
    else:
        got = [look(n) for n in outs]
        g.output(got[0] if len(got) == 1 else tuple(got))
    g.lint()
    code = g.python_code(root_module="self")
    targets = [str(n.target) for n in g.nodes if n.op in ("get_attr", "call_module")]
    return code.src, dict(code.globals), targets


def piece_names(scope: dict[str, Any]) -> tuple[tuple[str, str, Any], ...]:
    """The generated code's globals, modules by name (so that the pieces pickle)."""
    return tuple(
        (k, "module", v.__name__) if isinstance(v, types.ModuleType) else (k, "value", v)
        for k, v in sorted(scope.items())
    )


def piece_label(used: list[str], constants: dict[str, torch.Tensor]) -> str:
    mods = [u for u in used if u not in constants]
    if not mods:
        return "(ops)"
    return ",".join(mods) if len(mods) <= 3 else f"{mods[0]}..{mods[-1]}"


def check_crossing(
    twin: nn.Module, graph: fx.Graph, x: torch.Tensor, crossing: list[list[fx.Node]], name: str
) -> None:
    """Run the traced graph once (on ``twin``, on meta when it is) and refuse a value crossing a
    mark that cannot cross a stage boundary, naming it and the line that made it."""
    watched = {n for ins in crossing[1:] for n in ins}
    values: dict[fx.Node, Any] = {}

    class _Watch(fx.Interpreter):
        def run_node(self, n: fx.Node) -> Any:
            out = super().run_node(n)
            if n in watched:
                values[n] = out
            return out

    try:
        with torch.no_grad(), torch.random.fork_rng(devices=[]):
            _Watch(fx.GraphModule(twin, graph)).run(x)
    except (NotImplementedError, RuntimeError):  # pragma: no cover - the plan checks chunks
        return
    for k, ins in enumerate(crossing[1:], start=1):
        for n in ins:
            v = values.get(n)
            problem = None
            if not isinstance(v, torch.Tensor):
                problem = f"is of type {type(v).__name__}, not a tensor"
            elif not v.is_floating_point():
                problem = f"is a {v.dtype} tensor (tensors crossing carry gradients: float)"
            elif v.dim() == 0 or v.shape[0] != x.shape[0]:
                problem = f"has shape {tuple(v.shape)}, no row per sample"
            if problem:
                raise TypeError(
                    f"`{n.name}`{_source_line(n)} is made before pipe_split() number {k} of "
                    f"module {name} and used after it, but it {problem}: only float tensors "
                    "with a row per sample cross a stage boundary. Compute it again after the "
                    "mark (sizes from a tensor's shape there), or move the mark."
                )
