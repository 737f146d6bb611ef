"""Quantized checkpoints: model.safetensors (codes, scales, float params) + lorq_quant.json
(format_version, per-module format config) + the HF config and tokenizer, in one directory.
"""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors.torch import save_file

from ..errors import LorqError
from ..io import atomic_dir, load_safetensors, read_json, write_json
from .base import FormatConfig
from .linear import QuantizedLinear, QuantReport, set_module

FORMAT_VERSION = 1
QUANT_CONFIG = "lorq_quant.json"


def _state_without_tied(model) -> dict[str, torch.Tensor]:
    state = {k: v.contiguous() for k, v in model.state_dict().items()}
    if getattr(model.config, "tie_word_embeddings", False):
        state.pop("lm_head.weight", None)
    return state


def save_quantized(model, tokenizer, out: str | Path, report: QuantReport | None = None, source: str = "") -> Path:
    """Write a quantized model atomically; `lorq.models.load_model(out)` rebuilds it exactly."""
    modules = {
        name: {"in_features": m.in_features, "out_features": m.out_features, **m.cfg.to_json()}
        for name, m in model.named_modules() if isinstance(m, QuantizedLinear)
    }
    meta = {"format_version": FORMAT_VERSION, "source": source, "modules": modules}
    if report is not None:
        meta["report"] = report.summary()
    out = Path(out)
    with atomic_dir(out) as tmp:
        save_file(_state_without_tied(model), str(tmp / "model.safetensors"), metadata={"format": "pt"})
        model.config.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        write_json(tmp / QUANT_CONFIG, meta)
    return out


def load_quantized(path: str | Path):
    from transformers import AutoModelForCausalLM

    from ..models.loading import check_causal_lm

    path = Path(path)
    meta = read_json(path / QUANT_CONFIG)
    version = meta.get("format_version")
    if not isinstance(version, int) or version > FORMAT_VERSION:
        raise LorqError(
            f"{path / QUANT_CONFIG} has format_version {version!r}; this lorq reads versions up to {FORMAT_VERSION}"
        )
    config = check_causal_lm(path)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    tensors = load_safetensors(path / "model.safetensors")
    for name, spec in meta.get("modules", {}).items():
        try:
            base = model.get_submodule(name)
        except AttributeError:
            raise LorqError(f"quantized module {name} does not exist in the {config.model_type} model of {path}")
        if (base.in_features, base.out_features) != (spec["in_features"], spec["out_features"]):
            raise LorqError(f"quantized module {name} has shape mismatching the model config in {path}")
        cfg = FormatConfig.from_json({k: v for k, v in spec.items() if k not in ("in_features", "out_features")})
        prefix = name + "."
        own = {k[len(prefix):]: t for k, t in tensors.items() if k.startswith(prefix)}
        bias = own.pop("bias", None)
        set_module(model, name, QuantizedLinear(spec["in_features"], spec["out_features"], cfg, own, bias))
    missing, unexpected = model.load_state_dict(tensors, strict=False)
    missing = [k for k in missing if not (k == "lm_head.weight" and config.tie_word_embeddings)]
    if missing or unexpected:
        raise LorqError(f"{path / 'model.safetensors'} does not match its config: missing {missing[:3]}, unexpected {unexpected[:3]}")
    if config.tie_word_embeddings:
        model.tie_weights()
    return model
