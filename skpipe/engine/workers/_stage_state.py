"""What a stage host holds, read and written: its chunks' tensors and optimizer state, whole
(gathered from the tensor and replica shards where they are split), the weights callbacks
change, and its part of a checkpoint."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from ..parallel._sharding import assign, map_dtensors, place_optimizer_state, whole
from ..plan._config import PipelineConfig
from ..state._stream import LazyTensor
from ..state._named import (
    cpu_copy,
    read_state_files,
    stage_state,
    state_by_name,
    write_state_file,
)


class StageState:
    """The state half of ``StageHost`` (see there for the attributes)."""

    config: PipelineConfig
    chunks: dict[int, Any]
    chunk_ids: list[int]
    optimizer: torch.optim.Optimizer
    owns_state: bool
    pipe: Any
    rank: int

    @property
    def schedule_name(self) -> str:
        raise NotImplementedError

    def set_weights(
        self,
        values: dict[int, dict[str, torch.Tensor]],
        requires_grad: dict[int, dict[str, bool]],
    ) -> None:
        """Copy changed tensors into the chunks and set which parameters train."""
        with torch.no_grad():
            for c, state in values.items():
                own = self.chunks[c].layers.state_dict(keep_vars=True)
                for key, value in state.items():
                    assign(own[key], value)
        if self.pipe:  # between epochs: the versions the next forwards use take them too
            self.pipe.write_versions({f"layers.{k}": v for state in values.values()
                                      for k, v in state.items()})
        for c, flags in requires_grad.items():
            for key, p in self.chunks[c].layers.named_parameters():
                if key in flags:
                    p.requires_grad_(flags[key])

    def state_dicts(self, lazy: bool = False) -> dict[int, dict[str, torch.Tensor]]:
        """Each chunk's layer parameters and buffers, on the CPU. Where the state is split
        over ranks (``config.collective_state``) every rank of the stage must call this: the
        owner gets each tensor whole, the others nothing (see ``_gathered``)."""
        if not self.config.collective_state:
            return {
                c: {k: v.detach().cpu() for k, v in self.chunks[c].layers.state_dict().items()}
                for c in self.chunk_ids
            }
        own = {c: dict(self.chunks[c].layers.state_dict()) for c in self.chunk_ids}
        return self._gathered(own, lazy) or {}

    def optimizer_state(self, copy: bool = True, lazy: bool = False) -> dict[str, Any]:
        """This host's optimizer state dict: a copy on the CPU, or (``copy=False``, for
        streaming it away tensor by tensor) the live tensors themselves; whole where it is
        split over ranks, on the owner (every rank of the stage calls this; see state_dicts)."""
        state = self.optimizer.state_dict()
        if self.config.collective_state:
            state = self._gathered(state, lazy) or {"state": {}, "param_groups": []}
        return cpu_copy(state) if copy else state

    def _gathered(self, state: Any, lazy: bool) -> Any:
        """``state`` with each DTensor whole: on the owner gathered now, or (``lazy``) a
        ``LazyTensor`` gathered when the reply streams it, so that the owner holds one whole
        tensor at a time; on the stage's other ranks each is gathered now, in the same order
        (their part of every gathering), and dropped: None."""
        if not self.owns_state:
            map_dtensors(state, _gather_and_drop)
            return None
        if not lazy:
            return map_dtensors(state, _whole_on_cpu)
        return map_dtensors(state, _gathered_when_read)

    def load_state(
        self, chunk_states: dict[int, dict[str, torch.Tensor]], optimizer_state: dict[str, Any]
    ) -> None:
        """Put saved parameters (and the optimizer's state) back into this host's chunks
        (whole tensors: each rank keeps its shard)."""
        for c, state in chunk_states.items():
            own = self.chunks[c].layers.state_dict(keep_vars=True)
            if set(own) != set(state):
                self.chunks[c].layers.load_state_dict(state)  # its error names the keys
            for key, value in state.items():
                assign(own[key], value)
        self.optimizer.load_state_dict(optimizer_state)
        place_optimizer_state(self.optimizer)

    def save_part(
        self, path: str, names: dict[int, dict[str, str]], parameter_names: Sequence[str]
    ) -> None:
        """Write this host's checkpoint part: its tensors under their names in the whole
        network (``names``: per chunk, state-dict key -> name), its optimizer's state by
        parameter name."""
        module = {
            names[c][k]: v for c, state in self.state_dicts().items() for k, v in state.items()
        }
        optimizer = self.optimizer_state(copy=False)
        if not self.owns_state and self.config.collective_state:
            return  # its shards were gathered by the owner, which writes the part
        optimizer = state_by_name(optimizer, parameter_names)
        # an asynchronous stage also keeps the weight versions its rule still needs
        write_state_file(path, module, optimizer, self.pipe.stash() if self.pipe else None)

    def load_parts(
        self, paths: Sequence[str], names: dict[int, dict[str, str]], parameter_names: Sequence[str]
    ) -> None:
        """Take this host's tensors and optimizer state, by name, from checkpoint parts (and
        an asynchronous stage its stash: its weight versions and the fit's batch count)."""
        saved = read_state_files(paths)
        self.load_state(*stage_state(saved, names, parameter_names))
        if self.pipe is not None:
            mine = [s for s in saved["stashes"] if s["stage"] == self.rank]
            if not mine:
                raise ValueError(
                    f"the checkpoint holds no weight versions for stage {self.rank}: it was not "
                    f"written by schedule {self.schedule_name!r}, which needs them to resume"
                )
            self.pipe.load_stash(mine[0])


def _gather_and_drop(t: Any) -> None:
    whole(t)  # this rank's part of the gathering; the owner keeps the result


def _whole_on_cpu(t: Any) -> torch.Tensor:
    return whole(t).detach().cpu()


def _gathered_when_read(t: Any) -> LazyTensor:
    return LazyTensor(tuple(t.shape), t.dtype, lambda: _whole_on_cpu(t))
