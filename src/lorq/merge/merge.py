"""Fold LoRA adapters into their base, streaming one tensor (one layer) at a time.

Dense base: W' = W + ΔW, written as an HF checkpoint (safetensors shards + config + tokenizer).

Quantized base (a lorq checkpoint, or a dense one quantized on the fly with --format): the
merged weight W' = Q + L + ΔW no longer lies on the quantization grid. The usual merge,
Q' = quant(W') (`naive`), rounds away nearly all of a fine-tuned ΔW, whose entries are far
smaller than a quantization step. lorq re-quantizes and puts what re-quantizing lost into a
low-rank part with the low-rank machinery, at the rank of base + adapter by default (the merged
file is the size of base + adapter, and no adapter is needed to run it):
- `loftq` (default): LoftQ's alternation L' = SVD_r(W' - Q'), Q' = quant(W' - L'), started
  from the base's own codes (Q' = Q) instead of L' = 0, the best iterate kept. At the rank of
  base + adapter the start is already exact (L' = L + ΔW; re-quantizing is not quite idempotent,
  e.g. NF4's double-quantized scales move), and at a smaller rank the alternation trades code
  changes against the truncated update.
- `lorc`: Q' = quant(W'), L' = SVD_r(W' - Q'); the codes that ΔW pushed over a rounding
  threshold leave sparse errors that a low-rank part cannot hold.
- `qpissa`, `lq-lora`: the other decompositions of the low-rank issue, for comparison.
- `fold`: keep the codes, store ΔW as factors: exact, but always at the full rank.
"""

from __future__ import annotations

import shutil
import time
from dataclasses import dataclass, field
from enum import Enum
from pathlib import Path

import torch
import torch.nn as nn
from tqdm.auto import tqdm

from ..errors import LorqError
from ..eval.memory import release_freed_memory
from ..io import TensorSpec
from ..models.loading import DEFAULT_MODEL, MODEL_HELP, QUANT_CONFIG, TOKENIZER_FILES, check_causal_lm, load_tokenizer, resolve_model
from ..options import NON_NEGATIVE, POSITIVE, check_ranges, opt
from ..quant import DECODER_LINEARS, FormatConfig, MethodConfig, QuantFormat, QuantizedLinear, QuantMethod, QuantReport, Rule
from ..quant.base import no_quant
from ..quant.checkpoint import layer_from_tensors, module_spec, read_meta
from ..quant.lowrank import FACTOR_DTYPE, LowRankMethod
from ..quant.quantize import plan_modules, quantize_weight
from .delta import AdapterUpdate
from .shards import CheckpointReader, write_safetensors, write_sharded


class Requant(str, Enum):
    """How a quantized base takes W' = Q + L + ΔW."""

    NAIVE = "naive"  # Q' = quant(W'): dequantize, add, re-quantize
    LORC = "lorc"  # Q' = quant(W'), L' = SVD_r(W' - Q')
    LOFTQ = "loftq"  # alternate Q' = quant(W' - L'), L' = SVD_r(W' - Q')
    QPISSA = "qpissa"  # L' = SVD_r(W'), Q' = quant(W' - L')
    LQ_LORA = "lq-lora"
    FOLD = "fold"  # Q' = Q, L' = [L | ΔW]: exact, the codes stay as they are


DECOMPOSITION = {Requant.LORC: LowRankMethod.LORC, Requant.LOFTQ: LowRankMethod.LOFTQ,
                 Requant.QPISSA: LowRankMethod.QPISSA, Requant.LQ_LORA: LowRankMethod.LQ_LORA}


class OutDtype(str, Enum):
    AUTO = "auto"  # each tensor keeps its stored dtype; dequantized weights are fp32
    FP32 = "fp32"
    FP16 = "fp16"
    BF16 = "bf16"


TORCH_DTYPE = {OutDtype.FP32: torch.float32, OutDtype.FP16: torch.float16, OutDtype.BF16: torch.bfloat16}


@dataclass
class MergeConfig:
    model: str = opt(DEFAULT_MODEL, MODEL_HELP)
    adapter: list[str] = opt([], "PEFT adapter directories to fold in: one, or several for a weighted combination")
    weights: list[float] = opt([], "weight of each adapter's update (default: 1 each)")
    output: str = opt("runs/merged", "output directory (HF checkpoint for a dense base, lorq quantized checkpoint for a quantized one)")
    quant: FormatConfig = field(default_factory=no_quant)
    requant: Requant = opt(Requant.LOFTQ, "quantized base: naive (dequantize-add-requantize), loftq/lorc/qpissa/lq-lora (re-quantize, compensate the residual at --merge-rank), or fold (keep the codes, ΔW becomes frozen factors; exact)")
    requant_method: QuantMethod = opt(QuantMethod.RTN, "algorithm that re-chooses the codes: rtn or hqq (a GPTQ base is re-rounded to nearest: its codes lie on the grid)")
    merge_rank: int = opt(0, "rank of each merged quantized matrix's low-rank part (0 = base rank + adapter rank: the size of base + adapter)")
    merge_iters: int = opt(2, "loftq: alternations of re-quantization and SVD; lq-lora: the most")
    dequantize: bool = opt(False, "write a dense HF checkpoint even from a quantized base (Q + L + ΔW in float)")
    dtype: OutDtype = opt(OutDtype.AUTO, "dense output: auto (as stored; dequantized weights fp32), fp32, fp16 or bf16")
    max_shard_mb: int = opt(1024, "dense output: largest safetensors shard in MiB")
    eval_blocks: int = opt(16, "validation blocks of 256 tokens for the report's perplexities (0 = skip)")
    compare_naive: bool = opt(True, "quantized merge: also measure the naive merge in the same run")

    def validate(self) -> "MergeConfig":
        self.requant, self.dtype = Requant(self.requant), OutDtype(self.dtype)
        self.requant_method = QuantMethod(self.requant_method)
        self.quant.validate()
        if self.requant_method is QuantMethod.GPTQ:
            raise LorqError("--requant-method gptq needs calibration data; merge re-quantizes with rtn or hqq")
        check_ranges(self, {"merge_rank": NON_NEGATIVE, "max_shard_mb": POSITIVE, "eval_blocks": NON_NEGATIVE, "merge_iters": POSITIVE})
        if self.merge_rank and self.requant in (Requant.NAIVE, Requant.FOLD):
            raise LorqError(f"--merge-rank does not apply to --requant {self.requant.value}")
        return self

    @property
    def method_config(self) -> MethodConfig:
        return MethodConfig(method=self.requant_method, lowrank_iters=self.merge_iters)


def requantize(layer: QuantizedLinear, B: torch.Tensor, A: torch.Tensor, requant: Requant, rank: int,
               mcfg: MethodConfig) -> tuple[QuantizedLinear, torch.Tensor, Rule]:
    """(the merged layer, the exact merged weight W' = Q + L + B A, the rule that made it)."""
    target = layer.dequantize(torch.float32) + B @ A  # (out, in)
    if requant is Requant.FOLD:
        l1, l2 = B, A
        if layer.rank:
            l1, l2 = torch.cat([layer.lowrank_b.float(), l1], dim=1), torch.cat([layer.lowrank_a.float(), l2], dim=0)
        tensors = {n: getattr(layer, n) for n in layer._names}
        merged = QuantizedLinear(layer.in_features, layer.out_features, layer.cfg, tensors, layer.bias, (l1.to(FACTOR_DTYPE), l2.to(FACTOR_DTYPE)))
        return merged, target, Rule(".", layer.cfg, QuantMethod.RTN, LowRankMethod.LORC, merged.rank)
    lowrank = DECOMPOSITION.get(requant, LowRankMethod.NONE)
    rule = Rule(".", layer.cfg, mcfg.method, lowrank, rank if lowrank is not LowRankMethod.NONE else 0)
    codes = layer.qweight() if requant is Requant.LOFTQ else None  # LoftQ starts from the base's codes
    return quantize_weight(target, layer.bias, rule, mcfg, codes=codes), target, rule


@dataclass
class Source:
    """The base as a merge streams it: its tensors, its config and a skeleton of its modules
    (meta device), and which linear layers are quantized and how."""

    path: Path
    reader: CheckpointReader
    config: object
    skeleton: nn.Module
    specs: dict[str, dict]  # quantized module -> spec (format config, method, rank)
    meta: dict | None  # lorq_quant.json of a quantized checkpoint
    on_the_fly: Rule | None  # a dense base quantized during the merge by this rule

    @property
    def quantized(self) -> bool:
        return bool(self.specs)

    def shape(self, name: str) -> tuple[int, int]:
        m = self.skeleton.get_submodule(name)
        return m.out_features, m.in_features

    def layer(self, name: str) -> QuantizedLinear:
        """Quantized module `name` as stored (or as quantized now, for a dense base)."""
        if self.on_the_fly is not None:
            bias = self.reader.get(f"{name}.bias") if f"{name}.bias" in self.reader else None
            return quantize_weight(self.reader.get(f"{name}.weight").float(), bias, self.on_the_fly, MethodConfig())
        return layer_from_tensors(self.path, name, self.specs[name], self.reader.prefixed(name + "."), self.shape(name))

    def owner(self, tensor: str) -> str | None:
        """The quantized module a stored tensor belongs to."""
        module = tensor.rsplit(".", 1)[0]
        return module if module in self.specs else None


def check_stored(path: Path, reader, config, skeleton: nn.Module, quantized: set[str]) -> None:
    """Every tensor the config's model has is stored, with its shape (a merge or export streams
    tensors without loading the model, so nothing else would notice before the output is written).
    quantized: modules stored in a lorq format, checked when they are read."""
    tied = getattr(config, "tie_word_embeddings", False)
    for name, t in skeleton.state_dict().items():
        if name.rsplit(".", 1)[0] in quantized or (tied and name == "lm_head.weight" and name not in reader):
            continue
        if name not in reader:
            raise LorqError(f"{path}: {name} is not stored, though its config.json's model has it")
        if tuple(reader.spec(name).shape) != tuple(t.shape):
            raise LorqError(f"{path}: {name} is stored as {tuple(reader.spec(name).shape)}, its config.json says {tuple(t.shape)}")


def open_source(model: str, quant: FormatConfig) -> Source:
    from transformers import AutoModelForCausalLM

    path = resolve_model(model)
    config = check_causal_lm(path)
    with torch.device("meta"):
        skeleton = AutoModelForCausalLM.from_config(config)
    reader = CheckpointReader(path)
    if (path / QUANT_CONFIG).is_file():
        if QuantFormat(quant.format) is not QuantFormat.NONE:
            raise LorqError(f"{path} is already quantized; leave out --format")
        meta = read_meta(path)
        linears = {n for n, m in skeleton.named_modules() if isinstance(m, nn.Linear)}
        unknown = [n for n in meta.get("modules", {}) if n not in linears]
        if unknown:
            raise LorqError(f"quantized module {unknown[0]} does not exist in the {config.model_type} model of {path}")
        check_stored(path, reader, config, skeleton, set(meta.get("modules", {})))
        return Source(path, reader, config, skeleton, dict(meta.get("modules", {})), meta, None)
    check_stored(path, reader, config, skeleton, set())
    if QuantFormat(quant.format) is QuantFormat.NONE:
        return Source(path, reader, config, skeleton, {}, None, None)
    rule = Rule(DECODER_LINEARS, quant, QuantMethod.RTN)
    plan = plan_modules(skeleton, [rule])
    specs = {n: {"in_features": m.in_features, "out_features": m.out_features, "method": "rtn", **quant.to_json()} for n, (m, _) in plan.items()}
    return Source(path, reader, config, skeleton, specs, None, rule)


def check_targets(src: Source, update: AdapterUpdate) -> None:
    update.check_fits(src.skeleton)
    for module in update.modules():
        if module not in src.specs and f"{module}.weight" not in src.reader:
            raise LorqError(f"{module}.weight is not stored in {src.path} (tied to the embedding?); merging into it is not supported")


def dense_specs(src: Source, dtype: OutDtype) -> list[TensorSpec]:
    """What a dense output stores: every tensor as it is, a quantized module as weight (+ bias)."""
    specs, seen = [], set()
    for name in src.reader.names():
        module = src.owner(name)
        if module is None:
            s = src.reader.spec(name)
            cast = TORCH_DTYPE.get(dtype) if s.dtype.is_floating_point else None
            specs.append(TensorSpec(name, cast or s.dtype, s.shape))
        elif module not in seen:
            seen.add(module)
            specs.append(TensorSpec(f"{module}.weight", TORCH_DTYPE.get(dtype, torch.float32), src.shape(module)))
            if f"{module}.bias" in src.reader:
                specs.append(TensorSpec(f"{module}.bias", TORCH_DTYPE.get(dtype, torch.float32), (src.shape(module)[0],)))
    return specs


def finite(t: torch.Tensor, name: str) -> torch.Tensor:
    """t, unless the merge made it NaN or infinite (an adapter's NaN, or a weight that overflows
    the output type): then an error, before anything takes the output's place."""
    if t.is_floating_point() and not torch.isfinite(t).all():
        raise LorqError(f"merging gives non-finite values in {name} (NaN in an adapter, or too large a --weights for the type); nothing was written")
    return t


def dense_tensor(src: Source, update: AdapterUpdate, name: str) -> torch.Tensor:
    """Tensor `name` of the merged dense model, in fp32 where it is a merged or dequantized weight."""
    module, leaf = name.rsplit(".", 1)
    if leaf != "weight":  # a bias is stored under its own name, quantized module or not
        return src.reader.get(name)
    t = src.layer(module).dequantize(torch.float32) if module in src.specs else src.reader.get(name)
    delta = update.delta(module)
    return finite(t.float() + delta, name) if delta is not None else t


def merge_dense(src: Source, update: AdapterUpdate, out: Path, dtype: OutDtype, max_bytes: int, progress: bool = True) -> list[str]:
    specs = dense_specs(src, dtype)
    bar = tqdm(total=len(specs), desc="merge", unit="tensor", disable=not progress)

    def produce(s: TensorSpec) -> torch.Tensor:
        bar.update()
        release_freed_memory()  # the previous tensor is written and dropped by now
        return finite(dense_tensor(src, update, s.name).to(s.dtype), s.name)

    try:
        return write_sharded(out, specs, produce, max_bytes)
    finally:
        bar.close()


def merge_quantized(src: Source, update: AdapterUpdate, out: Path, cfg: MergeConfig, progress: bool = True) -> tuple[dict, QuantReport, float]:
    """Write model.safetensors of the merged quantized model, holding the quantized layers and one
    layer's float weights (the other tensors stream from the base as they are written).
    Returns (module specs, report of the merged modules: storage and error against the exact
    W + ΔW, bits per weight of every quantized module)."""
    tensors, specs, report = {}, {}, QuantReport()
    nbytes = numel = 0
    start = time.perf_counter()
    names = src.reader.names()
    for module in tqdm(list(src.specs), desc="merge", unit="layer", disable=not progress):
        layer = src.layer(module)
        if module in update.factors:
            B, A = update.stacked(module)
            if cfg.merge_rank > min(layer.in_features, layer.out_features):
                raise LorqError(f"--merge-rank {cfg.merge_rank} exceeds {module}'s smaller dimension ({min(layer.in_features, layer.out_features)})")
            rank = cfg.merge_rank or layer.rank + B.shape[1]
            layer, target, rule = requantize(layer, B, A, cfg.requant, rank, cfg.method_config)
            finite(target, f"{module}.weight")
            report.add(module, target, layer, rule)
            method = src.specs[module].get("method", "rtn") if cfg.requant is Requant.FOLD else rule.method.value  # fold keeps the codes
            report.modules[module].update({"method": method, **({"lowrank": cfg.requant.value} if layer.rank else {})})
            specs[module] = module_spec(module, layer, report)
        else:
            specs[module] = src.specs[module]
        tensors.update({f"{module}.{k}": v.detach() for k, v in layer.state_dict().items()})
        bias = layer.bias.numel() * layer.bias.element_size() if layer.bias is not None else 0
        nbytes, numel = nbytes + layer.nbytes - bias, numel + layer.in_features * layer.out_features
        del layer
        release_freed_memory()
    report.seconds = time.perf_counter() - start
    order = [TensorSpec(n, t.dtype, tuple(t.shape)) for n, t in tensors.items()]
    # everything else (embeddings, norms, dense linears; merged where adapted) is read when written
    order += [src.reader.spec(n) for n in names if src.owner(n) is None and n not in tensors]

    def produce(s: TensorSpec) -> torch.Tensor:
        if s.name in tensors:
            return tensors.pop(s.name)
        release_freed_memory()
        return dense_tensor(src, update, s.name).to(s.dtype)

    write_safetensors(out / "model.safetensors", order, produce)
    return specs, report, 8 * nbytes / max(numel, 1)


SIDE_FILES = (*TOKENIZER_FILES, "generation_config.json")


def write_side_files(src: Source, tmp: Path, dtype: OutDtype, dense: bool) -> None:
    """config.json (its dtype updated for a cast dense output), and the base's tokenizer and
    generation config files copied as they are."""
    config = src.config
    if dense and dtype is not OutDtype.AUTO:
        config.dtype = TORCH_DTYPE[dtype]
    config.save_pretrained(tmp)
    copied = {f for pattern in SIDE_FILES for f in src.path.glob(pattern) if f.is_file()}
    if not any(f.name.startswith("tokenizer") for f in copied):  # e.g. a tokenizer only transformers can rebuild
        load_tokenizer(src.path).save_pretrained(tmp)
    for f in copied:
        shutil.copyfile(f, tmp / f.name)


def rules_of(src: Source) -> list:
    """The quantization rules the merged checkpoint records: the base's, or the on-the-fly one."""
    if src.meta is not None:
        return list(src.meta.get("rules", []))
    return [src.on_the_fly] if src.on_the_fly is not None else []
