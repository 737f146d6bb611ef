"""Merge adapters into dense or quantized bases (streaming), and export to HF and GGUF."""

from .delta import AdapterUpdate, apply_unmerged
from .gguf import ExportConfig, GGUFType, export_gguf
from .merge import MergeConfig, OutDtype, Requant, requantize
from .run import run_merge

__all__ = ["AdapterUpdate", "apply_unmerged", "ExportConfig", "GGUFType", "export_gguf", "MergeConfig", "OutDtype",
           "Requant", "requantize", "run_merge"]
