"""Padding and exact loss weights: micro-batch losses sum to the loss of the real batch."""

import pytest
import torch
from torch import nn

from skpipe.engine.plan._microbatch import WeightedLoss, pad_rows, reduction_of, row_targets, step_rows


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


def test_replica_shares_are_contiguous_and_as_even_as_can_be():
    from skpipe.engine.plan._microbatch import replica_shares

    assert replica_shares(13, 3) == [slice(0, 5), slice(5, 9), slice(9, 13)]
    assert replica_shares(12, 2) == [slice(0, 6), slice(6, 12)]
    assert replica_shares(1, 3) == [slice(0, 1), slice(1, 1), slice(1, 1)]  # a tiny last batch


@pytest.mark.parametrize("criterion", [nn.CrossEntropyLoss(), nn.CrossEntropyLoss(reduction="sum")])
@pytest.mark.parametrize("weighted", [False, True])
def test_replicas_parts_of_the_loss_and_gradient_sum_to_the_batchs(criterion, weighted):
    """Each replica's micro-batch losses, scaled by the whole batch's rows (or weight), add up
    over the replicas to the batch loss, and so do their gradients."""
    from skpipe.engine.plan._microbatch import replica_shares

    torch.manual_seed(0)
    out = torch.randn(11, 4, requires_grad=True)
    y = torch.randint(0, 4, (11,))
    w = torch.rand(11) + 0.1 if weighted else None
    whole = WeightedLoss(criterion)
    whole.set_batch(y, 11, w)
    expected = whole(out, row_targets(11, 11))
    (g_expected,) = torch.autograd.grad(expected, out)
    total = torch.zeros(())
    for rows in replica_shares(11, 3):
        n = rows.stop - rows.start
        part = WeightedLoss(criterion)
        part.set_batch(y[rows], n, None if w is None else w[rows], total_rows=11,
                       total_weight=None if w is None else float(w.sum()))
        padded = pad_rows(out[rows], 4)  # each replica pads its share to its fixed step size
        total = total + part(padded[:2], row_targets(n, 4)[:2]) + part(padded[2:], row_targets(n, 4)[2:])
    (g_total,) = torch.autograd.grad(total, out)
    torch.testing.assert_close(total, expected, atol=1e-6, rtol=0)
    torch.testing.assert_close(g_total, g_expected, atol=1e-6, rtol=0)
