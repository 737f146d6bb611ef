"""Lean activations: the decoder's RMSNorms, SwiGLU MLPs and grouped-query attention keep fewer
tensors for backward.

transformers' eager forms keep every intermediate their ops' backward needs: an RMSNorm keeps
its input and its normalized output (2H values per token), a SwiGLU MLP keeps gate, silu(gate),
up and their product (4I). Here an RMSNorm keeps its input and 1/rms (H + 1) and the MLP keeps
gate and up (2I); the rest is recomputed elementwise in backward, no matmul is. The forward is
the same computation (bit for bit); the backward's rounding may differ in the last bits.
On SmolLM2-135M a 4 x 64-token step keeps 228 MiB instead of 352 (tests/train/test_lean.py checks
the saving, 2H + 2I values per token and layer, exactly).

Attention under a mask (documents kept apart in packed blocks): transformers repeats each shared
key/value head once per query head before calling SDPA, except where no mask is given, since
CUDA's fused kernels take grouped queries only without one. On the CPU its kernel takes them
with a mask too, so there the heads are read in place: 2 (heads - kv_heads) head_dim values
per token and layer fewer kept (SmolLM2: 3 query heads per kv head, 90 MiB at 4 x 256 tokens)
and about a fifth less attention time, the same result (forward bit for bit).
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Callable, Iterator

import torch
import torch.nn as nn
import torch.nn.functional as F
from transformers import AttentionInterface, PretrainedConfig
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask


def wide(t: torch.Tensor) -> torch.Tensor:
    """t in fp32, or wider if it already is."""
    return t.to(torch.promote_types(t.dtype, torch.float32))


class RMSNormFn(torch.autograd.Function):
    """weight * (x / rms(x)), computed in fp32 and cast back as transformers' LlamaRMSNorm does;
    keeps x and 1/rms for backward."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
        xw = wide(x)
        inv_rms = torch.rsqrt(xw.pow(2).mean(-1, keepdim=True) + eps)
        ctx.save_for_backward(x, weight, inv_rms)
        return weight * (xw * inv_rms).to(x.dtype)

    @staticmethod
    def backward(ctx, grad_y: torch.Tensor):
        x, weight, inv_rms = ctx.saved_tensors
        x_hat = wide(x) * inv_rms
        grad_w = None
        if ctx.needs_input_grad[1]:
            grad_w = (grad_y * x_hat.to(x.dtype)).reshape(-1, x.shape[-1]).sum(0).to(weight.dtype)
        g = wide(grad_y * weight)  # gradient of x_hat
        # d(x * r)/dx with r = mean(x^2)^-1/2: r * (g - x_hat * mean(g * x_hat))
        grad_x = inv_rms * (g - x_hat * (g * x_hat).mean(-1, keepdim=True))
        return grad_x.to(x.dtype), grad_w, None


def swiglu(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    return F.silu(gate) * up


class SwiGLUFn(torch.autograd.Function):
    """silu(gate) * up, keeping only gate and up for backward."""

    @staticmethod
    def forward(ctx, gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(gate, up)
        return swiglu(gate, up)

    @staticmethod
    def backward(ctx, grad_h: torch.Tensor):
        # autograd's own steps for silu(gate) * up (its fused silu_backward), silu(gate) recomputed
        gate, up = ctx.saved_tensors
        grad_up = grad_h * F.silu(gate) if ctx.needs_input_grad[1] else None
        grad_gate = torch.ops.aten.silu_backward(grad_h * up, gate) if ctx.needs_input_grad[0] else None
        return grad_gate, grad_up


@contextmanager
def recomputed(t: torch.Tensor, make: Callable[[], torch.Tensor]) -> Iterator[None]:
    """Ops run inside do not keep `t` (or a view of it) for backward: they keep `make`, which
    rebuilds it (bit for bit) when backward needs it. Works for any module consuming `t`."""
    storage, dtype = t.untyped_storage().data_ptr(), t.dtype

    def pack(s: torch.Tensor):
        if s.dtype == dtype and s.untyped_storage().data_ptr() == storage:
            return make, s.size(), s.stride(), s.storage_offset()
        return s

    def unpack(p):
        if isinstance(p, tuple):
            rebuild, size, stride, offset = p
            with torch.no_grad():
                return rebuild().as_strided(size, stride, offset)
        return p

    with torch.autograd.graph.saved_tensors_hooks(pack, unpack):
        yield


def lean_rms_norm(self, hidden_states: torch.Tensor) -> torch.Tensor:
    return RMSNormFn.apply(hidden_states, self.weight, self.variance_epsilon)


def lean_swiglu_mlp(self, x: torch.Tensor) -> torch.Tensor:
    gate, up = self.gate_proj(x), self.up_proj(x)
    if not (torch.is_grad_enabled() and (gate.requires_grad or up.requires_grad)):
        return self.down_proj(swiglu(gate, up))
    h = SwiGLUFn.apply(gate, up)
    with recomputed(h, lambda: swiglu(gate, up)):  # gate and up are kept anyway
        return self.down_proj(h)


GQA_SDPA = "lorq_gqa_sdpa"
SDPA_TAKES_GQA = torch.__version__ >= "2.5"  # SDPA's enable_gqa


def gqa_sdpa_attention(module: nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                       attention_mask: torch.Tensor | None, dropout: float = 0.0, scaling: float | None = None,
                       is_causal: bool | None = None, **kwargs) -> tuple[torch.Tensor, None]:
    """transformers' SDPA attention, (batch, heads, T, dim) -> (batch, T, heads, dim), with the key
    and value heads of grouped-query attention read in place under a mask on the CPU; anything
    else (another device, a cache, a single query, a bias, soft-capping) is transformers' own."""
    grouped = getattr(module, "num_key_value_groups", 1) > 1
    if (not grouped or not SDPA_TAKES_GQA or attention_mask is None or query.device.type != "cpu" or query.shape[2] == 1
            or key.shape[2] != query.shape[2] or kwargs.get("position_bias") is not None or kwargs.get("softcap") is not None):
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, is_causal=is_causal, **kwargs)
    out = F.scaled_dot_product_attention(query, key, value, attn_mask=attention_mask, dropout_p=dropout, scale=scaling, enable_gqa=True)
    return out.transpose(1, 2).contiguous(), None


AttentionInterface.register(GQA_SDPA, gqa_sdpa_attention)
AttentionMaskInterface.register(GQA_SDPA, sdpa_mask)  # the same masks as "sdpa"


def is_silu(module: nn.Module) -> bool:
    return type(getattr(module, "act_fn", None)).__name__ in ("SiLU", "SiLUActivation")


# transformers classes whose eager forward is exactly the one replaced (LlamaRMSNorm's:
# weight * normalized, not Gemma's 1 + weight; LlamaMLP's down(act(gate) * up), SiLU only)
RMS_NORMS = ("LlamaRMSNorm", "MistralRMSNorm", "Qwen2RMSNorm", "Qwen3RMSNorm", "Phi3RMSNorm", "GraniteRMSNorm", "SmolLM3RMSNorm")
SWIGLU_MLPS = ("LlamaMLP", "MistralMLP", "Qwen2MLP", "Qwen3MLP", "Olmo2MLP", "GraniteMLP", "SmolLM3MLP")
LEAN_FORWARDS: dict[str, tuple[Callable, Callable[[nn.Module], bool]]] = {
    **{name: (lean_rms_norm, lambda m: True) for name in RMS_NORMS},
    **{name: (lean_swiglu_mlp, is_silu) for name in SWIGLU_MLPS},
}


def make_lean(model: nn.Module) -> list[nn.Module | PretrainedConfig]:
    """Switch the model's known RMSNorms and SwiGLU MLPs to their lean forms (this instance
    only; the class stays as it is) and the configs its SDPA attention layers read to
    gqa_sdpa_attention; returns what changed, for restore_stock. Not meant under activation
    checkpointing, which keeps nothing inside a layer anyway."""
    swapped: list[nn.Module | PretrainedConfig] = []
    for m in model.modules():
        lean, applies = LEAN_FORWARDS.get(type(m).__name__, (None, None))
        if lean is not None and "forward" not in vars(m) and applies(m):
            m.forward = lean.__get__(m)
            swapped.append(m)
    for m in model.modules():  # attention layers (of each sub-model: one config each)
        config = getattr(m, "config", None)
        if hasattr(m, "num_key_value_groups") and getattr(config, "_attn_implementation", None) == "sdpa":
            config._attn_implementation = GQA_SDPA
            swapped.append(config)
    return swapped


def restore_stock(swapped: list[nn.Module | PretrainedConfig]) -> None:
    for m in swapped:
        if isinstance(m, nn.Module):
            vars(m).pop("forward", None)
        elif m._attn_implementation == GQA_SDPA:
            m._attn_implementation = "sdpa"
