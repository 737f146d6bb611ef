"""The QuantizedWeight protocol, format configs and the format registry.

Every format is a small class with the same surface (ARCHITECTURE.md): `from_float(w, cfg)`,
`dequantize(dtype)`, `linear(x)`, `nbytes`, `state_dict()` / `from_state_dict(tensors, cfg)`.
Nothing outside `lorq.quant` knows which format it holds.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields
from enum import Enum
from typing import ClassVar, Protocol

import torch
import torch.nn.functional as F

from ..errors import LorqError
from ..options import opt


class QuantFormat(str, Enum):
    """Weight formats available for the quantized base."""

    NF = "nf"
    INT = "int"
    FP8 = "fp8"
    FP4 = "fp4"
    INT8_OUTLIER = "int8-outlier"
    NONE = "none"
    NF4 = "nf"  # release-1 names, kept as aliases for Python callers
    INT4 = "int"

    @classmethod
    def _missing_(cls, value):
        # Release-1 names (checkpoints, YAML files): the bit width now has its own option.
        return {"nf4": cls.NF, "int4": cls.INT}.get(value)


RELEASE1_BITS = {"nf4": 4, "int4": 4}  # release-1 format names also fix the bit width


def check_release1_bits(written, bits) -> None:
    """A release-1 format name (nf4, int4) with a bit width it contradicts is a mistake, not a
    request for another width. `written` may carry the spelling as `.written` (the CLI's)."""
    written = getattr(written, "written", written)
    if isinstance(written, str) and written in RELEASE1_BITS and bits not in (None, RELEASE1_BITS[written]):
        raise LorqError(f"format {written} is {RELEASE1_BITS[written]}-bit, not {bits}: for {bits} bits use "
                        f"format {QuantFormat(written).value} with bits {bits}")


PER_CHANNEL = 0  # group_size value meaning one group per output row
MAX_GROUP = 2**16  # longer than any linear layer's rows


@dataclass
class FormatConfig:
    """How one weight matrix is quantized."""

    format: QuantFormat = opt(QuantFormat.NF, "weight format: nf (NormalFloat), int (affine), fp8 (e4m3), fp4 (e2m1), int8-outlier (LLM.int8()) or none (keep floats)")
    bits: int | None = opt(None, "bits per code: nf 2/3/4, int 2/3/4/8, fp8 8, fp4 4, int8-outlier 8 (default: 4, or 8 for the 8-bit formats)")
    group_size: int = opt(64, "weights sharing one scale, along each row (0 = one group per output channel)", aliases=("--group",))
    double_quant: bool = opt(True, "nf/fp8/fp4: quantize the per-group absmax again to 8 bits in blocks of 256 (QLoRA)")
    symmetric: bool = opt(False, "int: symmetric codes around zero (scale only) instead of scale + zero point")
    outlier_threshold: float = opt(6.0, "int8-outlier: input features with any |activation| >= this run in full precision (LLM.int8())")
    clip_search: bool = opt(False, "search each group's range, shrunk by up to 30%, for the least squared error instead of taking min/max or absmax (GPTQ's mse option; nf4 then no longer equals bitsandbytes)")

    def validate(self) -> "FormatConfig":
        check_release1_bits(self.format, self.bits)
        try:
            self.format = QuantFormat(self.format)
        except (ValueError, TypeError):
            known = ", ".join(f.value for f in QuantFormat)
            raise LorqError(f"unknown quantization format {self.format!r} (known: {known})")
        for name, kind in (("bits", int), ("group_size", int), ("outlier_threshold", (int, float))):
            value = getattr(self, name)
            if value is not None and (isinstance(value, bool) or not isinstance(value, kind)):
                raise LorqError(f"{name.replace('_', '-')} must be a number, got {value!r}")
        for name in ("double_quant", "symmetric", "clip_search"):
            if not isinstance(getattr(self, name), bool):
                raise LorqError(f"{name.replace('_', '-')} must be true or false, got {getattr(self, name)!r}")
        if not (self.outlier_threshold is None or self.outlier_threshold > 0):
            raise LorqError(f"outlier-threshold must be a positive number, got {self.outlier_threshold}")
        if self.format is QuantFormat.NONE:
            return self
        cls = FORMATS.get(self.format)
        for name, value in getattr(cls, "fixed", {}).items():
            setattr(self, name, value)
        if self.bits is None:
            self.bits = cls.default_bits
        if self.bits not in cls.supported_bits:
            raise LorqError(
                f"unsupported bits {self.bits} for format {self.format.value} "
                f"(supported: {', '.join(map(str, cls.supported_bits))})"
            )
        if self.group_size < 0 or self.group_size % 2:
            raise LorqError(f"group size must be 0 (per channel) or a positive even number, got {self.group_size}")
        if self.group_size > MAX_GROUP:  # rows are padded to whole groups: a huge group is a huge pad, not one group per row
            raise LorqError(f"group size must be at most {MAX_GROUP} (0 = one group per output row), got {self.group_size}")
        if self.outlier_threshold <= 0:
            raise LorqError(f"outlier threshold must be positive, got {self.outlier_threshold}")
        return self

    def group_for(self, in_features: int) -> int:
        """The group length along a row of in_features weights."""
        return in_features if self.group_size == PER_CHANNEL else self.group_size

    def describe(self) -> str:
        group = "per-channel" if self.group_size == PER_CHANNEL else f"g{self.group_size}"
        extra = " sym" if self.format is QuantFormat.INT and self.symmetric else ""
        bits = "" if str(self.bits) in self.format.value else str(self.bits)  # fp8, not fp88
        return f"{self.format.value}{bits} {group}{extra}"

    def to_json(self) -> dict:
        d = asdict(self)
        d["format"] = QuantFormat(self.format).value
        return d

    @classmethod
    def from_json(cls, d: dict) -> "FormatConfig":
        known = {f.name for f in fields(cls)}
        unknown = set(d) - known
        if unknown:
            raise LorqError(f"unknown quantization setting(s) {', '.join(sorted(unknown))}")
        return cls(**d).validate()


def no_quant() -> FormatConfig:
    """The default of commands that take a base as it is unless a format is given."""
    return FormatConfig(format=QuantFormat.NONE)


class QuantizedWeight(Protocol):
    """A frozen (out_features, in_features) weight stored in a low-bit format."""

    shape: tuple[int, int]
    cfg: FormatConfig
    supported_bits: ClassVar[tuple[int, ...]]
    default_bits: ClassVar[int]

    @classmethod
    def from_float(cls, w: torch.Tensor, cfg: FormatConfig) -> "QuantizedWeight": ...

    @classmethod
    def from_state_dict(cls, tensors: dict[str, torch.Tensor], shape, cfg: FormatConfig) -> "QuantizedWeight": ...

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor: ...

    def state_dict(self) -> dict[str, torch.Tensor]: ...

    @property
    def nbytes(self) -> int: ...


CLIP_SHRINKS = tuple(1.0 - 0.02 * i for i in range(16))  # range shrink factors tried by clip_search


class GroupCodec:
    """The codec over row groups wg (out, groups, g) that RTN, GPTQ and HQQ drive.

    A format supplies fit(wg, cfg, shrink) -> params (out, groups), encode -> codes,
    decode -> values and from_codes; this adds the range search shared by all of them.
    """

    @classmethod
    def fit_best(cls, wg: torch.Tensor, cfg: FormatConfig, mask: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        """cls.fit, or with cfg.clip_search the per-group shrink of the range with least squared
        error (mask (groups, g): which entries are real weights rather than padding)."""
        if not cfg.clip_search:
            return cls.fit(wg, cfg)
        best = best_err = None
        for shrink in CLIP_SHRINKS:
            params = cls.fit(wg, cfg, shrink)
            sq = (cls.decode(cls.encode(wg, params, cfg), params, cfg) - wg).pow(2)
            err = (sq if mask is None else sq * mask).sum(dim=-1)
            if best is None:
                best, best_err = params, err
                continue
            better = err < best_err
            best = {k: torch.where(better, params[k], best[k]) for k in params}
            best_err = torch.minimum(err, best_err)
        return best


class TensorFormat:
    """The protocol's parts that are the same for every format whose state is its dataclass fields.

    A format supplies from_float, dequantize and state_dict; this adds the reference linear,
    the round trip from stored tensors, and the true storage size.
    """

    def linear(self, x: torch.Tensor) -> torch.Tensor:
        """x @ W.T with W dequantized to x's dtype for this one call (the reference path)."""
        return F.linear(x, self.dequantize(x.dtype))

    @classmethod
    def from_state_dict(cls, tensors: dict[str, torch.Tensor], shape, cfg: FormatConfig):
        return cls(tuple(shape), cfg, **tensors)

    @property
    def nbytes(self) -> int:
        """Codes and every piece of metadata, as stored."""
        return sum(t.numel() * t.element_size() for t in self.state_dict().values())


@dataclass
class Registry:
    """Name -> class; formats register themselves so call sites never branch on the format."""

    items: dict = field(default_factory=dict)

    def register(self, name):
        def deco(cls):
            self.items[QuantFormat(name)] = cls
            return cls

        return deco

    def get(self, name) -> type:
        try:
            return self.items[QuantFormat(name)]
        except (KeyError, ValueError):
            raise LorqError(f"unknown quantization format {name!r} (known: {', '.join(f.value for f in self.items)})")


FORMATS = Registry()
