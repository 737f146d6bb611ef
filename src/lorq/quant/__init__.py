"""Quantized weights behind one protocol: formats, algorithms, QuantizedLinear, checkpoints."""

from . import affine, levels, outlier  # noqa: F401  (register the formats)
from .base import FORMATS, PER_CHANNEL, FormatConfig, QuantFormat, QuantizedWeight
from .checkpoint import load_quantized, save_quantized
from .linear import DECODER_LINEARS, QuantizedLinear, cast_unquantized
from .budget import Allocation, BudgetConfig, BudgetPlan, ErrorWeighting, allocate
from .lowrank import LowRankConfig, LowRankMethod, decompose
from .quantize import MethodConfig, QuantMethod, QuantReport, Rule, load_rules, quantize_model

__all__ = [
    "FORMATS", "PER_CHANNEL", "FormatConfig", "QuantFormat", "QuantizedWeight", "QuantizedLinear", "QuantReport",
    "MethodConfig", "QuantMethod", "Rule", "load_rules", "quantize_model", "save_quantized", "load_quantized",
    "DECODER_LINEARS", "cast_unquantized", "LowRankConfig", "LowRankMethod", "decompose", "Allocation", "BudgetConfig",
    "BudgetPlan", "ErrorWeighting", "allocate",
]
