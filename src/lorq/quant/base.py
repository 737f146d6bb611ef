"""The QuantizedWeight protocol, format configs and the format registry.

Every format is a small class with the same surface (ARCHITECTURE.md): `from_float(w, cfg)`,
`dequantize(dtype)`, `linear(x)`, `nbytes`, `state_dict()` / `from_state_dict(tensors, cfg)`.
Nothing outside `lorq.quant` knows which format it holds.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from enum import Enum
from typing import ClassVar, Protocol

import torch
import torch.nn.functional as F

from ..errors import LorqError
from ..options import opt


class QuantFormat(str, Enum):
    """Weight formats available for the quantized base."""

    NF4 = "nf4"
    INT4 = "int4"
    NONE = "none"


@dataclass
class FormatConfig:
    """How one weight matrix is quantized."""

    format: QuantFormat = opt(QuantFormat.NF4, "weight format of the base: nf4 (QLoRA NormalFloat), int4 (affine, asymmetric) or none (keep floats)")
    bits: int = opt(4, "bits per code (both formats of this release are 4-bit)")
    group_size: int = opt(64, "elements sharing one scale: NF4 block size or INT4 group size")
    double_quant: bool = opt(True, "NF4 only: quantize the per-block absmax again to 8 bits in blocks of 256 (QLoRA)")

    def validate(self) -> "FormatConfig":
        self.format = QuantFormat(self.format)
        if self.format is QuantFormat.NONE:
            return self
        cls = FORMATS.get(self.format)
        if self.bits not in cls.supported_bits:
            raise LorqError(
                f"unsupported bits {self.bits} for format {self.format.value} "
                f"(supported: {', '.join(map(str, cls.supported_bits))})"
            )
        if self.group_size <= 0 or self.group_size % 2:
            raise LorqError(f"group size must be a positive even number, got {self.group_size}")
        return self

    def to_json(self) -> dict:
        d = asdict(self)
        d["format"] = QuantFormat(self.format).value
        return d

    @classmethod
    def from_json(cls, d: dict) -> "FormatConfig":
        return cls(**{**d, "format": QuantFormat(d["format"])}).validate()


class QuantizedWeight(Protocol):
    """A frozen (out_features, in_features) weight stored in a low-bit format."""

    shape: tuple[int, int]
    cfg: FormatConfig
    supported_bits: ClassVar[tuple[int, ...]]

    @classmethod
    def from_float(cls, w: torch.Tensor, cfg: FormatConfig) -> "QuantizedWeight": ...

    @classmethod
    def from_state_dict(cls, tensors: dict[str, torch.Tensor], shape, cfg: FormatConfig) -> "QuantizedWeight": ...

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor: ...

    def state_dict(self) -> dict[str, torch.Tensor]: ...

    @property
    def nbytes(self) -> int: ...


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
