"""lorq: quantize a causal LM, fine-tune low-rank adapters on the quantized base, merge and export them."""

from .adapters import LoRAConfig, LoRALinear, add_adapters, load_peft, save_peft
from .errors import LorqError
from .eval import generate_text, perplexity
from .merge import ExportConfig, MergeConfig, Requant, export_gguf, run_merge
from .models.loading import load_model
from .quant import (
    FORMATS, BudgetConfig, FormatConfig, LowRankMethod, MethodConfig, QuantFormat, QuantizedLinear, QuantMethod, Rule, allocate,
    load_quantized, quantize_model, save_quantized,
)
from .train.data import DataConfig, load_blocks
from .train.loop import TrainConfig, train

__version__ = "0.1.0"
__all__ = [
    "LoRAConfig", "LoRALinear", "add_adapters", "load_peft", "save_peft", "LorqError", "generate_text",
    "perplexity", "load_model", "FORMATS", "FormatConfig", "MethodConfig", "QuantFormat", "QuantMethod", "Rule",
    "QuantizedLinear", "load_quantized", "LowRankMethod", "BudgetConfig", "allocate",
    "quantize_model", "save_quantized", "DataConfig", "TrainConfig", "load_blocks", "train",
    "MergeConfig", "Requant", "run_merge", "ExportConfig", "export_gguf",
]
