"""The driver <-> stage-worker protocol, defined once: one dataclass per message, with its fields.

The driver sends a message to every rank and gathers one reply per rank
(``WorkerGroup.ask_all``); the worker looks the message's type up in its dispatch table
(``_worker_main.HANDLERS``). Replies are ``Ok(payload)`` or ``Failed(traceback)``. Tensors travel
as numpy arrays: pickle protocol 5 copies their buffers directly, where torch's own pickling of
tensors costs more per message. ``Setup`` carries the user's modules and goes by cloudpickle, so
classes defined in ``__main__`` or a notebook cell travel too.
"""

from __future__ import annotations

import pickle
from dataclasses import dataclass
from typing import Any, ClassVar

import cloudpickle


@dataclass(frozen=True)
class Message:
    """Base of every driver -> worker message."""

    by_value: ClassVar[bool] = False  # True: cloudpickle (user classes travel by value)


@dataclass(frozen=True)
class Setup(Message):
    """Build this rank's stages: its chunks of the plan, the schedule and the optimizer."""

    by_value: ClassVar[bool] = True
    chunks: dict[int, Any]  # chunk index -> nn.Sequential of its layers
    config: Any  # PipelineConfig
    spec: Any  # TrainSpec
    shapes: list[Any]  # per boundary: one tensor's per-row shape, or a _partition.TensorTuple
    device: str
    seed: int
    program: Any = None  # _construct.Program giving meta chunks their values, or None
    tensor_styles: Any = None  # per chunk: parallelize_module's plan (parallel._tensor)


@dataclass(frozen=True)
class Step(Message):
    """One optimizer step; ``x`` goes to the rank of the first chunk, ``y`` (and the rows'
    sample weights ``w``, if any) to the last. With replicas, each replica's ranks get its share
    of ``n_real`` rows, and the whole batch's rows and weight (``total_rows``,
    ``total_weight``)."""

    x: Any  # numpy array or None
    y: Any
    n_real: int
    w: Any = None
    total_rows: int | None = None
    total_weight: float | None = None
    hyper: list[dict[str, Any]] | None = None  # the optimizer's new settings, when changed
    denominator: float | None = None  # the batch's class-weight sum (class-weighted means)


@dataclass(frozen=True)
class AsyncBegin(Message):
    """An asynchronous schedule's epoch of ``n_batches`` batches begins (its pipeline fills)."""

    n_batches: int


@dataclass(frozen=True)
class AsyncStep(Message):
    """The next batch of an asynchronous epoch: the settings of its update (None: unchanged),
    its rows (a ``Step`` record; None when they went ahead with the previous step) and the
    next batch's, ahead (None at the epoch's end). Reply, where the last chunk lives: the
    batch's (loss, outputs); elsewhere None, at once."""

    hyper: list[dict[str, Any]] | None
    now: Step | None
    ahead: Step | None


@dataclass(frozen=True)
class SyncStep(Message):
    """A synchronous step whose next batch goes along (``Step`` records): the rank updates with
    ``now``'s gradients (None: the batch that went ahead with the previous ``SyncStep``, whose
    forward and backward the rank computed after replying to it) and the settings ``hyper``
    (None: unchanged), replies as ``Step`` does, then computes ``ahead``'s forward and backward
    (None: the epoch's last batch) while the driver runs its callbacks."""

    hyper: list[dict[str, Any]] | None
    now: Step | None
    ahead: Step | None


@dataclass(frozen=True)
class AsyncEnd(Message):
    """Reply once the epoch's pipeline drained (every update done)."""


@dataclass(frozen=True)
class Forward(Message):
    """Forward only, in eval mode, for ``n_rows`` rows."""

    x: Any
    n_rows: int


@dataclass(frozen=True)
class Reset(Message):
    """Drop the stages (a warm worker waiting for its next fit) and free device memory."""


@dataclass(frozen=True)
class GetState(Message):
    """Reply: (this rank's chunk state dicts, its optimizer's state dict), on the CPU."""


@dataclass(frozen=True)
class SetState(Message):
    chunks: dict[int, Any]
    optimizer: dict[str, Any]


@dataclass(frozen=True)
class SaveStage(Message):
    """Write this rank's checkpoint part to ``path``: its tensors under their names in the
    whole network (``names``: per chunk, state-dict key -> name) and its optimizer's state
    keyed by ``parameter_names``."""

    path: str
    names: dict[int, dict[str, str]]
    parameter_names: list[str]


@dataclass(frozen=True)
class LoadStage(Message):
    """Take this rank's tensors and optimizer state from the checkpoint parts ``paths``."""

    paths: list[str]
    names: dict[int, dict[str, str]]
    parameter_names: list[str]


@dataclass(frozen=True)
class Hyper(Message):
    """Give the optimizer the settings ``groups`` (None: leave them). Reply: its settings."""

    groups: list[dict[str, Any]] | None = None


@dataclass(frozen=True)
class SetWeights(Message):
    """Copy what a callback changed into this rank's chunks: per chunk, state-dict key ->
    tensor (changed values) and parameter key -> requires_grad (all parameters)."""

    values: dict[int, dict[str, Any]]
    requires_grad: dict[int, dict[str, bool]]


@dataclass(frozen=True)
class DropTrainingState(Message):
    """Free the gradients and the optimizer's state: the fit is over, only weights will be
    asked for."""


@dataclass(frozen=True)
class Collect(Message):
    """Reply: this rank's chunk state dicts (the trained weights), on the CPU."""


@dataclass(frozen=True)
class RecordTimeline(Message):
    steps: int


@dataclass(frozen=True)
class Spans(Message):
    """Reply: the recorded timeline spans of this rank."""


@dataclass(frozen=True)
class TrackMemory(Message):
    on: bool


@dataclass(frozen=True)
class Stats(Message):
    """Reply: ``{'peak_activation_bytes': ...}`` of this rank (after ``TrackMemory``)."""


@dataclass(frozen=True)
class Close(Message):
    """Exit (no reply)."""


@dataclass(frozen=True)
class Ok:
    payload: Any


@dataclass(frozen=True)
class Streamed:
    """The payload of a reply whose tensors follow it on the channel as raw bytes, one tensor
    after another (``state._stream.write_tensors``): ``skeleton`` is the payload with a
    ``state._stream.TensorSlot`` in each tensor's place. Big states (the trained weights, optimizer
    moments) travel this way: no pickled copy on either side."""

    skeleton: Any


@dataclass(frozen=True)
class Failed:
    traceback: str


def encode(obj: Message | Ok | Failed) -> bytes:
    if isinstance(obj, Message) and obj.by_value:
        return cloudpickle.dumps(obj)
    return pickle.dumps(obj, protocol=5)


def decode(data: bytes) -> Any:
    return pickle.loads(data)
