"""Batched heterogeneous LoRA: one forward pass, every token with its own adapter.

S-LoRA (Sheng et al. 2023) / Punica's two kernels, in torch ops:
- segment (prefill): tokens are sorted by adapter and each adapter's contiguous run gets one
  GEMM pair, y_s += scaling · (x_s Aᵀ) Bᵀ — the same ops as `LoRALinear` for that run;
- gather (decode): one token per sequence, so each token's (A, B) is gathered into a stack and
  applied with one batched matmul pair per rank present — no adapter is padded to the largest
  rank. A decode batch keeps its adapters from one step to the next until a sequence leaves or
  joins, so the stacks of the last layout are kept (`GatherCache`) rather than gathered again
  at every step: the gathering was 40% of the LoRA work of a step with 21 adapters in 32 tokens.
Adapter weights live in the adapter cache, not in modules, so thousands of them cost no
module surgery: `MultiLoRALinear` only holds its base layer and asks the step's plan.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import cached_property

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..adapters.lora import LoRALinear
from ..adapters.peft_format import adapter_scaling, check_fits, read_peft
from ..errors import LorqError
from ..quant.linear import QuantizedLinear, match_modules, set_module


@dataclass
class AdapterWeights:
    """One adapter in serving form: module -> (A (r, in), B (out, r), scaling)."""

    name: str
    modules: dict[str, tuple[torch.Tensor, torch.Tensor, float]]
    path: str = ""

    @cached_property  # the cache sums it over every adapter it holds at each insertion
    def nbytes(self) -> int:
        return sum(A.numel() * A.element_size() + B.numel() * B.element_size() for A, B, _ in self.modules.values())

    @property
    def dtype(self) -> torch.dtype | None:
        return next((A.dtype for A, _, _ in self.modules.values()), None)

    @property
    def ranks(self) -> list[int]:
        return sorted({A.shape[0] for A, _, _ in self.modules.values()})


def read_adapter(name: str, path, layers: dict[str, nn.Module], dtype: torch.dtype, device: torch.device | str = "cpu") -> AdapterWeights:
    """A PEFT adapter directory as AdapterWeights, checked against the served layers."""
    config, pairs = read_peft(path)
    modules = {}
    for module, (A, B) in pairs.items():
        if module not in layers:
            raise LorqError(f"adapter {name!r} targets {module}, which is not an adaptable layer of the served model")
        check_fits(path, module, layers[module], A, B)
        A, B, scaling = A.to(device, dtype).contiguous(), B.to(device, dtype).contiguous(), adapter_scaling(module, A.shape[0], config)
        if not (torch.isfinite(A).all() and torch.isfinite(B).all() and torch.isfinite(torch.tensor(scaling, dtype=dtype))):
            raise LorqError(f"adapter {name!r}: {module}'s weights or scaling ({scaling:g}) overflow {str(dtype).removeprefix('torch.')}")
        modules[module] = (A, B, scaling)
    return AdapterWeights(name, modules, str(path))


STACK_CACHE_BYTES = 256 * 2**20  # at most this much of stacked adapter weights is kept between steps


class GatherCache:
    """The per-token adapter stacks of the last decode layout (its adapters in token order), kept
    while the next steps decode the same layout. It holds the adapters it stacked, so their ids
    cannot be reused by others while it does; a layout whose weights exceed `budget` bytes is
    gathered at every step instead."""

    def __init__(self, budget: int = STACK_CACHE_BYTES):
        self.budget = budget
        self.reset()

    def reset(self) -> None:
        self.key: tuple[int, ...] | None = None
        self.adapters: list[AdapterWeights] = []
        self.groups: dict = {}  # rank layout -> token groups (see rank_groups)
        self.stacks: dict = {}  # (module, group) -> (Aᵀ stack, Bᵀ stack, scalings)

    def layout(self, adapters: list[AdapterWeights]) -> tuple[dict, dict]:
        """(rank-group cache, stack cache) for this step's decode tokens."""
        key = tuple(map(id, adapters))
        if key != self.key:
            self.reset()
            if sum(a.nbytes for a in adapters) > self.budget:
                return {}, {}  # this step's own, dropped after it
            self.key, self.adapters = key, list(adapters)
        return self.groups, self.stacks


@dataclass
class StepPlan:
    """Which adapter each token of one packed step uses.

    prefill: (adapter, start, end) token runs (a prompt each); decode: (adapter, token) pairs.
    Base-only tokens (adapter None) are simply absent from both. `cache`: the engine's stacks
    kept from earlier steps (None: gathered for this step alone).
    """

    prefill: list[tuple[AdapterWeights, int, int]] = field(default_factory=list)
    decode: list[tuple[AdapterWeights, int]] = field(default_factory=list)
    device: torch.device | str = "cpu"
    cache: GatherCache | None = None

    def __post_init__(self):
        self._segments = segment_order(self.prefill, self.device)
        self._gather = gather_groups(self.decode, self.device, self.cache)

    def apply(self, module: str, x: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
        """out (tokens, out) + the LoRA update of every adapted token at `module`, added in place
        (out is the base layer's fresh output)."""
        if self._segments is not None:
            out = segment_lora(module, x, out, *self._segments)
        if self._gather is not None:
            out = gather_lora(module, x, out, *self._gather)
        return out


def segment_order(runs: list[tuple[AdapterWeights, int, int]], device="cpu"):
    """(token permutation sorting the runs by adapter, [(adapter, start, end)] in sorted order)."""
    if not runs:
        return None
    by_adapter: dict[int, tuple[AdapterWeights, list[torch.Tensor]]] = {}
    for adapter, s, e in runs:
        by_adapter.setdefault(id(adapter), (adapter, []))[1].append(torch.arange(s, e))
    perm, segments, n = [], [], 0
    for adapter, idx in by_adapter.values():
        idx = torch.cat(idx)
        perm.append(idx)
        segments.append((adapter, n, n + len(idx)))
        n += len(idx)
    return torch.cat(perm).to(device), segments


def segment_lora(module: str, x: torch.Tensor, out: torch.Tensor, perm: torch.Tensor, segments) -> torch.Tensor:
    xs = x.index_select(0, perm)
    for adapter, s, e in segments:
        w = adapter.modules.get(module)
        if w is not None:
            A, B, scaling = w
            out.index_add_(0, perm[s:e], F.linear(F.linear(xs[s:e], A), B).mul_(scaling))
    return out


def gather_groups(tokens: list[tuple[AdapterWeights, int]], device="cpu", cache: GatherCache | None = None):
    """(each token's adapter, token positions, rank-group cache, stack cache)."""
    if not tokens:
        return None
    adapters = [a for a, _ in tokens]
    groups, stacks = cache.layout(adapters) if cache is not None else ({}, {})
    return adapters, torch.tensor([t for _, t in tokens], device=device), groups, stacks


def rank_groups(module: str, adapters: list[AdapterWeights], cache: dict, device) -> list[tuple[list[int], torch.Tensor]]:
    """Tokens grouped by the rank of their adapter at `module` (tokens whose adapter lacks it
    are left out): [(token indices, as a tensor too)]. Layers with the same layout share it."""
    ranks = tuple(a.modules[module][0].shape[0] if module in a.modules else 0 for a in adapters)
    groups = cache.get(ranks)
    if groups is None:
        by_rank: dict[int, list[int]] = {}
        for i, r in enumerate(ranks):
            if r:
                by_rank.setdefault(r, []).append(i)
        groups = cache[ranks] = [(idx, torch.tensor(idx, device=device)) for idx in by_rank.values()]
    return groups


def stacked(module: str, adapters: list[AdapterWeights], idx: list[int], dtype: torch.dtype) -> tuple[torch.Tensor, ...]:
    """The tokens' (A, B) at `module` as (Aᵀ (n, in, r), Bᵀ (n, r, out), scalings (n, 1))."""
    weights = [adapters[i].modules[module] for i in idx]
    A = torch.stack([w[0] for w in weights])  # (n, r, in)
    B = torch.stack([w[1] for w in weights])  # (n, out, r)
    return A.transpose(1, 2), B.transpose(1, 2), torch.tensor([w[2] for w in weights], dtype=dtype, device=A.device)[:, None]


def gather_lora(module: str, x: torch.Tensor, out: torch.Tensor, adapters, positions, groups, stacks) -> torch.Tensor:
    """Per rank r present at this module: each token's (A, B) in a stack (kept in `stacks`),
    applied with one batched matmul pair."""
    for g, (idx, index) in enumerate(rank_groups(module, adapters, groups, positions.device)):
        if (module, g) not in stacks:
            stacks[module, g] = stacked(module, adapters, idx, out.dtype)
        At, Bt, s = stacks[module, g]
        pos = positions if len(idx) == len(adapters) else positions.index_select(0, index)
        h = torch.bmm(x.index_select(0, pos).unsqueeze(1), At)  # (n, 1, r)
        out.index_add_(0, pos, torch.bmm(h, Bt).squeeze(1).mul_(s))
    return out


class StepRef:
    """The plan of the step being run, shared by every MultiLoRALinear of one model."""

    plan: StepPlan | None = None


class MultiLoRALinear(nn.Module):
    """A base linear layer (dense or quantized) whose adapters come from the step's plan."""

    def __init__(self, base: nn.Module, name: str, step: StepRef):
        super().__init__()
        self.base, self.name, self.step = base, name, step
        self.in_features, self.out_features = base.in_features, base.out_features

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.base(x)
        plan = self.step.plan
        if plan is None:
            return out
        shape = out.shape
        return plan.apply(self.name, x.reshape(-1, x.shape[-1]), out.reshape(-1, shape[-1])).reshape(shape)

    def linear(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward(x)


def wrap_for_serving(model: nn.Module, targets: list[str]) -> tuple[StepRef, dict[str, MultiLoRALinear]]:
    """Make the target linear layers adaptable per token; returns the shared StepRef and the layers."""
    if any(isinstance(m, (LoRALinear, MultiLoRALinear)) for m in model.modules()):
        raise LorqError("serve a base model without adapters of its own: adapters come from the adapter store")
    names = match_modules(model, targets, (nn.Linear, QuantizedLinear))
    if not names:
        raise LorqError(f"target pattern(s) {targets} match no linear layer of the model")
    step = StepRef()
    layers = {}
    for name in names:
        layers[name] = MultiLoRALinear(model.get_submodule(name), name, step)
        set_module(model, name, layers[name])
    return step, layers
