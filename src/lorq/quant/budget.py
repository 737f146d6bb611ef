"""Bit budgets: choose each matrix's (bits, group, rank) so the model meets an average bits/weight.

Everything is counted: codes, scales, zeros, double-quantized metadata and the fp16 low-rank
factors (their storage comes from the formats' own `nbytes`).

- ILP (LQ-LoRA, Guo et al., 2024, §3.2): binary x[m, c] picks candidate c for matrix m;
  minimize Σ err[m, c]·x[m, c] subject to Σ_c x[m, c] = 1 and Σ bits[m, c]·x[m, c] <= B·N,
  solved exactly by scipy's HiGHS (`scipy.optimize.milp`), no commercial solver.
  err[m, c] = ‖diag(d_r)(W - Q_c - L_c)diag(d_c)‖² for round-to-nearest Q_c and the best
  rank-r L_c of the (weighted) error — every rank from one SVD: err(r) = ‖E‖² - Σ_{k<=r} σ_k².
  Weights: Fisher (default), activation (d_c = √E[x_j²], the input's second moment) or none.
  Measured on the embedded model at 3.25 bits: Fisher-weighted 29.2 perplexity, unweighted 41.7,
  activation-weighted 397 (it sends 2-bit codes to the early layers, whose errors the residual
  stream carries everywhere): only the loss gradient sees that sensitivity.
- Layer-wise (Dumitru et al., "Layer-Wise Quantization", 2024): a decoder layer's importance is
  1 - cos(its input, its output) on calibration tokens; the most important layers are raised
  to more bits first, as far as the budget allows.
"""

from __future__ import annotations

import re
import time
from dataclasses import dataclass, replace
from enum import Enum

import numpy as np
import torch
import torch.nn as nn
from tqdm.auto import tqdm

from ..errors import LorqError
from ..options import opt
from .base import FORMATS, FormatConfig, QuantFormat
from .linear import DECODER_BLOCKS
from .lowrank import LowRankMethod, factor_nbytes
from .quantize import Rule, plan_modules


class Allocation(str, Enum):
    ILP = "ilp"
    LAYERWISE = "layerwise"


class ErrorWeighting(str, Enum):
    NONE = "none"
    ACTIVATION = "activation"
    FISHER = "fisher"


@dataclass
class BudgetConfig:
    budget_bits: float | None = opt(None, "target average bits/weight of the quantized matrices, everything counted (codes, scales, zeros, low-rank factors); each matrix's bits/group/rank are then chosen to meet it")
    allocation: Allocation = opt(Allocation.ILP, "how the budget is spent: ilp (minimum total error, scipy milp) or layerwise (more bits for the layers that change their input most)")
    budget_choices: list[int] = opt([2, 3, 4], "bit widths the allocation may pick from (the format's supported ones)")
    budget_groups: list[int] = opt([64], "group sizes the allocation may pick from")
    budget_ranks: list[int] = opt([], "ranks the allocation may pick from (default: 0 and --rank when --lowrank is set, else 0)")
    budget_weighting: ErrorWeighting = opt(ErrorWeighting.FISHER, "error the allocation minimizes: fisher (weighted by squared gradients on calibration batches; best measured), activation (columns weighted by the input's second moment) or none (plain Frobenius)")

    def validate(self) -> "BudgetConfig":
        try:
            self.allocation, self.budget_weighting = Allocation(self.allocation), ErrorWeighting(self.budget_weighting)
        except ValueError as e:
            raise LorqError(str(e))
        if self.budget_bits is not None and not 1.0 <= self.budget_bits <= 32.0:
            raise LorqError(f"budget-bits must be between 1 and 32, got {self.budget_bits}")
        if not self.budget_choices or not self.budget_groups or any(r < 0 for r in self.budget_ranks):
            raise LorqError("budget-choices and budget-groups need at least one value; budget-ranks must be >= 0")
        return self


@dataclass(frozen=True)
class Candidate:
    quant: FormatConfig
    rank: int

    def describe(self) -> str:
        return self.quant.describe() + (f" r{self.rank}" if self.rank else "")


def candidates(base: FormatConfig, bcfg: BudgetConfig, ranks: list[int]) -> list[Candidate]:
    """Every valid (bits, group) of the base format times every rank."""
    out, why = [], ""
    for bits in sorted(set(bcfg.budget_choices)):
        for group in sorted(set(bcfg.budget_groups)):
            cfg = replace(base, bits=bits, group_size=group)
            try:
                cfg.validate()
            except LorqError as e:  # a choice the format lacks is skipped; none left is an error
                why = why or f"--budget-choices {bits} with --budget-groups {group}: {e}"
                continue
            out.extend(Candidate(cfg, r) for r in sorted(set(ranks)))
    if not out:
        raise LorqError(f"no valid budget choice ({why}); format {base.format.value} supports bits {FORMATS.get(base.format).supported_bits}")
    fewest = min(c.quant.bits for c in out)
    if bcfg.budget_bits is not None and bcfg.budget_bits < fewest:  # said before any model is loaded or measured
        raise LorqError(f"--budget-bits {bcfg.budget_bits:g} is below the {fewest} bits of the smallest code it may choose "
                        f"(--budget-choices), before any scale or zero point: allow fewer bits or a larger budget")
    return out


def weighted_error_by_rank(e: torch.Tensor, ranks: list[int], weights: tuple | None) -> list[float]:
    """‖D_r (E - L_r) D_c‖² for the best rank-r L_r of the weighted error, for each r."""
    e = e.float()
    if weights is not None:
        e = weights[0].float().unsqueeze(1) * e * weights[1].float()
    total = e.pow(2).sum().item()
    if max(ranks) == 0:
        return [total]
    s2 = torch.linalg.svdvals(e).double().pow(2).cumsum(0)
    return [max(total - (s2[min(r, len(s2)) - 1].item() if r else 0.0), 0.0) for r in ranks]


def matrix_costs(w: torch.Tensor, cands: list[Candidate], weights: tuple | None) -> tuple[list[float], list[int]]:
    """(error, storage bits) of every candidate for one float weight (out, in)."""
    errs, bits = [0.0] * len(cands), [0] * len(cands)
    by_format: dict[str, list[int]] = {}
    for i, c in enumerate(cands):
        by_format.setdefault(str(c.quant.to_json()), []).append(i)
    for idx in by_format.values():
        quant = cands[idx[0]].quant
        qw = FORMATS.get(quant.format).from_float(w, quant)
        e = w.float() - qw.dequantize(torch.float32)
        for i, err in zip(idx, weighted_error_by_rank(e, [cands[i].rank for i in idx], weights)):
            errs[i] = err
            bits[i] = 8 * (qw.nbytes + factor_nbytes(*w.shape, cands[i].rank))
    return errs, bits


def solve_ilp(err: np.ndarray, bits: np.ndarray, budget_total: float) -> np.ndarray:
    """Per-matrix candidate index minimizing Σ err subject to Σ bits <= budget_total (HiGHS MILP)."""
    from scipy.optimize import Bounds, LinearConstraint, milp
    from scipy.sparse import csr_matrix, kron, eye

    m, c = err.shape
    if bits.min(1).sum() > budget_total:
        raise LorqError(f"the budget is below the cheapest plan ({bits.min(1).sum() / budget_total:.2f}× the budget): allow fewer bits or smaller ranks")
    scale = err.sum() / err.size or 1.0  # O(1) objective coefficients for the solver
    one_each = LinearConstraint(kron(eye(m), np.ones((1, c))).tocsr(), 1, 1)
    within = LinearConstraint(csr_matrix(bits.reshape(1, -1).astype(float)), -np.inf, budget_total)
    res = milp(err.reshape(-1) / scale, constraints=[one_each, within], integrality=np.ones(m * c), bounds=Bounds(0, 1),
               options={"time_limit": 120, "mip_rel_gap": 1e-6})
    if res.x is None:
        raise LorqError(f"the bit-budget ILP found no solution ({res.message})")
    return res.x.reshape(m, c).argmax(1)


def solve_layerwise(layer_of: list[int], importance: dict[int, float], bits: np.ndarray, levels: list[int], budget_total: float) -> np.ndarray:
    """Raise whole layers to higher levels (candidate indices in rising cost) by importance."""
    choice = np.full(len(layer_of), levels[0])
    total = lambda ch: bits[np.arange(len(ch)), ch].sum()  # noqa: E731
    if total(choice) > budget_total:
        raise LorqError("the budget is below the cheapest plan: allow fewer bits or smaller ranks")
    order = sorted(importance, key=importance.get, reverse=True)
    for level in levels[1:]:
        for layer in order:
            trial = choice.copy()
            trial[[i for i, l in enumerate(layer_of) if l == layer]] = level
            if total(trial) <= budget_total:
                choice = trial
    return choice


def layer_index(name: str) -> int:
    m = re.search(DECODER_BLOCKS + r"\.(\d+)\.", name)
    return int(m.group(3)) if m else -1


@torch.no_grad()
def calibration_stats(model: nn.Module, names: list[str], calibration: torch.Tensor, progress: bool = True):
    """(per-linear input second moment E[x_j²] (in,), per-decoder-layer importance 1 - cos(in, out))."""
    from .calibration import CALIB_BATCH, decoder_layers

    _, layers = decoder_layers(model)
    sq = {n: None for n in names}
    counts = dict.fromkeys(names, 0)
    cos = {i: [] for i in range(len(layers))}

    def linear_hook(name):
        def hook(mod, args, out):
            x = args[0].detach().reshape(-1, args[0].shape[-1]).float()
            sq[name] = x.pow(2).sum(0) if sq[name] is None else sq[name] + x.pow(2).sum(0)
            counts[name] += x.shape[0]
        return hook

    def layer_hook(i):
        def hook(mod, args, kwargs, out):
            h_in = (args[0] if args else kwargs["hidden_states"]).float()
            h_out = (out[0] if isinstance(out, tuple) else out).float()
            cos[i].append(torch.nn.functional.cosine_similarity(h_in, h_out, dim=-1).mean().item())
        return hook

    hooks = [model.get_submodule(n).register_forward_hook(linear_hook(n)) for n in names]
    hooks += [layer.register_forward_hook(layer_hook(i), with_kwargs=True) for i, layer in enumerate(layers)]
    was_training = model.training
    model.eval()
    try:
        for i in tqdm(range(0, len(calibration), CALIB_BATCH), desc="statistics", unit="batch", disable=not progress):
            model(input_ids=calibration[i:i + CALIB_BATCH].to(next(model.parameters()).device), use_cache=False)
    finally:
        for h in hooks:
            h.remove()
        model.train(was_training)
    moments = {n: sq[n] / max(counts[n], 1) for n in names if sq[n] is not None}
    return moments, {i: 1.0 - float(np.mean(v)) for i, v in cos.items() if v}


@dataclass
class BudgetPlan:
    """The allocation's result: per-module rules (exact names) and what they add up to."""

    rules: list[Rule]
    choices: dict[str, str]
    target_bits: float
    bits_per_weight: float
    allocation: str
    weighting: str
    seconds: float
    solve_seconds: float

    def summary(self) -> dict:
        return {k: v for k, v in self.__dict__.items() if k != "rules"}

    def table(self) -> str:
        """Per-layer table: one row per decoder layer, one column per matrix kind."""
        kinds = sorted({n.rsplit(".", 1)[-1] for n in self.choices})
        rows = {}
        for n, c in self.choices.items():
            rows.setdefault(layer_index(n), {})[n.rsplit(".", 1)[-1]] = c
        lines = ["| layer | " + " | ".join(kinds) + " |", "|---" * (len(kinds) + 1) + "|"]
        lines += [f"| {i} | " + " | ".join(r.get(k, "-") for k in kinds) + " |" for i, r in sorted(rows.items())]
        return "\n".join(lines)


def budget_candidates(model: nn.Module, rules: list[Rule], bcfg: BudgetConfig, rank: int,
                      adapter_rank: int = 0) -> tuple[dict, list[Candidate]]:
    """(the matrices the rules select, the candidates each may take)."""
    bcfg.validate()
    plan = plan_modules(model, rules)
    if not plan:
        raise LorqError("no linear layer matched the quantization rules")
    base = next(iter(plan.values()))[1]
    if any(QuantFormat(r.quant.format) is not QuantFormat(base.quant.format) for _, r in plan.values()):
        raise LorqError("--budget-bits allocates within one format; the rules name several")
    lowrank = any(r.lowrank is not LowRankMethod.NONE for _, r in plan.values())
    if any(bcfg.budget_ranks) and not (lowrank and rank and not adapter_rank):  # they would be [0] whatever was asked
        raise LorqError("--budget-ranks picks ranks of --lowrank factors: it needs --lowrank and --rank (and no trained adapter in their place)")
    ranks = (bcfg.budget_ranks or [0, rank]) if lowrank and rank and not adapter_rank else [0]
    return plan, candidates(base.quant, bcfg, ranks)


def check_reachable(plan: dict, cands: list[Candidate], budget_bits: float) -> None:
    """Refuse a budget that even the cheapest plan exceeds, from the matrices' shapes alone:
    before calibration and the error tables, which would find the same at the solver."""
    shapes = [tuple(layer.weight.shape) for layer, _ in plan.values()]
    fewest = cheapest_plan_bits(shapes, cands) / sum(o * i for o, i in shapes)
    if fewest > budget_bits:
        raise LorqError(f"--budget-bits {budget_bits:g} is below the cheapest plan, {fewest:.4f} bits/weight with scales, zeros and "
                        f"factors counted: allow fewer bits, larger groups or smaller ranks, or a larger budget")


def storage_bits(shape: tuple[int, int], quant: FormatConfig) -> int:
    """Bits an (out, in) matrix takes in a format, codes and metadata as stored. Every format's
    storage follows from the shape alone, so a random matrix of that shape tells it."""
    w = torch.randn(shape, generator=torch.Generator().manual_seed(0))
    return 8 * FORMATS.get(quant.format).from_float(w, quant).nbytes


def cheapest_plan_bits(shapes: list[tuple[int, int]], cands: list[Candidate]) -> int:
    """Σ over the matrices of the fewest bits any candidate (factors included) stores it in."""
    formats = {str(c.quant.to_json()): c.quant for c in cands}
    fewest = {}
    for shape in set(shapes):
        quant_bits = {key: storage_bits(shape, q) for key, q in formats.items()}
        fewest[shape] = min(quant_bits[str(c.quant.to_json())] + 8 * factor_nbytes(*shape, c.rank) for c in cands)
    return sum(fewest[s] for s in shapes)


def allocate(model: nn.Module, rules: list[Rule], bcfg: BudgetConfig, rank: int, calibration: torch.Tensor | None,
             fisher: dict | None = None, progress: bool = True, adapter_rank: int = 0) -> BudgetPlan:
    """Per-matrix rules that spend bcfg.budget_bits on the linears the rules select.

    Each matrix keeps its rule's method and low-rank method; bits, group and rank come from
    the budget. calibration: token ids for activation weighting and layer-wise importance.
    adapter_rank: factors of this rank go to every matrix outside the budget, because they
    become the trainable adapter (LQ-LoRA's fine-tuning setting, like QLoRA's uncounted LoRA).
    """
    start = time.perf_counter()
    plan, cands = budget_candidates(model, rules, bcfg, rank, adapter_rank)
    needs_stats = bcfg.allocation is Allocation.LAYERWISE or bcfg.budget_weighting is ErrorWeighting.ACTIVATION
    if needs_stats and calibration is None:
        raise LorqError(f"{bcfg.allocation.value} allocation with {bcfg.budget_weighting.value} weighting needs calibration data")
    moments, importance = calibration_stats(model, list(plan), calibration, progress) if needs_stats else ({}, {})
    if bcfg.budget_weighting is ErrorWeighting.FISHER and not fisher:
        raise LorqError("fisher weighting needs Fisher weights from calibration data")

    def weights(name: str, w: torch.Tensor):
        if bcfg.budget_weighting is ErrorWeighting.ACTIVATION and name in moments:
            return w.new_ones(w.shape[0]), moments[name].sqrt()
        return fisher.get(name) if bcfg.budget_weighting is ErrorWeighting.FISHER else None

    names = list(plan)
    err, bits = np.zeros((len(names), len(cands))), np.zeros((len(names), len(cands)))
    for i, n in enumerate(tqdm(names, desc="budget: errors", unit="matrix", disable=not progress)):
        w = plan[n][0].weight.data
        err[i], bits[i] = matrix_costs(w, cands, weights(n, w))
    numel = np.array([plan[n][0].weight.numel() for n in names])
    budget_total = bcfg.budget_bits * numel.sum()
    solve_start = time.perf_counter()
    if bcfg.allocation is Allocation.ILP:
        choice = solve_ilp(err, bits, budget_total)
    else:
        levels = sorted(range(len(cands)), key=lambda c: bits[:, c].sum())
        choice = solve_layerwise([layer_index(n) for n in names], importance, bits, levels, budget_total)
    solve_seconds = time.perf_counter() - solve_start
    new_rules = []
    for n, c in zip(names, choice):
        rule, cand = plan[n][1], cands[c]
        r = cand.rank or (adapter_rank if rule.lowrank is not LowRankMethod.NONE else 0)
        new_rules.append(Rule("^" + re.escape(n) + "$", cand.quant, rule.method, rule.lowrank if r else LowRankMethod.NONE, r))
    return BudgetPlan(
        new_rules, {n: cands[c].describe() for n, c in zip(names, choice)}, bcfg.budget_bits,
        float(bits[np.arange(len(names)), choice].sum() / numel.sum()), bcfg.allocation.value,
        bcfg.budget_weighting.value, time.perf_counter() - start, solve_seconds,
    )
