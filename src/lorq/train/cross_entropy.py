"""Cross-entropy through the output layer with its gradient computed in the forward pass.

For logits z = h Wᵀ (+ b) and targets t, sum_i CE(z_i, t_i) has d/dz_i = softmax(z_i) − onehot(t_i).
Each chunk of rows forms its logits once (in the compute dtype, upcast to fp32 for the
log-sum-exp), turns them in place into that gradient and multiplies it back through W: the
loss is done with its logits before backward starts. Against the checkpointed chunked loss this
saves the recomputed output-layer matmul and its log-softmax, and the full (tokens, vocab)
logits never exist (Liger-Kernel's fused linear cross-entropy does the same on GPU).

An output layer tied to the input embedding would get two (V, H) gradients that autograd adds
at the end of backward, both alive at once (113 MiB each on SmolLM2). With a `TiedGradient`
the loss hands its gradient to the embedding lookup instead, which adds its rows into it with
index_add_ and passes one tensor on: one (V, H) gradient, as if the weight were used once.
For fewer tokens than the hidden size the loss hands over the smaller factors instead, its
(tokens, V) gradient for the logits and the hidden states, and the (V, H) gradient is formed
from them only there, at the end of backward, when the step's activations are gone.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..quant.linear import compute_dtype


@dataclass
class TiedGradient:
    """The output layer's weight gradient on its way from the loss to the embedding lookup:
    formed (grad), or as its factors, the loss's gradient for the logits (tokens, V) and the
    hidden states (tokens, H), when those are the smaller (logits_grad, hidden, scale)."""

    grad: torch.Tensor | None = None
    logits_grad: torch.Tensor | None = None
    hidden: torch.Tensor | None = None
    scale: torch.Tensor | None = None

    def take(self, shape: torch.Size, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
        """The (V, H) gradient, formed now if it was deferred (zeros if the loss left none)."""
        grad, g, h, scale = self.grad, self.logits_grad, self.hidden, self.scale
        self.grad = self.logits_grad = self.hidden = self.scale = None
        if grad is not None:
            return grad
        if g is None:
            return torch.zeros(shape, dtype=dtype, device=device)
        return (g.t() @ h.to(g.dtype)).float().mul_(scale).to(dtype)  # Σ_i g_iᵀ h_i


def defers_weight_gradient(tokens: int, hidden: int, dtype: torch.dtype) -> bool:
    """Keep the loss's (tokens, V) gradient for the logits until backward reaches the lookup,
    instead of the fp32 (V, H) weight gradient formed from it, when it is the smaller: short
    batches (on SmolLM2, under 576 tokens in fp32)."""
    return tokens * dtype.itemsize < hidden * 4


class _TiedLookup(torch.autograd.Function):
    """F.embedding(ids, weight) whose weight gradient is the loss's (from `tied`, if it left
    one) plus the looked-up rows' gradients; rows of `padding_idx` get none, as in F.embedding."""

    @staticmethod
    def forward(ctx, ids, weight, tied: TiedGradient, padding_idx: int | None):
        ctx.save_for_backward(ids)
        ctx.tied, ctx.padding_idx, ctx.weight_shape, ctx.weight_dtype = tied, padding_idx, weight.shape, weight.dtype
        return F.embedding(ids, weight, padding_idx)

    @staticmethod
    def backward(ctx, grad_out):
        (ids,) = ctx.saved_tensors
        grad = ctx.tied.take(ctx.weight_shape, ctx.weight_dtype, grad_out.device)
        rows, idx = grad_out.reshape(-1, grad_out.shape[-1]), ids.reshape(-1)
        if ctx.padding_idx is not None:
            keep = idx != ctx.padding_idx
            rows, idx = rows[keep], idx[keep]
        return None, grad.index_add_(0, idx, rows.to(grad.dtype)), None, None


def tied_lookup(ids: torch.Tensor, embedding: nn.Embedding, tied: TiedGradient) -> torch.Tensor:
    return _TiedLookup.apply(ids, embedding.weight, tied, embedding.padding_idx)


def sharable_embedding(decoder, head) -> nn.Embedding | None:
    """The decoder's input embedding when the output layer is tied to it and trained: a plain
    nn.Embedding (no max_norm, no frequency scaling, no subclass that scales its output)."""
    get = getattr(decoder, "get_input_embeddings", None)
    embedding = get() if get is not None else None
    if type(embedding) is not nn.Embedding or embedding.weight is not head.weight or not head.weight.requires_grad:
        return None
    if embedding.max_norm is not None or embedding.scale_grad_by_freq or embedding.sparse:
        return None
    return embedding


class _LinearCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, h, weight, bias, target, chunk: int, dtype: torch.dtype, tied: TiedGradient | None, w: torch.Tensor):
        need_h, need_w, need_b = ctx.needs_input_grad[:3]
        with torch.autocast(h.device.type, enabled=False):
            b = bias.to(torch.float32) if bias is not None else None
            nll = torch.zeros((), dtype=torch.float32, device=h.device)
            grad_h = torch.empty_like(h) if need_h else None
            defer = tied is not None and need_w and defers_weight_gradient(len(target), weight.shape[1], dtype)
            logits_grad = torch.empty(len(target), weight.shape[0], dtype=dtype, device=h.device) if defer else None
            in_place = defer and dtype == torch.float32  # the logits become the kept gradient where they are
            grad_w = torch.zeros_like(weight, dtype=torch.float32) if need_w and not defer else None
            grad_b = torch.zeros_like(bias, dtype=torch.float32) if need_b else None
            # one chunk's logits in fp32 and in the compute dtype, reused: fresh 50 MB tensors per
            # chunk cost more in page faults than the casts themselves (glibc maps each anew)
            rows_max = min(chunk, len(target))
            z_buf = torch.empty(rows_max, weight.shape[0], dtype=torch.float32, device=h.device) if not in_place else None
            low_buf = torch.empty(rows_max, weight.shape[0], dtype=dtype, device=h.device) if dtype != torch.float32 else None
            product = torch.empty_like(w) if grad_w is not None and dtype != torch.float32 else None
            for i in range(0, len(target), chunk):
                hc, tc = h[i : i + chunk].to(dtype), target[i : i + chunk]
                if in_place:
                    z = torch.mm(hc, w.t(), out=logits_grad[i : i + chunk])
                elif low_buf is None:
                    z = torch.mm(hc, w.t(), out=z_buf[: len(tc)])  # (c, V)
                else:
                    z = z_buf[: len(tc)].copy_(torch.mm(hc, w.t(), out=low_buf[: len(tc)]))  # (c, V), upcast
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
                if low_buf is None:  # fp32: z is the gradient (and, deferred, already where it is kept)
                    g = z
                else:  # cast down where it is kept, or into the reused buffer
                    g = (logits_grad[i : i + chunk] if defer else low_buf[: len(tc)]).copy_(z)
                if grad_h is not None:
                    grad_h[i : i + chunk] = (g @ w).to(h.dtype)
                if grad_w is not None:
                    accumulate_outer(grad_w, g, hc, product)
                if grad_b is not None:
                    grad_b += z.sum(dim=0)
        # gradients computed here, not inputs or outputs: kept on ctx, in their tensors' dtypes
        ctx.grads = (grad_h, grad_w.to(weight.dtype) if grad_w is not None else None,
                     grad_b.to(bias.dtype) if grad_b is not None else None)
        ctx.tied, ctx.factors = tied, (logits_grad, h) if defer else None
        return nll

    @staticmethod
    def backward(ctx, grad_out):
        # scaled in place and handed over: a tied embedding's (V, H) gradient exists once, not twice
        grads, ctx.grads = ctx.grads, None
        if grads is None:
            raise RuntimeError("the fused cross-entropy's backward runs once (retain_graph is not supported)")
        grad_h, grad_w, grad_b = (g.mul_(grad_out) if g is not None else None for g in grads)
        if ctx.tied is not None and grad_w is not None:
            ctx.tied.grad, grad_w = grad_w, None  # the lookup's backward, later, adds its rows and passes it on
        elif ctx.tied is not None and ctx.factors is not None:
            (ctx.tied.logits_grad, ctx.tied.hidden), ctx.tied.scale, ctx.factors = ctx.factors, grad_out, None
        return grad_h, grad_w, grad_b, None, None, None, None, None


def accumulate_outer(acc: torch.Tensor, g: torch.Tensor, h: torch.Tensor, product: torch.Tensor | None = None) -> None:
    """acc += gᵀ h in fp32. In place when g and h are fp32 (no (V, H) temporary: 113 MiB on
    SmolLM2's vocabulary); a 16-bit product is formed in its own dtype (into `product` where
    given, a reused (V, H) buffer), then added."""
    if g.dtype == acc.dtype and h.dtype == acc.dtype:
        acc.addmm_(g.t(), h)
    else:
        acc += torch.mm(g.t(), h, out=product) if product is not None else g.t() @ h


def fusable(head) -> bool:
    """The fused loss applies to a plain linear output layer (not one wrapped by an adapter)."""
    return type(head) is nn.Linear


def linear_cross_entropy(h: torch.Tensor, head: nn.Linear, target: torch.Tensor, chunk: int,
                         tied: TiedGradient | None = None) -> torch.Tensor:
    """sum_i CE(head(h_i), t_i) for h (N, H) and targets (N,), chunk rows at a time, in the
    compute dtype (autocast's when it is on). tied: h comes from a tied_lookup of the same
    weight, which then receives the head's gradient."""
    dtype = compute_dtype(h)
    return _LinearCrossEntropy.apply(h, head.weight, head.bias, target, chunk, dtype, tied, weight_in(head, dtype))


def weight_in(head: nn.Linear, dtype: torch.dtype) -> torch.Tensor:
    """The head's (V, H) weight in the compute dtype. A frozen one is cast once and kept while
    it is unchanged: a fresh 56 MB cast of SmolLM2's tied embedding cost ~0.1 s per step on a
    2-core CPU, mostly in page faults, and the cast exists at the step's peak anyway (the loss
    runs at the end of forward)."""
    weight = head.weight
    if weight.dtype == dtype or weight.requires_grad:
        return weight.to(dtype)
    key = (weight.data_ptr(), weight.device, dtype, weight._version)
    cached = getattr(head, "_lorq_cast", None)
    if cached is None or cached[0] != key:
        cached = head._lorq_cast = (key, weight.detach().to(dtype))
    return cached[1]
