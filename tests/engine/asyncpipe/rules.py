"""The asynchronous schedules' rules as plain loops, written from their formulas (not from
skpipe's code): the references the in-process run and the estimators' fits are checked against."""

import torch
from torch import nn
from torch.func import functional_call


def params(net):
    return {n: p.detach().clone() for n, p in net.named_parameters()}


def mse(t, out, y):
    return nn.functional.mse_loss(out, y)


def reference_2bw(net, make_opt, batches, loss_of=mse, lr_of=None, max_norm=None):
    """W_{-1} = W_0; batch t's gradient at W_{t-1}; W_{t+1} = opt_step(W_t, grad).
    ``loss_of(t, output, target)``: batch t's loss; ``lr_of(t)``: the rate of update t (None:
    the optimizer's own); ``max_norm``: each batch's gradient clipped by its global 2-norm
    (``clip_grad_norm_``) before its step. Returns the final weights and each batch's loss."""
    opt = make_opt(net.parameters())
    previous = params(net)  # W_{t-1}
    losses = []
    for t, (x, y) in enumerate(batches):
        current = params(net)  # W_t, before this batch's update
        weights = {n: w.requires_grad_(True) for n, w in previous.items()}
        loss = loss_of(t, functional_call(net, weights, (x,)), y)
        grads = torch.autograd.grad(loss, list(weights.values()))
        for p, g in zip(net.parameters(), grads):
            p.grad = g
        if max_norm is not None:
            nn.utils.clip_grad_norm_(net.parameters(), max_norm)
        if lr_of is not None:
            opt.param_groups[0]["lr"] = lr_of(t)
        opt.step()
        opt.zero_grad()
        previous = current
        losses.append(float(loss.detach()))
    return params(net), losses


def reference_pipedream(parts, make_opts, batches, m):
    """Micro-batch g runs stage s on W^s after max(0, g - (p - s) + 1) of its updates; then
    every stage steps on g's gradient (its own mean loss), in order of g."""
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
        grads = iter(torch.autograd.grad(loss, [t for w in weights for t in w.values()]))
        for s, c in enumerate(parts):
            for q in c.parameters():
                q.grad = next(grads)
            opts[s].step()
            opts[s].zero_grad()
            history[s].append(params(c))
    return [params(c) for c in parts]
