"""Padding and exact loss weights: micro-batch losses sum to the loss of the real batch."""

import pytest
import torch
from torch import nn

from skpipe.engine._microbatch import WeightedLoss, pad_rows, reduction_of, row_targets, step_rows


def test_step_rows_round_up_to_a_multiple_of_m():
    assert step_rows(13, 4) == 16
    assert step_rows(16, 4) == 16
    assert step_rows(1, 1) == 1


def test_pad_rows_appends_zero_rows_and_refuses_too_many():
    x = torch.ones(3, 2)
    padded = pad_rows(x, 5)
    assert padded.shape == (5, 2) and torch.equal(padded[:3], x) and not padded[3:].any()
    assert pad_rows(x, 3) is x
    with pytest.raises(ValueError, match="a batch of 3 rows does not fit the fixed step size of 2"):
        pad_rows(x, 2)


def test_row_targets_mark_padding():
    assert row_targets(3, 5).tolist() == [0, 1, 2, -1, -1]


@pytest.mark.parametrize("criterion", [nn.CrossEntropyLoss(), nn.CrossEntropyLoss(reduction="sum")])
@pytest.mark.parametrize("m", [1, 2, 3, 4])
def test_weighted_microbatch_losses_and_gradients_sum_to_the_batch(criterion, m):
    torch.manual_seed(0)
    n, rows = 7, step_rows(7, m)
    out = torch.randn(rows, 3, requires_grad=True)
    y = torch.randint(0, 3, (n,))
    whole = criterion(out[:n], y)
    (g_whole,) = torch.autograd.grad(whole, out)
    loss = WeightedLoss(criterion)
    loss.set_batch(y, n)
    idx = row_targets(n, rows)
    parts = [loss(out[i], idx[i]) for i in torch.arange(rows).tensor_split(m)]
    total = torch.stack(parts).sum()
    (g_parts,) = torch.autograd.grad(total, out)
    torch.testing.assert_close(total, whole)
    torch.testing.assert_close(g_parts, g_whole)
    assert not g_parts[n:].any()  # padding rows get no gradient


def test_loss_before_set_batch_and_unsupported_reductions_are_refused():
    with pytest.raises(RuntimeError, match="set_batch must be called before the step"):
        WeightedLoss(nn.MSELoss())(torch.zeros(2, 1), torch.arange(2))
    with pytest.raises(ValueError, match=r"criterion L1Loss has reduction='none'"):
        reduction_of(nn.L1Loss(reduction="none"))
