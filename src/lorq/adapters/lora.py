"""LoRALinear: one adapter layer over any base with `linear(x)` (dense or quantized).

Hu et al., "LoRA" (2021), eq. 3: h = W0 x + (alpha / r) · B A x, with A (r, in) Kaiming-uniform
and B (out, r) zero so training starts at the base model. rsLoRA (Kalajdzievski 2023) scales
by alpha / sqrt(r) instead. Several adapters live side by side, addressed by name.
"""

from __future__ import annotations

import math
import re
from contextlib import contextmanager
from dataclasses import dataclass

import torch
import torch.nn as nn

from ..errors import LorqError
from ..options import opt
from ..quant.linear import DECODER_LINEARS, QuantizedLinear, compute_dtype, match_modules, set_module
from .variants import Adapter, LowRankAdapter, Variant, lora_scaling, make_adapter  # noqa: F401  (re-exported)


@dataclass
class LoRAConfig:
    """Which layers get an adapter and its shape."""

    rank: int = opt(16, "LoRA rank r")
    alpha: float = opt(32.0, "LoRA alpha; the update is scaled by alpha / r (alpha / sqrt(r) with --rslora)")
    dropout: float = opt(0.05, "dropout on the adapter's input during training")
    rslora: bool = opt(False, "rank-stabilized scaling alpha / sqrt(r)")
    targets: list[str] = opt([DECODER_LINEARS], "regexes (searched in module names) of the linear layers to adapt")
    adapter_name: str = opt("default", "name of the adapter inside lorq (PEFT's adapter name)")
    variant: Variant = opt(Variant.LORA, "adapter parametrization: lora, dora (magnitude + direction), dylora (nested ranks), core (frozen B, A; r×r core trained, LoRA-XS), nola (random-basis coefficients), randlora (full-rank from random bases), peqa (train the scales of an INT-k base), l4q (LoRA inside a learned-step quantizer; writes a quantized model)")
    nola_bases: int = opt(64, "nola: random bases per factor (trainable coefficients per layer = 2 × this)")
    basis_seed: int = opt(0, "nola / randlora: seed of the frozen random bases")
    dylora_rank: int = opt(0, "dylora: rank the adapter is evaluated and exported at (0 = --rank)")
    qat_bits: int = opt(4, "l4q: bits of the quantized result")
    qat_group_size: int = opt(64, "l4q: weights per learned step size, along each row")

    def options(self) -> dict:
        """Construction options of the variant."""
        self.variant = Variant(self.variant)
        return {Variant.NOLA: {"nola_bases": self.nola_bases, "basis_seed": self.basis_seed},
                Variant.RANDLORA: {"basis_seed": self.basis_seed},
                Variant.L4Q: {"qat_bits": self.qat_bits, "qat_group_size": self.qat_group_size}}.get(self.variant, {})

    def validate(self) -> "LoRAConfig":
        self.variant = Variant(self.variant)
        if self.rank <= 0:
            raise LorqError(f"rank must be a positive integer, got {self.rank}")
        if self.nola_bases <= 0:
            raise LorqError(f"nola-bases must be positive, got {self.nola_bases}")
        if not 0 <= self.dylora_rank <= self.rank:
            raise LorqError(f"dylora-rank must be in 0..{self.rank} (the rank), got {self.dylora_rank}")
        if not 0.0 <= self.dropout < 1.0:
            raise LorqError(f"dropout must be in [0, 1), got {self.dropout}")
        if not (isinstance(self.alpha, (int, float)) and math.isfinite(self.alpha) and self.alpha > 0):
            raise LorqError(f"alpha must be a positive number, got {self.alpha}")
        if not self.adapter_name or "." in self.adapter_name:
            raise LorqError(f"adapter-name must be a non-empty name without '.' (it becomes part of module names), got {self.adapter_name!r}")
        check_patterns(self.targets)
        return self


def check_patterns(targets: list[str]) -> None:
    """--targets: valid, non-empty regexes (an empty one would match every linear layer)."""
    for pattern in targets:
        if not pattern:
            raise LorqError("an empty --targets pattern would match every linear layer, the output layer too")
        try:
            re.compile(pattern)
        except re.error as e:
            raise LorqError(f"--targets {pattern!r} is not a valid regular expression: {e}")


class LoRALinear(nn.Module):
    """A base linear layer plus named low-rank adapters.

    forward(x): base(x) + the sum of the active, unmerged adapters. With `adapter_index`
    (ints broadcastable to x.shape[:-1]; -1 = base only) each token uses its own adapter —
    the mixed batch that multi-adapter serving needs.
    """

    def __init__(self, base: nn.Module):
        super().__init__()
        self.base = base
        self.train(base.training)
        self.in_features, self.out_features = base.in_features, base.out_features
        self.adapters = nn.ModuleDict()
        self.active: list[str] = []
        self.merged: list[str] = []
        self.merged_deltas: dict[str, torch.Tensor] = {}
        self.starts: dict = {}  # adapter name -> init Start that was subtracted from the base
        self.adapter_index: torch.Tensor | None = None

    def add(self, name: str, rank: int, alpha: float, rslora: bool = False, dropout: float = 0.0,
            variant: Variant = Variant.LORA, **options) -> Adapter:
        if name in self.adapters:
            raise LorqError(f"adapter {name!r} already exists")
        ad = make_adapter(variant, self, rank, alpha, rslora, dropout, **options)
        ad.to(self.device)  # next to the base (random banks stay shared only on the CPU)
        ad.train(self.training)  # a new adapter follows its layer's train/eval mode
        self.adapters[name] = ad
        self.active.append(name)
        return ad

    @property
    def device(self) -> torch.device:
        t = next(self.base.parameters(), None)
        t = t if t is not None else next(self.base.buffers(), None)
        return t.device if t is not None else torch.device("cpu")

    def remove(self, name: str) -> None:
        if name in self.merged:
            self.unmerge(name)
        del self.adapters[name]
        self.active = [a for a in self.active if a != name]

    def forward(self, x: torch.Tensor, adapter_index: torch.Tensor | None = None) -> torch.Tensor:
        x = x.to(compute_dtype(x))  # under autocast: cast once for the base and every adapter
        index = adapter_index if adapter_index is not None else self.adapter_index
        if index is None:
            live = [self.adapters[name] for name in self.active if name not in self.merged]
            if len(live) == 1 and live[0].owns_base:  # it shares the base's matmul (DoRA)
                return live[0].output(x, self)
            out = base_out = self.base(x)
            for ad in live:
                out = ad.add_delta(out, x, base_out, self)
            return out
        out = base_out = self.base(x)
        index = index.reshape(index.shape + (1,) * (x.dim() - 1 - index.dim())).expand(x.shape[:-1])
        out = out.clone()
        for i, name in enumerate(self.adapters):
            sel = index == i  # tokens that use adapter i
            if sel.any():
                out[sel] = out[sel] + self.adapters[name].delta(x[sel], base_out[sel], self).to(out.dtype)
        return out

    def linear(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward(x)

    def merge(self, name: str) -> None:
        """Fold an adapter into a dense base weight (W += ΔW); the ΔW is kept to unmerge exactly
        (DoRA's ΔW depends on the base weight it was merged into)."""
        if not isinstance(self.base, nn.Linear):
            raise LorqError("merging into a quantized base is not supported here; merge on a dense base")
        if name not in self.merged:
            with torch.no_grad():
                delta = self.adapters[name].delta_weight(self).to(self.base.weight.dtype)
                self.base.weight += delta
            self.merged.append(name)
            self.merged_deltas[name] = delta

    def unmerge(self, name: str) -> None:
        if name in self.merged:
            with torch.no_grad():
                self.base.weight -= self.merged_deltas.pop(name)
            self.merged.remove(name)


def lora_layers(model: nn.Module) -> dict[str, LoRALinear]:
    return {n: m for n, m in model.named_modules() if isinstance(m, LoRALinear)}


def add_adapters(model: nn.Module, cfg: LoRAConfig, name: str | None = None) -> list[str]:
    """Wrap the target linear layers (dense or quantized) and add adapter `name` to each.

    Freezes everything but the new adapters. Returns the wrapped module names.
    """
    cfg.validate()
    name = name or cfg.adapter_name
    existing = lora_layers(model)
    targets = match_modules(model, cfg.targets, (nn.Linear, QuantizedLinear, LoRALinear))
    targets = [t for t in targets if not any(t.startswith(e + ".") for e in existing)]  # skip wrapped bases
    if not targets:
        raise LorqError(f"target pattern(s) {cfg.targets} match no linear layer of the model")
    for t in targets:
        wrap_layer(model, t).add(name, cfg.rank, cfg.alpha, cfg.rslora, cfg.dropout, cfg.variant, **cfg.options())
    mark_trainable(model, name)
    return targets


def wrap_layer(model: nn.Module, module: str) -> LoRALinear:
    """The LoRALinear at `module`, wrapping the linear layer there first if needed."""
    layer = model.get_submodule(module)
    if not isinstance(layer, LoRALinear):
        layer = LoRALinear(layer)
        set_module(model, module, layer)
    return layer


def set_trainable(model: nn.Module, name: str, trainable: bool) -> None:
    """Adapter `name` trainable (and nothing else), or the whole model frozen."""
    if trainable:
        mark_trainable(model, name)
    else:
        model.requires_grad_(False)


def mark_trainable(model: nn.Module, name: str) -> None:
    """Only adapter `name` trains; base weights (and other adapters) stay frozen."""
    for p in model.parameters():
        p.requires_grad_(False)
    for layer in lora_layers(model).values():
        if name in layer.adapters:
            ad = layer.adapters[name]
            for n in ad.trainable_names:
                getattr(ad, n).requires_grad_(True)


@contextmanager
def adapter_routing(model: nn.Module, index: torch.Tensor):
    """Within the block, every LoRALinear routes tokens by `index` (see LoRALinear.forward)."""
    layers = lora_layers(model).values()
    for layer in layers:
        layer.adapter_index = index
    try:
        yield
    finally:
        for layer in layers:
            layer.adapter_index = None
