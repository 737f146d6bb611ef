"""Serving many adapters on one base: engine (continuous batching), multi_lora (segment/gather
LoRA), adapter_cache (LRU with a byte budget), server (OpenAI-compatible HTTP)."""

from .adapter_cache import AdapterNotFound, AdapterStore
from .engine import Engine, EngineConfig, QueueFull, SamplingParams
from .multi_lora import AdapterWeights, StepPlan, read_adapter

__all__ = ["AdapterNotFound", "AdapterStore", "AdapterWeights", "Engine", "EngineConfig", "QueueFull", "SamplingParams", "StepPlan", "read_adapter"]
