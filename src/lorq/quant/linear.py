"""QuantizedLinear (a frozen low-bit nn.Linear) and quantize_model (model surgery + report)."""

from __future__ import annotations

import re

import torch
import torch.nn as nn
import torch.nn.functional as F

from .base import FORMATS, FormatConfig, QuantizedWeight


def compute_dtype(x: torch.Tensor) -> torch.dtype:
    """The dtype a matmul on x runs in: the autocast dtype when autocast is on, else x's."""
    dev = x.device.type
    if torch.is_autocast_enabled(dev):
        return torch.get_autocast_dtype(dev)
    return x.dtype


def tensors_key(tensors) -> tuple:
    """Changes whenever one of the tensors is replaced (.to(), load) or modified in place (but not
    through .data, which bypasses version counting; inference tensors have no counter)."""
    return tuple((id(t), 0 if t.is_inference() else t._version) for t in tensors)


class _DequantMatmul(torch.autograd.Function):
    """y = x @ W.T with W dequantized in forward and again in backward, never stored.

    Only one layer's float weight exists at a time; the gradient flows to x only (the
    codes are frozen buffers).
    """

    @staticmethod
    def forward(ctx, x: torch.Tensor, module: "QuantizedLinear") -> torch.Tensor:
        dtype = compute_dtype(x)
        ctx.module, ctx.x_dtype = module, x.dtype
        return module.matmul(x.to(dtype))

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):
        w = ctx.module.qweight().dequantize(grad_out.dtype)  # (out, in)
        return (grad_out @ w).to(ctx.x_dtype), None


LOWRANK = ("lowrank_b", "lowrank_a")  # buffer names of the frozen compensation L1 (out, r), L2 (r, in)


class QuantizedLinear(nn.Module):
    """A frozen linear layer whose weight lives in a QuantizedWeight format, optionally plus a
    frozen low-rank compensation: y = x Qᵀ + (x L2ᵀ) L1ᵀ (+ bias).

    The format's tensors are buffers (they move with .to() and appear in state_dict as
    `<module>.<tensor>`); the QuantizedWeight view over them is rebuilt per call, for free.
    """

    def __init__(self, in_features: int, out_features: int, cfg: FormatConfig, tensors: dict[str, torch.Tensor],
                 bias: torch.Tensor | None = None, lowrank: tuple[torch.Tensor, torch.Tensor] | None = None):
        super().__init__()
        self.in_features, self.out_features, self.cfg = in_features, out_features, cfg
        self._names = tuple(tensors)
        for name, t in tensors.items():
            self.register_buffer(name, t)
        self.bias = nn.Parameter(bias.detach().clone(), requires_grad=False) if bias is not None else None
        self.set_lowrank(lowrank)

    def set_lowrank(self, lowrank: tuple[torch.Tensor, torch.Tensor] | None) -> None:
        """Attach (L1 (out, r), L2 (r, in)) as the frozen compensation branch, or drop it (None)."""
        if lowrank is not None:
            l1, l2 = lowrank
            if l1.dim() != 2 or l2.dim() != 2 or l1.shape[0] != self.out_features or l2.shape[1] != self.in_features or l1.shape[1] != l2.shape[0]:
                raise ValueError(f"low-rank factors {tuple(l1.shape)} x {tuple(l2.shape)} do not fit a {self.out_features}x{self.in_features} layer")
        for name, t in zip(LOWRANK, lowrank or (None, None)):
            self.register_buffer(name, t.detach().contiguous() if t is not None else None)

    @property
    def rank(self) -> int:
        return 0 if self.lowrank_a is None else self.lowrank_a.shape[0]

    @classmethod
    def from_linear(cls, linear: nn.Linear, cfg: FormatConfig) -> "QuantizedLinear":
        cfg.validate()
        return cls.from_weight(FORMATS.get(cfg.format).from_float(linear.weight.data, cfg), linear.bias)

    @classmethod
    def from_weight(cls, qw: QuantizedWeight, bias: torch.Tensor | None = None, lowrank=None) -> "QuantizedLinear":
        return cls(qw.shape[1], qw.shape[0], qw.cfg, qw.state_dict(), bias, lowrank)

    use_kernels = True  # class-wide switch; benchmarks and tests turn fast kernels off to compare

    def _buffers_key(self) -> tuple:
        return tensors_key(getattr(self, n) for n in self._names)

    def qweight(self) -> QuantizedWeight:
        """The format's view over the buffers, cached while they are unchanged (formats may cache
        derived values on it, e.g. NF's double-dequantized absmax)."""
        key = self._buffers_key()
        if getattr(self, "_qweight_key", None) != key:
            tensors = {n: getattr(self, n) for n in self._names}
            qw = FORMATS.get(self.cfg.format).from_state_dict(tensors, (self.out_features, self.in_features), self.cfg)
            self._qweight, self._qweight_key = qw, key
        return self._qweight

    def _apply(self, fn, *args, **kwargs):
        # .to()/.cuda() replace the buffers: drop views and kernels that hold the old ones
        self._qweight = self._qweight_key = self._kernel = self._kernel_key = None
        return super()._apply(fn, *args, **kwargs)

    def kernel(self, x: torch.Tensor):
        """The format's fast kernel for x's dtype and device (prepared once, cached), or None."""
        qw = self.qweight()
        if not self.use_kernels or not hasattr(qw, "fast_kernel"):
            return None
        key = (x.device, x.dtype) + self._buffers_key()
        if getattr(self, "_kernel_key", None) != key:
            self._kernel, self._kernel_key = qw.fast_kernel(x.dtype, x.device), key
        return self._kernel

    def matmul(self, x: torch.Tensor) -> torch.Tensor:
        """x @ W.T through the fast kernel where one applies, else dequantize and multiply."""
        kernel = self.kernel(x)
        return kernel(x) if kernel is not None else self.qweight().linear(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = _DequantMatmul.apply(x, self)
        if self.lowrank_a is not None:  # (..., in) -> (..., r) -> (..., out)
            y = y + F.linear(F.linear(x.to(y.dtype), self.lowrank_a.to(y.dtype)), self.lowrank_b.to(y.dtype))
        return y + self.bias.to(y.dtype) if self.bias is not None else y

    linear = forward

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """The effective weight Q + L1 L2 (out, in)."""
        w = self.qweight().dequantize(dtype)
        return w + (self.lowrank_b.to(dtype) @ self.lowrank_a.to(dtype)) if self.rank else w

    @property
    def nbytes(self) -> int:
        extra = [t for t in (self.bias, self.lowrank_a, self.lowrank_b) if t is not None]
        return self.qweight().nbytes + sum(t.numel() * t.element_size() for t in extra)

    def extra_repr(self) -> str:
        rank = f", lowrank={self.rank}" if self.rank else ""
        return f"in_features={self.in_features}, out_features={self.out_features}, format={self.cfg.describe()}{rank}"


# The list of repeated decoder blocks, and every linear layer inside it (never lm_head or embeddings).
DECODER_BLOCKS = r"(^|\.)(layers|h|blocks)"
DECODER_LINEARS = DECODER_BLOCKS + r"\.\d+\."


def match_modules(model: nn.Module, patterns: list[str], kinds: tuple[type, ...]) -> list[str]:
    """Names of modules of the given kinds whose name matches any regex (re.search)."""
    regexes = [re.compile(p) for p in patterns]
    return [n for n, m in model.named_modules() if isinstance(m, kinds) and any(r.search(n) for r in regexes)]


def set_module(model: nn.Module, name: str, new: nn.Module) -> None:
    """Replace submodule `name`; the new module takes over the old one's train/eval mode."""
    parent_name, _, leaf = name.rpartition(".")
    new.train(model.get_submodule(name).training)
    setattr(model.get_submodule(parent_name) if parent_name else model, leaf, new)


def cast_unquantized(model: nn.Module, dtype: torch.dtype) -> nn.Module:
    """Cast every float parameter and buffer to dtype, except the stored quantized tensors.

    model.to(dtype) would also cast QuantizedLinear's fp16/fp32 scales and change the codes'
    meaning; this leaves them (and the fp16 low-rank factors) exactly as stored. Rotary
    embeddings' frequencies stay fp32, as transformers keeps them in a bf16 model (rounded to
    bf16 they would turn positions a few hundred tokens apart by radians).
    """
    for mod in model.modules():
        keep = set(mod._names) | set(LOWRANK) if isinstance(mod, QuantizedLinear) else set()
        for name, p in mod.named_parameters(recurse=False):
            p.data = p.data.to(dtype)
        for name, b in mod.named_buffers(recurse=False):
            if b.is_floating_point() and name not in keep and not name.endswith("inv_freq"):
                mod._buffers[name] = b.to(dtype)
    return model
