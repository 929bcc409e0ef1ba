"""Every rank of a torchrun (or cluster-launched) job holds its own stage; all ranks run the same
loop over the same data, so each sees the same history and ends with the whole network."""

from __future__ import annotations

import os

import torch
import torch.distributed as dist
from torch import nn

from ._config import PipelineConfig, TrainSpec
from ._plan import make_plan
from ._runner import Runner, _cpu
from ._stage import StageHost


def ensure_world_group(config: PipelineConfig) -> dist.ProcessGroup:
    from . import _stage

    if _stage.LOCAL_GROUP_MADE or not dist.is_initialized():
        if "RANK" not in os.environ or _stage.LOCAL_GROUP_MADE:
            raise RuntimeError(
                "launcher='torchrun' needs a process group of the job's processes: run the script "
                "under torchrun (or call torch.distributed.init_process_group first), or use "
                "launcher='spawn'. (A one-process group made for launcher='local' is not one.)"
            )
        backend = "nccl" if config.devices[0].startswith("cuda") else "gloo"
        dist.init_process_group(backend)
    world = dist.get_world_size()
    if world != config.n_stages:
        raise ValueError(
            f"n_stages ({config.n_stages}) must equal the torchrun world size ({world}) with "
            "launcher='torchrun'; set n_stages to the number of processes per job."
        )
    group = dist.group.WORLD
    assert group is not None
    return group


class TorchrunRunner(Runner):
    def __init__(
        self, module: nn.Module, config: PipelineConfig, spec: TrainSpec, sample: torch.Tensor
    ) -> None:
        self.config = config
        self.module = module
        group = ensure_world_group(config)
        self.rank = dist.get_rank()
        self.plan, self.layers = make_plan(module, config, sample)
        chunks = {c: self.plan.chunk_layers(self.layers, c) for c in config.chunks_of(self.rank)}
        device = config.devices[self.rank] if config.devices[0] != "cpu" else "cpu"
        if device.startswith("cuda"):
            local = int(os.environ.get("LOCAL_RANK", self.rank))
            device = f"cuda:{local}"
            torch.cuda.set_device(device)
        self.device = device
        self.host = StageHost(
            chunks, config, spec, self.plan.shapes, rank=self.rank, device=device, group=group
        )
        self.last = config.owner(config.n_chunks - 1)
        self.out_shape = self.plan.shapes[-1]

    def _share(self, t: torch.Tensor | None, shape: tuple[int, ...]) -> torch.Tensor:
        """Broadcast a tensor from the rank holding the last chunk to every rank."""
        buf = t.contiguous() if t is not None else torch.empty(shape, device=self.device)
        dist.broadcast(buf, group_src=self.last)
        return buf.cpu()

    def train_step(self, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        n = x.shape[0]
        loss, out = self.host.train_step(x, y, n)
        loss = self._share(None if loss is None else loss.reshape(()).to(self.device), ())
        out = self._share(out, (n,) + self.out_shape)
        return loss, out

    def predict(self, x: torch.Tensor) -> torch.Tensor:
        n = x.shape[0]
        out = self.host.forward(x, n)
        return self._share(out, (n,) + self.out_shape)

    def record_timeline(self, steps: int) -> None:
        self.host.record_timeline(steps)

    def spans(self) -> list:
        everyone: list = [None] * dist.get_world_size()
        dist.all_gather_object(everyone, self.host.spans())
        return [s for spans in everyone for s in spans]

    def finish(self) -> None:
        mine = self.host.state_dicts()
        everyone: list[dict[int, dict[str, torch.Tensor]] | None] = [None] * dist.get_world_size()
        dist.all_gather_object(everyone, mine)
        self._load_chunks(everyone)
        self.module.to("cpu")

    def get_state(self) -> dict:
        mine = (self.host.state_dicts(), _cpu(self.host.optimizer.state_dict()))
        everyone: list = [None] * dist.get_world_size()
        dist.all_gather_object(everyone, mine)
        self._load_chunks(chunks for chunks, _ in everyone)
        return {"module": _cpu(self.module.state_dict()), "optimizers": [opt for _, opt in everyone]}

    def set_state(self, state: dict) -> None:
        self.module.load_state_dict(state["module"])
        chunks = {
            c: self.plan.chunk_layers(self.layers, c).state_dict() for c in self.config.chunks_of(self.rank)
        }
        self.host.load_state(chunks, state["optimizers"][self.rank])

    def close(self) -> None:
        self.host.close()


def agree_seed(seed: int) -> int:
    """Rank 0's seed on every rank, so that all ranks build the same network and batches."""
    if not (dist.is_available() and dist.is_initialized()):
        return seed
    box = [seed]
    dist.broadcast_object_list(box, src=0)
    return int(box[0])
