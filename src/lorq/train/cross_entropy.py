"""Cross-entropy through the output layer with its gradient computed in the forward pass.

For logits z = h Wᵀ (+ b) and targets t, sum_i CE(z_i, t_i) has d/dz_i = softmax(z_i) − onehot(t_i).
Each chunk of rows forms its logits once (in the compute dtype, upcast to fp32 for the
log-sum-exp), turns them in place into that gradient and multiplies it back through W: the
loss is done with its logits before backward starts. Against the checkpointed chunked loss this
saves the recomputed output-layer matmul and its log-softmax, and the full (tokens, vocab)
logits never exist (Liger-Kernel's fused linear cross-entropy does the same on GPU).
"""

from __future__ import annotations

import torch
import torch.nn as nn

from ..quant.linear import compute_dtype


class _LinearCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, h, weight, bias, target, chunk: int, dtype: torch.dtype):
        need_h, need_w, need_b = ctx.needs_input_grad[:3]
        with torch.autocast(h.device.type, enabled=False):
            w = weight.to(dtype)  # (V, H), cast once per call
            b = bias.to(torch.float32) if bias is not None else None
            nll = torch.zeros((), dtype=torch.float32, device=h.device)
            grad_h = torch.empty_like(h) if need_h else None
            grad_w = torch.zeros_like(weight, dtype=torch.float32) if need_w else None
            grad_b = torch.zeros_like(bias, dtype=torch.float32) if need_b else None
            for i in range(0, len(target), chunk):
                hc, tc = h[i : i + chunk].to(dtype), target[i : i + chunk]
                z = (hc @ w.t()).float()  # (c, V)
                if b is not None:
                    z += b
                rows = torch.arange(len(tc), device=z.device)
                picked, peak = z[rows, tc], z.amax(dim=1, keepdim=True)
                total = z.sub_(peak).exp_().sum(dim=1, keepdim=True)  # z now holds exp(z - max), in place
                nll += (peak + total.log()).sum() - picked.sum()  # log-sum-exp minus the target's logit
                if not (need_h or need_w or need_b):
                    continue
                z.div_(total)  # softmax
                z[rows, tc] -= 1.0  # dCE/dz
                g = z.to(dtype)
                if grad_h is not None:
                    grad_h[i : i + chunk] = (g @ w).to(h.dtype)
                if grad_w is not None:
                    accumulate_outer(grad_w, g, hc)
                if grad_b is not None:
                    grad_b += z.sum(dim=0)
        # gradients computed here, not inputs or outputs: kept on ctx, in their tensors' dtypes
        ctx.grads = (grad_h, grad_w.to(weight.dtype) if grad_w is not None else None,
                     grad_b.to(bias.dtype) if grad_b is not None else None)
        return nll

    @staticmethod
    def backward(ctx, grad_out):
        # scaled in place and handed over: a tied embedding's (V, H) gradient exists once, not twice
        grads, ctx.grads = ctx.grads, None
        if grads is None:
            raise RuntimeError("the fused cross-entropy's backward runs once (retain_graph is not supported)")
        return (*(g.mul_(grad_out) if g is not None else None for g in grads), None, None, None)


def accumulate_outer(acc: torch.Tensor, g: torch.Tensor, h: torch.Tensor) -> None:
    """acc += gᵀ h in fp32. In place when g and h are fp32 (no (V, H) temporary: 113 MiB on
    SmolLM2's vocabulary); a 16-bit product is formed in its own dtype, then added."""
    if g.dtype == acc.dtype and h.dtype == acc.dtype:
        acc.addmm_(g.t(), h)
    else:
        acc += g.t() @ h


def fusable(head) -> bool:
    """The fused loss applies to a plain linear output layer (not one wrapped by an adapter)."""
    return type(head) is nn.Linear


def linear_cross_entropy(h: torch.Tensor, head: nn.Linear, target: torch.Tensor, chunk: int) -> torch.Tensor:
    """sum_i CE(head(h_i), t_i) for h (N, H) and targets (N,), chunk rows at a time, in the
    compute dtype (autocast's when it is on)."""
    return _LinearCrossEntropy.apply(h, head.weight, head.bias, target, chunk, compute_dtype(h))
