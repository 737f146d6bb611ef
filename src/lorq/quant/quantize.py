"""Model quantization: ordered per-module rules, the algorithms that choose codes, the report.

A rule maps a module-name pattern (regex, searched) to a format config and an algorithm; the
first rule that matches a linear layer decides it. RTN and HQQ need only the weight; GPTQ
needs each layer's input Hessian, so with any GPTQ rule the decoder layers are processed in
order on calibration activations (calibration.py), one layer's activations in memory at once.
"""

from __future__ import annotations

import re
import time
from dataclasses import dataclass, field
from enum import Enum
from pathlib import Path

import torch
import torch.nn as nn
from tqdm.auto import tqdm

from ..errors import LorqError
from ..eval.memory import own_file_backed_tensors
from ..io import check_file
from ..options import NON_NEGATIVE, POSITIVE, check_ranges, opt
from .base import FORMATS, FormatConfig, QuantFormat
from .gptq import GPTQConfig, quantize_gptq
from .hqq import HQQConfig, quantize_hqq
from .linear import DECODER_LINEARS, QuantizedLinear, set_module
from .lowrank import Context, LowRankConfig, LowRankMethod, decompose


class QuantMethod(str, Enum):
    """How codes are chosen."""

    RTN = "rtn"
    HQQ = "hqq"
    GPTQ = "gptq"


@dataclass
class MethodConfig(LowRankConfig, HQQConfig, GPTQConfig):
    method: QuantMethod = opt(QuantMethod.RTN, "algorithm: rtn (round to nearest), hqq (calibration-free zero-point optimization) or gptq (Hessian-aware, needs calibration)")
    calib_samples: int = opt(32, "calibration sequences (gptq, eora, --fisher, budgets) from the training split (or --calib-file)")
    calib_seq_len: int = opt(512, "tokens per calibration sequence")
    calib_file: str | None = opt(None, "calibration text (.txt or .jsonl) for gptq, eora, --fisher and budgets, instead of the embedded training split", aliases=("--calibration",))

    def validate(self) -> "MethodConfig":
        LowRankConfig.validate(self)
        self.method = QuantMethod(self.method)
        check_ranges(self, {"calib_samples": POSITIVE, "calib_seq_len": (lambda v: v > 1, "at least 2"), "hqq_iters": NON_NEGATIVE,
                            "gptq_block": POSITIVE, "hqq_lp_norm": POSITIVE, "hqq_beta": POSITIVE, "hqq_kappa": (lambda v: v >= 1, ">= 1")})
        check_file(self.calib_file, "calibration file")
        if not 0 <= self.gptq_damp < 1:
            raise LorqError(f"gptq-damp must be in [0, 1), got {self.gptq_damp}")
        return self


# Each algorithm: (float weight, format config, method config, Hessian or None) -> QuantizedWeight.
METHODS = {
    QuantMethod.RTN: lambda w, cfg, m, h: FORMATS.get(cfg.format).from_float(w, cfg),
    QuantMethod.HQQ: lambda w, cfg, m, h: quantize_hqq(w, cfg, m),
    QuantMethod.GPTQ: lambda w, cfg, m, h: quantize_gptq(w, h, cfg, m),
}


@dataclass
class Rule:
    """Module-name regex -> how to quantize the matching linear layers."""

    pattern: str
    quant: FormatConfig
    method: QuantMethod = QuantMethod.RTN
    lowrank: LowRankMethod = LowRankMethod.NONE
    rank: int = 0

    def __post_init__(self):
        self.method, self.lowrank = QuantMethod(self.method), LowRankMethod(self.lowrank)
        if isinstance(self.rank, bool) or not isinstance(self.rank, int) or self.rank < 0:
            raise LorqError(f"rank must be a non-negative integer, got {self.rank!r}")
        if self.lowrank is not LowRankMethod.NONE and self.rank == 0:
            raise LorqError(f"low-rank method {self.lowrank.value} needs rank >= 1")

    @property
    def compensated(self) -> bool:
        return self.lowrank is not LowRankMethod.NONE and self.rank > 0

    def to_json(self) -> dict:
        extra = {"lowrank": self.lowrank.value, "rank": self.rank} if self.compensated else {}
        return {"pattern": self.pattern, "method": QuantMethod(self.method).value, **extra, **self.quant.to_json()}

    @classmethod
    def from_json(cls, d: dict, default_quant: FormatConfig | None = None, default_method: QuantMethod = QuantMethod.RTN,
                  default_lowrank: LowRankMethod = LowRankMethod.NONE, default_rank: int = 0) -> "Rule":
        """A rule from a mapping; settings it leaves out come from the defaults."""
        if not isinstance(d, dict) or not isinstance(d.get("pattern"), str):
            raise LorqError(f"a quantization rule needs a 'pattern' string, got {d!r}")
        d = {k.replace("-", "_"): v for k, v in d.items()}
        if "group" in d:
            d["group_size"] = d.pop("group")
        try:
            re.compile(d["pattern"])
        except re.error as e:
            raise LorqError(f"rule pattern {d['pattern']!r} is not a valid regex: {e}")
        method = d.pop("method", default_method)
        try:
            method = QuantMethod(method)
        except ValueError:
            raise LorqError(f"unknown quantization method {method!r} (known: {', '.join(m.value for m in QuantMethod)})")
        lowrank = d.pop("lowrank", default_lowrank)
        try:
            lowrank = LowRankMethod(lowrank)
        except ValueError:
            raise LorqError(f"unknown low-rank method {lowrank!r} (known: {', '.join(m.value for m in LowRankMethod)})")
        rank = d.pop("rank", default_rank if lowrank is not LowRankMethod.NONE else 0)
        base = (default_quant or FormatConfig()).to_json()
        if "format" in d and "bits" not in d and FormatConfig(d["format"]).validate().format.value != base["format"]:
            base["bits"] = None  # another format starts from its own default width
        quant = FormatConfig.from_json({**base, **{k: v for k, v in d.items() if k != "pattern"}})
        return cls(d["pattern"], quant, method, lowrank, rank)


def load_rules(path: str | Path, default_quant: FormatConfig, default_method: QuantMethod,
               default_lowrank: LowRankMethod = LowRankMethod.NONE, default_rank: int = 0) -> list[Rule]:
    """A YAML (or JSON) list of rules: `- {pattern: 'mlp\\.down_proj', format: int, bits: 8}`."""
    import yaml

    p = Path(path)
    check_file(p, "rules file")
    try:
        data = yaml.safe_load(p.read_text())
    except (yaml.YAMLError, UnicodeDecodeError) as e:
        raise LorqError(f"rules file {p} is not valid YAML: {str(e).splitlines()[0]}")
    if not isinstance(data, list) or not data:
        raise LorqError(f"rules file {p} must hold a non-empty list of rules")
    return [Rule.from_json(d, default_quant, default_method, default_lowrank, default_rank) for d in data]


@dataclass
class QuantReport:
    """What quantize_model did: per-module and total storage, error, time."""

    modules: dict[str, dict] = field(default_factory=dict)
    seconds: float = 0.0

    def add(self, name: str, w: torch.Tensor, layer: QuantizedLinear, rule: "Rule") -> None:
        """Record layer (Q, plus L1 L2 if compensated) made from float weight w by rule."""
        w = w.float()
        err = (layer.dequantize(torch.float32) - w).pow(2).sum().item()
        bias = layer.bias.numel() * layer.bias.element_size() if layer.bias is not None else 0
        self.modules[name] = {
            "format": layer.cfg.describe(), "method": rule.method.value, "numel": w.numel(),
            "nbytes": layer.nbytes - bias, "err_sq": err, "norm_sq": w.pow(2).sum().item(),
        }
        if layer.rank:
            self.modules[name].update(lowrank=rule.lowrank.value, rank=layer.rank)

    @property
    def n_weights(self) -> int:
        return sum(m["numel"] for m in self.modules.values())

    @property
    def bits_per_weight(self) -> float:
        """Storage of codes and every piece of metadata, per quantized weight."""
        return 8 * sum(m["nbytes"] for m in self.modules.values()) / max(self.n_weights, 1)

    @property
    def rel_error(self) -> float:
        """Relative Frobenius error ||W - Q||_F / ||W||_F over all quantized matrices together."""
        num = sum(m["err_sq"] for m in self.modules.values())
        den = sum(m["norm_sq"] for m in self.modules.values())
        return (num / den) ** 0.5 if den else 0.0

    def summary(self) -> dict:
        return {
            "quantized_modules": len(self.modules),
            "quantized_weights": self.n_weights,
            "bits_per_weight": round(self.bits_per_weight, 4),
            "relative_error": round(self.rel_error, 6),
            "seconds": round(self.seconds, 2),
            "formats": sorted({describe_module(m) for m in self.modules.values()}),
        }


def describe_module(m: dict) -> str:
    """'gptq nf3 g64 + lq-lora r16' from a report entry."""
    return f"{m['method']} {m['format']}" + (f" + {m['lowrank']} r{m['rank']}" if m.get("rank") else "")


def plan_modules(model: nn.Module, rules: list[Rule]) -> dict[str, tuple[nn.Linear, Rule]]:
    """Linear layer name -> (layer, first matching rule), in model order; format none is skipped."""
    plan = {}
    for name, mod in model.named_modules():
        if isinstance(mod, nn.Linear):
            rule = next((r for r in rules if re.search(r.pattern, name)), None)
            if rule is not None and QuantFormat(rule.quant.format) is not QuantFormat.NONE:
                plan[name] = (mod, rule)
    return plan


def quantize_weight(w: torch.Tensor, bias: torch.Tensor | None, rule: Rule, mcfg: MethodConfig,
                    hessian=None, fisher: tuple | None = None, codes=None) -> QuantizedLinear:
    """A float weight (out, in) as a QuantizedLinear by `rule`: Q, or Q + L1 L2 (LoftQ's
    alternation started from the QuantizedWeight `codes` when given)."""

    def quantize(target: torch.Tensor):
        return METHODS[rule.method](target, rule.quant, mcfg, hessian)

    if rule.compensated:
        ctx = Context(mcfg.lowrank_iters, *(fisher or (None, None)), hessian, codes)
        qw, l1, l2 = decompose(rule.lowrank, w, rule.rank, quantize, ctx)
        return QuantizedLinear.from_weight(qw, bias, (l1, l2))
    return QuantizedLinear.from_weight(quantize(w), bias)


def quantize_linear(model, name: str, linear: nn.Linear, rule: Rule, mcfg: MethodConfig, report: QuantReport,
                    hessian=None, fisher: tuple | None = None) -> None:
    """Quantize one layer by its rule and put the QuantizedLinear in its place."""
    layer = quantize_weight(linear.weight.data, linear.bias, rule, mcfg, hessian, fisher)
    report.add(name, linear.weight.data, layer, rule)
    set_module(model, name, layer)


def needs_calibration(rule: Rule) -> bool:
    """GPTQ needs each layer's Hessian; EoRA its input covariance (the same matrix)."""
    return rule.method is QuantMethod.GPTQ or (rule.compensated and rule.lowrank is LowRankMethod.EORA)


def quantize_model(model: nn.Module, rules: list[Rule | tuple[str, FormatConfig]], mcfg: MethodConfig | None = None,
                   calibration: torch.Tensor | None = None, progress: bool = True, fisher: dict | None = None) -> QuantReport:
    """Replace every nn.Linear matched by a rule (first match wins) with a QuantizedLinear.

    rules: Rule objects, or (pattern, FormatConfig) pairs meaning round-to-nearest.
    calibration: (n, seq) token ids, needed when any rule uses GPTQ or EoRA, or with mcfg.fisher.
    fisher: precomputed Fisher row/column weights (name -> (d_r, d_c)); computed here when
    mcfg.fisher asks for them and none are given.
    """
    from .calibration import quantize_sequential

    from .fisher import fisher_weights

    mcfg = (mcfg or MethodConfig()).validate()
    rules = [Rule(r.pattern, r.quant.validate(), r.method, r.lowrank, r.rank) if isinstance(r, Rule) else Rule(r[0], r[1].validate()) for r in rules]
    report, start = QuantReport(), time.perf_counter()
    plan = plan_modules(model, rules)
    if fisher is None and mcfg.fisher and any(rule.compensated for _, rule in plan.values()):
        if calibration is None:
            raise LorqError("--fisher needs calibration data")
        fisher = fisher_weights(model, [n for n, (_, rule) in plan.items() if rule.compensated], calibration, progress)
    fisher = fisher or {}
    if any(needs_calibration(rule) for _, rule in plan.values()):
        if calibration is None:
            raise LorqError("gptq and eora need calibration data")
        outside = [n for n, (_, rule) in plan.items() if needs_calibration(rule) and not re.search(DECODER_LINEARS, n)]
        if outside:
            raise LorqError(f"gptq and eora apply to linear layers inside decoder blocks; {outside[0]} is not one (give it an rtn or hqq rule without eora)")
        quantize_sequential(model, plan, mcfg, calibration, report, progress, fisher)
    else:
        for name, (mod, rule) in tqdm(plan.items(), desc="quantize", unit="layer", disable=not progress):
            quantize_linear(model, name, mod, rule, mcfg, report, fisher=fisher.get(name))
    own_file_backed_tensors(model)  # lets the loaded file's mapping, and the float weights read from it, go
    report.seconds = time.perf_counter() - start
    return report
