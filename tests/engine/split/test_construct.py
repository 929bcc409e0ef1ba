"""Networks built where they run: a meta-device construction, recorded, replayed per stage,
gives every tensor the value eager construction gives it."""

import os
import subprocess
import sys
import textwrap

import cloudpickle
import numpy as np
import pytest
import torch
from torch import nn

from skpipe import PipeNetClassifier
from skpipe.engine.split._construct import (
    DeferralError,
    build_deferred,
    is_deferred,
    materialize,
    program_for,
    real_copy,
)
from skpipe.modules import MLP, FTTransformer, TabularResNet
from tests.conftest import assert_same_weights


class OwnInit(nn.Module):
    """Initialises in its own __init__, the ways real models do: a parent re-initialising its
    children, initialisers torch skips on meta (orthogonal_, dirac_, sparse_), tensors from
    Python data, scaled random factories, attention, embeddings, BatchNorm."""

    def __init__(self):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(5, 8), nn.BatchNorm1d(8), nn.Linear(8, 3))
        for m in self.net:
            if isinstance(m, nn.Linear):
                nn.init.orthogonal_(m.weight)
                m.bias.data.fill_(0.5)
        self.scale = nn.Parameter(torch.randn(3, 3) * 0.02)
        self.register_buffer("const", torch.tensor([1.0, 2.0, 3.0]))
        self.w = nn.Parameter(torch.empty(4, 4))
        nn.init.xavier_normal_(self.w)
        self.emb = nn.Embedding(10, 4, padding_idx=0)
        self.conv = nn.Conv1d(3, 4, 3)
        nn.init.dirac_(self.conv.weight)
        self.sparse = nn.Parameter(torch.empty(6, 5))
        nn.init.sparse_(self.sparse, 0.5)
        self.attn = nn.MultiheadAttention(8, 2)


FACTORIES = {
    "mlp": lambda: MLP(n_features_in=10, n_outputs=3, hidden_layer_sizes=(32, 16), dropout=0.1),
    "own_init": OwnInit,
    "tabular_resnet": lambda: TabularResNet(n_features_in=10, n_outputs=3, width=16, n_blocks=2),
    "ft_transformer": lambda: FTTransformer(n_features_in=10, n_outputs=3, d_token=16, n_blocks=2,
                                            n_heads=2),
}


@pytest.mark.parametrize("name", FACTORIES)
def test_replay_gives_the_values_of_eager_construction(name):
    factory = FACTORIES[name]
    torch.manual_seed(3)
    eager = factory()
    after_eager = torch.rand(5)
    torch.manual_seed(3)
    meta = build_deferred(factory)
    after_meta = torch.rand(5)
    assert is_deferred(meta)
    assert all(t.is_meta for t in meta.parameters())  # nothing was allocated for the weights
    torch.testing.assert_close(after_meta, after_eager, rtol=0, atol=0)  # the same stream after
    built = real_copy(meta)
    assert built.state_dict().keys() == eager.state_dict().keys()
    for key, value in eager.state_dict().items():
        torch.testing.assert_close(built.state_dict()[key], value, rtol=0, atol=0, msg=key)


def test_a_shipped_chunk_makes_only_its_own_layers():
    torch.manual_seed(0)
    eager = MLP(n_features_in=8, n_outputs=2, hidden_layer_sizes=(64, 64, 32))
    torch.manual_seed(0)
    meta = build_deferred(lambda: MLP(n_features_in=8, n_outputs=2, hidden_layer_sizes=(64, 64, 32)))
    last = nn.Sequential(*list(meta.children())[4:])  # the last stage: Linear(64, 32), ReLU, out
    program = program_for({1: last})
    assert program.nbytes == sum(p.numel() * 4 for p in last.parameters())
    # what a worker receives: meta layers and the program, by value
    layers, program = cloudpickle.loads(cloudpickle.dumps((last, program)))
    program.apply({1: layers})
    expected = nn.Sequential(*list(eager.children())[4:])
    for (k, a), b in zip(layers.state_dict().items(), expected.state_dict().values(), strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=0, msg=k)
    assert is_deferred(meta)  # the driver's network is still on meta
    assert not is_deferred(materialize(meta))


def test_constructors_meta_cannot_run_are_refused_with_the_reason():
    with pytest.raises(DeferralError, match="trunc_normal_|item|meta"):
        # torch 2.13's trunc_normal_ draws until its samples fall in range: value-dependent
        build_deferred(lambda: nn.init.trunc_normal_(nn.Linear(3, 3).weight) and nn.Linear(3, 3))
    gen = torch.Generator().manual_seed(0)
    with pytest.raises(DeferralError, match="generator"):
        build_deferred(lambda: nn.init.normal_(nn.Linear(3, 3).weight, generator=gen))


class TruncInit(nn.Module):
    """A module meta construction cannot record (rejection sampling depends on values)."""

    def __init__(self, n_features_in, n_outputs):
        super().__init__()
        self.body = nn.Sequential(nn.Linear(n_features_in, 16), nn.ReLU(), nn.Linear(16, 16),
                                  nn.ReLU(), nn.Linear(16, n_outputs))
        for m in self.body:
            if isinstance(m, nn.Linear):
                nn.init.trunc_normal_(m.weight, std=0.2)

    def forward(self, x):
        return self.body(x)


class TruncSequential(nn.Sequential):
    def __init__(self, n_features_in, n_outputs):
        super().__init__(*TruncInit(n_features_in, n_outputs).body)


@pytest.mark.distributed
def test_a_module_built_here_instead_still_trains_like_one_device(capsys):
    rng = np.random.RandomState(0)
    X = rng.randn(64, 6).astype("float32")
    y = (X[:, 0] > 0).astype(int)
    kw = dict(module=TruncSequential, max_epochs=2, batch_size=16, random_state=0)
    one = PipeNetClassifier(**kw).fit(X, y)
    two = PipeNetClassifier(**kw, n_stages=2, launcher="spawn", verbose=1).fit(X, y)
    assert "Note: TruncSequential is built whole in this process" in capsys.readouterr().out
    assert "cannot be built on the meta device" in two.plan_.construction
    for a, b in zip(one.module_.parameters(), two.module_.parameters(), strict=True):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=0)


@pytest.mark.distributed
def test_spawned_stages_start_from_the_weights_of_one_device():
    """An OwnInit-style network (a parent re-initialising its children) trained for one step
    with a vanishing learning rate: the weights the stages made are the eager ones."""
    rng = np.random.RandomState(1)
    X = rng.randn(32, 5).astype("float32")
    y = rng.randint(0, 3, 32)

    class Net(nn.Sequential):
        def __init__(self, n_features_in, n_outputs):
            super().__init__(nn.Linear(n_features_in, 8), nn.Tanh(), nn.Linear(8, 8), nn.Tanh(),
                             nn.Linear(8, n_outputs))
            for m in self:
                if isinstance(m, nn.Linear):
                    nn.init.orthogonal_(m.weight)

    kw = dict(module=Net, max_epochs=1, batch_size=32, random_state=5, lr=1e-30,
              optimizer=torch.optim.SGD)
    two = PipeNetClassifier(**kw, n_stages=2, launcher="spawn").fit(X, y)
    assert two.plan_.construction.startswith("built on the meta device")
    one = PipeNetClassifier(**kw).fit(X, y)
    assert_same_weights(one, two, atol=1e-20)


def test_planning_a_big_network_for_workers_allocates_no_weights(tmp_path):
    """plan() of a 1.2 GB network laid out for spawned workers: its peak memory stays far below
    one copy of the weights (layers are measured on the meta device), where planning it for
    one process builds the weights."""
    script = textwrap.dedent("""
        import resource, sys, numpy as np
        from skpipe import PipeNetClassifier
        from skpipe.modules import MLP
        X = np.zeros((32, 1024), dtype="float32"); y = np.arange(32) % 2
        est = PipeNetClassifier(module=MLP, module__hidden_layer_sizes=(4096,) * 18,
                                n_stages=int(sys.argv[1]), launcher=sys.argv[2], batch_size=16)
        print(est.plan(X, y).chunks[0].parameters)
        print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)
    """)
    env = dict(os.environ, PYTHONPATH=os.getcwd())
    peaks = {}
    for n_stages, launcher in ((2, "spawn"), (1, "auto")):
        out = subprocess.run([sys.executable, "-c", script, str(n_stages), launcher],
                             capture_output=True, text=True, env=env, timeout=300, check=True)
        params, peak = (int(v) for v in out.stdout.split())
        peaks[launcher] = peak
    weights = 289_488_898 * 4  # 1.08 GiB of float32
    assert peaks["spawn"] < peaks["auto"] - 0.8 * weights
    assert peaks["spawn"] < 0.5 * weights + 600 * 2**20  # torch itself and one layer's draws
