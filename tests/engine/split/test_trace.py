"""Networks split at their pipe_split() marks: the pieces compute what forward computes (train
and eval mode, any batch size, buffers updated), keep the network's names, pickle, and train
like one device on every launcher; what cannot be traced or cannot cross a mark is refused
before any worker starts, naming the line."""

import pickle
import subprocess
import sys

import cloudpickle
import numpy as np
import pytest
import torch
from torch import nn
from torch.distributed.pipelining import SplitPoint, pipe_split

from skpipe import PipeNetRegressor
from skpipe.engine.plan._plan import make_plan
from skpipe.engine.split._marks import mark_split_points
from skpipe.engine.split._trace import split_network
from tests.conftest import assert_same_weights, pipeline_config, wait_no_workers


class Marked(nn.Module):
    """A [CLS]-token transformer: the batch size is read in forward, a skip connection spans
    every piece, and forward's own code reads self.training."""

    def __init__(self, n_features_in, n_outputs, d=16, n_blocks=3, p=0.0, norm=True):
        super().__init__()
        self.emb = nn.Linear(n_features_in, d)
        self.cls = nn.Parameter(torch.randn(1, 1, d) * 0.1)
        self.blocks = nn.ModuleList(
            nn.TransformerEncoderLayer(d, 2, 32, dropout=0.0, batch_first=True)
            for _ in range(n_blocks)
        )
        # BatchNorm over micro-batches is not BatchNorm over the batch: training tests go without
        self.norm = nn.BatchNorm1d(d) if norm else nn.Identity()
        self.head = nn.Linear(d, n_outputs)
        self.p = p

    def forward(self, x):
        tokens = self.emb(x).unsqueeze(1)
        h = torch.cat([self.cls.expand(x.shape[0], -1, -1), tokens], dim=1)
        skip = h
        for block in self.blocks:
            h = block(h)
            pipe_split()
        h = self.norm((h + skip)[:, 0])
        h = nn.functional.dropout(h, self.p, self.training)
        return self.head(h)


def pieces(net, rows_shape=(5,)):
    named, trace = split_network(net, 2, rows_shape, torch.float32)
    assert trace is not None
    return nn.Sequential(*[layer for _, layer in named])


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("rows", [3, 11])
def test_pieces_compute_what_forward_computes(training, rows):
    torch.manual_seed(0)
    net, twin = Marked(5, 2, p=0.3), Marked(5, 2, p=0.3)
    twin.load_state_dict(net.state_dict())
    seq = pieces(twin)
    assert len(seq) == 4  # three marks after three blocks: the last piece is the head
    net.train(training)
    seq.train(training)
    x = torch.randn(rows, 5)
    torch.manual_seed(1)
    want = net(x)
    torch.manual_seed(1)
    got = seq(x)
    torch.testing.assert_close(got, want, rtol=0, atol=0)
    # BatchNorm's running statistics moved (train) or not (eval) in the network itself
    torch.testing.assert_close(twin.norm.running_mean, net.norm.running_mean, rtol=0, atol=0)


def test_pieces_hold_the_networks_own_tensors_under_their_names():
    net = Marked(5, 2)
    seq = pieces(net)
    names = {}
    for k, piece in enumerate(seq):
        for name, t in piece.named_parameters():
            assert t is net.get_parameter(name), name
            names[name] = k
    assert set(names) == {n for n, _ in net.named_parameters()}
    assert names["cls"] == names["emb.weight"] == 0 and names["head.weight"] == 3
    assert "norm.running_mean" in seq[3].state_dict()


class Buffers(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Linear(5, 5)
        self.register_buffer("scale", torch.full((5,), 2.0), persistent=False)
        self.register_buffer("shift", torch.full((5,), 0.5))
        self.plain = torch.ones(5) * 3  # a tensor attribute, not registered

    def forward(self, x):
        h = self.a(x) * self.scale
        pipe_split()
        return h + self.shift + self.plain + torch.tensor([1.0, 2, 3, 4, 5])


def test_the_pieces_state_dicts_are_the_networks():
    # what the network's state dict leaves out (non-persistent buffers, tensor attributes,
    # constants made in forward) the pieces' leave out too: checkpoints keep the same keys
    net = Buffers()
    seq = pieces(net)
    assert list(seq.state_dict()) == ["0.a.weight", "0.a.bias", "1.shift"]
    x = torch.randn(3, 5)
    torch.testing.assert_close(seq(x), net(x), rtol=0, atol=0)


def test_splitting_leaves_the_network_as_it_was():
    net = Marked(5, 2).eval()
    before = {k: v.clone() for k, v in net.state_dict().items()}
    pieces(net)
    assert not net.training and not net.blocks[0].training
    for k, v in net.state_dict().items():
        torch.testing.assert_close(v, before[k], rtol=0, atol=0)


def test_pieces_pickle_without_the_compiled_code():
    net = Marked(5, 2).eval()
    seq = pieces(net).eval()
    x = torch.randn(4, 5)
    for dumps, loads in ((pickle.dumps, pickle.loads), (cloudpickle.dumps, pickle.loads)):
        back = loads(dumps(seq))
        torch.testing.assert_close(back(x), net(x), rtol=0, atol=0)


class Inner(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Linear(5, 5), nn.Linear(5, 5)

    def forward(self, x):
        h = torch.relu(self.a(x))
        pipe_split()
        return self.b(h)


class Nested(nn.Module):
    def __init__(self):
        super().__init__()
        self.body, self.head = Inner(), nn.Linear(5, 1)

    def forward(self, x):
        return self.head(self.body(x))


@pytest.mark.parametrize(
    "net,labels",
    [
        (Nested(), ["body.a", "body.b,head"]),
        (nn.Sequential(nn.Linear(5, 5), Inner(), nn.Linear(5, 1)), ["0,1.a", "1.b,2"]),
    ],
    ids=["submodule", "inside-a-sequential"],
)
def test_a_mark_inside_a_submodule_is_traced_through(net, labels):
    # a mark inside a layer of a Sequential makes the marks the only cut points
    seq = pieces(net)
    assert [p.label for p in seq] == labels
    x = torch.randn(6, 5)
    torch.testing.assert_close(seq(x), net(x), rtol=0, atol=0)


def test_a_network_without_marks_splits_as_a_sequential():
    net = nn.Sequential(nn.Linear(5, 4), nn.ReLU(), nn.Linear(4, 1))
    named, trace = split_network(net, 2, (5,), torch.float32)
    assert trace is None and [n for n, _ in named] == ["0", "1", "2"]


class Unmarked(nn.Module):
    """A residual stack without marks: split points come from outside."""

    def __init__(self, n_features_in=5, n_outputs=1, d=8):
        super().__init__()
        self.emb = nn.Linear(n_features_in, d)
        self.blocks = nn.ModuleList(nn.Sequential(nn.Linear(d, d), nn.Tanh()) for _ in range(4))
        self.head = nn.Linear(d, n_outputs)

    def forward(self, x):
        h = self.emb(x)
        for block in self.blocks:
            h = h + block(h)
        return self.head(h)


def test_split_points_mark_a_network_from_outside():
    net = Unmarked()
    mark_split_points(net, {"blocks.1": SplitPoint.BEGINNING, "blocks.2": "end"})
    named, _ = split_network(net, 2, (5,), torch.float32)
    assert [layer.label for _, layer in named] == ["emb,blocks.0", "blocks.1,blocks.2",
                                                   "blocks.3,head"]
    x = torch.randn(3, 5)
    torch.testing.assert_close(nn.Sequential(*[p for _, p in named])(x), net(x), rtol=0, atol=0)
    # marking again replaces the marks
    mark_split_points(net, {"blocks.3": "end"})
    named, _ = split_network(net, 2, (5,), torch.float32)
    assert [layer.label for _, layer in named] == ["emb..blocks.3", "head"]
    with pytest.raises(ValueError, match=r"split_points names 'block.1', which is not a "
                                         r"submodule of Unmarked. Did you mean 'blocks.1'"):
        mark_split_points(net, {"block.1": "end"})


def test_a_split_point_on_a_traced_module_is_marked_once():
    # a module that calls pipe_split() itself is traced through: its hooks run under the trace
    net = nn.Sequential(nn.Linear(5, 5), Inner(), nn.Linear(5, 1))
    mark_split_points(net, {"1": "beginning"})
    named, _ = split_network(net, 2, (5,), torch.float32)
    assert [layer.label for _, layer in named] == ["0", "1.a", "1.b,2"]


# -- refused, naming the line -----------------------------------------------------------------
class Branchy(nn.Module):
    def __init__(self, n_features_in=5, n_outputs=1):
        super().__init__()
        self.a, self.b = nn.Linear(n_features_in, 5), nn.Linear(5, n_outputs)

    def forward(self, x):
        h = self.a(x)
        if h.sum() > 0:
            h = h * 2
        pipe_split()
        return self.b(h)


class SizeCrosses(Branchy):
    def forward(self, x):
        n = x.shape[0]
        h = self.a(x)
        pipe_split()
        return self.b(h).view(n, -1)


class IndexCrosses(Branchy):
    def forward(self, x):
        h = self.a(x)
        idx = torch.argmax(h, dim=1, keepdim=True)
        pipe_split()
        return self.b(h) + idx


class TwoPieces(Branchy):
    def forward(self, x):
        h = self.a(x)
        pipe_split()
        return self.b(h)


class Tied(Branchy):
    def forward(self, x):
        h = self.a(x)
        pipe_split()
        h = torch.tanh(h)
        pipe_split()
        return nn.functional.linear(h, self.a.weight)[:, :1]


class TiedNear(Branchy):
    def forward(self, x):
        h = self.a(x)
        pipe_split()
        h = torch.tanh(self.b(torch.tanh(h)))
        pipe_split()
        return nn.functional.linear(h, self.b.weight.t())[:, :1]


@pytest.mark.parametrize(
    "net,error,pattern",
    [
        (Branchy(), TypeError, r"module Branchy calls pipe_split\(\).*failed at .*test_trace.py:\d+ "
         r"\(if h.sum\(\) > 0:\): TraceError: .*Move that code into a submodule without"),
        (SizeCrosses(), TypeError, r"`getitem` \(made by `n = x.shape\[0\]` at .*test_trace.py:\d+\) is "
         r"made before pipe_split\(\) number 1 of module SizeCrosses .* is of type int, not a tensor"),
        (IndexCrosses(), TypeError, r"`argmax` \(made by `idx = torch.argmax.*` at .*\) .* is a "
         r"torch.int64 tensor"),
    ],
    ids=["control-flow", "int-crosses", "index-crosses"],
)
def test_what_cannot_be_split_is_named(net, error, pattern):
    with pytest.raises(error, match=pattern):
        split_network(net, 2, (5,), torch.float32)


def test_a_tensor_two_chunks_would_hold_is_refused():
    cfg = pipeline_config(n_stages=3, n_microbatches=3, batch_size=12, devices=("cpu",) * 3)
    with pytest.raises(ValueError, match=r"parameter 'a.weight' is used by pipeline chunk 0 "
                                         r"and chunk 2"):
        make_plan(Tied(), cfg, torch.randn(12, 5))
    # in one chunk it is one tensor: the plan takes it
    plan = make_plan(TiedNear(), pipeline_config(n_stages=2, n_microbatches=2, batch_size=12,
                                                 balance=[1, 2]), torch.randn(12, 5))
    assert plan.parameter_names[1] == ("b.weight", "b.bias")


def test_more_stages_than_pieces_says_where_to_mark():
    cfg = pipeline_config(n_stages=3, n_microbatches=3, batch_size=12, devices=("cpu",) * 3)
    with pytest.raises(ValueError, match=r"2 splittable layers \(the pieces between its "
                                         r"pipe_split\(\) marks\).*call pipe_split\(\) at more"):
        make_plan(TwoPieces(), cfg, torch.randn(12, 5))


# -- training ---------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def data():
    rng = np.random.RandomState(0)
    X = rng.randn(48, 5).astype("float32")
    y = (X.sum(axis=1) + 0.1 * rng.randn(48)).astype("float32")
    return X, y


# SGD: Adam would magnify the float noise in the attention's key bias, whose gradient is 0
KW = dict(module=Marked, module__norm=False, max_epochs=2, batch_size=16, random_state=0, lr=0.05,
          optimizer=torch.optim.SGD)


@pytest.fixture(scope="module")
def reference(data):
    return PipeNetRegressor(**KW).fit(*data)


@pytest.mark.parametrize(
    "launcher,schedule",
    [("local", "1f1b"), ("local", "interleaved_1f1b"), ("spawn", "gpipe"), ("spawn", "zbv")],
)
def test_a_marked_network_trains_like_one_device(data, reference, launcher, schedule):
    est = PipeNetRegressor(**KW, n_stages=2, launcher=launcher, schedule=schedule).fit(*data)
    assert_same_weights(est, reference, atol=2e-6)
    np.testing.assert_allclose(est.predict(data[0]), reference.predict(data[0]), atol=1e-5)
    assert " emb,cls,blocks.0" in str(est.plan_)  # pieces labelled in forward's order
    wait_no_workers()


def test_split_points_train_like_one_device_and_pickle(data):
    kw = dict(KW, module=Unmarked)
    kw.pop("module__norm")
    ref = PipeNetRegressor(**kw).fit(*data)
    est = PipeNetRegressor(**kw, n_stages=2, launcher="spawn",
                           split_points={"blocks.2": "beginning"}).fit(*data)
    assert "emb,blocks.0,blocks.1" in str(est.plan_)
    assert_same_weights(est, ref, atol=1e-6)
    back = pickle.loads(pickle.dumps(est))
    np.testing.assert_array_equal(back.predict(data[0]), est.predict(data[0]))
    wait_no_workers()


class InputCrosses(nn.Module):
    """The network's input itself is used two marks later: it rides through the middle piece."""

    def __init__(self, n_features_in, n_outputs, d=8):
        super().__init__()
        self.a, self.b = nn.Linear(n_features_in, d), nn.Linear(d, d)
        self.c = nn.Linear(d + n_features_in, n_outputs)

    def forward(self, x):
        h = torch.tanh(self.a(x))
        pipe_split()
        h = torch.tanh(self.b(h))
        pipe_split()
        return self.c(torch.cat([h, x], dim=1))


def test_the_input_rides_through_the_stages_it_skips(data):
    kw = dict(KW, module=InputCrosses)
    kw.pop("module__norm")
    ref = PipeNetRegressor(**kw).fit(*data)
    est = PipeNetRegressor(**kw, n_stages=3, launcher="local", schedule="gpipe").fit(*data)
    assert_same_weights(est, ref, atol=1e-6)


TORCHRUN = """
import sys, numpy as np, torch, torch.distributed as dist
sys.path.insert(0, {root!r})
from tests.engine.split.test_trace import Marked, KW
from skpipe import PipeNetRegressor
dist.init_process_group("gloo")
rng = np.random.RandomState(0)
X = rng.randn(48, 5).astype("float32"); y = X.sum(axis=1).astype("float32")
piped = PipeNetRegressor(**KW, n_stages=2, schedule="1f1b", launcher="torchrun").fit(X, y)
one = PipeNetRegressor(**KW).fit(X, y)
diff = max(float((a - b).abs().max()) for a, b in zip(piped.module_.state_dict().values(),
                                                       one.module_.state_dict().values()))
sys.stdout.write(f"rank {{dist.get_rank()}} max difference {{diff:.3g}}\\n")
sys.stdout.flush()
dist.destroy_process_group()
"""


@pytest.mark.distributed
def test_a_marked_network_trains_like_one_device_under_torchrun(tmp_path):
    import pathlib

    from tests.test_examples import free_port

    root = str(pathlib.Path(__file__).resolve().parents[3])
    script = tmp_path / "marked.py"
    script.write_text(TORCHRUN.format(root=root))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2",
           "--master-addr", "127.0.0.1", "--master-port", str(free_port()), str(script)]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=root)
    assert out.returncode == 0, out.stderr[-3000:]
    diffs = [float(line.rsplit(" ", 1)[1]) for line in out.stdout.splitlines()
             if line.startswith("rank ")]
    assert len(diffs) == 2 and max(diffs) < 2e-6
