"""LLM.int8() (Dettmers et al., 2022): int8 weights with a full-precision outlier decomposition.

Weights are int8, symmetric, one fp16 scale per output row (vector-wise). At run time the
input features (columns of X) holding any |x| >= threshold are multiplied in full precision
against the dequantized weight columns; every other feature is quantized per row of X to int8
and multiplied int8 x int8 -> int32, then rescaled by both scales:

    Y = X[:, O] W[:, O]^T + (s_x s_w^T) ⊙ (Q(X[:, ~O]) Q(W[:, ~O])^T)
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .affine import AffineWeight
from .base import FORMATS


def int8_rows(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Row-wise absmax int8 quantization: (codes int8, scale fp32 (rows, 1)), x ≈ codes·scale."""
    scale = x.abs().amax(dim=1, keepdim=True).float() / 127
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))
    return torch.round(x.float() / scale).clamp(-127, 127).to(torch.int8), scale


def int8_matmul(a: torch.Tensor, b_t: torch.Tensor) -> torch.Tensor:
    """int8 (m, k) @ int8 (k, n) -> int32, exact. CUDA: torch._int_mm where it takes the shapes.
    Elsewhere an fp64 GEMM, exact since |sums| <= k·127·128 < 2^53, and on CPU far faster than
    torch's int8 GEMM (about 25x here)."""
    if a.device.type == "cuda":
        try:
            return torch._int_mm(a, b_t)
        except RuntimeError:  # fewer than 17 rows, or sizes not multiples of 8
            pass
    return (a.double() @ b_t.double()).to(torch.int32)


@FORMATS.register("int8-outlier")
@dataclass
class Int8OutlierWeight(AffineWeight):
    """Per-channel symmetric int8 codes (stored with offset 128) whose linear() is LLM.int8()."""

    supported_bits = (8,)
    default_bits = 8
    fixed = {"group_size": 0, "symmetric": True}  # vector-wise symmetric, whatever was asked

    def int8_weight(self) -> torch.Tensor:
        """(out, in) int8 codes centered at zero."""
        return (self.int_codes().to(torch.int16) - 128).to(torch.int8)

    def linear(self, x: torch.Tensor) -> torch.Tensor:
        x2 = x.reshape(-1, self.shape[1])
        outliers = (x2.abs() >= self.cfg.outlier_threshold).any(dim=0)  # (in,) feature mask
        w_scale = self.scale.float().view(1, -1)  # (1, out): the weight's row scales
        x_rest = torch.where(outliers, torch.zeros_like(x2), x2)
        xq, x_scale = int8_rows(x_rest)
        y = int8_matmul(xq, self.int8_weight().t()).float() * x_scale * w_scale
        if outliers.any():
            w_out = self.dequantize(torch.float32)[:, outliers]
            y = y + x2[:, outliers].float() @ w_out.t()
        return y.to(x.dtype).view(*x.shape[:-1], self.shape[0])
