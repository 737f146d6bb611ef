"""Absmax-scaled level formats: NormalFloat-k, FP8 (e4m3) and FP4 (e2m1).

All three scale each block of weights by its absmax into [-1, 1] and round to the nearest of
a fixed, sorted table of levels; they differ only in the table. NF-k uses normal quantiles
(QLoRA), FP8/FP4 the representable values of e4m3 / e2m1 divided by their largest one, so a
block's absmax lands on the format's largest value (ZeroQuant-FP's per-group scaling). The
absmax is stored in fp32 or double-quantized to 8 bits (QLoRA); blocks are consecutive
weights in row-major order, which with group | in_features are row groups.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

import torch

from ..errors import LorqError
from .base import FORMATS, FormatConfig, GroupCodec, QuantFormat, TensorFormat
from .nf import absmax_scale, blocks, dequantize_dynamic_8bit, nf_levels, quantize_dynamic_8bit, scale_by
from .packing import BYTE_TABLE_BITS, byte_pair_table, byte_table, decode_bytes, pack_bits, pairs_pay, unpack_bits


@lru_cache(maxsize=None)
def fp8_e4m3_levels() -> torch.Tensor:
    """The 253 distinct finite float8_e4m3fn values / 448."""
    v = torch.arange(256, dtype=torch.uint8).view(torch.float8_e4m3fn).float()
    v = v[v.isfinite()].unique()
    return v / v.abs().max()


@lru_cache(maxsize=None)
def fp4_e2m1_levels() -> torch.Tensor:
    """The 15 distinct e2m1 values (±{0, .5, 1, 1.5, 2, 3, 4, 6}) / 6."""
    mags = torch.tensor([0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0])
    return torch.cat([-mags.flip(0)[:-1], mags]) / 6.0


LEVEL_TABLES = {
    QuantFormat.NF: nf_levels,
    QuantFormat.FP8: lambda bits: fp8_e4m3_levels(),
    QuantFormat.FP4: lambda bits: fp4_e2m1_levels(),
}


@lru_cache(maxsize=None)
def levels_for(fmt: QuantFormat, bits: int) -> torch.Tensor:
    return LEVEL_TABLES[QuantFormat(fmt)](bits)


@lru_cache(maxsize=None)
def level_byte_table(fmt: QuantFormat, bits: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """(256, 8 / bits): the format's levels of the codes packed in each possible byte, cached."""
    return byte_table(levels_for(fmt, bits), bits).to(device, dtype)


@lru_cache(maxsize=None)
def level_pair_table(fmt: QuantFormat, bits: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor | None:
    """The byte_pair_table of level_byte_table where gathering pairs pays (else None), cached."""
    table = level_byte_table(fmt, bits, dtype, device)
    return byte_pair_table(table) if pairs_pay(table) else None


def nearest_level(scaled: torch.Tensor, levels: torch.Tensor) -> torch.Tensor:
    """Index of the nearest level (ties to the lower one, as bitsandbytes) of values in [-1, 1]."""
    return torch.bucketize(scaled, (levels[:-1] + levels[1:]) / 2).to(torch.uint8)


@dataclass
class LevelWeight(GroupCodec, TensorFormat):
    """Level codes packed in a bit stream; fp32 absmax per block or its double-quantized form."""

    shape: tuple[int, int]
    cfg: FormatConfig
    codes: torch.Tensor
    absmax: torch.Tensor | None = None  # (n_blocks,) fp32 without double quantization
    absmax_codes: torch.Tensor | None = None  # (n_blocks,) uint8
    absmax_scale: torch.Tensor | None = None  # (ceil(n_blocks / 256),) fp32
    absmax_offset: torch.Tensor | None = None  # (1,) fp32, the mean subtracted before quantizing

    @property
    def block(self) -> int:
        return self.cfg.group_for(self.shape[1])

    @classmethod
    def levels(cls, cfg: FormatConfig) -> torch.Tensor:
        return levels_for(cfg.format, cfg.bits)

    @classmethod
    def fit(cls, wg: torch.Tensor, cfg: FormatConfig, shrink: float = 1.0) -> dict[str, torch.Tensor]:
        return {"absmax": shrink * wg.abs().amax(dim=-1)}

    @classmethod
    def encode(cls, wg: torch.Tensor, params: dict[str, torch.Tensor], cfg: FormatConfig) -> torch.Tensor:
        return nearest_level(scale_by(wg, params["absmax"]), cls.levels(cfg).to(wg.device))

    @classmethod
    def decode(cls, codes: torch.Tensor, params: dict[str, torch.Tensor], cfg: FormatConfig) -> torch.Tensor:
        return cls.levels(cfg).to(codes.device)[codes.long()] * params["absmax"].float().unsqueeze(-1)

    @classmethod
    def from_codes(cls, shape, cfg: FormatConfig, codes: torch.Tensor, params: dict[str, torch.Tensor]) -> "LevelWeight":
        packed = pack_bits(codes, cfg.bits)
        absmax = params["absmax"].reshape(-1).float()
        if not cfg.double_quant:
            return cls(tuple(shape), cfg, packed, absmax=absmax)
        offset = absmax.mean()
        acodes, ascale = quantize_dynamic_8bit(absmax - offset)
        return cls(tuple(shape), cfg, packed, absmax_codes=acodes, absmax_scale=ascale, absmax_offset=offset.reshape(1))

    @classmethod
    def from_float(cls, w: torch.Tensor, cfg: FormatConfig) -> "LevelWeight":
        """Flat blocks of the row-major weight (bitsandbytes' layout; a partial last block is allowed)."""
        block = cfg.group_for(w.shape[1])
        if cfg.clip_search:
            if w.shape[1] % block:
                raise LorqError(f"clip search with {cfg.format.value}: block {block} must divide the input dimension {w.shape[1]}")
            wg = w.detach().float().view(w.shape[0], -1, block)
            params = cls.fit_best(wg, cfg)
            return cls.from_codes(w.shape, cfg, cls.encode(wg, params, cfg), params)
        scaled, absmax = absmax_scale(w.detach(), cfg.group_for(w.shape[1]))
        codes = nearest_level(scaled.reshape(-1), cls.levels(cfg).to(w.device))[: w.numel()]
        return cls.from_codes(w.shape, cfg, codes, {"absmax": absmax})

    def block_absmax(self) -> torch.Tensor:
        if self.absmax is not None:
            return self.absmax
        if getattr(self, "_absmax", None) is None:  # computed once per view (QuantizedLinear caches the view)
            self._absmax = dequantize_dynamic_8bit(self.absmax_codes, self.absmax_scale) + self.absmax_offset
        return self._absmax

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        n = self.shape[0] * self.shape[1]
        # Half-precision results are computed in that dtype (one pass, the decode hot path);
        # anything else in fp32, which is what bitsandbytes-exactness needs.
        work = dtype if dtype in (torch.bfloat16, torch.float16) else torch.float32
        if self.cfg.bits in BYTE_TABLE_BITS:  # one gather yields every level a byte holds
            key = (self.cfg.format, self.cfg.bits, work, self.codes.device)
            values = decode_bytes(level_byte_table(*key), self.codes, level_pair_table(*key))
        else:
            codes = unpack_bits(self.codes, self.cfg.bits, n).int()  # index_select: ~2x advanced indexing's speed
            values = self.levels(self.cfg).to(self.codes.device, work).index_select(0, codes)
        absmax = self.block_absmax()
        if n % self.block == 0:
            w = values[:n].view(-1, self.block) * absmax.to(work).unsqueeze(1)
        else:
            w = blocks(values[:n], self.block) * absmax.unsqueeze(1)
        return w.reshape(-1)[:n].view(self.shape).to(dtype)

    def state_dict(self) -> dict[str, torch.Tensor]:
        names = ("codes", "absmax", "absmax_codes", "absmax_scale", "absmax_offset")
        return {k: getattr(self, k) for k in names if getattr(self, k) is not None}


@FORMATS.register("nf")
@dataclass
class NFWeight(LevelWeight):
    supported_bits = (2, 3, 4)
    default_bits = 4


@FORMATS.register("fp8")
@dataclass
class FP8Weight(LevelWeight):
    supported_bits = (8,)
    default_bits = 8


@FORMATS.register("fp4")
@dataclass
class FP4Weight(LevelWeight):
    supported_bits = (4,)
    default_bits = 4
