"""What a pipelined step's actions cost (each chunk's forward and backward at a micro-batch's
rows, with what its messages cost beside them and what recomputation adds), and what the step
pays besides them: each stage's optimizer step after its last action, the replicas' gradient
sum, and on ``spawn`` the driver's step message and reply."""

from __future__ import annotations

from typing import Any

from ..plan._config import PipelineConfig
from ._measure import LayerProfile, MessageCost, OptimizerCost
from ._simulate import ChunkCost


def stage_sums(
    per_layer: tuple[float, ...] | tuple[int, ...],
    bounds: list[tuple[int, int]],
    owners: list[int],
    n_stages: int,
) -> list[float]:
    """``per_layer`` summed over each stage's chunks (``owners[c]``: chunk c's stage)."""
    out = [0.0] * n_stages
    for (s, e), owner in zip(bounds, owners, strict=True):
        out[owner] += float(sum(per_layer[s:e]))
    return out


def optimizer_finish(
    profile: LayerProfile,
    config: PipelineConfig,
    bounds: list[tuple[int, int]],
    owners: list[int],
    sim: Any,
    optimizer: OptimizerCost | None,
) -> float:
    """When the last stage's optimizer step ends: each stage steps its own parameters after
    its last action (all of them one after the other where one process holds every stage)."""
    if optimizer is None or not sim.finish_seconds:
        return float(sim.step_seconds)
    nbytes = [
        stepped_bytes(b, config)
        for b in stage_sums(profile.parameter_bytes, bounds, owners, config.n_stages)
    ]
    tensors = stage_sums(profile.parameter_tensors, bounds, owners, config.n_stages)
    steps = [optimizer.seconds(b, int(t)) for b, t in zip(nbytes, tensors, strict=True)]
    if len(sim.finish_seconds) == 1:  # 'local': one process steps every stage
        return float(sim.finish_seconds[0]) + sum(steps)
    return max(f + o for f, o in zip(sim.finish_seconds, steps, strict=True))


def stepped_bytes(nbytes: float, config: PipelineConfig) -> float:
    """Of a stage's parameter bytes (its tensor shard's), what its optimizer steps: 1/k where
    the replicas shard their state."""
    return nbytes / config.n_replicas if config.shard != "none" else nbytes


def contention(
    profile: LayerProfile,
    bounds: list[tuple[int, int]],
    owners: list[int],
    c: int,
    rows: int,
    message: MessageCost,
) -> float:
    """What chunk ``c``'s forward (or backward) loses to its messages: it sends its output
    (the gradient of its input) to another process and receives its input (its output's
    gradient) from another, each at the measured compute lost per byte."""
    s, e = bounds[c]
    out = rows * profile.output_bytes_per_row[e - 1]
    inp = rows * (profile.output_bytes_per_row[s - 1] if s else 0.0)
    lost = 0.0
    if c + 1 < len(bounds) and owners[c + 1] != owners[c]:
        lost += out * message.send_per_byte
    if c > 0 and owners[c - 1] != owners[c]:
        lost += inp * message.receive_per_byte
    return lost


# what the replicas' gradient sum sends at a time (parallel._replicas.BUCKET_BYTES)
REPLICA_BUCKET_BYTES = 4 * 2**20


def ring_seconds(nbytes: float, k: int, message: MessageCost) -> float:
    """A ring all-reduce of ``nbytes`` over ``k`` replicas: 2 (k - 1) messages' latency, and
    2 (k - 1) / k of the bytes sent, at the measured message cost."""
    return 2 * (k - 1) * message.latency + 2 * (k - 1) / k * nbytes * message.per_byte


def replica_sum_seconds(
    profile: LayerProfile,
    config: PipelineConfig,
    bounds: list[tuple[int, int]],
    owners: list[int],
    spec: Any,
    message: MessageCost,
    busy: list[float],
) -> float:
    """What a step waits for the replicas' gradient sum after its schedule: a ring all-reduce
    of each stage's gradient bytes (2 (k-1)/k of them sent, at the measured message cost).
    Zero-bubble schedules sum after their last weight gradient: all of it waits. The others
    sum bucket by bucket while the backward runs: what the backward (half of a stage's busy
    time) does not hide waits, and at least the last bucket."""
    k = config.n_replicas
    if k < 2 or config.shard != "none":  # sharded: reduce-scattered in each backward
        return 0.0
    grads = stage_sums(profile.parameter_bytes, bounds, owners, config.n_stages)

    def ring(nbytes: float) -> float:
        return ring_seconds(nbytes, k, message)

    waits = []
    for rank, nbytes in enumerate(grads):
        if spec.zero_bubble:
            waits.append(ring(nbytes))
        else:
            hidden = busy[rank] / 2
            waits.append(max(ring(min(nbytes, REPLICA_BUCKET_BYTES)), ring(nbytes) - hidden))
    return max(waits)


def driver_message_seconds(
    profile: LayerProfile, config: PipelineConfig, message: MessageCost
) -> float:
    """The driver's step message (the batch's inputs to the first stage) and the reply (the
    last stage's outputs), which the schedule waits for: each a message of the share's rows."""
    rows = config.share_rows
    out = profile.output_bytes_per_row[-1] if profile.output_bytes_per_row else 0.0
    return 2 * message.latency + rows * (profile.input_bytes_per_row + out) * message.per_byte


def chunk_costs(
    profile: LayerProfile,
    config: PipelineConfig,
    spec: Any,
    rows: int,
    bounds: list[tuple[int, int]],
    owners: list[int],
    message: MessageCost,
    local: bool,
) -> tuple[list[ChunkCost], list[float]]:
    """Each chunk's costs per micro-batch of ``rows`` rows under schedule ``spec``, and per
    stage the activations of the one micro-batch a recomputing backward rebuilds."""
    layer_costs = profile.costs(rows)
    o = message.per_action  # torch's time per action, the messages' latency included
    recompute = config.checkpoint == "always"
    rebuilt = [0.0] * config.n_stages
    costs = []
    for c, (s, e) in enumerate(bounds):
        f, i, w, b = (sum(layer[k] for layer in layer_costs[s:e]) for k in range(4))
        if not local:  # messages to and from other processes slow the compute beside them
            f, i, b = (t + contention(profile, bounds, owners, c, rows, message)
                       for t in (f, i, b))
        act = rows * sum(profile.activation_bytes_per_row[s:e])
        held = act
        if recompute:  # each micro-batch holds its input; the backward runs the forward again
            entering = profile.output_bytes_per_row[s - 1] if s else profile.input_bytes_per_row
            held = rows * entering
            if c == len(bounds) - 1:  # the loss keeps the output it was computed on
                held = min(act, held + rows * profile.output_bytes_per_row[e - 1])
            rebuilt[owners[c]] = max(rebuilt[owners[c]], act)
            i, b = i + f, b + f
        # a split backward is two actions, so 'I' and 'W' each pay the per-action time
        costs.append(
            ChunkCost(
                f + o, i + o, w + o, held,
                full_backward=None if spec.zero_bubble else b + o,
            )
        )
    return costs, rebuilt
