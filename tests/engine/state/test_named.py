"""Optimizer state keyed by parameter name: any split of the network takes it back."""

import torch
from torch import nn

from skpipe.engine.state._named import cpu_copy, merge_by_name, state_by_name, state_for


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
