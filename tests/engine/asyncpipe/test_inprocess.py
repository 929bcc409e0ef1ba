"""The asynchronous schedules run in one process equal a plain loop written from their rules
(kept here, from the formulas in ``_ticks``'s doc)."""

import copy

import pytest
import torch
from torch import nn
from torch.func import functional_call

from skpipe.engine.asyncpipe._inprocess import run_in_process


def chunks(p, width=6, seed=0):
    torch.manual_seed(seed)
    return [nn.Sequential(nn.Linear(width, width), nn.Tanh()) for _ in range(p - 1)] + [
        nn.Linear(width, 2)]


def data(n_batches, rows=8, width=6, seed=1):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(rows, width, generator=g), torch.randn(rows, 2, generator=g))
            for _ in range(n_batches)]


def params(net):
    return {n: p.detach().clone() for n, p in net.named_parameters()}


def reference_2bw(net, make_opt, batches):
    """W_{-1} = W_0; batch t's gradient at W_{t-1}; W_{t+1} = opt_step(W_t, grad)."""
    opt = make_opt(net.parameters())
    previous = params(net)  # W_{t-1}
    for x, y in batches:
        current = params(net)  # W_t, before this batch's update
        weights = {n: t.requires_grad_(True) for n, t in previous.items()}
        loss = nn.functional.mse_loss(functional_call(net, weights, (x,)), y)
        grads = torch.autograd.grad(loss, list(weights.values()))
        for p, g in zip(net.parameters(), grads):
            p.grad = g
        opt.step()
        opt.zero_grad()
        previous = current
    return params(net)


def reference_pipedream(parts, make_opts, batches, m):
    """Micro-batch g runs stage s on W^s after max(0, g - (p - s) + 1) of its updates; then
    every stage steps on g's gradient, in order of g."""
    p = len(parts)
    opts = [make_opts(c.parameters()) for c in parts]
    history = [[params(c)] for c in parts]  # history[s][j]: stage s after j updates
    micro = [mb for x, y in batches for mb in zip(x.tensor_split(m), y.tensor_split(m))]
    for g, (x, y) in enumerate(micro):
        weights = []
        h = x
        for s, c in enumerate(parts):
            v = max(0, g - (p - s) + 1)
            w = {n: t.clone().requires_grad_(True) for n, t in history[s][v].items()}
            weights.append(w)
            h = functional_call(c, w, (h,))
        loss = nn.functional.mse_loss(h, y)
        grads = torch.autograd.grad(loss, [t for w in weights for t in w.values()])
        it = iter(grads)
        for s, c in enumerate(parts):
            for p_ in c.parameters():
                p_.grad = next(it)
            opts[s].step()
            opts[s].zero_grad()
            history[s].append(params(c))
    return [params(c) for c in parts]


OPTIMIZERS = {
    "sgd": lambda ps: torch.optim.SGD(ps, lr=0.1, momentum=0.9),
    "adam": lambda ps: torch.optim.Adam(ps, lr=0.01),
}


@pytest.mark.parametrize("opt", sorted(OPTIMIZERS))
@pytest.mark.parametrize("p", [2, 4])
def test_2bw_equals_its_rule(p, opt):
    m, batches = 4, data(5)
    stages = chunks(p)
    whole = nn.Sequential(*copy.deepcopy(stages))
    run_in_process("2bw", stages, [OPTIMIZERS[opt](c.parameters()) for c in stages], batches,
                   m, nn.functional.mse_loss)
    expected = reference_2bw(whole, OPTIMIZERS[opt], batches)
    got = {f"{s}.{n}": t for s, c in enumerate(stages) for n, t in params(c).items()}
    assert got.keys() == expected.keys()
    for n in got:
        torch.testing.assert_close(got[n], expected[n], atol=1e-6, rtol=1e-5)
    # and the delay matters: a synchronous loop differs
    sync = nn.Sequential(*chunks(p))
    o = OPTIMIZERS[opt](sync.parameters())
    for x, y in batches:
        nn.functional.mse_loss(sync(x), y).backward()
        o.step()
        o.zero_grad()
    assert any(not torch.allclose(got[n], params(sync)[n], atol=1e-4) for n in got)


@pytest.mark.parametrize("opt", sorted(OPTIMIZERS))
@pytest.mark.parametrize("p", [2, 4])
def test_pipedream_equals_its_rule(p, opt):
    m, batches = 2, data(3)
    stages = chunks(p)
    copies = copy.deepcopy(stages)
    run_in_process("pipedream", stages, [OPTIMIZERS[opt](c.parameters()) for c in stages],
                   batches, m, nn.functional.mse_loss)
    expected = reference_pipedream(copies, OPTIMIZERS[opt], batches, m)
    for c, e in zip(stages, expected):
        for n, t in params(c).items():
            torch.testing.assert_close(t, e[n], atol=1e-6, rtol=1e-5)
