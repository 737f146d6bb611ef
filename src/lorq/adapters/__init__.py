"""LoRA adapters over dense or quantized bases, and PEFT-format import/export."""

from .lora import LoRAConfig, LoRALinear, LowRankAdapter, adapter_routing, add_adapters, lora_layers
from .peft_format import load_peft, save_peft

__all__ = ["LoRAConfig", "LoRALinear", "LowRankAdapter", "add_adapters", "adapter_routing", "lora_layers", "load_peft", "save_peft"]
