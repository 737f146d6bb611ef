"""Variants whose end product is a quantized model, not an adapter.

- peqa: Kim et al. 2023, "Memory-Efficient Fine-Tuning of Compressed LLMs via sub-4-bit Integer
        Quantization": the integer codes (and zero points) of an INT-k base stay frozen, only the
        per-group scales s train. With w = s (q - z): w' = (s'/s) w, so the update is
        ΔW = (Δs / s) ⊙ W_q, and folding it in rewrites s (and min = -z s) only.
  Input dropout does not apply to peqa and l4q: they change the weight, not add a branch.
- l4q:  Jeon et al. 2024, "L4Q: Parameter Efficient Quantization-Aware Fine-Tuning": the LoRA
        update is merged into the weight inside a learned-step-size quantizer (LSQ, Esser et al.
        2020): W_q = α · clamp(⌊(W + s B A) / α⌉, -2^(k-1), 2^(k-1) - 1), rounding with a
        straight-through gradient, α (per output row and group) trained with A and B (without
        LSQ's gradient scale 1/sqrt(N·Qp): Adam's normalization makes it moot). Folding
        writes W_q as lorq's symmetric INT-k format: one quantized model.

`fold_quantized(model, name)` replaces every layer carrying such an adapter by the
QuantizedLinear it has become.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..errors import LorqError
from ..quant.affine import AffineWeight, as_groups, from_groups
from ..quant.base import FormatConfig, QuantFormat
from ..quant.linear import QuantizedLinear, set_module
from .variants import Adapter, LowRankAdapter, Variant, base_bias, compute_dtype_of, register


def expand_groups(g: torch.Tensor, in_features: int, group: int) -> torch.Tensor:
    """(out, groups) -> (out, in): each group's value repeated over its columns."""
    return g.repeat_interleave(group, dim=1)[:, :in_features]


def weight_grad(grad_y: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """∂L/∂W (out, in) fp32 of y = x Wᵀ, over every token."""
    return (grad_y.reshape(-1, grad_y.shape[-1]).T @ x.reshape(-1, x.shape[-1]).to(grad_y.dtype)).float()


def plus_base_bias(y: torch.Tensor, layer) -> torch.Tensor:
    bias = base_bias(layer)
    return y + bias.to(y.dtype) if bias is not None else y


def peqa_factors(base: QuantizedLinear, scale_delta, scale0, group: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(s'/s per weight, W_q), both (out, in) fp32: W' = (s'/s) ⊙ W_q. No gradients."""
    with torch.no_grad(), torch.autocast(scale0.device.type, enabled=False):
        w = base.dequantize(torch.float32)
        return expand_groups(1 + scale_delta.float() / scale0, w.shape[1], group), w


class PEQALinear(torch.autograd.Function):
    """y = x ((s'/s) ⊙ W_q)ᵀ in one matmul with one dequantization of the INT-k base. Keeps x
    (and the small Δs, s) for backward, which dequantizes the base again rather than keeping
    weight-sized tensors for every layer; Δs's gradient is (∂L/∂W') ⊙ W_q / s, summed per group."""

    @staticmethod
    def forward(ctx, x, base: QuantizedLinear, scale_delta, scale0, group: int):
        ctx.base, ctx.group = base, group
        ctx.save_for_backward(x, scale_delta, scale0)
        ratio, w = peqa_factors(base, scale_delta, scale0, group)
        return F.linear(x, (ratio * w).to(x.dtype))

    @staticmethod
    def backward(ctx, grad_y):
        x, scale_delta, scale0 = ctx.saved_tensors
        ratio, w = peqa_factors(ctx.base, scale_delta, scale0, ctx.group)
        grad_x = grad_y @ (ratio * w).to(grad_y.dtype) if ctx.needs_input_grad[0] else None
        grad_delta = None
        if ctx.needs_input_grad[2]:
            grad_delta = group_sums(weight_grad(grad_y, x) * w, ctx.group) / scale0  # ∂L/∂W' ⊙ W_q / s
        return grad_x, None, grad_delta, None, None


@register(Variant.PEQA)
class PEQAAdapter(Adapter):
    """Trainable Δs (out, groups) on the scales of an INT-k base; no low-rank factors."""

    trainable_names = ("scale_delta",)
    owns_base = True  # alone on a layer, its scaled weight replaces the base's matmul (PEQALinear)

    def __init__(self, layer, rank: int, alpha: float, rslora: bool = False, dropout: float = 0.0, **kw):
        super().__init__(layer, rank, alpha, rslora, dropout, **kw)
        base = layer.base
        if not isinstance(base, QuantizedLinear) or QuantFormat(base.cfg.format) is not QuantFormat.INT or base.rank:
            got = (QuantFormat(base.cfg.format).value + (" with low-rank compensation" if base.rank else "")
                   if isinstance(base, QuantizedLinear) else "dense")
            raise LorqError(f"the peqa variant trains the scales of an INT-k base (--format int, without --lowrank); this base is {got} "
                            "(a --model that is already a quantized checkpoint keeps its own format)")
        qw = base.qweight()
        self.group = qw.group
        self.register_buffer("scale0", qw.scale.float(), persistent=False)  # (out, groups)
        self.scale_delta = nn.Parameter(torch.zeros_like(self.scale0))

    def output(self, x: torch.Tensor, layer) -> torch.Tensor:
        return plus_base_bias(PEQALinear.apply(x, layer.base, self.scale_delta, self.scale0, self.group), layer)

    def delta_weight(self, layer=None) -> torch.Tensor:
        ratio = expand_groups(self.scale_delta / self.scale0, self.in_features, self.group)  # (out, in)
        return ratio * layer.base.dequantize(torch.float32)

    def delta(self, x: torch.Tensor, base_out: torch.Tensor, layer) -> torch.Tensor:
        dtype = compute_dtype_of(x, self.scale_delta)
        return x.to(dtype) @ self.delta_weight(layer).to(dtype).T

    def folded(self, layer) -> QuantizedLinear:
        """The base with s' = s + Δs (and min' = min · s'/s): same codes, still quantized."""
        qw = layer.base.qweight()
        new_scale = (self.scale0 + self.scale_delta.detach())
        params = {"scale": new_scale.to(torch.float16)}
        if qw.min is not None:
            params["min"] = (qw.min.float() * new_scale / self.scale0).to(torch.float16)
        codes = qw.int_codes()
        return QuantizedLinear.from_weight(AffineWeight.from_codes(qw.shape, qw.cfg, codes, params), layer.base.bias)


class RoundSTE(torch.autograd.Function):
    """round(x) forward, identity backward (straight-through)."""

    @staticmethod
    def forward(ctx, x):
        return torch.round(x)

    @staticmethod
    def backward(ctx, g):
        return g


def group_sums(t: torch.Tensor, group: int) -> torch.Tensor:
    """(out, in) -> (out, groups): each group's columns summed (a short last group as it is)."""
    return F.pad(t, (0, -t.shape[1] % group)).view(t.shape[0], -1, group).sum(-1)


def lsq_quantize(weight, A, B, step, scaling: float, group: int, lo: int, hi: int):
    """(W_q, v, ⌊v⌉) in fp32 for v = (W + s B A) / α: W_q = α · clamp(⌊v⌉, lo, hi). No gradients."""
    with torch.no_grad(), torch.autocast(weight.device.type, enabled=False):
        alpha = expand_groups(step.float(), weight.shape[1], group)  # (out, in)
        v = (weight.float() + scaling * (B.float() @ A.float())) / alpha
        r = torch.round(v)
        return alpha * r.clamp(lo, hi), v, r


class L4QLinear(torch.autograd.Function):
    """y = x W_qᵀ in one matmul. Keeps x (and the small A, B, α) for backward, which rebuilds
    W_q from them and the frozen W instead of keeping (out, in) tensors for every layer (the
    autograd form kept four, 5.9 GiB peak on SmolLM2). Gradients are L4Q's: straight through
    the rounding to W + s B A where ⌊v⌉ is within the clamp, and LSQ's to α, summed per group:
    ⌊v⌉ - v inside the clamp, the clamped value outside."""

    @staticmethod
    def forward(ctx, x, weight, A, B, step, scaling: float, group: int, lo: int, hi: int):
        w_q, _, _ = lsq_quantize(weight, A, B, step, scaling, group, lo, hi)
        ctx.save_for_backward(x, weight, A, B, step)
        ctx.meta = (scaling, group, lo, hi)
        return F.linear(x, w_q.to(x.dtype))

    @staticmethod
    def backward(ctx, grad_y):
        x, weight, A, B, step = ctx.saved_tensors
        scaling, group, lo, hi = ctx.meta
        w_q, v, r = lsq_quantize(weight, A, B, step, scaling, group, lo, hi)
        grad_x = grad_y @ w_q.to(grad_y.dtype) if ctx.needs_input_grad[0] else None
        grad_A = grad_B = grad_step = None
        if any(ctx.needs_input_grad[2:5]):
            g_wq = weight_grad(grad_y, x)
            inside = (r >= lo) & (r <= hi)
            g_w = torch.where(inside, g_wq, 0)  # straight through ⌊·⌉, stopped by the clamp
            grad_A = scaling * (B.float().T @ g_w) if ctx.needs_input_grad[2] else None
            grad_B = scaling * (g_w @ A.float().T) if ctx.needs_input_grad[3] else None
            if ctx.needs_input_grad[4]:
                grad_step = group_sums(g_wq * torch.where(inside, r - v, r.clamp(lo, hi)), group)
        return grad_x, None, grad_A, grad_B, grad_step, None, None, None, None


@register(Variant.L4Q)
class L4QAdapter(LowRankAdapter):
    """LoRA merged into the weight inside an LSQ quantizer with trainable step sizes α."""

    add_delta = Adapter.add_delta  # its delta is the quantized weight's, not the low-rank product
    owns_base = True  # alone on a layer, x W_qᵀ replaces the base's matmul (L4QLinear)

    trainable_names = ("A", "B", "step")
    no_decay_names = ("step",)

    def __init__(self, layer, rank: int, alpha: float, rslora: bool = False, dropout: float = 0.0,
                 qat_bits: int = 4, qat_group_size: int = 64, **kw):
        super().__init__(layer, rank, alpha, rslora, dropout, **kw)
        if not isinstance(layer.base, nn.Linear):
            raise LorqError("the l4q variant quantizes W + s·B A itself: it needs a dense base (--format none, and a --model "
                            "that is not already a quantized checkpoint)")
        if qat_bits not in AffineWeight.supported_bits or qat_group_size <= 0 or qat_group_size % 2:  # even: the folded model is an int format
            raise LorqError(f"qat-bits must be one of {AffineWeight.supported_bits} and qat-group-size a positive even number, got {qat_bits} and {qat_group_size}")
        self.bits, self.group = qat_bits, qat_group_size
        wg = as_groups(layer.base.weight, qat_group_size)  # (out, groups, g)
        # LSQ starts where symmetric min-max quantization is: α = 2·absmax / (2^k - 1)
        self.step = nn.Parameter((2 * wg.abs().amax(-1) / (2**qat_bits - 1)).clamp_min(1e-8))  # (out, groups)

    def options(self) -> dict:
        return {"qat_bits": self.bits, "qat_group_size": self.group}

    @property
    def clamp_range(self) -> tuple[int, int]:
        """The signed k-bit integers (lo, hi) that W / α is rounded into."""
        return -(2 ** (self.bits - 1)), 2 ** (self.bits - 1) - 1

    def quantized_weight(self, layer, dtype=torch.float32) -> torch.Tensor:
        """α · clamp(⌊(W + s B A) / α⌉), differentiable in A, B (STE) and α (LSQ)."""
        w = layer.base.weight.to(dtype) + LowRankAdapter.delta_weight(self).to(dtype)  # (out, in)
        alpha = expand_groups(self.step.to(dtype), self.in_features, self.group)
        return alpha * torch.clamp(RoundSTE.apply(w / alpha), *self.clamp_range)

    def output(self, x: torch.Tensor, layer) -> torch.Tensor:
        return plus_base_bias(L4QLinear.apply(x, layer.base.weight, self.A, self.B, self.step, self.scaling, self.group, *self.clamp_range), layer)

    def delta_weight(self, layer=None) -> torch.Tensor:
        if layer is None:
            raise LorqError("an L4Q update depends on the base weight")
        return self.quantized_weight(layer) - layer.base.weight.float()

    def delta(self, x: torch.Tensor, base_out: torch.Tensor, layer) -> torch.Tensor:
        dtype = compute_dtype_of(x, self.A)
        return x.to(dtype) @ (self.quantized_weight(layer, dtype) - layer.base.weight.to(dtype)).T

    @torch.no_grad()
    def folded(self, layer) -> QuantizedLinear:
        """W_q as symmetric INT-k (codes = ⌊W'/α⌉ + 2^(k-1), scale = α in fp16)."""
        cfg = FormatConfig(format="int", bits=self.bits, group_size=self.group, symmetric=True).validate()
        w = layer.base.weight.float() + LowRankAdapter.delta_weight(self).float()
        scale = self.step.detach().clamp_min(6.2e-5).to(torch.float16)  # fp16's smallest normal: no zero scale
        wg = as_groups(w, self.group)
        codes = (torch.round(wg / scale.float().unsqueeze(-1)) + 2 ** (self.bits - 1)).clamp(0, 2**self.bits - 1).to(torch.uint8)
        qw = AffineWeight.from_codes(w.shape, cfg, from_groups(codes, w.shape[1]), {"scale": scale})
        return QuantizedLinear.from_weight(qw, layer.base.bias)


QAT_VARIANTS = (Variant.PEQA, Variant.L4Q)


def fold_quantized(model: nn.Module, name: str) -> list[str]:
    """Replace every layer with a PEQA / L4Q adapter `name` by its quantized result."""
    from .lora import lora_layers

    done = []
    for module, layer in lora_layers(model).items():
        ad = layer.adapters[name] if name in layer.adapters else None
        if ad is not None and ad.variant in QAT_VARIANTS:
            set_module(model, module, ad.folded(layer))
            done.append(module)
    return done
