"""The asynchronous schedules run in one process equal plain loops written from their rules
(``rules.py``, from the formulas in ``_ticks``'s doc)."""

import copy

import pytest
import torch
from torch import nn

from skpipe.engine.asyncpipe._inprocess import run_in_process
from tests.engine.asyncpipe.rules import params, reference_2bw, reference_pipedream


def chunks(p, width=6, seed=0):
    torch.manual_seed(seed)
    return [nn.Sequential(nn.Linear(width, width), nn.Tanh()) for _ in range(p - 1)] + [
        nn.Linear(width, 2)]


def data(n_batches, rows=8, width=6, seed=1):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(rows, width, generator=g), torch.randn(rows, 2, generator=g))
            for _ in range(n_batches)]


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
    expected, _ = reference_2bw(whole, OPTIMIZERS[opt], batches)
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
