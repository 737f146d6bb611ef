"""NormalFloat levels and bitsandbytes' double quantization of block absmax values.

Dettmers et al., "QLoRA" (2023), §3: blocks of 64 weights are scaled by their absmax into
[-1, 1] and rounded to the nearest of 2^k NormalFloat levels (normal quantiles with an exact
zero). Double quantization stores absmax - mean(absmax) with bitsandbytes' signed 8-bit
dynamic map in blocks of 256, plus one fp32 scale per block and the fp32 mean. NF4 codes and
values equal bitsandbytes' CPU `quantize_4bit` / `dequantize_4bit` bit for bit
(tests/quant/test_nf.py); the weight class itself is levels.LevelWeight.
"""

from __future__ import annotations

from functools import lru_cache

import torch
import torch.nn.functional as F


# The 16 NF4 levels (QLoRA, Appendix E), sorted; index = code.
NF4_LEVELS = (
    -1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453,
    -0.28444138169288635, -0.18477343022823334, -0.09105003625154495, 0.0,
    0.07958029955625534, 0.16093020141124725, 0.24611230194568634, 0.33791524171829224,
    0.44070982933044434, 0.5626170039176941, 0.7229568362236023, 1.0,
)
ABSMAX_BLOCK = 256  # double-quantization block size (QLoRA)
LUT_SIZE = 65536  # bitsandbytes' CPU 8-bit quantizer rounds through a 65536-entry table


@lru_cache(maxsize=None)
def nf4_levels() -> torch.Tensor:
    return torch.tensor(NF4_LEVELS, dtype=torch.float32)


def normal_float_levels(bits: int) -> torch.Tensor:
    """QLoRA's construction for 2^k levels: 2^(k-1) positive and 2^(k-1) - 1 negative normal
    quantiles, evenly spaced in probability from `offset` to 1/2, plus an exact zero; scaled
    so the largest magnitude is 1. offset = 1 - (1/(2n) + 1/(2(n-1)))/2 with n = 2^k, which
    is QLoRA's 0.9677 for k = 4 (this reproduces NF4_LEVELS to fp32 rounding).
    """
    n = 2**bits
    offset = 1 - 0.5 * (1 / (2 * n) + 1 / (2 * (n - 1)))
    pos = torch.special.ndtri(torch.linspace(offset, 0.5, n // 2 + 1, dtype=torch.float64)[:-1])
    neg = -torch.special.ndtri(torch.linspace(offset, 0.5, n // 2, dtype=torch.float64)[:-1])
    values = torch.cat([pos, neg, torch.zeros(1, dtype=torch.float64)])
    return (values / values.abs().max()).sort().values.float()


def nf_levels(bits: int) -> torch.Tensor:
    """Sorted NF-k levels; NF4 is bitsandbytes' exact table."""
    return nf4_levels() if bits == 4 else normal_float_levels(bits)


@lru_cache(maxsize=None)
def dynamic_map_8bit() -> torch.Tensor:
    """Signed 8-bit dynamic tree map (Dettmers 2015, "8-Bit Approximations"), sorted.

    For exponent e = 0..6, 2**e linear fraction levels: the midpoints of
    linspace(0.1, 1, 2**e + 1) scaled by 10**(e - 6), with both signs; plus 0 and 1.
    """
    values: list[float] = []
    for e in range(7):
        edges = torch.linspace(0.1, 1.0, 2**e + 1, dtype=torch.float32)
        means = (edges[:-1] + edges[1:]) / 2.0
        values += (10.0 ** (e - 6) * means).tolist() + (-(10.0 ** (e - 6)) * means).tolist()  # fp32 products
    values += [0.0, 1.0]
    return torch.tensor(sorted(values), dtype=torch.float32)


@lru_cache(maxsize=None)
def _dynamic_map_lut() -> torch.Tensor:
    """Grid point i/65535 of [-1, 1] -> index of its nearest dynamic-map level (bitsandbytes CPU)."""
    code = dynamic_map_8bit()
    midpoints = 0.5 * (code[:-1] + code[1:])
    grid = -1.0 + (2.0 * torch.arange(LUT_SIZE, dtype=torch.float32)) / (LUT_SIZE - 1)
    return torch.searchsorted(midpoints, grid, side="left").to(torch.uint8)


def blocks(x: torch.Tensor, block: int) -> torch.Tensor:
    """Flat fp32 view as (n_blocks, block); the last partial block is zero-padded (absmax-neutral)."""
    flat = x.reshape(-1).float()
    pad = -flat.numel() % block
    return F.pad(flat, (0, pad)).view(-1, block)


def scale_by(wg: torch.Tensor, absmax: torch.Tensor) -> torch.Tensor:
    """wg (..., g) times 1/absmax (...), clamped to [-1, 1]; multiplying by the reciprocal is
    what bitsandbytes does, and bit-exactness depends on it."""
    inv = 1.0 / absmax.clamp(min=1e-38)
    return torch.clamp(wg * inv.unsqueeze(-1), -1, 1)


def absmax_scale(w: torch.Tensor, block: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(blocks of w scaled into [-1, 1], absmax per block)."""
    wb = blocks(w, block)  # (n_blocks, block)
    absmax = wb.abs().amax(dim=1)  # (n_blocks,)
    scaled = scale_by(wb, absmax)
    if w.numel() % block:  # bitsandbytes divides (not multiplies) in the last partial block
        scaled[-1] = torch.clamp(wb[-1] / absmax[-1].clamp(min=1e-38), -1, 1)
    return scaled, absmax


def quantize_dynamic_8bit(x: torch.Tensor, block: int = ABSMAX_BLOCK) -> tuple[torch.Tensor, torch.Tensor]:
    """Blockwise 8-bit dynamic quantization: (codes uint8 (numel,), absmax fp32 (n_blocks,)).

    Rounds like bitsandbytes' CPU kernel: the scaled value picks the nearest of 65536 grid
    points on [-1, 1], whose nearest map level is precomputed.
    """
    xb = blocks(x, block)
    absmax = xb.abs().amax(dim=1)
    inv = torch.where(absmax > 0, 1.0 / absmax, torch.zeros_like(absmax))
    scaled = torch.clamp(xb * inv.unsqueeze(1), -1, 1)
    grid_index = ((scaled + 1.0) * 0.5 * (LUT_SIZE - 1) + 0.5).to(torch.int64)
    codes = _dynamic_map_lut().to(x.device)[grid_index]
    codes = torch.where(absmax.unsqueeze(1) > 0, codes, torch.zeros_like(codes))
    return codes.reshape(-1)[: x.numel()], absmax


def dequantize_dynamic_8bit(codes: torch.Tensor, absmax: torch.Tensor, block: int = ABSMAX_BLOCK) -> torch.Tensor:
    values = dynamic_map_8bit().to(codes.device)[codes.long()]
    return (blocks(values, block) * absmax.unsqueeze(1)).reshape(-1)[: codes.numel()]
