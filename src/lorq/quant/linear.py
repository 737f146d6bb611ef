"""QuantizedLinear (a frozen low-bit nn.Linear) and quantize_model (model surgery + report)."""

from __future__ import annotations

import re
import time
from dataclasses import dataclass, field

import torch
import torch.nn as nn
from tqdm.auto import tqdm

from .base import FORMATS, FormatConfig, QuantFormat, QuantizedWeight


def compute_dtype(x: torch.Tensor) -> torch.dtype:
    """The dtype a matmul on x runs in: the autocast dtype when autocast is on, else x's."""
    dev = x.device.type
    if torch.is_autocast_enabled(dev):
        return torch.get_autocast_dtype(dev)
    return x.dtype


class _DequantMatmul(torch.autograd.Function):
    """y = x @ W.T with W dequantized in forward and again in backward, never stored.

    Only one layer's float weight exists at a time; the gradient flows to x only (the
    codes are frozen buffers).
    """

    @staticmethod
    def forward(ctx, x: torch.Tensor, module: "QuantizedLinear") -> torch.Tensor:
        dtype = compute_dtype(x)
        ctx.module, ctx.x_dtype = module, x.dtype
        return module.qweight().linear(x.to(dtype))

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):
        w = ctx.module.qweight().dequantize(grad_out.dtype)  # (out, in)
        return (grad_out @ w).to(ctx.x_dtype), None


class QuantizedLinear(nn.Module):
    """A frozen linear layer whose weight lives in a QuantizedWeight format.

    The format's tensors are buffers (they move with .to() and appear in state_dict as
    `<module>.<tensor>`); the QuantizedWeight view over them is rebuilt per call, for free.
    """

    def __init__(self, in_features: int, out_features: int, cfg: FormatConfig, tensors: dict[str, torch.Tensor], bias: torch.Tensor | None = None):
        super().__init__()
        self.in_features, self.out_features, self.cfg = in_features, out_features, cfg
        self._names = tuple(tensors)
        for name, t in tensors.items():
            self.register_buffer(name, t)
        self.bias = nn.Parameter(bias.detach().clone(), requires_grad=False) if bias is not None else None

    @classmethod
    def from_linear(cls, linear: nn.Linear, cfg: FormatConfig) -> "QuantizedLinear":
        qw = FORMATS.get(cfg.format).from_float(linear.weight.data, cfg)
        return cls(linear.in_features, linear.out_features, cfg, qw.state_dict(), linear.bias)

    def qweight(self) -> QuantizedWeight:
        tensors = {n: getattr(self, n) for n in self._names}
        return FORMATS.get(self.cfg.format).from_state_dict(tensors, (self.out_features, self.in_features), self.cfg)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = _DequantMatmul.apply(x, self)
        return y + self.bias.to(y.dtype) if self.bias is not None else y

    linear = forward

    @property
    def nbytes(self) -> int:
        return self.qweight().nbytes + (self.bias.numel() * self.bias.element_size() if self.bias is not None else 0)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, format={self.cfg.format.value}, group_size={self.cfg.group_size}"


# Every linear layer inside the repeated decoder blocks; never lm_head or embeddings.
DECODER_LINEARS = r"(^|\.)(layers|h|blocks)\.\d+\."


@dataclass
class QuantReport:
    """What quantize_model did: per-module and total storage, error, time."""

    modules: dict[str, dict] = field(default_factory=dict)
    seconds: float = 0.0

    @property
    def n_weights(self) -> int:
        return sum(m["numel"] for m in self.modules.values())

    @property
    def bits_per_weight(self) -> float:
        return 8 * sum(m["nbytes"] for m in self.modules.values()) / max(self.n_weights, 1)

    @property
    def rel_error(self) -> float:
        """Relative Frobenius error ||W - Q||_F / ||W||_F over all quantized matrices together."""
        num = sum(m["err_sq"] for m in self.modules.values())
        den = sum(m["norm_sq"] for m in self.modules.values())
        return (num / den) ** 0.5 if den else 0.0

    def summary(self) -> dict:
        return {
            "quantized_modules": len(self.modules),
            "quantized_weights": self.n_weights,
            "bits_per_weight": round(self.bits_per_weight, 4),
            "relative_error": round(self.rel_error, 6),
            "seconds": round(self.seconds, 2),
        }


def match_modules(model: nn.Module, patterns: list[str], kinds: tuple[type, ...]) -> list[str]:
    """Names of modules of the given kinds whose name matches any regex (re.search)."""
    regexes = [re.compile(p) for p in patterns]
    return [n for n, m in model.named_modules() if isinstance(m, kinds) and any(r.search(n) for r in regexes)]


def set_module(model: nn.Module, name: str, new: nn.Module) -> None:
    """Replace submodule `name`; the new module takes over the old one's train/eval mode."""
    parent_name, _, leaf = name.rpartition(".")
    new.train(model.get_submodule(name).training)
    setattr(model.get_submodule(parent_name) if parent_name else model, leaf, new)


def quantize_model(model: nn.Module, rules: list[tuple[str, FormatConfig]], progress: bool = True) -> QuantReport:
    """Replace every nn.Linear matched by a rule (first match wins) with a QuantizedLinear."""
    report = QuantReport()
    start = time.perf_counter()
    plan = []
    for name, mod in model.named_modules():
        if not isinstance(mod, nn.Linear):
            continue
        cfg = next((c for p, c in rules if re.search(p, name)), None)
        if cfg is not None and QuantFormat(cfg.format) is not QuantFormat.NONE:
            plan.append((name, mod, cfg))
    for name, mod, cfg in tqdm(plan, desc="quantize", unit="layer", disable=not progress):
        q = QuantizedLinear.from_linear(mod, cfg)
        w = mod.weight.data.float()
        err = (q.qweight().dequantize(torch.float32) - w).pow(2).sum().item()
        report.modules[name] = {
            "format": cfg.format.value, "numel": w.numel(), "nbytes": q.qweight().nbytes,
            "err_sq": err, "norm_sq": w.pow(2).sum().item(),
        }
        set_module(model, name, q)
    report.seconds = time.perf_counter() - start
    return report
