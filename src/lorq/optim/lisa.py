"""LISA (Pan et al. 2024, "Layerwise Importance Sampled AdamW"): full-parameter training in
which only `n_active` randomly sampled decoder layers are trainable during each period of
`period` steps. The paper also trains the embeddings and the output layer at every step; see
`Embeddings` for when lorq does.

When a layer leaves the active set its optimizer state is deleted, not kept, so the optimizer
holds the state of the active layers only. The sample of a period is a pure function of
(seed, period), so a resumed run trains the same layers.
"""

from __future__ import annotations

import re
from enum import Enum

import torch
import torch.nn as nn

from ..errors import LorqError
from ..quant.linear import DECODER_BLOCKS


class Embeddings(str, Enum):
    """What LISA does with the parameters outside the decoder blocks (embeddings, final norm,
    output layer). TRAIN is the paper's choice: there (LLaMA-2-7B) they are 4% of the model. A
    small model ties its output layer to a large input embedding (SmolLM2-135M: 21% of the
    parameters), whose AdamW state then outweighs that of the sampled layers; frozen, LISA's
    optimizer state fell from 0.26x to 0.05x of full fine-tuning's and its validation loss was
    lower (benchmarks/results/methods.md). AUTO freezes them when tied, trains them otherwise."""

    AUTO = "auto"
    TRAIN = "train"
    FREEZE = "freeze"


def tied_embeddings(model: nn.Module) -> bool:
    inp, out = model.get_input_embeddings(), model.get_output_embeddings()
    return inp is not None and out is not None and inp.weight is out.weight


def trains_embeddings(model: nn.Module, choice: Embeddings) -> bool:
    return choice is Embeddings.TRAIN or (choice is Embeddings.AUTO and not tied_embeddings(model))


def decoder_layers(model: nn.Module) -> list[str]:
    """Names of the decoder blocks (model.layers.0, model.layers.1, ...)."""
    pattern = re.compile(DECODER_BLOCKS + r"\.\d+$")
    return [n for n, _ in model.named_modules() if pattern.search(n)]


def sample_layers(n_layers: int, n_active: int, period: int, seed: int) -> list[int]:
    g = torch.Generator().manual_seed(seed * 9176 + period)
    return sorted(torch.randperm(n_layers, generator=g)[:n_active].tolist())


def check_active_layers(model: nn.Module, n_active: int) -> list[str]:
    """The model's decoder layers, of which n_active must be a share (checked before any work)."""
    layers = decoder_layers(model)
    if not layers:
        raise LorqError("LISA: no decoder layers found in this model")
    if not 1 <= n_active <= len(layers):
        raise LorqError(f"lisa-layers must be in 1..{len(layers)}, got {n_active}")
    return layers


class LayerSampler:
    """Switches requires_grad between periods and frees the optimizer state of frozen params."""

    def __init__(self, model: nn.Module, optimizer: torch.optim.Optimizer, n_active: int, period: int, seed: int,
                 embeddings: Embeddings = Embeddings.AUTO):
        self.layers = check_active_layers(model, n_active)
        if period <= 0:
            raise LorqError(f"lisa-period must be positive, got {period}")
        self.model, self.optimizer = model, optimizer
        self.n_active, self.period, self.seed = n_active, period, seed
        in_layer = {id(p) for name in self.layers for p in model.get_submodule(name).parameters()}
        self.layer_params = [list(model.get_submodule(name).parameters()) for name in self.layers]
        # outside the decoder blocks: embeddings, output layer, final norm
        self.outside = [p for p in model.parameters() if id(p) not in in_layer]
        self.always = self.outside if trains_embeddings(model, Embeddings(embeddings)) else []
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
