"""Q-GaLore (Zhang et al. 2024): GaLore with INT8 weights, INT4 projections and lazy,
layer-adaptive projection refreshes.

- The decoder's linear weights live as int8 codes with one fp32 scale per (row, group of 128)
  (a scale grows when an update takes a weight past its group's range):
  `Int8Linear`. Its backward hands the weight gradient straight to the optimizer (no float
  gradient or float weight is ever stored), which applies the GaLore update to the dequantized
  weight and writes it back with stochastic rounding, E[round(x)] = x, so updates smaller than
  one quantization step still move the weight on average.
- Each projection P is stored as INT4 (lorq's affine INT4 format, groups of 64) and dequantized
  when used.
- When a layer's new projection is similar to the previous one (mean |cos| of matching singular
  vectors ≥ `similarity`), its refresh interval doubles: the subspace has stopped moving.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..eval.memory import own_file_backed_tensors
from ..quant.affine import AffineWeight
from ..quant.base import FormatConfig
from ..quant.linear import DECODER_LINEARS, match_modules, set_module
from .galore import GaLoreAdamW

GROUP = 128
P_FORMAT = FormatConfig(format="int", bits=4, group_size=64)


def group_absmax(w: torch.Tensor) -> torch.Tensor:
    """(out, in) -> (out, groups of GROUP): the largest |w| of each group."""
    pad = -w.shape[1] % GROUP
    w = torch.cat([w, w[:, -1:].expand(-1, pad)], 1) if pad else w
    return w.abs().view(w.shape[0], -1, GROUP).amax(-1)


def int8_codes(w: torch.Tensor, scale: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
    """w (out, in) / scale (out, groups) -> int8 codes in [-127, 127]; stochastic rounding with a
    (CPU) generator (floor(x + u), u ~ U[0, 1)), nearest without."""
    x = w / scale.repeat_interleave(GROUP, dim=1)[:, : w.shape[1]]
    x = torch.floor(x + torch.rand(x.shape, generator=generator).to(x.device)) if generator is not None else torch.round(x)
    return x.clamp(-127, 127).to(torch.int8)


class Int8Matmul(torch.autograd.Function):
    """y = x Wᵀ with W dequantized; backward passes ∂L/∂W to the module's `on_grad`."""

    @staticmethod
    def forward(ctx, x, module):
        ctx.save_for_backward(x)
        ctx.module = module
        return F.linear(x, module.weight_float().to(x.dtype))

    @staticmethod
    def backward(ctx, g):
        (x,) = ctx.saved_tensors
        module = ctx.module
        grad_w = g.reshape(-1, g.shape[-1]).T.float() @ x.reshape(-1, x.shape[-1]).float()  # (out, in)
        grad_x = g @ module.weight_float().to(g.dtype)
        module.on_grad(grad_w)
        return grad_x, None


class Int8Linear(nn.Module):
    """A linear layer whose weight is int8 codes + fp32 group scales (buffers, not parameters)."""

    def __init__(self, linear: nn.Linear):
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        w = linear.weight.detach().float()
        scale = (group_absmax(w) / 127).clamp_min(1e-12)  # (out, groups)
        self.register_buffer("scale", scale)
        self.register_buffer("codes", int8_codes(w, scale, None))
        self.bias = linear.bias
        self.grad_hook, self.index = None, 0

    def weight_float(self) -> torch.Tensor:
        return self.codes.float() * self.scale.repeat_interleave(GROUP, dim=1)[:, : self.in_features]

    def on_grad(self, grad_w: torch.Tensor) -> None:
        if self.grad_hook is not None:
            self.grad_hook(self, grad_w)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = Int8Matmul.apply(x, self) if torch.is_grad_enabled() else F.linear(x, self.weight_float().to(x.dtype))
        return y + self.bias.to(y.dtype) if self.bias is not None else y

    def to_linear(self) -> nn.Linear:
        lin = nn.Linear(self.in_features, self.out_features, bias=self.bias is not None)
        with torch.no_grad():
            lin.weight.copy_(self.weight_float())
            if self.bias is not None:
                lin.bias.copy_(self.bias)
        return lin


def quantize_weights_int8(model: nn.Module) -> dict[str, Int8Linear]:
    """Replace the decoder's nn.Linear layers by Int8Linear; returns them by name."""
    out = {}
    for name in match_modules(model, [DECODER_LINEARS], (nn.Linear,)):
        layer = Int8Linear(model.get_submodule(name))
        set_module(model, name, layer)
        out[name] = layer
    own_file_backed_tensors(model)  # the float weights' pages in the loaded file are released with its mapping
    return out


def dequantize_weights(model: nn.Module) -> None:
    """Back to nn.Linear (for saving an HF model)."""
    for name, m in list(model.named_modules()):
        if isinstance(m, Int8Linear):
            set_module(model, name, m.to_linear())


class QGaLoreAdamW(GaLoreAdamW):
    """GaLore for Int8Linear weights: INT4 projections, lazy refresh, stochastic rounding.

    The int8 code tensors are this optimizer's "parameters" (a group with `int8`), so their
    state is checkpointed like any other; they are updated from Int8Linear's backward."""

    def __init__(self, params, layers: dict[str, Int8Linear], similarity: float = 0.4, seed: int = 0, **kw):
        super().__init__(params, **kw)
        self.similarity, self.seed = similarity, seed
        for i, layer in enumerate(layers.values()):
            layer.grad_hook, layer.index = self.int8_hook, i
        # by index: load_state_dict replaces the group dicts
        self.int8_group = next(i for i, g in enumerate(self.param_groups) if g.get("int8"))

    def refresh_projection(self, st: dict, G: torch.Tensor, group: dict) -> None:
        old = self.projector(st) if "P_codes" in st else None
        super().refresh_projection(st, G, group)
        P = st.pop("P")
        qw = AffineWeight.from_float(P, P_FORMAT.validate())
        st["P_codes"], st["P_scale"], st["P_min"] = qw.codes, qw.scale, qw.min
        st["P_rows"], st["P_cols"] = P.shape
        st.setdefault("gap", group["update_gap"])
        st["next_refresh"] = st.get("step", 0) + st["gap"]
        if old is not None and old.shape == P.shape:
            cos = (old * P).sum(0).abs() / (old.norm(dim=0) * P.norm(dim=0)).clamp_min(1e-12)
            if float(cos.mean()) >= self.similarity:  # the subspace has settled: look again later
                st["gap"] = st["gap"] * 2
                st["next_refresh"] = st["step"] + st["gap"]

    def refresh_due(self, st: dict, group: dict) -> bool:
        return st["step"] >= st.get("next_refresh", 0)

    def projector(self, st: dict) -> torch.Tensor:
        qw = AffineWeight((st["P_rows"], st["P_cols"]), P_FORMAT, st["P_codes"], st["P_scale"], st["P_min"])
        return qw.dequantize(torch.float32)

    @torch.no_grad()
    def int8_hook(self, layer: Int8Linear, grad_w: torch.Tensor) -> None:
        group = self.param_groups[self.int8_group]
        st = self.state[layer.codes]
        grad = self.clipped(grad_w)
        w = layer.weight_float()
        if group["weight_decay"]:
            w.mul_(1 - group["lr"] * group["weight_decay"])
        self.projected_step(w, st, grad, group)
        layer.scale.copy_(torch.maximum(layer.scale, group_absmax(w) / 127))  # a weight may outgrow its group's range
        g = torch.Generator().manual_seed((self.seed * 1000003 + st["step"]) * 1009 + layer.index)  # resumable
        layer.codes.copy_(int8_codes(w, layer.scale, g))
