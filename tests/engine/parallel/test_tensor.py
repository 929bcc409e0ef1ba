"""Tensor-parallel plans, without processes: the built-in plans, the checks, and each chunk's
styles with whole activations at its boundaries."""

import pytest
from torch import nn
from torch.distributed.tensor import Replicate, Shard
from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel

from skpipe.engine.parallel._tensor import builtin_plan, check_plan, chunk_styles, plan_for
from skpipe.engine.split._names import matches, shard_units, split_parameter, style_of
from skpipe.modules import MLP, FTTransformer, TabularResNet


def test_names_match_part_by_part_as_torch_reads_patterns():
    assert matches("blocks.*.ffn.0", "blocks.3.ffn.0")
    assert not matches("blocks.*", "blocks.3.ffn")  # one * is one part
    assert style_of({"*": "colwise", "2": "rowwise"}, "2") == "rowwise"  # the last one wins
    assert style_of({"0": "colwise"}, "1") is None
    assert split_parameter("rowwise", "weight") and not split_parameter("rowwise", "bias")
    assert split_parameter("colwise", "bias") and not split_parameter("replicate", "weight")


def test_built_in_plans_pair_the_layers():
    assert builtin_plan(MLP(4, 3, (8, 8, 8))) == {"0": "colwise", "2": "rowwise",
                                                  "4": "colwise", "6": "rowwise"}
    assert builtin_plan(MLP(4, 3, (8, 8))) == {"0": "colwise", "2": "rowwise"}  # 4 replicated
    assert builtin_plan(TabularResNet(4, 3, width=8, n_blocks=2)) == {
        "1.up": "colwise", "1.down": "rowwise", "2.up": "colwise", "2.down": "rowwise"}
    assert builtin_plan(FTTransformer(4, 3, d_token=8, n_blocks=1, n_heads=2)) == {
        "1.attention.q": "colwise", "1.attention.k": "colwise", "1.attention.v": "colwise",
        "1.attention.out": "rowwise", "1.ffn.0": "colwise", "1.ffn.3": "rowwise"}
    assert builtin_plan(nn.Sequential(nn.Linear(4, 4))) is None


def test_checks_name_the_layer_and_the_closest_names():
    with pytest.raises(ValueError, match=r"must divide the width colwise layer '0' is split along \(out_features=6\)"):
        plan_for(MLP(4, 3, (6, 8)), None, 4)
    with pytest.raises(ValueError, match=r"closest: \['2'\]|closest"):
        check_plan(MLP(4, 3, (8, 8)), {"2x": "colwise"}, 2)
    assert check_plan(MLP(4, 3, (8, 8)), {"*": "replicate"}, 3) == {"*": "replicate"}


def styles_of(net, plan, start, stop):
    """The styles of the chunk of ``net``'s layers [start, stop), named as a chunk names them."""
    chunk = nn.Sequential(*list(net)[start:stop])
    names = {f"{i}.{k}": f"{start + i}.{k}" for i in range(stop - start)
             for k, _ in list(net)[start + i].named_parameters()}
    return chunk_styles(chunk, names, plan)


def test_a_boundary_between_a_pair_gathers_and_splits_again():
    net = MLP(4, 3, (8, 8, 8))  # Linear 0, 2, 4, 6: pairs (0, 2), (4, 6)
    plan = builtin_plan(net)
    whole = styles_of(net, plan, 0, 7)
    assert [type(s) for s in whole.values()] == [ColwiseParallel, RowwiseParallel] * 2
    # paired: the activation between them stays split (colwise's output is its shard)
    assert whole["0"].output_layouts == (Shard(-1),) and whole["2"].input_layouts == (Shard(-1),)
    # cut between layer 0 and its rowwise partner 2: 0 gathers its output, 2 splits its input
    first, second = styles_of(net, plan, 0, 2), styles_of(net, plan, 2, 7)
    assert isinstance(first["0"], ColwiseParallel) and first["0"].output_layouts == (Replicate(),)
    assert isinstance(second["0"], RowwiseParallel) and second["0"].input_layouts == (Replicate(),)
    assert isinstance(second["2"], ColwiseParallel) and second["2"].output_layouts == (Shard(-1),)


def test_attention_keeps_its_heads_split_from_q_k_v_to_out():
    net = FTTransformer(4, 3, d_token=8, n_blocks=1, n_heads=4)
    styles = styles_of(net, builtin_plan(net), 1, 2)  # the block alone
    for part in ("q", "k", "v"):  # each rank's heads: q, k and v stay split
        assert styles[f"0.attention.{part}"].output_layouts == (Shard(-1),), part
    assert styles["0.attention.out"].input_layouts == (Shard(-1),)
    # in a Sequential, consecutive colwise layers feed each other: only the last is paired
    chain = nn.Sequential(nn.Linear(4, 8), nn.Linear(8, 8), nn.Linear(8, 4))
    seq = chunk_styles(chain, {f"{i}.weight": f"{i}.weight" for i in range(3)},
                       {"0": "colwise", "1": "colwise", "2": "rowwise"})
    assert seq["0"].output_layouts == (Replicate(),) and seq["1"].output_layouts == (Shard(-1),)


def test_heads_must_divide_by_tensor_parallel():
    net = FTTransformer(4, 3, d_token=12, n_blocks=1, n_heads=3)
    with pytest.raises(ValueError, match=r"number of heads of '1.attention' \(n_heads=3\)"):
        plan_for(net, None, 2)


def test_shard_units_open_containers():
    net = nn.Sequential(MLP(4, 3, (8,)), nn.ReLU())
    assert [type(u).__name__ for u in shard_units(net)] == ["Linear", "Linear"]
    blocks = TabularResNet(4, 3, width=8, n_blocks=2)
    assert [type(u).__name__ for u in shard_units(nn.Sequential(blocks))] == [
        "Linear", "ResidualBlock", "ResidualBlock", "LayerNorm", "Linear"]
