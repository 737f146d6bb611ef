"""Adapter initializations that come from a decomposition of the base weight.

LoftQ / LQ-LoRA / QPiSSA / LoRC / EoRA (lorq.quant.lowrank) leave W ≈ Q + L1 L2. Used as the
LoRA initialization, the adapter starts at scaling · B A = L1 L2 (A = L2, B = L1 / scaling), so
fine-tuning starts from the compensated model, and the base keeps only Q. The adapter then
belongs to that Q, which is saved beside it.
"""

from __future__ import annotations

from enum import Enum

import torch
import torch.nn as nn

from ..errors import LorqError
from ..quant.linear import QuantizedLinear
from .lora import lora_layers


class LowRankUse(str, Enum):
    """What the low-rank factors of a compensated quantization become."""

    INIT = "init"  # the trainable LoRA's initial value
    COMPENSATE = "compensate"  # a frozen branch of the base (the model is Q + L1 L2)


def pop_compensation(model: nn.Module) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Detach every QuantizedLinear's frozen factors: name -> (L1 (out, r), L2 (r, in))."""
    factors = {}
    for name, mod in model.named_modules():
        if isinstance(mod, QuantizedLinear) and mod.rank:
            factors[name] = (mod.lowrank_b, mod.lowrank_a)
            mod.set_lowrank(None)
    return factors


@torch.no_grad()
def init_from_factors(model: nn.Module, name: str, factors: dict[str, tuple[torch.Tensor, torch.Tensor]]) -> None:
    """Set adapter `name` of each wrapped layer to its factors: scaling · B A = L1 L2."""
    layers = {n: l for n, l in lora_layers(model).items() if name in l.adapters}
    for module, (l1, l2) in factors.items():
        layer = layers.get(module)
        if layer is None:
            raise LorqError(f"{module} has low-rank factors but no adapter {name!r} (adapt every compensated layer)")
        ad = layer.adapters[name]
        if ad.rank != l1.shape[1]:
            raise LorqError(f"{module}: factors of rank {l1.shape[1]} cannot initialize a rank-{ad.rank} adapter (use the same --rank)")
        ad.A.copy_(l2.to(ad.A.dtype))
        ad.B.copy_(l1.to(ad.B.dtype) / ad.scaling)
