"""lorq's native adapter files, for variants PEFT cannot represent (core / LoRA-SB, NOLA, RandLoRA).

Same layout as PEFT's, so tools can tell the two apart by `peft_type`:

    adapter_config.json        {"peft_type": "LORQ", "format_version": 1, "variant": "nola",
                                "r", "lora_alpha", "use_rslora", "lora_dropout", "options": {...},
                                "modules": [...], "base_model_name_or_path", "restore_base"}
    adapter_model.safetensors  base_model.model.<module>.<tensor>  every trained tensor and the
                                                                   per-layer frozen ones (core's B, A)
                               lorq.bank.<name>.<d0>x<d1>...        each frozen random basis, once
                               base_model.model.<module>.start_B / start_A
                                                                   with restore_base: the residual
                                                                   init to subtract from the base

The random bases are stored, not regenerated from the seed, so a file reloads identically
whatever torch's random generator does in another version.
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn as nn

from ..errors import LorqError
from ..io import atomic_dir, check_finite_tensors, is_number, is_positive_int, load_safetensors, read_json, save_safetensors, write_json
from .lora import LoRALinear, lora_layers, set_trainable, wrap_layer
from .variants import Variant

CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"
PREFIX = "base_model.model."
FORMAT_VERSION = 1
NATIVE_VARIANTS = (Variant.CORE, Variant.NOLA, Variant.RANDLORA)


def is_native(path: Path) -> bool:
    cfg = path / CONFIG_FILE
    if not cfg.is_file():
        return False
    config = read_json(cfg)
    return isinstance(config, dict) and config.get("peft_type") == "LORQ"


def bank_key(name: str, t: torch.Tensor) -> str:
    return f"lorq.bank.{name}.{'x'.join(map(str, t.shape))}"


def save_native(model: nn.Module, out: str | Path, name: str, base_model: str = "", restore_base: bool = False) -> Path:
    layers = {m: l for m, l in lora_layers(model).items() if name in l.adapters}
    first = next(iter(layers.values())).adapters[name]
    tensors: dict[str, torch.Tensor] = {}
    for m, layer in layers.items():
        ad = layer.adapters[name]
        for key, t in ad.state_dict().items():  # trained tensors and persistent buffers
            tensors[f"{PREFIX}{m}.{key}"] = t.detach().float().contiguous()
        for bank in ad.bank_names:
            t = getattr(ad, bank)
            tensors.setdefault(bank_key(bank, t), t.detach().float().contiguous())
        start = layer.starts.get(name) if restore_base else None
        if start is not None:
            B0 = start.B @ start.R if start.R is not None else start.B
            tensors[f"{PREFIX}{m}.start_B"] = (ad.scaling * B0).float().contiguous()
            tensors[f"{PREFIX}{m}.start_A"] = start.A.float().contiguous()
    config = {
        "peft_type": "LORQ", "format_version": FORMAT_VERSION, "variant": first.variant.value,
        "base_model_name_or_path": base_model, "r": first.rank, "lora_alpha": first.alpha,
        "use_rslora": first.rslora, "lora_dropout": getattr(first.dropout, "p", 0.0),
        "options": first.options(), "modules": sorted(layers), "restore_base": bool(restore_base and any(layers[m].starts.get(name) for m in layers)),
    }
    with atomic_dir(out) as tmp:
        save_safetensors(tensors, tmp / WEIGHTS_FILE, metadata={"format": "pt"})
        write_json(tmp / CONFIG_FILE, config)
    return Path(out)


def read_native_config(path: Path) -> dict:
    """The config's fields with the types save_native writes; anything else is a one-line error."""
    config, where = read_json(path / CONFIG_FILE), path / CONFIG_FILE
    if not isinstance(config, dict):
        raise LorqError(f"{where} is not a JSON object")
    if config.get("format_version") != FORMAT_VERSION:
        raise LorqError(f"{path}: lorq adapter format_version {config.get('format_version')!r} is not {FORMAT_VERSION}")
    variants = [v.value for v in NATIVE_VARIANTS]
    r, alpha = config.get("r"), config.get("lora_alpha")
    dropout, modules, options = config.get("lora_dropout", 0.0), config.get("modules"), config.get("options") or {}
    problems = {
        f"variant must be one of {variants}": config.get("variant") not in variants,
        "r must be a positive integer": not is_positive_int(r),
        "lora_alpha must be a positive finite number": not is_number(alpha) or alpha <= 0,
        "lora_dropout must be a number in [0, 1)": not is_number(dropout) or not 0 <= dropout < 1,
        "use_rslora and restore_base must be true or false": not all(isinstance(config.get(k, False), bool) for k in ("use_rslora", "restore_base")),
        "modules must be a non-empty list of distinct module names": not isinstance(modules, list) or not modules
        or not all(isinstance(m, str) and m for m in modules) or len(set(modules)) != len(modules),
        "options must be an object": not isinstance(options, dict),
    }
    bad = [what for what, wrong in problems.items() if wrong]
    if bad:
        raise LorqError(f"{where}: malformed lorq adapter config: {'; '.join(bad)}")
    return {**config, "variant": Variant(config["variant"]), "lora_alpha": float(alpha), "lora_dropout": float(dropout), "options": dict(options)}


def load_native(model: nn.Module, path: Path, name: str = "default", trainable: bool = False) -> list[str]:
    config = read_native_config(path)
    variant, rank, alpha, modules = config["variant"], config["r"], config["lora_alpha"], config["modules"]
    options, dropout, restore = config["options"], config["lora_dropout"], config.get("restore_base", False)
    tensors = load_safetensors(path / WEIGHTS_FILE)
    check_finite_tensors(tensors, path / WEIGHTS_FILE)
    starts, used = {}, set()
    for module in modules:
        try:
            layer = model.get_submodule(module)
        except AttributeError:
            raise LorqError(f"adapter {path} targets {module}, which this base model does not have")
        if not hasattr(layer, "in_features"):
            raise LorqError(f"adapter {path} targets {module}, which is not a linear layer")
        start = tensors.get(f"{PREFIX}{module}.start_B"), tensors.get(f"{PREFIX}{module}.start_A")
        if any(t is not None for t in start):  # the adapter was trained on W - ΔW₀
            B0, A0 = start
            if B0 is None or A0 is None or B0.shape[0] != layer.out_features or A0.shape[1] != layer.in_features or B0.shape[1] != A0.shape[0]:
                raise LorqError(f"{path}: {module}'s start_B / start_A are missing or do not fit the layer")
            base = layer.base if isinstance(layer, LoRALinear) else layer
            if not isinstance(base, nn.Linear) or (isinstance(layer, LoRALinear) and layer.adapters):
                raise LorqError(f"{path} was trained from a residual init: it needs a dense base without other adapters")
            starts[module] = B0 @ A0
            used |= {f"{PREFIX}{module}.start_B", f"{PREFIX}{module}.start_A"}
    if restore != bool(starts):  # the base it was trained on would not be the one it runs on
        held = "start_B / start_A tensors" if starts else "no start_B / start_A tensors"
        raise LorqError(f"{path}: restore_base is {str(restore).lower()} but the file holds {held}")
    for module in modules:
        layer = wrap_layer(model, module)
        try:
            ad = layer.add(name, rank, alpha, config.get("use_rslora", False), dropout, variant, **options)
        except TypeError as e:
            raise LorqError(f"{path / CONFIG_FILE}: options {options} do not fit the {variant.value} variant ({e})")
        own = {k: tensors.get(f"{PREFIX}{module}.{k}") for k in ad.state_dict()}
        used |= {f"{PREFIX}{module}.{k}" for k in own} | {bank_key(b, getattr(ad, b)) for b in ad.bank_names}
        missing = [k for k, t in own.items() if t is None]
        if missing:
            raise LorqError(f"{path}: {module} lacks {', '.join(missing)}")
        try:
            ad.load_state_dict(own)
            for bank in ad.bank_names:
                t = tensors[bank_key(bank, getattr(ad, bank))]
                setattr(ad, bank, t)  # the stored basis, shared by the layers of this shape
        except (RuntimeError, KeyError) as e:
            raise LorqError(f"adapter {path} does not fit the base model at {module}: {str(e).splitlines()[0]}")
    unexpected = sorted(set(tensors) - used)
    if unexpected:
        raise LorqError(f"{path / WEIGHTS_FILE}: unexpected tensor {unexpected[0]!r}" + (f" and {len(unexpected) - 1} more" if len(unexpected) > 1 else ""))
    with torch.no_grad():  # only now that everything fits: make the base the one it was trained on
        for module, delta in starts.items():
            base = model.get_submodule(module).base
            base.weight -= delta.to(base.weight.dtype)
    set_trainable(model, name, trainable)
    return sorted(modules)
