"""LISA (Pan et al. 2024, "Layerwise Importance Sampled AdamW"): full-parameter training in
which only `n_active` randomly sampled decoder layers (plus, as in the paper, the embeddings and
the output layer) are trainable during each period of `period` steps.

When a layer leaves the active set its optimizer state is deleted, not kept, so the optimizer
holds the state of the active layers only. The sample of a period is a pure function of
(seed, period), so a resumed run trains the same layers.
"""

from __future__ import annotations

import re

import torch
import torch.nn as nn

from ..errors import LorqError
from ..quant.linear import DECODER_BLOCKS


def decoder_layers(model: nn.Module) -> list[str]:
    """Names of the decoder blocks (model.layers.0, model.layers.1, ...)."""
    pattern = re.compile(DECODER_BLOCKS + r"\.\d+$")
    return [n for n, _ in model.named_modules() if pattern.search(n)]


def sample_layers(n_layers: int, n_active: int, period: int, seed: int) -> list[int]:
    g = torch.Generator().manual_seed(seed * 9176 + period)
    return sorted(torch.randperm(n_layers, generator=g)[:n_active].tolist())


class LayerSampler:
    """Switches requires_grad between periods and frees the optimizer state of frozen params."""

    def __init__(self, model: nn.Module, optimizer: torch.optim.Optimizer, n_active: int, period: int, seed: int,
                 always_embeddings: bool = True):
        self.layers = decoder_layers(model)
        if not self.layers:
            raise LorqError("LISA: no decoder layers found in this model")
        if not 1 <= n_active <= len(self.layers):
            raise LorqError(f"lisa-layers must be in 1..{len(self.layers)}, got {n_active}")
        if period <= 0:
            raise LorqError(f"lisa-period must be positive, got {period}")
        self.model, self.optimizer = model, optimizer
        self.n_active, self.period, self.seed = n_active, period, seed
        in_layer = {id(p) for name in self.layers for p in model.get_submodule(name).parameters()}
        self.layer_params = [list(model.get_submodule(name).parameters()) for name in self.layers]
        # outside the decoder blocks: embeddings, output layer, final norm
        self.outside = [p for p in model.parameters() if id(p) not in in_layer]
        self.always = self.outside if always_embeddings else []
        self.current: int | None = None

    def active_layers(self, step: int) -> list[int]:
        return sample_layers(len(self.layers), self.n_active, step // self.period, self.seed)

    def begin_step(self, step: int) -> None:
        period = step // self.period
        if period == self.current:
            return
        self.current = period  # (None after construction: the first call, or a resume, always selects)
        active = {id(p) for i in self.active_layers(step) for p in self.layer_params[i]} | {id(p) for p in self.always}
        for group in self.optimizer.param_groups:
            for p in group["params"]:
                on = id(p) in active
                p.requires_grad_(on)
                if not on:
                    p.grad = None
                    self.optimizer.state.pop(p, None)  # freed, not kept for later
