"""INT-k affine group-wise quantization (k = 2, 3, 4, 8), asymmetric or symmetric.

Each group of `group_size` consecutive weights of a row (or the whole row, group 0) gets an
fp16 scale s and, when asymmetric, an fp16 offset m. Asymmetric: s = (max - min) / (2^k - 1),
m = min, codes q = round((w - m) / s) in [0, 2^k - 1], w ≈ q·s + m. Symmetric (GPTQ's
convention): s = 2·absmax / (2^k - 1), w ≈ (q - 2^(k-1))·s. Groups run along the input
dimension, so the format maps directly onto int4 weight-only matmul kernels (kernels.py).

The codec (fit / encode / decode / from_codes) is what GPTQ and HQQ drive: they choose the
parameters and the codes, the format stores them.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

import torch

from .base import FORMATS, FormatConfig, GroupCodec, TensorFormat
from .kernels import int4_kernel_applies, prepare_int4_kernel
from .packing import BYTE_TABLE_BITS, byte_table, decode_bytes, pack_bits, unpack_bits


def qmax(bits: int) -> int:
    return (1 << bits) - 1


def as_groups(w: torch.Tensor, group: int) -> torch.Tensor:
    """(out, in) -> (out, ceil(in / group), group) fp32.

    A short last group (group ∤ in, e.g. 128 on a 576-wide model) is padded by repeating the
    row's last weight, which leaves the group's min, max and absmax unchanged.
    """
    pad = -w.shape[1] % group
    w = w.detach().float()
    if pad:
        w = torch.cat([w, w[:, -1:].expand(-1, pad)], dim=1)
    return w.reshape(w.shape[0], -1, group)


def group_mask(in_features: int, group: int, device=None) -> torch.Tensor:
    """(groups, group) float: 1 for real weights, 0 for as_groups' padding (so means and error
    sums over a short last group count each real weight once)."""
    n = -(-in_features // group) * group
    return (torch.arange(n, device=device) < in_features).float().view(-1, group)


def from_groups(x: torch.Tensor, in_features: int) -> torch.Tensor:
    """Inverse of as_groups: (out, groups, group) -> (out, in_features), padding dropped."""
    return x.reshape(x.shape[0], -1)[:, :in_features]


def fit_affine(wg: torch.Tensor, bits: int, symmetric: bool, shrink: float = 1.0) -> dict[str, torch.Tensor]:
    """Parameters per group of wg (out, groups, g) covering its range times `shrink`, in fp16."""
    if symmetric:
        scale = (2 * shrink * wg.abs().amax(dim=-1) / qmax(bits)).to(torch.float16)
        return {"scale": torch.where(scale > 0, scale, torch.ones_like(scale))}
    lo, hi = shrink * wg.amin(dim=-1), shrink * wg.amax(dim=-1)
    scale = ((hi - lo) / qmax(bits)).to(torch.float16)
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))  # constant group: any scale works
    return {"scale": scale, "min": lo.to(torch.float16)}


def encode_affine(wg: torch.Tensor, params: dict[str, torch.Tensor], bits: int) -> torch.Tensor:
    """Nearest codes (uint8, same shape as wg) under per-group params (out, groups)."""
    scale = params["scale"].float().unsqueeze(-1)
    if "min" in params:
        q = torch.round((wg - params["min"].float().unsqueeze(-1)) / scale)
    else:
        q = torch.round(wg / scale) + (1 << (bits - 1))
    return q.clamp(0, qmax(bits)).to(torch.uint8)


@lru_cache(maxsize=None)
def code_byte_table(bits: int, device: torch.device) -> torch.Tensor:
    """(256, 8 / bits) fp32: the integer codes packed in each byte."""
    return byte_table(torch.arange(1 << bits, dtype=torch.float32), bits).to(device)


def decode_affine(codes: torch.Tensor, params: dict[str, torch.Tensor], bits: int) -> torch.Tensor:
    """fp32 values of codes (out, groups, g)."""
    scale = params["scale"].float().unsqueeze(-1)
    if "min" in params:
        return torch.addcmul(params["min"].float().unsqueeze(-1), codes.float(), scale)
    return (codes.float() - (1 << (bits - 1))) * scale


@FORMATS.register("int")
@dataclass
class AffineWeight(GroupCodec, TensorFormat):
    """INT-k codes packed in a bit stream with fp16 scale (and min) per (row, group)."""

    shape: tuple[int, int]
    cfg: FormatConfig
    codes: torch.Tensor  # packed uint8
    scale: torch.Tensor  # (out, groups) fp16
    min: torch.Tensor | None = None  # (out, groups) fp16, asymmetric only

    supported_bits = (2, 3, 4, 8)
    default_bits = 4
    partial_groups = True  # the codec accepts a short last group per row

    @property
    def group(self) -> int:
        return self.cfg.group_for(self.shape[1])

    @classmethod
    def fit(cls, wg: torch.Tensor, cfg: FormatConfig, shrink: float = 1.0) -> dict[str, torch.Tensor]:
        return fit_affine(wg, cfg.bits, cfg.symmetric, shrink)

    @classmethod
    def encode(cls, wg: torch.Tensor, params: dict[str, torch.Tensor], cfg: FormatConfig) -> torch.Tensor:
        return encode_affine(wg, params, cfg.bits)

    @classmethod
    def decode(cls, codes: torch.Tensor, params: dict[str, torch.Tensor], cfg: FormatConfig) -> torch.Tensor:
        return decode_affine(codes, params, cfg.bits)

    @classmethod
    def from_codes(cls, shape, cfg: FormatConfig, codes: torch.Tensor, params: dict[str, torch.Tensor]) -> "AffineWeight":
        return cls(tuple(shape), cfg, pack_bits(codes, cfg.bits), params["scale"].to(torch.float16),
                   params["min"].to(torch.float16) if "min" in params else None)

    @classmethod
    def from_float(cls, w: torch.Tensor, cfg: FormatConfig) -> "AffineWeight":
        group = cfg.group_for(w.shape[1])
        wg = as_groups(w, group)
        return cls.from_params(w, cfg, cls.fit_best(wg, cfg, group_mask(w.shape[1], group, w.device)))

    @classmethod
    def from_params(cls, w: torch.Tensor, cfg: FormatConfig, params: dict[str, torch.Tensor]) -> "AffineWeight":
        """Nearest codes of w under the given per-group parameters."""
        wg = as_groups(w, cfg.group_for(w.shape[1]))
        return cls.from_codes(w.shape, cfg, from_groups(cls.encode(wg, params, cfg), w.shape[1]), params)

    def params(self) -> dict[str, torch.Tensor]:
        return {"scale": self.scale} if self.min is None else {"scale": self.scale, "min": self.min}

    def int_codes(self) -> torch.Tensor:
        """Unpacked codes as (out, in) uint8."""
        return unpack_bits(self.codes, self.cfg.bits, self.shape[0] * self.shape[1]).view(self.shape)

    def float_codes(self) -> torch.Tensor:
        """The codes as fp32 (out, in), by one byte-table gather where they fill whole bytes."""
        if self.cfg.bits not in BYTE_TABLE_BITS or self.cfg.bits == 8:  # 8-bit: .float() is one pass
            return self.int_codes().float()
        table = code_byte_table(self.cfg.bits, self.codes.device)
        return decode_bytes(table, self.codes)[: self.shape[0] * self.shape[1]].view(self.shape)

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        # fp32 arithmetic even for half-precision results: min + q·s cancels near zero, and bf16
        # intermediate rounding there would cost far more than one final rounding
        out_f, in_f = self.shape
        codes = self.float_codes()
        grouped = codes.view(out_f, -1, self.group) if in_f % self.group == 0 else as_groups(codes, self.group)
        return from_groups(decode_affine(grouped, self.params(), self.cfg.bits), in_f).to(dtype)

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {"codes": self.codes, **self.params()}

    def fast_kernel(self, dtype: torch.dtype, device: torch.device):
        """PyTorch's int4 weight-only kernel for int4 asymmetric weights and bf16 inputs, else None."""
        if not int4_kernel_applies(self, dtype, device):
            return None
        try:
            return prepare_int4_kernel(self, device)
        except (RuntimeError, AttributeError):  # a torch build without the op, or a shape it refuses
            return None
