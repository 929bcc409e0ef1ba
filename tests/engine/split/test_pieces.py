"""A piece of a traced network as a layer: its code runs against the network's own submodules
and tensors, under their names in the network, in train or eval mode, and pickles."""

import pickle

import torch
from torch import nn

from skpipe.engine.split._pieces import PieceCode, SplitTrace

TRAIN = """
def forward(self, boundary):
    return torch.nn.functional.dropout(self.lin(boundary) * self.scale + self.gain, 0.5, True)
"""
EVAL = """
def forward(self, boundary):
    return self.lin(boundary) * self.scale + self.gain
"""


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(3, 3)
        self.gain = nn.Parameter(torch.ones(3))
        self.register_buffer("scale", torch.full((3,), 2.0), persistent=False)


def code():
    return PieceCode(train=TRAIN, eval=EVAL, names=(("torch", "module", "torch"),),
                     targets=("lin", "gain", "scale"), transient=frozenset({"scale"}),
                     label="lin")


def test_a_piece_holds_the_networks_own_tensors_under_their_names():
    net = Net()
    (name, piece), = SplitTrace(pieces=(code(),), module_type="Net").bind(net)
    assert name == "" and piece.label == "lin"
    assert piece.lin is net.lin and piece.gain is net.gain and piece.scale is net.scale
    assert list(piece.state_dict()) == ["gain", "lin.weight", "lin.bias"]  # scale: not persistent


def test_train_and_eval_run_their_own_code():
    net = Net()
    piece = SplitTrace(pieces=(code(),), module_type="Net").bind(net)[0][1]
    x = torch.randn(64, 3)
    want = net.lin(x) * 2 + 1
    torch.testing.assert_close(piece.eval()(x), want)
    dropped = piece.train()(x)
    assert (dropped == 0).any() and not torch.equal(dropped, want)


def test_a_piece_pickles_and_keeps_working():
    net = Net()
    piece = SplitTrace(pieces=(code(),), module_type="Net").bind(net)[0][1].eval()
    back = pickle.loads(pickle.dumps(piece))
    x = torch.randn(4, 3)
    torch.testing.assert_close(back(x), piece(x), rtol=0, atol=0)
    assert "_forwards" not in piece.__getstate__()
