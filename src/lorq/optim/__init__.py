"""Optimizers and what they train: AdamW, 8-bit AdamW, GaLore, Q-GaLore, LISA, LoRA+ groups.

`build_optimizer(model, cfg, ...)` returns a `Plan`: the optimizer, the named tensors it may
update (what checkpoints hold), a per-step hook (LISA's layer switching) and `step(max_norm)`
(clip + update; GaLore's layerwise mode updates during backward instead).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from enum import Enum
from typing import Callable

import torch
import torch.nn as nn

from ..errors import LorqError
from ..options import POSITIVE, check_ranges, opt
from ..quant.linear import DECODER_LINEARS, match_modules
from ..train.distributed import full
from .adamw8bit import AdamW8bit
from .galore import GaLoreAdamW
from .lisa import Embeddings as LisaEmbeddings
from .lisa import LayerSampler


class OptimizerKind(str, Enum):
    ADAMW = "adamw"
    ADAMW8BIT = "adamw8bit"
    GALORE = "galore"
    QGALORE = "qgalore"
    LISA = "lisa"


class StateFormat(str, Enum):
    """How GaLore keeps Adam's moments (auto: resolved by OptimConfig.validate)."""

    AUTO = "auto"
    FP32 = "fp32"
    INT8 = "int8"


FULL_PARAMETER = {OptimizerKind.GALORE, OptimizerKind.QGALORE, OptimizerKind.LISA}


@dataclass
class OptimConfig:
    """The optimizer and which weights it trains."""

    optimizer: OptimizerKind = opt(OptimizerKind.ADAMW, "adamw, adamw8bit (8-bit states), galore (full-parameter, low-rank projected states), qgalore (galore with int8 weights and int4 projections), lisa (full-parameter, a few sampled layers at a time)")
    full: bool = opt(False, "train the base model's own weights instead of an adapter (implied by galore, qgalore and lisa; needs a dense base)")
    loraplus_ratio: float = opt(1.0, "LoRA+: learning rate of the B factors = ratio × lr (the paper suggests 16; 1 = plain LoRA)")
    galore_rank: int = opt(128, "galore: rank of the gradient projection")
    galore_gap: int = opt(200, "galore: steps between projection refreshes (T)")
    galore_scale: float = opt(0.25, "galore: scale of the projected-back update (α)")
    galore_states: StateFormat = opt(StateFormat.AUTO, "galore, qgalore: Adam's moments in fp32, or int8 (8-bit GaLore: block-wise 8-bit codes as in 8-bit AdamW); auto: fp32 for galore, int8 for qgalore (its reference optimizer is an 8-bit AdamW)")
    galore_layerwise: bool = opt(True, "galore: update each parameter during backward and free its gradient (needs grad-accum 1; clips per parameter)")
    qgalore_similarity: float = opt(0.4, "qgalore: a layer's projection refresh interval doubles when its new projection is this similar to the last (mean |cos|)")
    lisa_layers: int = opt(2, "lisa: decoder layers trained at a time")
    lisa_period: int = opt(20, "lisa: steps between layer resamplings")
    lisa_embeddings: LisaEmbeddings = opt(LisaEmbeddings.AUTO, "lisa: the embeddings, final norm and output layer: train (at every step, the paper's choice), freeze, or auto (freeze them when the output layer is tied to the input embedding, train them otherwise)")

    def validate(self) -> "OptimConfig":
        self.optimizer = OptimizerKind(self.optimizer)
        self.lisa_embeddings = LisaEmbeddings(self.lisa_embeddings)
        self.galore_states = StateFormat(self.galore_states)
        if self.galore_states is StateFormat.AUTO:
            self.galore_states = StateFormat.INT8 if self.optimizer is OptimizerKind.QGALORE else StateFormat.FP32
        if self.optimizer in FULL_PARAMETER:
            self.full = True
        check_ranges(self, {**{k: POSITIVE for k in ("loraplus_ratio", "galore_rank", "galore_gap", "galore_scale")},
                            "qgalore_similarity": (lambda v: 0 < v <= 1, "in (0, 1]"), "lisa_layers": POSITIVE, "lisa_period": POSITIVE})
        return self

    def check_accumulation(self, grad_accum: int, world_size: int) -> None:
        """Optimizers that update weights during backward see one micro-batch on one process."""
        if grad_accum == 1 and world_size == 1:
            return
        if self.optimizer is OptimizerKind.QGALORE:
            raise LorqError("qgalore updates each int8 weight during backward: it needs --grad-accum 1 and one process")
        if self.optimizer is OptimizerKind.GALORE and self.galore_layerwise:
            raise LorqError("galore's layerwise updates need --grad-accum 1 and one process (or --no-galore-layerwise)")


@dataclass
class Plan:
    optimizer: torch.optim.Optimizer
    params: dict[str, nn.Parameter]  # what the optimizer may update, by name (checkpointed)
    begin_step: Callable[[int], None] = lambda step: None
    layerwise: GaLoreAdamW | None = None
    hooks: list = field(default_factory=list)

    def step(self, max_norm: float) -> float:
        """Clip the gradients still held, update; returns the gradient norm."""
        held = [p for p in self.params.values() if p.grad is not None]
        norm = torch.nn.utils.clip_grad_norm_(held, max_norm if max_norm > 0 else float("inf")) if held else 0.0
        norm = float(full(norm))  # sharded (FSDP) gradients give a DTensor norm
        self.optimizer.step()
        if self.layerwise is not None:
            norm = math.sqrt(norm**2 + self.layerwise.take_hooked_norm() ** 2)
        return norm

    def state_bytes(self) -> int:
        """Bytes of optimizer state held now."""
        return sum(local_nbytes(t) for st in self.optimizer.state.values() for t in st.values() if torch.is_tensor(t))

    def close(self) -> None:
        for h in self.hooks:
            h.remove()


def local_nbytes(t: torch.Tensor) -> int:
    """Bytes this process holds of t: its shard if t is sharded (FSDP)."""
    shard = t.to_local() if hasattr(t, "to_local") else t
    return shard.numel() * shard.element_size()


def trainable(model: nn.Module) -> dict[str, nn.Parameter]:
    return {n: p for n, p in model.named_parameters() if p.requires_grad}


def no_decay_ids(model: nn.Module) -> set[int]:
    """Trained tensors whose neutral value is not 0 (DoRA's magnitude, step sizes, scalings)."""
    from ..adapters.variants import Adapter

    return {id(getattr(m, n)) for m in model.modules() if isinstance(m, Adapter) for n in m.no_decay_names}


def param_groups(named: dict[str, nn.Parameter], lr: float, wd: float, loraplus_ratio: float, no_decay: set[int] = frozenset()) -> list[dict]:
    """LoRA+ (Hayou et al. 2024): the B factors learn `ratio` times faster than the rest; tensors
    in `no_decay` get no weight decay."""
    groups = {}
    for n, p in named.items():
        key = (loraplus_ratio if n.endswith(".B") else 1.0, 0.0 if id(p) in no_decay else wd)
        groups.setdefault(key, []).append(p)
    return [{"params": ps, "lr_scale": scale, "lr": lr * scale, "weight_decay": decay} for (scale, decay), ps in groups.items()]


def galore_groups(model: nn.Module, named: dict[str, nn.Parameter], cfg: OptimConfig, lr: float, wd: float) -> list[dict]:
    """The decoder's linear weights get projected states; everything else plain AdamW."""
    linears = set(match_modules(model, [DECODER_LINEARS], (nn.Linear,)))
    projected = [p for n, p in named.items() if n.rsplit(".", 1)[0] in linears and p.dim() == 2]
    ids = {id(p) for p in projected}
    rest = [p for p in named.values() if id(p) not in ids]
    # whole_state: the projected states are never sharded, even when shaped like their weight (FSDP)
    return [{"params": projected, "rank": cfg.galore_rank, "lr": lr, "weight_decay": wd, "lr_scale": 1.0, "whole_state": True},
            {"params": rest, "rank": 0, "lr": lr, "weight_decay": wd, "lr_scale": 1.0}]


Builder = Callable[..., Plan]
OPTIMIZERS: dict[OptimizerKind, Builder] = {}


def register(kind: OptimizerKind):
    def deco(fn: Builder) -> Builder:
        OPTIMIZERS[kind] = fn
        return fn
    return deco


@register(OptimizerKind.ADAMW)
def build_adamw(model, cfg: OptimConfig, lr, wd, seed, grad_accum, max_norm, world_size) -> Plan:
    named = trainable(model)
    return Plan(torch.optim.AdamW(param_groups(named, lr, wd, cfg.loraplus_ratio, no_decay_ids(model)), lr=lr, weight_decay=wd), named)


@register(OptimizerKind.ADAMW8BIT)
def build_adamw8bit(model, cfg: OptimConfig, lr, wd, seed, grad_accum, max_norm, world_size) -> Plan:
    named = trainable(model)
    return Plan(AdamW8bit(param_groups(named, lr, wd, cfg.loraplus_ratio, no_decay_ids(model)), lr=lr, weight_decay=wd), named)


@register(OptimizerKind.GALORE)
def build_galore(model, cfg: OptimConfig, lr, wd, seed, grad_accum, max_norm, world_size) -> Plan:
    named = trainable(model)
    optimizer = GaLoreAdamW(galore_groups(model, named, cfg, lr, wd), lr=lr, weight_decay=wd, update_gap=cfg.galore_gap,
                            scale=cfg.galore_scale, states=cfg.galore_states.value)
    plan = Plan(optimizer, named)
    if cfg.galore_layerwise:
        cfg.check_accumulation(grad_accum, world_size)
        plan.layerwise, plan.hooks = optimizer, optimizer.attach_layerwise(max_norm)
    return plan


@register(OptimizerKind.QGALORE)
def build_qgalore(model, cfg: OptimConfig, lr, wd, seed, grad_accum, max_norm, world_size) -> Plan:
    from .qgalore import QGaLoreAdamW, quantize_weights_int8

    cfg.check_accumulation(grad_accum, world_size)
    layers = quantize_weights_int8(model)  # the float weights are gone from here on
    named = trainable(model)
    codes = {f"{n}.codes": l.codes for n, l in layers.items()}
    scales = {f"{n}.scale": l.scale for n, l in layers.items()}  # grow when a weight outgrows its group
    groups = [{"params": list(codes.values()), "rank": cfg.galore_rank, "int8": True, "lr": lr, "weight_decay": wd, "lr_scale": 1.0},
              {"params": list(named.values()), "rank": 0, "lr": lr, "weight_decay": wd, "lr_scale": 1.0}]
    optimizer = QGaLoreAdamW(groups, layers, similarity=cfg.qgalore_similarity, seed=seed, lr=lr, weight_decay=wd,
                             update_gap=cfg.galore_gap, scale=cfg.galore_scale, states=cfg.galore_states.value)
    optimizer.clip = max_norm
    return Plan(optimizer, {**named, **codes, **scales}, layerwise=optimizer)


@register(OptimizerKind.LISA)
def build_lisa(model, cfg: OptimConfig, lr, wd, seed, grad_accum, max_norm, world_size) -> Plan:
    named = trainable(model)
    optimizer = torch.optim.AdamW(param_groups(named, lr, wd, 1.0), lr=lr, weight_decay=wd)
    sampler = LayerSampler(model, optimizer, cfg.lisa_layers, cfg.lisa_period, seed, cfg.lisa_embeddings)
    return Plan(optimizer, named, begin_step=sampler.begin_step)


def build_optimizer(model: nn.Module, cfg: OptimConfig, lr: float, weight_decay: float, seed: int = 0,
                    grad_accum: int = 1, max_norm: float = 0.0, world_size: int = 1) -> Plan:
    cfg.validate()
    if not trainable(model):
        raise LorqError("nothing to train: the model has no trainable parameters")
    return OPTIMIZERS[cfg.optimizer](model, cfg, lr, weight_decay, seed, grad_accum, max_norm, world_size)


__all__ = ["OptimConfig", "OptimizerKind", "StateFormat", "Plan", "build_optimizer", "AdamW8bit", "GaLoreAdamW", "LayerSampler", "FULL_PARAMETER"]
