"""PEFT's adapter files: adapter_config.json + adapter_model.safetensors.

Keys are `base_model.model.<module>.lora_A.weight` ([r, in]) and `...lora_B.weight`
([out, r]); scaling is lora_alpha / r, or lora_alpha / sqrt(r) with use_rslora. Such
adapters load in `peft.PeftModel.from_pretrained` and in vLLM.
"""

from __future__ import annotations

import re
from pathlib import Path

import torch
import torch.nn as nn

from ..errors import LorqError
from ..io import atomic_dir, check_finite_tensors, is_number, is_positive_int, load_safetensors, read_json, save_safetensors, write_json
from ..quant.linear import QuantizedLinear
from .lora import LoRALinear, lora_layers, lora_scaling, set_trainable, wrap_layer
from .native_format import NATIVE_VARIANTS, is_native, load_native, save_native
from .variants import Variant

CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"
PREFIX = "base_model.model."
_KEY = re.compile(r"^base_model\.model\.(?P<module>.+)\.lora_(?P<ab>[AB])(?:\.[^.]+)?\.weight$")
_MAGNITUDE = re.compile(r"^base_model\.model\.(?P<module>.+)\.lora_magnitude_vector(?:\.[^.]+)?(?:\.weight)?$")


def peft_target_modules(model: nn.Module, wrapped: list[str]) -> list[str] | str:
    """Leaf names when they pick exactly the wrapped layers (PEFT's usual form), else a full-match regex."""
    leaves = sorted({n.rsplit(".", 1)[-1] for n in wrapped})
    linear_kinds = (nn.Linear, QuantizedLinear, LoRALinear)
    picked = {
        n for n, m in model.named_modules()
        if isinstance(m, linear_kinds) and n.rsplit(".", 1)[-1] in leaves and not n.endswith(".base")
    }
    if picked == set(wrapped):
        return leaves
    return "|".join(re.escape(n) for n in sorted(wrapped))


def exported_factors(layer, name: str, restore_base: bool) -> tuple[torch.Tensor, torch.Tensor, tuple]:
    """(B, A, (rank, alpha, rslora)) of adapter `name` as PEFT will apply them.

    DyLoRA exports at its inference rank. An init whose product was subtracted from the base
    (PiSSA, OLoRA, LoRA-GA, ...) exports, with restore_base, against the original base as plain
    LoRA of rank r + r0: A' = [A; A0], B' = [s·B, -s0·B0], alpha' = r' so that scaling' = 1.
    """
    ad = layer.adapters[name]
    B, A, s = ad.export_factors()
    start = layer.starts.get(name) if restore_base else None
    if start is None:
        return B, A, (A.shape[0], ad.alpha, ad.rslora)  # DyLoRA at rank b: alpha / b, as PEFT computes
    B0 = start.B @ start.R if start.R is not None else start.B
    B2 = torch.cat([s * B, -ad.scaling * B0.to(B.dtype)], dim=1)  # (out, r + r0)
    A2 = torch.cat([A, start.A.to(A.dtype)], dim=0)  # (r + r0, in)
    return B2, A2, (A2.shape[0], float(A2.shape[0]), False)


def save_peft(model: nn.Module, out: str | Path, name: str = "default", base_model: str = "", restore_base: bool = False) -> Path:
    """Write adapter `name` in PEFT's format (lorq's native one for variants PEFT lacks), atomically.

    restore_base: the model's dense base holds W - ΔW₀ of a residual init; export the adapter
    against the original W (rank r + r0) so that it applies to the unmodified model.
    """
    layers = {m: l for m, l in lora_layers(model).items() if name in l.adapters}
    if not layers:
        raise LorqError(f"the model has no adapter named {name!r}")
    variant = next(iter(layers.values())).adapters[name].variant
    if variant in (Variant.PEQA, Variant.L4Q):
        raise LorqError(f"a {variant.value} adapter is not exported as an adapter: fold it into the quantized model it becomes (adapters.qat.fold_quantized, then save_quantized)")
    if variant in NATIVE_VARIANTS:
        return save_native(model, out, name, base_model, restore_base)
    tensors, shapes = {}, set()
    for m, layer in layers.items():
        B, A, shape = exported_factors(layer, name, restore_base)
        shapes.add(shape)
        tensors[f"{PREFIX}{m}.lora_A.weight"] = A.detach().float().contiguous()
        tensors[f"{PREFIX}{m}.lora_B.weight"] = B.detach().float().contiguous()
        if variant is Variant.DORA:
            tensors[f"{PREFIX}{m}.lora_magnitude_vector"] = layer.adapters[name].magnitude.detach().float().contiguous()
    if len(shapes) != 1:
        raise LorqError("per-layer ranks or alphas are not exported by this version")
    rank, alpha, rslora = shapes.pop()
    dropout = next(iter(layers.values())).adapters[name].dropout
    config = {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": base_model,
        "r": rank,
        "lora_alpha": alpha,
        "use_rslora": rslora,
        "lora_dropout": getattr(dropout, "p", 0.0),
        "target_modules": peft_target_modules(model, list(layers)),
        "bias": "none",
        "fan_in_fan_out": False,
        "modules_to_save": None,
        "init_lora_weights": True,
        "use_dora": variant is Variant.DORA,
        "inference_mode": True,
        "rank_pattern": {},
        "alpha_pattern": {},
        "layers_to_transform": None,
        "layers_pattern": None,
    }
    with atomic_dir(out) as tmp:
        save_safetensors(tensors, tmp / WEIGHTS_FILE, metadata={"format": "pt"})
        write_json(tmp / CONFIG_FILE, config)
    return Path(out)


def _check_config(config, path: Path) -> None:
    """The fields lorq reads have the types PEFT writes (a malformed file is a one-line error,
    not an exception from deep inside the scaling)."""
    if not isinstance(config, dict):
        raise LorqError(f"{path / CONFIG_FILE} is not a JSON object")
    if config.get("peft_type", "LORA") in ("LORA", None) and not is_number(config.get("lora_alpha")):
        raise LorqError(f"{path / CONFIG_FILE}: lora_alpha must be a finite number, got {config.get('lora_alpha')!r}")
    dropout = config.get("lora_dropout", 0.0)
    if not (is_number(dropout) and 0 <= dropout < 1):
        raise LorqError(f"{path / CONFIG_FILE}: lora_dropout must be a number in [0, 1), got {dropout!r}")
    if not isinstance(config.get("use_rslora", False), bool):
        raise LorqError(f"{path / CONFIG_FILE}: use_rslora must be true or false, got {config.get('use_rslora')!r}")
    if config.get("r") is not None and not is_positive_int(config["r"]):
        raise LorqError(f"{path / CONFIG_FILE}: r must be a positive integer, got {config['r']!r}")
    ranks = config.get("rank_pattern") or {}
    if not isinstance(ranks, dict) or not all(isinstance(k, str) and is_positive_int(v) for k, v in ranks.items()):
        raise LorqError(f"{path / CONFIG_FILE}: rank_pattern must map module patterns to positive integers")
    pattern = config.get("alpha_pattern") or {}
    if not isinstance(pattern, dict) or not all(isinstance(k, str) and is_number(v) for k, v in pattern.items()):
        raise LorqError(f"{path / CONFIG_FILE}: alpha_pattern must map module patterns to finite numbers")
    for key in pattern:
        try:
            re.compile(key)
        except re.error as e:
            raise LorqError(f"{path / CONFIG_FILE}: alpha_pattern key {key!r} is not a valid regex ({e})")


def _check_supported(config: dict, path: Path, dora: bool = False) -> None:
    if config.get("peft_type", "LORA") == "LORQ":
        raise LorqError(f"{path} holds a lorq-native {config.get('variant')} adapter; this command takes PEFT LoRA adapters")
    if config.get("peft_type", "LORA") != "LORA":
        raise LorqError(f"{path} holds a {config.get('peft_type')} adapter; lorq loads LoRA adapters")
    unsupported = {
        "use_dora": config.get("use_dora") and not dora,
        "fan_in_fan_out": config.get("fan_in_fan_out"),
        "modules_to_save": config.get("modules_to_save"),
        "bias": config.get("bias", "none") != "none",
        "layers_to_transform": config.get("layers_to_transform") not in (None, []),  # PEFT would skip the other layers
    }
    bad = [k for k, v in unsupported.items() if v]
    if bad:
        hint = " (DoRA adapters load in lorq eval and generate; merge and serve take plain LoRA)" if "use_dora" in bad else ""
        raise LorqError(f"{path} uses PEFT options this command does not support: {', '.join(bad)}{hint}")


def targeted(module: str, targets: list[str] | str) -> bool:
    """Whether PEFT's target_modules picks `module`: a string is a regex the whole name must
    match ("all-linear": every linear layer but the output head), a list names modules by
    their last dotted parts."""
    if targets == "all-linear":
        return module != "lm_head"
    if isinstance(targets, str):
        return re.fullmatch(targets, module) is not None
    return any(module == t or module.endswith("." + t) for t in targets)


def check_targets(config: dict, modules, path: Path) -> None:
    """PEFT builds LoRA layers only where target_modules points and ignores weights for any
    other module: an adapter whose weights lie outside its own targets is refused."""
    targets = config.get("target_modules")
    if targets is None:  # PEFT then takes its per-architecture defaults; files it writes always say
        return
    if isinstance(targets, str):
        try:
            re.compile(targets)
        except re.error as e:
            raise LorqError(f"{path / CONFIG_FILE}: target_modules {targets!r} is not a valid regex ({e})")
    elif not (isinstance(targets, list) and all(isinstance(t, str) for t in targets)):
        raise LorqError(f"{path / CONFIG_FILE}: target_modules must be a list of module names or a regex, got {targets!r}")
    outside = [m for m in modules if not targeted(m, targets)]
    if outside:
        raise LorqError(f"{path}: weights for {outside[0]}{f' and {len(outside) - 1} more' if len(outside) > 1 else ''} "
                        f"lie outside adapter_config.json's target_modules {targets!r} (PEFT would ignore them)")


def _alpha_for(module: str, config: dict) -> float:
    for pattern, alpha in (config.get("alpha_pattern") or {}).items():
        if re.search(rf"(^|\.){pattern}$", module):
            return float(alpha)
    return float(config["lora_alpha"])


def read_peft(path: str | Path, dora: bool = False) -> tuple[dict, dict[str, tuple[torch.Tensor, torch.Tensor]]]:
    """(adapter_config, {module: (A (r, in), B (out, r))}) of the PEFT adapter in `path`, checked
    for what lorq supports and for pairs that fit each other (not yet for a base model).
    dora: DoRA adapters are accepted; their magnitudes are in config["magnitudes"]."""
    path = Path(path)
    if not path.is_dir():
        raise LorqError(f"adapter directory {path} not found" + (" (it is a file)" if path.is_file() else ""))
    config = read_json(path / CONFIG_FILE)
    _check_config(config, path)
    _check_supported(config, path, dora)
    tensors = load_safetensors(path / WEIGHTS_FILE)
    check_finite_tensors(tensors, path / WEIGHTS_FILE)
    pairs: dict[str, dict[str, torch.Tensor]] = {}
    magnitudes = {}
    for key, t in tensors.items():
        m = _KEY.match(key)
        mag = _MAGNITUDE.match(key) if config.get("use_dora") else None
        if mag is not None:
            magnitudes[mag["module"]] = t
            continue
        if m is None:
            raise LorqError(f"{path / WEIGHTS_FILE}: unexpected tensor {key!r} (not a LoRA A/B weight)")
        pairs.setdefault(m["module"], {})[m["ab"]] = t
    if not pairs:
        raise LorqError(f"{path / WEIGHTS_FILE} holds no LoRA weights")
    check_targets(config, pairs, path)
    for module, ab in pairs.items():
        if set(ab) != {"A", "B"}:
            raise LorqError(f"{path}: module {module} lacks its lora_{'B' if 'A' in ab else 'A'} weight")
        if ab["A"].dim() != 2 or ab["B"].dim() != 2 or ab["B"].shape[1] != ab["A"].shape[0]:
            raise LorqError(f"{path}: {module} has A {tuple(ab['A'].shape)} and B {tuple(ab['B'].shape)}, which do not multiply")
        if ab["A"].shape[0] == 0:
            raise LorqError(f"{path}: {module} has rank 0")
        r = config.get("r")
        # PEFT builds each layer at r (or its rank_pattern entry) and refuses tensors of another rank
        if is_number(r) and not config.get("rank_pattern") and ab["A"].shape[0] != r:
            raise LorqError(f"{path}: {module} has rank {ab['A'].shape[0]} but adapter_config.json says r = {r}")
    if config.get("use_dora"):
        missing = sorted(set(pairs) - set(magnitudes))
        if missing or any(magnitudes[m].shape != (pairs[m]["B"].shape[0],) for m in pairs):
            raise LorqError(f"{path}: DoRA magnitude vectors missing or of the wrong size ({', '.join(missing[:3]) or 'size'})")
        config = {**config, "magnitudes": magnitudes}
    return config, {module: (ab["A"], ab["B"]) for module, ab in pairs.items()}


def adapter_scaling(module: str, rank: int, config: dict) -> float:
    """The factor PEFT multiplies B A by for `module` (alpha_pattern and use_rslora honoured)."""
    return lora_scaling(_alpha_for(module, config), rank, bool(config.get("use_rslora")))


def check_fits(path: Path, module: str, layer, A: torch.Tensor, B: torch.Tensor) -> None:
    if not (hasattr(layer, "in_features") and hasattr(layer, "out_features")):  # every linear kind (dense, quantized, wrapped)
        raise LorqError(f"adapter {path} targets {module}, which is a {type(layer).__name__}, not a linear layer")
    if A.shape[1] != layer.in_features or B.shape[0] != layer.out_features:
        raise LorqError(
            f"adapter {path} does not fit the base model: {module} is {layer.out_features}x{layer.in_features}, "
            f"adapter has A {tuple(A.shape)} and B {tuple(B.shape)}"
        )


def load_peft(model: nn.Module, path: str | Path, name: str = "default", trainable: bool = False) -> list[str]:
    """Add the PEFT adapter (or lorq-native one) in `path` to the model as adapter `name`;
    returns the adapted modules."""
    path = Path(path)
    if is_native(path):
        return load_native(model, path, name, trainable)
    config, pairs = read_peft(path, dora=True)
    variant = Variant.DORA if config.get("use_dora") else Variant.LORA
    for module, (A, B) in pairs.items():
        try:
            layer = model.get_submodule(module)
        except AttributeError:
            raise LorqError(f"adapter {path} targets {module}, which this base model does not have")
        check_fits(path, module, layer, A, B)
    for module, (A, B) in pairs.items():
        layer = wrap_layer(model, module)
        ad = layer.add(name, A.shape[0], _alpha_for(module, config), bool(config.get("use_rslora")),
                       float(config.get("lora_dropout", 0.0)), variant)
        with torch.no_grad():
            ad.A.copy_(A)
            ad.B.copy_(B)
            if variant is Variant.DORA:
                ad.magnitude.copy_(config["magnitudes"][module])
    set_trainable(model, name, trainable)
    return sorted(pairs)
