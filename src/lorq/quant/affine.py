"""INT4 affine (asymmetric) group-wise quantization.

Each group of `group_size` consecutive weights of a row gets a scale s = (max - min) / 15 and
an offset m = min, both stored as fp16; codes q = round((w - m) / s) in [0, 15] are packed two
per byte, and w ≈ q·s + m. Groups run along the input dimension, so the format maps directly
onto int4 weight-only matmul kernels (scale and zero per (group, output channel)).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..errors import LorqError
from .base import FORMATS, FormatConfig, TensorFormat
from .packing import pack_4bit, unpack_4bit

QMAX = 15


def affine_params(wg: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-group (scale, min) of wg (out, groups, group_size), rounded to their fp16 storage."""
    lo = wg.amin(dim=-1)
    hi = wg.amax(dim=-1)
    scale = ((hi - lo) / QMAX).to(torch.float16)
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))  # constant group: any scale works
    return scale, lo.to(torch.float16)


def quantize_affine(w: torch.Tensor, group_size: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(codes uint8 (out, in), scale fp16 (out, groups), min fp16 (out, groups))."""
    out_f, in_f = w.shape
    wg = w.detach().float().view(out_f, in_f // group_size, group_size)
    scale, lo = affine_params(wg)
    q = torch.round((wg - lo.float().unsqueeze(-1)) / scale.float().unsqueeze(-1)).clamp(0, QMAX)
    return q.to(torch.uint8).view(out_f, in_f), scale, lo


def dequantize_affine(codes: torch.Tensor, scale: torch.Tensor, lo: torch.Tensor, group_size: int) -> torch.Tensor:
    out_f, in_f = codes.shape
    qg = codes.view(out_f, in_f // group_size, group_size).float()
    return (qg * scale.float().unsqueeze(-1) + lo.float().unsqueeze(-1)).view(out_f, in_f)


@FORMATS.register("int4")
@dataclass
class AffineWeight(TensorFormat):
    """INT4 codes packed two per byte with fp16 scale and min per (row, group)."""

    shape: tuple[int, int]
    cfg: FormatConfig
    codes: torch.Tensor  # (out * in / 2,) uint8
    scale: torch.Tensor  # (out, in / group_size) fp16
    min: torch.Tensor  # (out, in / group_size) fp16

    supported_bits = (4,)

    @classmethod
    def from_float(cls, w: torch.Tensor, cfg: FormatConfig) -> "AffineWeight":
        if w.shape[1] % cfg.group_size:
            raise LorqError(
                f"int4 group size {cfg.group_size} does not divide the input dimension {w.shape[1]}"
            )
        codes, scale, lo = quantize_affine(w, cfg.group_size)
        return cls(tuple(w.shape), cfg, pack_4bit(codes), scale, lo)

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        codes = unpack_4bit(self.codes, self.shape[0] * self.shape[1]).view(self.shape)
        return dequantize_affine(codes, self.scale, self.min, self.cfg.group_size).to(dtype)

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {"codes": self.codes, "scale": self.scale, "min": self.min}
