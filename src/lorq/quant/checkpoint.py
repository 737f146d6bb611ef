"""Quantized checkpoints: model.safetensors (codes, scales, float params) + lorq_quant.json
(format_version, the rules, per-module format config) + the HF config and tokenizer.

Version history: 1 (formats "nf4" and "int4", 4-bit only); 2 (formats nf/int/fp8/fp4/
int8-outlier with bits, symmetric and outlier settings, per-module method, the rule list;
optionally per-module `lowrank`/`rank` with fp16 factors `<module>.lowrank_b` (out, r) and
`<module>.lowrank_a` (r, in), and the bit-budget plan under `budget`).
Version 1 files load unchanged: their tensors have the same names and packing, and their
format names map onto nf/int with 4 bits.
"""

from __future__ import annotations

import functools
import json
from pathlib import Path

import torch

from ..errors import LorqError
from ..io import atomic_dir, load_safetensors, read_json, save_safetensors, write_json
from ..models.loading import QUANT_CONFIG
from .base import FORMATS, FormatConfig
from .linear import LOWRANK, QuantizedLinear, set_module
from .quantize import QuantReport, Rule

FORMAT_VERSION = 2
MODULE_KEYS = ("in_features", "out_features", "method", "lowrank", "rank")  # per-module keys that are not format settings


def _state_without_tied(model) -> dict[str, torch.Tensor]:
    state = {k: v.contiguous() for k, v in model.state_dict().items()}
    if getattr(model.config, "tie_word_embeddings", False):
        state.pop("lm_head.weight", None)
    return state


def module_spec(name: str, m: QuantizedLinear, report: QuantReport | None) -> dict:
    entry = report.modules.get(name, {}) if report else {}
    spec = {"in_features": m.in_features, "out_features": m.out_features, "method": entry.get("method", "rtn")}
    if m.rank:
        spec.update(lowrank=entry.get("lowrank", "lorc"), rank=m.rank)
    return {**spec, **m.cfg.to_json()}


def quant_meta(modules: dict[str, dict], report: QuantReport | None = None, source: str = "",
               rules: list | None = None, budget: dict | None = None, **extra) -> dict:
    """The lorq_quant.json of a checkpoint; rules are Rule objects or their JSON already."""
    rules = [r.to_json() if isinstance(r, Rule) else r for r in rules or []]
    meta = {"format_version": FORMAT_VERSION, "source": source, "rules": rules, "modules": modules}
    if budget is not None:
        meta["budget"] = budget
    if report is not None:
        meta["report"] = {**report.summary(), "per_module": report.modules}
    return {**meta, **extra}


def save_generation_config(model, out: Path) -> None:
    """The model's generation config (its end-of-sequence ids, sampling defaults), as
    save_pretrained writes it; one that transformers' own checks refuse is left out."""
    config = getattr(model, "generation_config", None)
    if config is not None:
        try:
            config.save_pretrained(out)
        except ValueError:
            pass


def save_quantized(model, tokenizer, out: str | Path, report: QuantReport | None = None, source: str = "",
                   rules: list[Rule] | None = None, budget: dict | None = None) -> Path:
    """Write a quantized model atomically; `lorq.models.load_model(out)` rebuilds it exactly."""
    modules = {name: module_spec(name, m, report) for name, m in model.named_modules() if isinstance(m, QuantizedLinear)}
    out = Path(out)
    with atomic_dir(out) as tmp:
        save_safetensors(_state_without_tied(model), tmp / "model.safetensors", metadata={"format": "pt"})
        model.config.save_pretrained(tmp)
        save_generation_config(model, tmp)
        tokenizer.save_pretrained(tmp)
        write_json(tmp / QUANT_CONFIG, quant_meta(modules, report, source, rules, budget))
    return out


def read_meta(path: Path) -> dict:
    """lorq_quant.json, its version checked."""
    meta = read_json(path / QUANT_CONFIG)
    if not isinstance(meta, dict):
        raise LorqError(f"{path / QUANT_CONFIG} is not a JSON object")
    version = meta.get("format_version")
    if not isinstance(version, int) or not 1 <= version <= FORMAT_VERSION:
        raise LorqError(
            f"{path / QUANT_CONFIG} has format_version {version!r}; this lorq reads versions 1 to {FORMAT_VERSION}"
            + (" (written by a newer lorq: upgrade lorq)" if isinstance(version, int) and version > FORMAT_VERSION else "")
        )
    if not isinstance(meta.get("modules", {}), dict):
        raise LorqError(f"{path / QUANT_CONFIG}: 'modules' must be a mapping")
    return meta


@functools.lru_cache(maxsize=256)
def expected_layout(cfg_json: str, shape: tuple[int, int]) -> dict:
    """{tensor name: (shape, dtype)} the format writes for a weight of `shape`; once per distinct
    (settings, shape), on the meta device where the format's operations allow it."""
    cfg = FormatConfig.from_json(json.loads(cfg_json))
    fmt = FORMATS.get(cfg.format)
    try:
        state = fmt.from_float(torch.zeros(shape, device="meta"), cfg).state_dict()
    except (NotImplementedError, RuntimeError):
        state = fmt.from_float(torch.zeros(shape), cfg).state_dict()
    return {k: (tuple(t.shape), t.dtype) for k, t in state.items()}


def check_layout(path: Path, name: str, cfg: FormatConfig, own: dict[str, torch.Tensor], shape: tuple[int, int]) -> None:
    """The stored tensors are exactly those the format writes for this shape and these settings
    (names, shapes, dtypes, as a quantization of zeros gives them): a tensor cut away, or a
    group size that contradicts the stored scales, is an error, not different weights."""
    want = expected_layout(json.dumps(cfg.to_json(), sort_keys=True), shape)
    got = {k: (tuple(t.shape), t.dtype) for k, t in own.items()}
    if got != want:
        diff = sorted(set(got) ^ set(want)) or [k for k in want if got[k] != want[k]]
        raise LorqError(f"{path}: {name}: its tensors do not fit its config ({cfg.describe()}): {diff[0]} "
                        + ("missing or extra" if diff[0] not in got or diff[0] not in want else f"is {got[diff[0]]}, expected {want[diff[0]]}"))


def layer_from_tensors(path: Path, name: str, spec: dict, own: dict[str, torch.Tensor], shape: tuple[int, int]) -> QuantizedLinear:
    """Module `name` of checkpoint `path` from its spec and its own tensors (prefix removed;
    consumed). shape: (out, in) the model config gives the module."""
    if not isinstance(spec, dict):
        raise LorqError(f"{path / QUANT_CONFIG}: the entry of {name} is not a mapping")
    if (shape[1], shape[0]) != (spec.get("in_features"), spec.get("out_features")):
        raise LorqError(f"quantized module {name} has shape mismatching the model config in {path}")
    try:
        cfg = FormatConfig.from_json({k: v for k, v in spec.items() if k not in MODULE_KEYS})
    except (LorqError, TypeError, ValueError, KeyError) as e:
        raise LorqError(f"{path / QUANT_CONFIG}: invalid settings for {name}: {e}")
    bias = own.pop("bias", None)
    factors = [own.pop(k, None) for k in LOWRANK]
    if (factors[0] is None) != (factors[1] is None) or (factors[0] is not None) != bool(spec.get("rank")):
        raise LorqError(f"{path}: the low-rank factors of {name} are missing or do not match its config")
    check_layout(path, name, cfg, own, shape)
    try:
        return QuantizedLinear(shape[1], shape[0], cfg, own, bias, factors if factors[0] is not None else None)
    except (ValueError, KeyError, TypeError, IndexError, RuntimeError) as e:  # missing or misshapen tensors
        raise LorqError(f"{path}: {name}: its tensors do not fit its config ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})")


def load_quantized(path: str | Path, config=None):
    """The quantized checkpoint in path; config: its config.json already read and checked."""
    from transformers import AutoModelForCausalLM

    from ..models.loading import check_causal_lm

    path = Path(path)
    meta = read_meta(path)
    config = config if config is not None else check_causal_lm(path)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    tensors = load_safetensors(path / "model.safetensors")
    for name, spec in meta.get("modules", {}).items():
        try:
            base = model.get_submodule(name)
        except AttributeError:
            raise LorqError(f"quantized module {name} does not exist in the {config.model_type} model of {path}")
        if not isinstance(base, torch.nn.Linear):
            raise LorqError(f"{path / QUANT_CONFIG}: quantized module {name!r} is a {type(base).__name__} in the model, not a linear layer")
        prefix = name + "."
        own = {k[len(prefix):]: t for k, t in tensors.items() if k.startswith(prefix)}
        set_module(model, name, layer_from_tensors(path, name, spec, own, (base.out_features, base.in_features)))
    missing, unexpected = model.load_state_dict(tensors, strict=False)
    missing = [k for k in missing if not (k == "lm_head.weight" and config.tie_word_embeddings)]
    if missing or unexpected:
        raise LorqError(f"{path / 'model.safetensors'} does not match its config: missing {missing[:3]}, unexpected {unexpected[:3]}")
    if config.tie_word_embeddings:
        model.tie_weights()
    return model
