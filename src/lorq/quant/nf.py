"""NormalFloat-4 with double quantization, as QLoRA / bitsandbytes define it.

Dettmers et al., "QLoRA" (2023), §3: blocks of 64 weights are scaled by their absmax into
[-1, 1] and rounded to the nearest of 16 NormalFloat levels. Double quantization stores
absmax - mean(absmax) with bitsandbytes' signed 8-bit dynamic map in blocks of 256, plus
one fp32 scale per block and the fp32 mean. Codes and values equal bitsandbytes' CPU
`quantize_4bit` / `dequantize_4bit` bit for bit (tests/quant/test_nf.py).
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

import torch
import torch.nn.functional as F

from .base import FORMATS, FormatConfig, TensorFormat
from .packing import pack_4bit

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


def _blocks(x: torch.Tensor, block: int) -> torch.Tensor:
    """Flat fp32 view as (n_blocks, block); the last partial block is zero-padded (absmax-neutral)."""
    flat = x.reshape(-1).float()
    pad = -flat.numel() % block
    return F.pad(flat, (0, pad)).view(-1, block)


def absmax_scale(w: torch.Tensor, block: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(blocks of w scaled into [-1, 1], absmax per block)."""
    wb = _blocks(w, block)  # (n_blocks, block)
    absmax = wb.abs().amax(dim=1)  # (n_blocks,)
    safe = absmax.clamp(min=1e-38)
    scaled = wb * (1.0 / safe).unsqueeze(1)
    if w.numel() % block:  # bitsandbytes divides (not multiplies) in the last partial block
        scaled[-1] = wb[-1] / safe[-1]
    return torch.clamp(scaled, -1, 1), absmax


def quantize_nf4_codes(w: torch.Tensor, block: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Nearest NF4 level per weight: (codes uint8 flat (numel,), absmax fp32 (n_blocks,))."""
    scaled, absmax = absmax_scale(w, block)
    levels = nf4_levels()
    codes = torch.bucketize(scaled.reshape(-1), (levels[:-1] + levels[1:]) / 2)
    return codes[: w.numel()].to(torch.uint8), absmax


def quantize_dynamic_8bit(x: torch.Tensor, block: int = ABSMAX_BLOCK) -> tuple[torch.Tensor, torch.Tensor]:
    """Blockwise 8-bit dynamic quantization: (codes uint8 (numel,), absmax fp32 (n_blocks,)).

    Rounds like bitsandbytes' CPU kernel: the scaled value picks the nearest of 65536 grid
    points on [-1, 1], whose nearest map level is precomputed.
    """
    xb = _blocks(x, block)
    absmax = xb.abs().amax(dim=1)
    inv = torch.where(absmax > 0, 1.0 / absmax, torch.zeros_like(absmax))
    scaled = torch.clamp(xb * inv.unsqueeze(1), -1, 1)
    grid_index = ((scaled + 1.0) * 0.5 * (LUT_SIZE - 1) + 0.5).to(torch.int64)
    codes = _dynamic_map_lut()[grid_index]
    codes = torch.where(absmax.unsqueeze(1) > 0, codes, torch.zeros_like(codes))
    return codes.reshape(-1)[: x.numel()], absmax


def dequantize_dynamic_8bit(codes: torch.Tensor, absmax: torch.Tensor, block: int = ABSMAX_BLOCK) -> torch.Tensor:
    values = dynamic_map_8bit()[codes.long()]
    return (_blocks(values, block) * absmax.unsqueeze(1)).reshape(-1)[: codes.numel()]


@lru_cache(maxsize=None)
def _nf4_byte_table() -> torch.Tensor:
    """byte -> (level of high nibble, level of low nibble): one gather per two weights."""
    levels = nf4_levels()
    b = torch.arange(256)
    return torch.stack([levels[b >> 4], levels[b & 0x0F]], dim=1)  # (256, 2)


@FORMATS.register("nf4")
@dataclass
class NF4Weight(TensorFormat):
    """NF4 codes packed two per byte, fp32 absmax or its double-quantized form."""

    shape: tuple[int, int]
    cfg: FormatConfig
    codes: torch.Tensor  # (ceil(numel / 2),) uint8
    absmax: torch.Tensor | None = None  # (n_blocks,) fp32 without double quantization
    absmax_codes: torch.Tensor | None = None  # (n_blocks,) uint8
    absmax_scale: torch.Tensor | None = None  # (ceil(n_blocks / 256),) fp32
    absmax_offset: torch.Tensor | None = None  # (1,) fp32, the mean subtracted before quantizing

    supported_bits = (4,)

    @classmethod
    def from_float(cls, w: torch.Tensor, cfg: FormatConfig) -> "NF4Weight":
        codes, absmax = quantize_nf4_codes(w.detach(), cfg.group_size)
        packed = pack_4bit(codes)
        shape = tuple(w.shape)
        if not cfg.double_quant:
            return cls(shape, cfg, packed, absmax=absmax)
        offset = absmax.mean()
        acodes, ascale = quantize_dynamic_8bit(absmax - offset)
        return cls(shape, cfg, packed, absmax_codes=acodes, absmax_scale=ascale, absmax_offset=offset.reshape(1))

    def block_absmax(self) -> torch.Tensor:
        if self.absmax is not None:
            return self.absmax
        return dequantize_dynamic_8bit(self.absmax_codes, self.absmax_scale) + self.absmax_offset

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        n = self.shape[0] * self.shape[1]
        values = _nf4_byte_table().to(self.codes.device)[self.codes.long()].reshape(-1)  # (2 * bytes,)
        w = _blocks(values, self.cfg.group_size) * self.block_absmax().unsqueeze(1)
        return w.reshape(-1)[:n].view(self.shape).to(dtype)

    def state_dict(self) -> dict[str, torch.Tensor]:
        names = ("codes", "absmax", "absmax_codes", "absmax_scale", "absmax_offset")
        return {k: getattr(self, k) for k in names if getattr(self, k) is not None}
