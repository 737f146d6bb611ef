"""The stages as jobs: each takes one typed config, does its work, returns a summary dict.

The CLI (`lorq.cli`) builds the configs from options and YAML; Python users call these directly.
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from .adapters import LoRAConfig, add_adapters, load_peft, save_peft
from .errors import LorqError
from .eval import generate_text, perplexity
from .io import write_json
from .models.loading import DEFAULT_MODEL, load_model
from .options import opt
from .quant import DECODER_LINEARS, FormatConfig, QuantFormat, QuantizedLinear, quantize_model, save_quantized
from .train.data import DataConfig, eval_blocks, load_blocks
from .train.loop import TrainConfig, train
from .train.plot import plot_loss
from .train.precision import Precision, resolve

MODEL_HELP = f"model: a local HF model directory, a lorq quantized checkpoint, a .gguf file, or {DEFAULT_MODEL} (embedded)"


def no_quant() -> FormatConfig:
    return FormatConfig(format=QuantFormat.NONE)


@dataclass
class QuantizeConfig:
    model: str = opt(DEFAULT_MODEL, MODEL_HELP)
    output: str = opt("runs/quantized", "directory of the quantized checkpoint")
    quant: FormatConfig = field(default_factory=FormatConfig)


@dataclass
class FinetuneConfig:
    model: str = opt(DEFAULT_MODEL, MODEL_HELP)
    output: str = opt("runs/finetune", "run directory: adapter/, metrics.jsonl, loss.png, checkpoints/")
    quant: FormatConfig = field(default_factory=FormatConfig)
    lora: LoRAConfig = field(default_factory=LoRAConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)


@dataclass
class EvalConfig:
    model: str = opt(DEFAULT_MODEL, MODEL_HELP)
    adapter: str | None = opt(None, "PEFT-format adapter directory to apply")
    data_file: str | None = opt(None, "evaluate on this file (all of it) instead of the validation split")
    eval_blocks: int = opt(16, "validation blocks used (0 = all); ignored with --data-file")
    block_size: int = opt(256, "tokens per block")
    batch_size: int = opt(4, "blocks per forward pass")
    precision: Precision = opt(Precision.FP32, "compute precision: fp32, bf16 or auto")
    quant: FormatConfig = field(default_factory=no_quant)


@dataclass
class GenerateConfig:
    model: str = opt(DEFAULT_MODEL, MODEL_HELP)
    adapter: str | None = opt(None, "PEFT-format adapter directory to apply")
    prompt: str = opt("What does the Python 'with' statement do?", "the prompt")
    max_new_tokens: int = opt(64, "tokens to generate")
    temperature: float = opt(0.0, "sampling temperature (0 = greedy)")
    top_p: float = opt(1.0, "nucleus sampling threshold")
    seed: int = opt(0, "sampling seed")
    chat: bool = opt(True, "wrap the prompt in the tokenizer's chat template")
    quant: FormatConfig = field(default_factory=no_quant)


def is_quantized(model) -> bool:
    return any(isinstance(m, QuantizedLinear) for m in model.modules())


def prepare_base(model_name: str, quant: FormatConfig):
    """Load a model and quantize its decoder linears unless it is already quantized."""
    quant.validate()
    model, tok, path = load_model(model_name)
    report = None
    if quant.format is not QuantFormat.NONE and not is_quantized(model):
        report = quantize_model(model, [(DECODER_LINEARS, quant)])
    return model, tok, path, report


def run_quantize(cfg: QuantizeConfig) -> dict:
    if cfg.quant.validate().format is QuantFormat.NONE:
        raise LorqError("lorq quantize needs a format (nf4 or int4)")
    model, tok, path, report = prepare_base(cfg.model, cfg.quant)
    if report is None:
        raise LorqError(f"{path} is already quantized")
    out = save_quantized(model, tok, cfg.output, report, source=str(cfg.model))
    size = sum(f.stat().st_size for f in Path(out).iterdir() if f.is_file())
    summary = {**report.summary(), "output": str(out), "size_on_disk_mb": round(size / 2**20, 2)}
    print(f"quantized {summary['quantized_modules']} layers to {cfg.quant.format.value} (group {cfg.quant.group_size}): "
          f"{summary['bits_per_weight']:.3f} bits/weight, relative error {summary['relative_error']:.4f}, "
          f"{summary['seconds']:.1f} s, {summary['size_on_disk_mb']} MiB on disk -> {out}")
    return summary


def trainable_count(model) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def run_finetune(cfg: FinetuneConfig) -> dict:
    cfg.lora.validate()
    cfg.train.validate()
    cfg.data.validate()
    start = time.perf_counter()
    out = Path(cfg.output)
    if not cfg.train.resume and any(out.glob("checkpoints/step-*")):
        print(f"lorq: note: {out} holds an earlier run; this run starts over and replaces it as it goes", flush=True)
    model, tok, path, report = prepare_base(cfg.model, cfg.quant)
    train_blocks, val_blocks = load_blocks(tok, cfg.data)
    torch.manual_seed(cfg.train.seed)
    wrapped = add_adapters(model, cfg.lora)
    precision = resolve(cfg.train.precision, next(model.parameters()).device)
    val_eval = val_blocks.take(cfg.train.eval_blocks or None)
    print(f"lorq: base {path}{' quantized to ' + cfg.quant.format.value if report else ''}; "
          f"LoRA r={cfg.lora.rank} on {len(wrapped)} layers, {trainable_count(model):,} trainable parameters; "
          f"{len(train_blocks)} training / {len(val_eval)} validation blocks of {cfg.data.block_size} tokens; {precision.value} compute", flush=True)
    before = perplexity(model, val_eval, cfg.train.batch_size, precision, progress=True, desc="eval before")
    print(f"validation perplexity before training: {before['ppl']:.3f}", flush=True)
    final = train(model, train_blocks, val_blocks, cfg.train, out, initial_val=before)
    after = perplexity(model, val_eval, cfg.train.batch_size, precision, progress=True, desc="eval after")
    save_peft(model, out / "adapter", cfg.lora.adapter_name, base_model=str(cfg.model))
    plot_loss(out / "metrics.jsonl", out / "loss.png")
    summary = {
        "base": str(path), "quantization": report.summary() if report else None,
        "trainable_parameters": trainable_count(model), "ppl_before": before["ppl"], "ppl_after": after["ppl"],
        "val_tokens": before["tokens"], "final": final, "seconds": round(time.perf_counter() - start, 1),
        "adapter": str(out / "adapter"), "config": json.loads(json.dumps(asdict(cfg), default=str)),
    }
    write_json(out / "summary.json", summary)
    print(f"validation perplexity: {before['ppl']:.3f} before -> {after['ppl']:.3f} after training "
          f"({summary['seconds']:.0f} s). Adapter (PEFT format): {out / 'adapter'}; metrics: {out / 'metrics.jsonl'}; plot: {out / 'loss.png'}")
    return summary


def load_for_inference(model_name: str, quant: FormatConfig, adapter: str | None):
    model, tok, path, _ = prepare_base(model_name, quant)
    if adapter:
        load_peft(model, adapter)
    return model, tok, path


def run_eval(cfg: EvalConfig) -> dict:
    if cfg.eval_blocks < 0 or cfg.batch_size <= 0:
        raise LorqError("eval-blocks must be >= 0 and batch-size positive")
    model, tok, path = load_for_inference(cfg.model, cfg.quant, cfg.adapter)
    data = DataConfig(block_size=cfg.block_size)
    blocks = eval_blocks(tok, data, cfg.data_file)
    if cfg.data_file is None:
        blocks = blocks.take(cfg.eval_blocks or None)
    precision = resolve(cfg.precision, next(model.parameters()).device)
    result = perplexity(model, blocks, cfg.batch_size, precision, progress=True)
    what = f"{path}" + (f" + adapter {cfg.adapter}" if cfg.adapter else "")
    print(f"perplexity {result['ppl']:.3f} (loss {result['loss']:.4f} over {result['tokens']} tokens) for {what}")
    return result


def run_generate(cfg: GenerateConfig) -> str:
    if cfg.max_new_tokens <= 0 or cfg.temperature < 0 or not 0 < cfg.top_p <= 1:
        raise LorqError("max-new-tokens must be positive, temperature >= 0 and top-p in (0, 1]")
    model, tok, _ = load_for_inference(cfg.model, cfg.quant, cfg.adapter)
    text = generate_text(model, tok, cfg.prompt, cfg.max_new_tokens, cfg.temperature, cfg.top_p, cfg.seed, cfg.chat)
    print(text)
    return text
