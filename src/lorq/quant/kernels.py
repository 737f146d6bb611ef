"""Fast int4 weight-only matmul through PyTorch's built-in kernels.

INT4 asymmetric group-wise weights map onto `aten._weight_int4pack_mm_for_cpu` (CPU) and
`aten._weight_int4pack_mm` (CUDA), which take bf16 activations, the weight in a tiled int4
layout, and per (group, output channel) a bf16 scale and "zero" under the convention
w = (q - 8)·scale + zero, i.e. zero = min + 8·scale. Everything else dequantizes per layer.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .base import QuantFormat

KERNEL_GROUPS = (32, 64, 128, 256)
INNER_K_TILES = 8


@dataclass
class Int4Kernel:
    """A weight prepared once for the int4 kernel of one device; call it like a linear layer."""

    packed: torch.Tensor
    scales_zeros: torch.Tensor  # (in / group, out, 2) bf16
    group: int
    out_features: int

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        x2 = x.reshape(-1, x.shape[-1]).to(torch.bfloat16).contiguous()
        mm = torch.ops.aten._weight_int4pack_mm_for_cpu if x.device.type == "cpu" else torch.ops.aten._weight_int4pack_mm
        return mm(x2, self.packed, self.group, self.scales_zeros).view(*x.shape[:-1], self.out_features)


def inner_k_tiles(in_features: int, device: torch.device) -> int | None:
    """The kernels' K tiling: CPU packs in tiles of 16·8; CUDA takes 8, 4 or 2 tiles of 16."""
    if device.type == "cpu":
        return INNER_K_TILES
    return next((t for t in (8, 4, 2) if in_features % (16 * t) == 0), None)


def int4_kernel_applies(qw, dtype: torch.dtype, device: torch.device) -> bool:
    cfg = qw.cfg
    out_f, in_f = qw.shape
    out_multiple = 16 if device.type == "cpu" else 8  # the packing functions' N tiling
    return (
        cfg.format is QuantFormat.INT and cfg.bits == 4 and not cfg.symmetric
        and dtype == torch.bfloat16 and device.type in ("cpu", "cuda")
        and qw.group in KERNEL_GROUPS and in_f % qw.group == 0 and out_f % out_multiple == 0
        and inner_k_tiles(in_f, device) is not None
    )


def prepare_int4_kernel(qw, device: torch.device) -> Int4Kernel:
    """Repack an int4 AffineWeight for the kernel of `device`."""
    codes = qw.int_codes().to(device)
    scale = qw.scale.to(device).float()
    zero = qw.min.to(device).float() + 8 * scale
    scales_zeros = torch.stack([scale.t(), zero.t()], dim=-1).to(torch.bfloat16).contiguous()
    tiles = inner_k_tiles(qw.shape[1], device)
    if device.type == "cpu":
        packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(codes.to(torch.int32), tiles)
    else:  # CUDA takes two codes per byte, even column in the high nibble
        pairs = codes.to(torch.uint8)
        packed = torch.ops.aten._convert_weight_to_int4pack((pairs[:, 0::2] << 4) | pairs[:, 1::2], tiles)
    return Int4Kernel(packed, scales_zeros, qw.group, qw.shape[0])
