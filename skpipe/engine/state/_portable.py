"""Pickling a big network without a second copy of its weights."""

from __future__ import annotations

from copy import deepcopy
from typing import Any

import torch

from ..split._construct import named_tensors, put_tensor


class PortableModule:
    """Pickles a network as its structure (on the meta device) and one numpy array per tensor.

    Pickling an ``nn.Module`` directly keeps a bytes copy of every tensor in the pickler's memo
    until the end (peak memory: twice the weights); numpy arrays go with pickle protocol 5
    straight from the tensors' memory, and joblib writes them to its files as they are. Tied
    tensors stay tied.
    """

    def __init__(self, module: torch.nn.Module) -> None:
        self.module = module

    def __reduce__(self) -> tuple[Any, tuple[Any, ...]]:
        memo: dict[int, Any] = {}
        arrays: dict[str, Any] = {}
        by_id: dict[int, Any] = {}
        for name, t in named_tensors(self.module):
            if id(t) not in memo:
                meta = torch.empty_like(t, device="meta")
                memo[id(t)] = (
                    torch.nn.Parameter(meta, requires_grad=t.requires_grad)
                    if isinstance(t, torch.nn.Parameter)
                    else meta
                )
                by_id[id(t)] = _to_numpy(t)
            arrays[name] = by_id[id(t)]  # the same array object: pickled once
        skeleton = deepcopy(self.module, memo)
        return _rebuild_module, (skeleton, arrays)


_VIEWED = {torch.bfloat16: torch.int16, torch.float16: torch.int16}


def _to_numpy(t: torch.Tensor) -> tuple[Any, str]:
    t = t.detach()
    if t.dtype in _VIEWED:  # numpy has no bfloat16: its bits travel as int16
        return t.view(_VIEWED[t.dtype]).numpy(), str(t.dtype)
    return t.numpy(), ""


def _from_numpy(value: tuple[Any, str]) -> torch.Tensor:
    array, dtype = value
    t = torch.from_numpy(array)
    return t.view(getattr(torch, dtype.removeprefix("torch."))) if dtype else t


def _rebuild_module(skeleton: torch.nn.Module, arrays: dict[str, Any]) -> torch.nn.Module:
    done: dict[int, torch.Tensor] = {}
    made: dict[int, torch.Tensor] = {}
    for name, value in arrays.items():
        tensor = made.setdefault(id(value), _from_numpy(value))
        put_tensor(skeleton, name, tensor, done)
    return skeleton
