"""State that crosses processes: optimizer state keyed by parameter name (any split of the
network takes it back), tensors streamed as raw bytes, networks pickled as arrays."""

import os
import pickle
import socket
import threading
import tracemalloc

import pytest
import torch
from torch import nn

from skpipe.engine._state import (
    PortableModule,
    cpu_copy,
    join_tensors,
    merge_by_name,
    read_tensors,
    slots,
    split_tensors,
    state_by_name,
    state_for,
    write_tensors,
)


def trained(params):
    opt = torch.optim.Adam(params, lr=0.1)
    for p in params:
        p.grad = torch.ones_like(p)
    opt.step()
    return opt


def test_state_moves_between_splits():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(3, 4), nn.Linear(4, 2))
    names = [n for n, _ in net.named_parameters()]
    params = list(net.parameters())
    # split A: the whole network in one optimizer
    whole = trained(params)
    named = state_by_name(whole.state_dict(), names)
    # split B: two stages, the first holding the first three parameters
    first = torch.optim.Adam(params[:3], lr=0.5)
    first.load_state_dict(state_for(named, names[:3]))
    second = torch.optim.Adam(params[3:], lr=0.5)
    second.load_state_dict(state_for(named, names[3:]))
    assert first.param_groups[0]["lr"] == 0.1  # the saved settings win
    torch.testing.assert_close(second.state[params[3]]["exp_avg"], whole.state[params[3]]["exp_avg"])
    back = merge_by_name([state_by_name(first.state_dict(), names[:3]),
                          state_by_name(second.state_dict(), names[3:])])
    assert sorted(back["state"]) == sorted(names)
    for name in names:
        torch.testing.assert_close(back["state"][name]["exp_avg_sq"], named["state"][name]["exp_avg_sq"])


def test_cpu_copy_copies():
    t = torch.ones(2)
    c = cpu_copy({"a": [t]})
    c["a"][0].add_(1)
    assert t.tolist() == [1.0, 1.0]


def test_tensors_stream_through_a_socket_into_their_own_memory():
    payload = {
        0: {"weight": torch.randn(300, 70), "bias": torch.randn(70).to(torch.bfloat16)},
        "steps": torch.tensor(7),
        "empty": torch.zeros(0, 3),
        "strided": torch.arange(20.0).reshape(4, 5).t(),  # not contiguous
        "flags": torch.tensor([True, False]),
        "hyper": {"lr": 0.1, "betas": (0.9, 0.99)},
    }
    skeleton, tensors = split_tensors(payload)
    a, b = socket.socketpair()
    writer = threading.Thread(target=write_tensors, args=(a.fileno(), tensors))
    writer.start()
    got = read_tensors(b.fileno(), slots(skeleton))
    writer.join()
    a.close()
    b.close()
    back = join_tensors(skeleton, got)
    assert back["hyper"] == {"lr": 0.1, "betas": (0.9, 0.99)}
    for key in ("steps", "empty", "strided", "flags"):
        assert back[key].dtype == payload[key].dtype
        torch.testing.assert_close(back[key], payload[key], rtol=0, atol=0)
    torch.testing.assert_close(back[0]["bias"], payload[0]["bias"], rtol=0, atol=0)
    torch.testing.assert_close(back[0]["weight"], payload[0]["weight"], rtol=0, atol=0)


def test_a_sender_that_closes_midway_is_an_error():
    a, b = socket.socketpair()
    os.write(a.fileno(), b"\0" * 10)
    a.close()
    skeleton, _ = split_tensors({"w": torch.zeros(100)})
    with pytest.raises(EOFError):
        read_tensors(b.fileno(), slots(skeleton))
    b.close()


class Tied(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Linear(4, 4)
        self.b = nn.Linear(4, 4)
        self.b.weight = self.a.weight
        self.frozen = nn.Parameter(torch.ones(2), requires_grad=False)
        self.register_buffer("low", torch.randn(3).to(torch.bfloat16))


def test_a_pickled_network_comes_back_equal_and_tied():
    net = Tied()
    back = pickle.loads(pickle.dumps(PortableModule(net), protocol=5))
    assert back.a.weight is back.b.weight
    assert not back.frozen.requires_grad and isinstance(back.frozen, nn.Parameter)
    assert back.low.dtype == torch.bfloat16
    for (k, v), w in zip(net.state_dict().items(), back.state_dict().values(), strict=True):
        torch.testing.assert_close(v, w, rtol=0, atol=0, msg=k)


def test_pickling_a_network_makes_no_copy_of_its_weights(tmp_path):
    net = nn.Sequential(nn.Linear(2048, 2048), nn.Linear(2048, 2048))  # 32 MiB of weights

    def peak(obj):
        tracemalloc.start()
        with open(tmp_path / "net.pkl", "wb") as f:
            pickle.dump(obj, f, protocol=5)
        _, top = tracemalloc.get_traced_memory()
        tracemalloc.stop()
        return top

    assert peak(net) > 16 * 2**20  # torch's own pickling holds bytes copies of the weights
    assert peak(PortableModule(net)) < 2 * 2**20
    with open(tmp_path / "net.pkl", "rb") as f:
        back = pickle.load(f)
    torch.testing.assert_close(back[1].weight, net[1].weight, rtol=0, atol=0)
