"""The update a set of PEFT adapters makes to each base weight: ΔW = Σ_i w_i · s_i · B_i A_i.

s_i is each adapter's own scaling (lora_alpha / r, or / √r with rsLoRA) and w_i the weight the
user gives it. Factors are kept, not multiplied out, so ΔW is formed one module at a time
and a merge can also keep it as rank Σ r_i factors (`fold`).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn as nn

from ..adapters.lora import lora_layers
from ..adapters.peft_format import adapter_scaling, check_fits, load_peft, read_peft
from ..errors import LorqError
from ..io import check_finite


@dataclass
class AdapterUpdate:
    paths: list[Path]
    weights: list[float]
    factors: dict[str, list[tuple[torch.Tensor, torch.Tensor]]] = field(default_factory=dict)  # module -> [(w s B (out, r), A (r, in))]
    origin: dict[str, list[Path]] = field(default_factory=dict)  # module -> the adapter each pair came from

    @classmethod
    def read(cls, paths: list[str], weights: list[float] | None = None) -> "AdapterUpdate":
        if not paths:
            raise LorqError("give at least one adapter (--adapter DIR [DIR ...])")
        weights = list(weights) if weights else [1.0] * len(paths)
        if len(weights) != len(paths):
            raise LorqError(f"{len(weights)} weights for {len(paths)} adapters: give one weight per adapter")
        check_finite("--weights", weights)
        update = cls([Path(p) for p in paths], [float(w) for w in weights])
        for path, w in zip(update.paths, update.weights):
            config, pairs = read_peft(path)
            for module, (A, B) in pairs.items():
                s = adapter_scaling(module, A.shape[0], config)
                B, A = (w * s) * B.float(), A.float()
                if not (torch.isfinite(B).all() and torch.isfinite(A).all()):
                    raise LorqError(f"adapter {path}: {module}'s factors are not finite (NaN in the file, or a weight too large)")
                update.factors.setdefault(module, []).append((B, A))
                update.origin.setdefault(module, []).append(path)
        return update

    def modules(self) -> list[str]:
        return list(self.factors)

    def check_fits(self, model: nn.Module) -> None:
        """Every adapted module exists in `model` (a skeleton on the meta device will do) and has its shape."""
        for module, pairs in self.factors.items():
            try:
                layer = model.get_submodule(module)
            except AttributeError:
                raise LorqError(f"the adapter(s) target {module}, which this base model does not have")
            for (B, A), path in zip(pairs, self.origin[module]):
                check_fits(path, module, layer, A, B)

    def stacked(self, module: str) -> tuple[torch.Tensor, torch.Tensor]:
        """ΔW as one pair of factors: [w1 s1 B1, w2 s2 B2, ...] (out, Σr) and [A1; A2; ...] (Σr, in)."""
        pairs = self.factors[module]
        return torch.cat([B for B, _ in pairs], dim=1), torch.cat([A for _, A in pairs], dim=0)

    def delta(self, module: str) -> torch.Tensor | None:
        """ΔW (out, in) in fp32, or None for a module no adapter touches."""
        if module not in self.factors:
            return None
        B, A = self.stacked(module)
        return B @ A

    def nbytes(self) -> int:
        return sum(t.numel() * 4 for pairs in self.factors.values() for B, A in pairs for t in (B, A))


def apply_unmerged(model: nn.Module, update: AdapterUpdate) -> None:
    """Load every adapter of `update` into `model` as a separate, unmerged LoRA branch with its
    weight folded into the scaling: the reference a merge is compared against."""
    for i, (path, w) in enumerate(zip(update.paths, update.weights)):
        name = f"merge{i}"
        load_peft(model, path, name)
        for layer in lora_layers(model).values():
            if name in layer.adapters:
                layer.adapters[name].scaling *= w
