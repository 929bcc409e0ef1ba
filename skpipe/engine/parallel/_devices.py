"""Which device each pipeline rank uses, and how many CPU threads each worker gets."""

from __future__ import annotations

import os
from collections.abc import Sequence

import torch


def resolve_devices(
    devices: str | Sequence[str],
    n_stages: int,
    launcher: str,
    n_replicas: int = 1,
    tensor_parallel: int = 1,
) -> tuple[str, ...]:
    """One device string per rank (``n_replicas x n_stages`` of them; rank
    ``replica * n_stages + stage``).

    ``'auto'``: one GPU per rank when at least that many GPUs exist; every stage on the one
    GPU when the stages share this process (``launcher='local'`` or one stage); under
    ``torchrun`` a GPU per rank (its ``LOCAL_RANK``) whenever this machine has one; else the CPU.
    A list names the devices in rank order; with one rank its first entry is used.
    """
    n_ranks = n_stages * n_replicas * tensor_parallel
    n_gpus = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if isinstance(devices, str):
        if devices != "auto":
            devices = [devices]
        else:
            if n_gpus >= n_ranks:
                return tuple(f"cuda:{i}" for i in range(n_ranks))
            if n_gpus >= 1 and launcher in ("local", "single"):
                return ("cuda:0",) * n_ranks
            if n_gpus >= 1 and launcher == "torchrun":
                # a job's ranks span machines: each rank takes the GPU its LOCAL_RANK names
                return ("cuda:0",) * n_ranks
            return ("cpu",) * n_ranks
    devices = list(devices)
    if len(devices) == 0:
        raise ValueError("devices is an empty list; give 'auto' or at least one device.")
    out = []
    for d in devices:
        try:
            dev = torch.device(d)
        except (RuntimeError, TypeError) as exc:
            raise ValueError(f"devices entry {d!r} is not a torch device ({exc}).") from None
        if dev.type == "cuda":
            index = dev.index if dev.index is not None else 0
            if index >= n_gpus:
                raise ValueError(
                    f"devices entry {d!r} names a GPU this machine does not have "
                    f"({n_gpus} CUDA device(s) visible)."
                )
            out.append(f"cuda:{index}")
        else:
            out.append(d if dev.type == "cpu" else str(dev))
    if n_ranks == 1:
        return (out[0],)
    if launcher == "local" and len(out) == 1:
        return (out[0],) * n_stages
    if len(out) < n_ranks:
        if tensor_parallel > 1:
            raise ValueError(
                f"n_replicas ({n_replicas}) x n_stages ({n_stages}) x tensor_parallel "
                f"({tensor_parallel}) needs {n_ranks} devices, one per rank in the order "
                f"(replica, stage, tensor shard); devices lists {len(out)}: {out}. List more, or "
                "lower tensor_parallel, n_stages or n_replicas."
            )
        if n_replicas == 1:
            raise ValueError(
                f"n_stages ({n_stages}) is larger than the number of devices given ({len(out)}: "
                f"{out}); list one device per stage or lower n_stages."
            )
        raise ValueError(
            f"n_replicas ({n_replicas}) x n_stages ({n_stages}) needs {n_ranks} devices, one per "
            f"(replica, stage) in the order replica 0's stages, replica 1's, ...; devices lists "
            f"{len(out)}: {out}. List more, or lower n_replicas or n_stages."
        )
    return tuple(out[:n_ranks])


def execution_devices(devices: Sequence[str]) -> tuple[str, ...]:
    """Where tensors go: a CPU "device" with an index (a lease name such as 'cpu:1') is the CPU."""
    return tuple("cpu" if d.startswith("cpu") else d for d in devices)


def auto_gpu_pool(requested: str | Sequence[str], devices: Sequence[str]) -> tuple[str, ...] | None:
    """With devices='auto' on several GPUs, the GPUs a lease may choose from; else None."""
    if requested != "auto" or not devices or not devices[0].startswith("cuda"):
        return None
    if len(set(devices)) != len(devices):  # every stage on one GPU: that GPU
        return None
    return tuple(f"cuda:{i}" for i in range(torch.cuda.device_count()))


def threads_per_worker(n_workers: int) -> int:
    """CPU threads for each worker so that the fit does not oversubscribe its share of cores.

    The share is the cores this process may use, or fewer when a thread limit was set for it
    (joblib's loky workers get OMP_NUM_THREADS = cores // n_jobs), split among the workers.
    """
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover - not Linux
        cores = os.cpu_count() or 1
    limit = os.environ.get("OMP_NUM_THREADS")
    if limit and limit.isdigit() and int(limit) > 0:
        cores = min(cores, int(limit))
    return max(1, cores // n_workers)
