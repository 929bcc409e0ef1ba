"""Networks pickled as numpy arrays on a meta skeleton: equal, tied, and without a copy."""

import pickle
import tracemalloc

import torch
from torch import nn

from skpipe.engine.state._portable import PortableModule


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
