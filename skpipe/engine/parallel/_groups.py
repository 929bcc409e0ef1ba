"""Process groups, in one place: a world of one for ``local``, a spawned worker's world, and the
world of a ``torchrun`` job.

The module remembers whether it made this process's one-process group itself (for
``launcher='local'``): such a group is not a job's world and must never be taken for one.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist

_made_local_world = False


def backend_for(device: str) -> str:
    return "nccl" if device.startswith("cuda") else "gloo"


def _world() -> dist.ProcessGroup:
    group = dist.group.WORLD
    if group is None:  # pragma: no cover - initialised just before
        raise RuntimeError("torch.distributed has no default process group")
    return group


def local_world(device: str) -> dist.ProcessGroup:
    """A world-size-1 default group for stages that all live in this process."""
    global _made_local_world
    if dist.is_initialized():
        if dist.get_world_size() != 1:
            raise RuntimeError(
                f"launcher='local' runs every stage in this process, but a process group of "
                f"world size {dist.get_world_size()} is already initialized (torchrun?); use "
                "launcher='torchrun' or 'auto'."
            )
        return _world()
    dist.init_process_group(backend_for(device), store=dist.HashStore(), rank=0, world_size=1)
    _made_local_world = True
    return _world()


def job_world(
    device: str, n_stages: int, n_replicas: int = 1, tensor_parallel: int = 1
) -> dist.ProcessGroup:
    """The world of a torchrun (or otherwise launched) job, initialised from its environment
    when needed; its size must be ``n_replicas x n_stages x tensor_parallel``."""
    if _made_local_world or not dist.is_initialized():
        if "RANK" not in os.environ or _made_local_world:
            raise RuntimeError(
                "launcher='torchrun' needs a process group of the job's processes: run the script "
                "under torchrun (or call torch.distributed.init_process_group first), or use "
                "launcher='spawn'. (A one-process group made for launcher='local' is not one.)"
            )
        dist.init_process_group(backend_for(device))
    world = dist.get_world_size()
    if world == n_stages * n_replicas * tensor_parallel:
        return _world()
    if tensor_parallel == 1 and n_replicas == 1:
        hint = "set n_stages to the number of processes of the job"
        if world % n_stages == 0:
            hint += f", or n_replicas={world // n_stages} to run that many pipelines"
        raise ValueError(
            f"n_stages ({n_stages}) must equal the torchrun world size ({world}) with "
            f"launcher='torchrun' and n_replicas=1; {hint}."
        )
    pipeline = n_stages * tensor_parallel  # the processes of one replica
    factors = f"n_replicas ({n_replicas}) x n_stages ({n_stages})"
    shape, holds = f"pipelines of {n_stages}", "one stage of one replica"
    if tensor_parallel > 1:
        factors += f" x tensor_parallel ({tensor_parallel})"
        shape = f"pipelines of {n_stages} stages x {tensor_parallel} tensor shards"
        holds = "one tensor shard of one stage of one replica"
    raise ValueError(
        f"{factors} = {n_replicas * pipeline} processes, but the torchrun world size is {world}; "
        f"with launcher='torchrun' every process holds {holds}"
        + (
            f": n_replicas={world // pipeline} fits this job."
            if world % pipeline == 0
            else f", and {world} processes cannot be split into {shape}."
        )
    )


def job_active() -> bool:
    """True when a job's process group exists or torchrun's environment says one should."""
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        return True
    return "TORCHELASTIC_RUN_ID" in os.environ and int(os.environ.get("WORLD_SIZE", "1")) > 1


def worker_world(
    store_path: str, rank: int, size: int, device: str, timeout: float
) -> dist.ProcessGroup:
    """The group of a spawned pipeline's workers, joined through a FileStore in the driver's
    private folder (a TCPStore server would listen on every interface). Joined once per process:
    a warm worker keeps its group across fits."""
    if not dist.is_initialized():
        dist.init_process_group(
            backend_for(device),
            store=dist.FileStore(store_path, size),
            rank=rank,
            world_size=size,
            timeout=timedelta(seconds=max(timeout, 120.0)),
        )
    return _world()


@dataclass(frozen=True)
class MeshGroups:
    """One rank's view of the (replica x stage x tensor) mesh.

    ``pipeline``: its pipeline's stages (the group its PipelineStages talk in: the ranks of the
    same replica and tensor shard); ``replicas``: the same stage and shard of every replica (the
    group gradients are summed over; None with one replica); ``tensor`` / ``replica_mesh``: the
    one-dimensional device meshes that torch's ``parallelize_module`` and ``fully_shard`` take
    (None where that dimension has size 1). Both come from one root mesh, so that FSDP2 over
    the replicas composes with the tensor shards (torch's 2D parallelism).
    """

    pipeline: dist.ProcessGroup
    replicas: dist.ProcessGroup | None
    tensor: Any = None
    replica_mesh: Any = None


_MESHES: dict[tuple[int, int, int, str], MeshGroups] = {}


def mesh_groups(
    n_replicas: int, n_stages: int, device: str, tensor_parallel: int = 1
) -> MeshGroups:
    """This rank's groups on the (replica x stage x tensor) mesh of the default group.

    Built with torch's ``init_device_mesh`` over the whole world (every rank calls this with
    the same shape); kept per shape, so that a warm worker does not make new groups each fit.
    """
    if n_replicas == 1 and tensor_parallel == 1:
        return MeshGroups(_world(), None)
    device_type = torch.device(device).type
    key = (n_replicas, n_stages, tensor_parallel, device_type)
    if key not in _MESHES:
        from torch.distributed.device_mesh import init_device_mesh

        world = dist.get_world_size()
        if world != n_replicas * n_stages * tensor_parallel:
            raise ValueError(
                f"n_replicas ({n_replicas}) x n_stages ({n_stages}) x tensor_parallel "
                f"({tensor_parallel}) = {n_replicas * n_stages * tensor_parallel} ranks, but the "
                f"process group has {world}."
            )
        mesh = init_device_mesh(
            device_type,
            (n_replicas, n_stages, tensor_parallel),
            mesh_dim_names=("replica", "stage", "tensor"),
        )
        _MESHES[key] = MeshGroups(
            pipeline=mesh.get_group("stage"),
            replicas=mesh.get_group("replica") if n_replicas > 1 else None,
            tensor=mesh["tensor"] if tensor_parallel > 1 else None,
            replica_mesh=mesh["replica"] if n_replicas > 1 else None,
        )
    return _MESHES[key]


_SIDE_GROUPS: dict[tuple[tuple[int, ...], ...], Any] = {}


def side_group(groups: list[list[int]]) -> Any:
    """This rank's group of ``groups`` (ranks of the default group, which cover it; every rank
    calls this with the same list), a group of its own: for the collectives that a thread issues
    while the main thread uses the usual groups (a group's collectives must come in one order on
    every rank). Kept per list, as the mesh's groups are."""
    key = tuple(tuple(g) for g in groups)
    if key not in _SIDE_GROUPS:
        mine, _ = dist.new_subgroups_by_enumeration([list(g) for g in key])
        _SIDE_GROUPS[key] = mine
    return _SIDE_GROUPS[key]


def broadcast_object(value: object, src: int = 0) -> object:
    """``value`` as rank ``src`` has it, on every rank of the default group (or as given,
    outside a multi-process group)."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return value
    box = [value]
    dist.broadcast_object_list(box, src=src)
    return box[0]
