"""The plan of a fit, made once, before any worker exists: the split of the network into chunks,
where each chunk runs, and what each holds and costs.

``make_plan`` flattens the network, balances its layers over the chunks (``balance='time'``
profiles copies of the layers on the device they will run on), places the chunks on the ranks,
finds the boundary shapes and measures each chunk's parameter and activation bytes. The plan is
handed to the runner, which builds its stages from it; the memory budget reads it; the report a
user sees (``plan_``) is ``plan.report()``.
"""

from __future__ import annotations

import dataclasses
from copy import deepcopy
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from ..split._construct import is_deferred, real_copy
from ..split._partition import (
    Boundary,
    as_boundary,
    backward_from,
    balance_sizes,
    boundary_bytes_per_row,
    boundary_shapes,
    check_boundary,
    chunk_bounds,
    fresh_inputs,
    leaves,
    map_boundary,
    named_layers,
)
from ..split._names import shard_units, split_parameter, style_of
from ..split._trace import SplitTrace, split_network
from . import _schedules
from ._config import PipelineConfig
from ._memory import ActivationMeter
from ._report import ChunkReport, PlanReport


@dataclass(frozen=True)
class Plan:
    """Where every layer goes, and what every chunk holds.

    ``bounds[c]`` is the half-open layer range of chunk c; ``shapes[c]`` what enters chunk c
    per row: one tensor's shape, or a ``TensorTuple`` (``shapes[-1]`` the output, one tensor);
    ``owners[c]`` the pipeline rank holding chunk c; ``parameter_names[c]`` the names in the
    whole network of chunk c's parameters, in the order its optimizer sees them. With one
    stage the whole network is the one layer. ``trace``: where the layers are the pieces
    between the network's ``pipe_split()`` marks, their code (else None: the layers of an
    ``nn.Sequential``).
    """

    config: PipelineConfig
    n_layers: int
    bounds: tuple[tuple[int, int], ...]
    shapes: tuple[Boundary, ...]
    owners: tuple[int, ...]
    parameters: tuple[int, ...]
    parameter_bytes: tuple[int, ...]
    parameter_names: tuple[tuple[str, ...], ...]
    activation_bytes_per_row: tuple[float, ...]
    layer_names: tuple[str, ...]
    layer_costs: tuple[float, ...] | None = None
    trace: SplitTrace | None = None
    # per chunk: bytes of the parameters tensor_parallel splits, and of its largest layer
    split_bytes: tuple[int, ...] = ()
    largest_layer_bytes: tuple[int, ...] = ()

    @property
    def output_shape(self) -> tuple[int, ...]:
        """The network's output per row (one tensor: the plan refuses anything else)."""
        out = self.shapes[-1]
        if not isinstance(out, tuple):  # make_plan and boundary_shapes refuse such a network
            raise TypeError(f"the network's output must be one tensor; it is {out}")
        return out

    @property
    def n_chunks(self) -> int:
        return len(self.bounds)

    def named_layers(self, module: nn.Module) -> list[tuple[str, nn.Module]]:
        """The layers of ``module`` this plan indexes, with their names in ``module`` (traced
        pieces are named '': their tensors carry their full names). Pieces read ``module``'s
        submodules and tensors as they are now."""
        named = (
            self.trace.bind(module)
            if self.trace is not None
            else named_layers(module, self.n_chunks)
        )
        if len(named) != self.n_layers:
            raise ValueError(
                f"the network has {len(named)} layers but the plan was made for {self.n_layers}"
            )
        return named

    def layers(self, module: nn.Module) -> list[nn.Module]:
        """The layers of ``module`` this plan indexes."""
        return [layer for _, layer in self.named_layers(module)]

    def chunks(self, module: nn.Module, rank: int | None = None) -> dict[int, nn.Sequential]:
        """The chunks of ``rank`` (all chunks when None), sharing their layers with ``module``."""
        layers = self.layers(module)
        ids = range(self.n_chunks) if rank is None else self.config.chunks_of(rank)
        return {c: nn.Sequential(*layers[slice(*self.bounds[c])]) for c in ids}

    def rank_parameter_names(self, rank: int | None = None) -> list[str]:
        """Parameter names in the order the optimizer of ``rank`` (or of every chunk) holds them."""
        ids = range(self.n_chunks) if rank is None else self.config.chunks_of(rank)
        return [name for c in sorted(ids) for name in self.parameter_names[c]]

    def state_names(self, module: nn.Module, rank: int | None) -> dict[int, dict[str, str]]:
        """Per chunk of ``rank`` (of every rank when None): each key of the chunk's state dict
        -> its name in the whole network's state dict (parameters and persistent buffers)."""
        named = self.named_layers(module)
        return {
            c: {
                key: _qualified(named, self.bounds[c][0], key)
                for key in chunk.state_dict(keep_vars=True)
            }
            for c, chunk in self.chunks(module, rank).items()
        }

    def load_chunk_states(self, module: nn.Module, states: dict[int, dict[str, Any]]) -> None:
        """Put chunk state dicts (keyed as ``chunks()`` keys them) into ``module`` under the
        network's names; the tensors become the network's own (no copy)."""
        names = self.state_names(module, None)
        whole = {names[c][key]: t for c, state in states.items() for key, t in state.items()}
        unexpected = module.load_state_dict(whole, strict=False, assign=True).unexpected_keys
        if unexpected:  # pragma: no cover - the names come from this network's own chunks
            raise KeyError(f"chunk states name tensors {unexpected[:3]} the network lacks")

    def with_microbatches(self, n_microbatches: int) -> Plan:
        """The same split, stepping with another micro-batch count."""
        from ._microbatch import step_rows

        config = dataclasses.replace(
            self.config,
            n_microbatches=n_microbatches,
            batch_rows=step_rows(self.config.share_rows, n_microbatches),
        )
        return dataclasses.replace(self, config=config)

    def stage_bytes(self, n_microbatches: int | None = None) -> list[float]:
        """Estimated peak bytes of each stage: 4 x its parameter bytes (weights, gradients and
        two Adam moments: an upper bound for SGD), the weight versions an asynchronous schedule
        stashes (and 2bw's pending gradient when clipping), plus the activations of the
        micro-batches it holds at its peak (``held_bytes_per_row``); the first chunk's stage
        also holds the step's inputs, and the last chunk's its targets (as many bytes as the
        outputs: a stand-in), for the whole step: every micro-batch is a view of them."""
        cfg = self.config
        m = cfg.n_microbatches if n_microbatches is None else n_microbatches
        rows = -(-cfg.share_rows // m)  # a replica's share of the batch, per micro-batch
        held = _schedules.in_flight(cfg.schedule, cfg.n_stages, cfg.chunks_per_stage, m)
        need = [0.0] * cfg.n_stages
        for c, rank in enumerate(self.owners):
            need[rank] += self.state_bytes(c, _schedules.state_copies(cfg.schedule, cfg, rank))
            need[rank] += rows * self.held_bytes_per_row(c, held)
        need[self.owners[0]] += rows * m * boundary_bytes_per_row(self.shapes[0])
        need[self.owners[-1]] += rows * m * boundary_bytes_per_row(self.shapes[-1])
        return need

    def state_bytes(self, chunk: int, copies: int = 4) -> float:
        """Bytes of chunk ``chunk``'s training state one rank holds: ``copies`` x its
        parameter bytes (weights, gradients, two Adam moments, stashed versions), of which a
        tensor shard holds the split layers' 1/t; with ``shard='optimizer'`` the gradients and
        moments are 1/k per replica (the weights gathered for the step), with ``'full'``
        everything, plus the largest layer's weights and gradient gathered at once."""
        cfg = self.config
        split = self.split_bytes[chunk] if self.split_bytes else 0
        mine = self.parameter_bytes[chunk] - split + split / cfg.tensor_parallel
        largest = self.largest_layer_bytes[chunk] if self.largest_layer_bytes else 0
        return rank_state_bytes(mine, largest, cfg, copies)

    def held_bytes_per_row(self, chunk: int, held: int) -> float:
        """Bytes per row chunk ``chunk`` holds for backward with ``held`` micro-batches in
        flight: all their activations ('never'); with recomputation only each micro-batch's
        input, and the activations of the one being recomputed ('always'), or of the last
        micro-batch too ('except_last'), and on the last chunk the outputs the loss keeps."""
        act = self.activation_bytes_per_row[chunk]
        policy = self.config.checkpoint
        if policy == "never" or held < 1:
            return held * act
        inputs = boundary_bytes_per_row(self.shapes[chunk])
        # the loss keeps the output of each micro-batch it was computed on
        kept = held * boundary_bytes_per_row(self.shapes[-1]) if chunk == self.n_chunks - 1 else 0
        if policy == "always":
            return min(held * act, held * inputs + act + kept)
        return min(held * act, (held - 1) * inputs + 2 * act + kept)

    def report(self) -> PlanReport:
        cfg = self.config
        chunks = []
        per_rank_seconds = [0.0] * cfg.n_stages
        for c, (s, e) in enumerate(self.bounds):
            cost = sum(self.layer_costs[s:e]) if self.layer_costs is not None else None
            per_rank_seconds[self.owners[c]] += cost or 0.0
            names = self.layer_names[s:e]
            label = (
                f"{s}-{e - 1} " + ",".join(names)
                if len(names) <= 4
                else f"{s}-{e - 1} {names[0]}..{names[-1]}"
            )
            chunks.append(
                ChunkReport(
                    stage=self.owners[c],
                    chunk=c,
                    layers=label,
                    n_layers=e - s,
                    parameters=self.parameters[c],
                    parameter_MiB=self.parameter_bytes[c] / 2**20,
                    activation_MiB_per_microbatch=(
                        self.activation_bytes_per_row[c] * cfg.microbatch_rows / 2**20
                    ),
                    fwd_bwd_ms=None if cost is None else cost * 1e3,
                )
            )
        predicted = None
        if self.layer_costs is not None:
            slowest = max(per_rank_seconds)
            predicted = 1e3 * _schedules.theoretical_step_time(
                cfg.schedule,
                cfg.n_stages,
                cfg.n_microbatches,
                cfg.chunks_per_stage,
                slowest / 3,
                2 * slowest / 3,
            )
        return PlanReport(
            schedule=cfg.schedule,
            n_stages=cfg.n_stages,
            chunks_per_stage=cfg.chunks_per_stage,
            n_microbatches=cfg.n_microbatches,
            microbatch_rows=cfg.microbatch_rows,
            batch_rows=cfg.batch_rows,
            launcher=cfg.launcher,
            devices=cfg.devices,
            chunks=chunks,
            bubble=_schedules.bubble_fraction(
                cfg.schedule, cfg.n_stages, cfg.n_microbatches, cfg.chunks_per_stage
            ),
            predicted_step_ms=predicted,
            n_replicas=cfg.n_replicas,
            tensor_parallel=cfg.tensor_parallel,
            shard=cfg.shard,
            clips_gradients=cfg.clips_gradients,
            stage_MiB=[b / 2**20 for b in self.stage_bytes()],
            mesh=[
                {
                    "rank": rank,
                    "replica": cfg.replica_of(rank),
                    "stage": cfg.stage_of(rank),
                    "tensor": cfg.tensor_of(rank),
                    "device": cfg.devices[rank] if rank < len(cfg.devices) else cfg.devices[0],
                }
                for rank in range(cfg.world_size)
            ],
        )


def make_plan(
    module: nn.Module,
    config: PipelineConfig,
    sample: torch.Tensor,
    sizes: tuple[int, ...] | None = None,
) -> Plan:
    """Split ``module`` for ``config``; ``sample`` (a few rows of X) is what the chunks are
    measured on. Nothing of ``module`` changes: measuring runs on copies. ``sizes``: the layers
    per chunk the planner predicted for (its split is taken, not measured again); else
    ``config.balance`` splits."""
    named, trace = split_network(
        module, config.n_chunks, tuple(sample.shape[1:]), sample.dtype
    )
    layers = [layer for _, layer in named]
    split, costs = balance_sizes(
        layers,
        config.n_chunks,
        config.balance if sizes is None else sizes,
        sample[: config.microbatch_rows],
        config.devices[0],
        traced=trace is not None,
    )
    bounds = chunk_bounds(split)
    _check_unshared(named, bounds)
    # one stage: any module, whatever it does inside; its output shape is measured below
    shapes = boundary_shapes(layers, bounds, sample.shape[1]) if config.n_chunks > 1 else None
    names, counts, nbytes, act, split, largest = [], [], [], [], [], []
    x = microbatch_of(sample, config.microbatch_rows)
    for s, e in bounds:
        chunk = nn.Sequential(*layers[s:e])
        params = list(chunk.named_parameters())
        names.append(tuple(_qualified(named, s, local) for local, _ in params))
        counts.append(sum(p.numel() for _, p in params))
        nbytes.append(sum(p.numel() * p.element_size() for _, p in params))
        split.append(sum(
            p.numel() * p.element_size()
            for name, (_, p) in zip(names[-1], params, strict=True)
            if split_parameter(style_of(config.tp_plan, name.rpartition(".")[0]),
                               name.rpartition(".")[2])
        ))
        largest.append(max(
            (sum(p.numel() * p.element_size() for p in unit.parameters())
             for unit in shard_units(chunk)), default=0
        ))
        held, x = activation_bytes(chunk, x)
        act.append(held / leaves(x)[0].shape[0])
    if shapes is None:  # one chunk: the whole network, whose output the loss takes
        check_boundary(x, config.microbatch_rows, f"module {type(module).__name__}", last=True)
        shapes = [tuple(sample.shape[1:]), as_boundary(x)]
    return Plan(
        config=config,
        n_layers=len(layers),
        bounds=tuple(bounds),
        shapes=tuple(shapes),
        owners=tuple(config.owner(c) for c in range(config.n_chunks)),
        parameters=tuple(counts),
        parameter_bytes=tuple(nbytes),
        parameter_names=tuple(names),
        activation_bytes_per_row=tuple(act),
        layer_names=tuple(getattr(layer, "label", type(layer).__name__) for layer in layers),
        layer_costs=None if costs is None else tuple(costs),
        trace=trace,
        split_bytes=tuple(split),
        largest_layer_bytes=tuple(largest),
    )


def _check_unshared(named: list[tuple[str, nn.Module]], bounds: list[tuple[int, int]]) -> None:
    """Refuse a tensor that two chunks would hold: each stage would train its own copy."""
    if len(bounds) < 2:
        return
    home: dict[int, tuple[int, str]] = {}
    for c, (s, e) in enumerate(bounds):
        for i in range(s, e):
            prefix, layer = named[i]
            for local, t in layer.named_parameters(remove_duplicate=False):
                full = f"{prefix}.{local}" if prefix else local
                first = home.setdefault(id(t), (c, full))
                if first[0] != c:
                    also = f" (also named {first[1]!r})" if first[1] != full else ""
                    raise ValueError(
                        f"parameter {full!r}{also} is used by pipeline chunk "
                        f"{first[0]} and chunk {c}: a tensor lives in one stage, and two "
                        "stages would each train their own copy. Keep the layers that share it "
                        "in one chunk (move the split point or pass balance), or untie them."
                    )


def rank_state_bytes(nbytes: float, largest: float, config: PipelineConfig,
                     copies: float) -> float:
    """The training state one rank holds of ``nbytes`` parameter bytes (its tensor shard's;
    ``largest``: its largest layer's), ``copies`` of it unsharded (weights, gradients, Adam's
    two moments, stashed versions): with ``shard='optimizer'`` all but the weights are 1/k per
    replica, with ``'full'`` everything, plus the largest layer's weights and gradient gathered
    at once."""
    k = config.n_replicas
    if config.shard == "optimizer":
        return nbytes + (copies - 1) * nbytes / k
    if config.shard == "full":
        return copies * nbytes / k + 2 * largest
    return copies * nbytes


def _qualified(named: list[tuple[str, nn.Module]], start: int, local: str) -> str:
    """``'3.weight'`` of a chunk starting at layer ``start`` -> its name in the whole network."""
    index, _, rest = local.partition(".")
    prefix = named[start + int(index)][0]
    return f"{prefix}.{rest}" if prefix else rest


def microbatch_of(sample: torch.Tensor, rows: int) -> torch.Tensor:
    """A full micro-batch of ``rows`` rows from ``sample`` (its rows repeated when too few)."""
    x = sample[:rows]
    if x.shape[0] < rows:
        reps = -(-rows // max(1, x.shape[0]))
        x = x.repeat((reps,) + (1,) * (x.dim() - 1))[:rows]
    return x


def activation_bytes(chunk: nn.Module, x: Any) -> tuple[float, Any]:
    """Bytes a chunk holds for backward on micro-batch ``x``, and its output; measured on a CPU
    copy in train mode under a forked random generator (the chunk itself is untouched). A
    chunk still on the meta device is measured there (sizes only: nothing is allocated), and
    gives a meta output; where meta cannot run it, on a real copy."""
    if is_deferred(chunk):
        try:
            return _measure_held(deepcopy(chunk).train(), map_boundary(x, lambda t: t.to("meta")))
        except (NotImplementedError, RuntimeError):
            pass  # a layer meta cannot run: measured for real below
    # a chunk before measured on meta left sizes only: zeros of those sizes
    x = map_boundary(x, lambda t: torch.zeros(t.shape, dtype=t.dtype) if t.is_meta else t)
    return _measure_held(real_copy(chunk).cpu().train(), x)


def _measure_held(copy: nn.Module, x: Any) -> tuple[float, Any]:
    meter = ActivationMeter(copy.parameters())
    inp = fresh_inputs(x)
    with torch.random.fork_rng(devices=[]), meter.track():
        out = copy(inp)
    backward_from(out)
    del copy
    return float(meter.peak), map_boundary(out, torch.Tensor.detach)
