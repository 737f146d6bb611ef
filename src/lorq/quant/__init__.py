"""Quantized weights behind one protocol: formats, QuantizedLinear, model surgery, checkpoints."""

from . import affine, nf  # noqa: F401  (register the formats)
from .base import FORMATS, FormatConfig, QuantFormat, QuantizedWeight
from .checkpoint import load_quantized, save_quantized
from .linear import DECODER_LINEARS, QuantizedLinear, QuantReport, quantize_model

__all__ = [
    "FORMATS", "FormatConfig", "QuantFormat", "QuantizedWeight", "QuantizedLinear", "QuantReport",
    "quantize_model", "save_quantized", "load_quantized", "DECODER_LINEARS",
]
