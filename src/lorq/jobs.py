"""The stages as jobs: each takes one typed config, does its work, returns a summary dict.

The CLI (`lorq.cli`) builds the configs from options and YAML; Python users call these directly.
"""

from __future__ import annotations

import json
import re
import shutil
import time
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

import torch

from .adapters import LoRAConfig, add_adapters, load_peft, save_peft
from .errors import LorqError
from .eval import generate_text, perplexity
from .eval.generate import check_new_tokens
from .io import atomic_dir, check_output_dir, usual_mode, write_json
from .merge import ExportConfig, MergeConfig, export_gguf, run_merge  # noqa: F401  (the merge and export commands)
from .merge.run import REPORT as MERGE_REPORT
from .models.loading import DEFAULT_MODEL, DEVICE_HELP, HF_MODEL_FILES, MODEL_HELP, QUANT_CONFIG, Device, load_model, model_context, model_label, resolve_device
from .options import NON_NEGATIVE, POSITIVE, check_ranges, opt
from .adapters.init import RESIDUAL_INITS, InitConfig, LoRAInit, LowRankUse, apply_starts, compute_starts, init_from_factors, pop_compensation
from .adapters.lora import lora_layers
from .adapters.native_format import NATIVE_VARIANTS
from .adapters.qat import QAT_VARIANTS, fold_quantized
from .adapters.variants import Variant
from .optim import OptimConfig, OptimizerKind
from .optim.lisa import check_active_layers
from .optim.qgalore import dequantize_weights
from .quant import (
    DECODER_LINEARS, FormatConfig, MethodConfig, QuantFormat, QuantizedLinear, QuantReport, Rule, cast_unquantized,
    load_rules, quantize_model, save_quantized,
)
from .quant.base import no_quant
from .serve.engine import check_max_model_len
from .serve.server import Server, ServeConfig, build_server, check_address, serve
from .quant.budget import Allocation, BudgetConfig, BudgetPlan, ErrorWeighting, allocate, budget_candidates, candidates, check_reachable
from .quant.fisher import fisher_weights
from .quant.lowrank import LowRankMethod
from .quant.quantize import needs_calibration, plan_modules
from .train.data import DataConfig, check_records, eval_blocks, load_blocks, pack, read_records, tokenize_records
from .train.distributed import check_divisible, finish, gathered, init_world, is_sharded
from .train.checkpoint import check_readable, check_same_options, latest_checkpoint
from .train.loop import NextTokenLoss, TrainConfig, check_fsdp, train
from .train.plot import plot_loss
from .train.precision import INFERENCE_PRECISION_HELP, Precision, resolve, weights_dtype

@dataclass
class QuantizeConfig:
    model: str = opt(DEFAULT_MODEL, MODEL_HELP)
    output: str = opt("runs/quantized", "directory of the quantized checkpoint")
    quant: FormatConfig = field(default_factory=FormatConfig)
    method: MethodConfig = field(default_factory=MethodConfig)
    rank: int = opt(16, "rank r of the low-rank part with --lowrank")
    budget: BudgetConfig = field(default_factory=BudgetConfig)
    rules: str | None = opt(None, "YAML list of per-module rules ({pattern, format, bits, group_size, method, lowrank, rank, ...}), first match wins; unmatched decoder linears use the options above")
    eval_blocks: int = opt(16, "validation blocks of 256 tokens for the report's perplexity (0 = skip)")


@dataclass
class FinetuneConfig:
    model: str = opt(DEFAULT_MODEL, MODEL_HELP)
    output: str = opt("runs/finetune", "run directory: adapter/, metrics.jsonl, loss.png, checkpoints/")
    device: Device = opt(Device.AUTO, DEVICE_HELP)
    quant: FormatConfig = field(default_factory=FormatConfig)
    method: MethodConfig = field(default_factory=MethodConfig)
    budget: BudgetConfig = field(default_factory=BudgetConfig)
    lowrank_as: LowRankUse = opt(LowRankUse.INIT, "with --lowrank: the factors (rank = --rank) initialize the trainable LoRA (init) or stay a frozen branch under a fresh LoRA (compensate)")
    lora: LoRAConfig = field(default_factory=LoRAConfig)
    start: InitConfig = field(default_factory=InitConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)


@dataclass
class EvalConfig:
    model: str = opt(DEFAULT_MODEL, MODEL_HELP)
    adapter: str | None = opt(None, "PEFT-format adapter directory to apply")
    data_file: str | None = opt(None, "evaluate on this file instead of the validation split: all of it, the last block padded (every token but each block's first is scored)")
    eval_blocks: int = opt(16, "validation blocks used (0 = all); ignored with --data-file")
    block_size: int = opt(256, "tokens per block")
    batch_size: int = opt(4, "blocks per forward pass")
    precision: Precision = opt(Precision.FP32, "compute precision: fp32, bf16 or auto")
    device: Device = opt(Device.AUTO, DEVICE_HELP)
    quant: FormatConfig = field(default_factory=no_quant)


@dataclass
class GenerateConfig:
    model: str = opt(DEFAULT_MODEL, MODEL_HELP)
    adapter: str | None = opt(None, "PEFT-format adapter directory to apply")
    prompt: str = opt("What does the Python 'with' statement do?", "the prompt")
    max_new_tokens: int = opt(64, "tokens to generate")
    temperature: float = opt(0.0, "sampling temperature (0 = greedy)")
    top_p: float = opt(1.0, "nucleus sampling threshold")
    top_k: int = opt(0, "sample among the k most likely tokens only (0 = all)")
    repetition_penalty: float = opt(1.0, "divide a positive logit (multiply a negative one) of every token already in prompt or output by this, also when greedy (1 = off)")
    seed: int = opt(0, "sampling seed")
    chat: bool = opt(True, "wrap the prompt in the tokenizer's chat template")
    device: Device = opt(Device.AUTO, DEVICE_HELP)
    precision: Precision = opt(Precision.AUTO, INFERENCE_PRECISION_HELP)
    quant: FormatConfig = field(default_factory=no_quant)


def is_quantized(model) -> bool:
    return any(isinstance(m, QuantizedLinear) for m in model.modules())


def quant_rules(quant: FormatConfig, mcfg: MethodConfig, rules_file: str | None = None, rank: int = 0) -> list[Rule]:
    """The rules file's rules, then the default rule: every decoder linear with the options given."""
    quant.validate()
    mcfg.validate()
    if mcfg.lowrank is not LowRankMethod.NONE and rank <= 0:
        raise LorqError(f"--lowrank {mcfg.lowrank.value} needs --rank >= 1")
    rank = rank if mcfg.lowrank is not LowRankMethod.NONE else 0
    rules = load_rules(rules_file, quant, mcfg.method, mcfg.lowrank, rank) if rules_file else []
    return rules + [Rule(DECODER_LINEARS, quant, mcfg.method, mcfg.lowrank, rank)]


def check_block_size(config, block_size: int) -> None:
    """Blocks longer than the model's positions would be run past what it was trained on."""
    context = model_context(config)
    if context and block_size > context:
        raise LorqError(f"--block-size {block_size} exceeds the model's context of {context} tokens")


def check_rules_match(model, rules: list[Rule], where: str) -> None:
    """A rule whose pattern names no linear layer is a typo, not a no-op."""
    names = [n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)]
    for rule in rules:
        if not any(re.search(rule.pattern, n) for n in names):
            raise LorqError(f"rule pattern {rule.pattern!r} in {where} matches no linear layer of the model")


def calibration_ids(tok, mcfg: MethodConfig, context: int | None = None) -> torch.Tensor:
    """calib_samples token sequences spread evenly over the calibration data: all of
    --calib-file, or the embedded training split (never the validation split); sequences are
    at most the model's context long (past it, positions the model never saw, or an index error)."""
    seq_len = min(mcfg.calib_seq_len, context or mcfg.calib_seq_len)
    if seq_len < mcfg.calib_seq_len:
        print(f"lorq: note: --calib-seq-len {mcfg.calib_seq_len} exceeds the model's context; calibrating on {seq_len}-token sequences", flush=True)
    if mcfg.calib_file:
        blocks = pack(*tokenize_records(tok, read_records(mcfg.calib_file)), seq_len, mcfg.calib_file)
    else:
        blocks, _ = load_blocks(tok, DataConfig(block_size=seq_len))
    n = min(mcfg.calib_samples, len(blocks))
    return blocks.input_ids[torch.linspace(0, len(blocks) - 1, n).long()]


@dataclass
class Base:
    """A loaded base model and what was done to it."""

    model: torch.nn.Module
    tok: object
    path: Path
    report: QuantReport | None = None  # None: loaded as it was (dense, or already quantized)
    rules: list[Rule] = field(default_factory=list)
    budget: BudgetPlan | None = None


def prepare_base(model_name: str, quant: FormatConfig, mcfg: MethodConfig | None = None, rules_file: str | None = None,
                 rank: int = 0, budget: BudgetConfig | None = None, adapter_rank: int = 0, before_quantize=None,
                 check_config=None) -> Base:
    """Load a model and quantize its linears by the rules (and the bit budget, if any) unless it
    is already quantized. adapter_rank: low-rank factors that will become the trainable
    adapter, so the budget does not count them (see budget.allocate). before_quantize(model,
    tok): runs on the loaded model first (adapter inits that change the dense weights).
    check_config(config): see load_model."""
    mcfg, budget = mcfg or MethodConfig(), (budget or BudgetConfig()).validate()
    check_records(mcfg.calib_file)
    rules = quant_rules(quant, mcfg, rules_file, rank)
    if budget.budget_bits is not None and quant.validate().format is not QuantFormat.NONE:
        candidates(quant, budget, [0])  # impossible choices are refused before the model is loaded
    if budget.budget_bits is not None and all(QuantFormat(r.quant.format) is QuantFormat.NONE for r in rules):
        raise LorqError("--budget-bits needs a quantization format")
    model, tok, path = load_model(model_name, check_config=check_config)
    if rules_file and not is_quantized(model):
        check_rules_match(model, rules[:-1], rules_file)
    if before_quantize is not None:
        before_quantize(model, tok)
    if is_quantized(model) or all(QuantFormat(r.quant.format) is QuantFormat.NONE for r in rules):
        if budget.budget_bits is not None and not is_quantized(model):
            raise LorqError("--budget-bits needs a quantization format")
        return Base(model, tok, path, None, rules)
    use_budget = budget.budget_bits is not None
    fisher_for_budget = use_budget and budget.budget_weighting is ErrorWeighting.FISHER
    stats = use_budget and (budget.allocation is Allocation.LAYERWISE or budget.budget_weighting is ErrorWeighting.ACTIVATION)
    targets = plan_modules(model, rules)
    for name, (layer, rule) in targets.items():
        if rule.rank > min(layer.out_features, layer.in_features):  # the factors cannot have that rank
            raise LorqError(f"--rank {rule.rank} exceeds {name}'s smaller dimension ({min(layer.out_features, layer.in_features)})")
    if use_budget:  # an unreachable budget is refused before calibration
        check_reachable(*budget_candidates(model, rules, budget, rank, adapter_rank), budget.budget_bits)
    needs = mcfg.fisher or fisher_for_budget or stats or any(needs_calibration(rule) for _, rule in targets.values())
    calibration = calibration_ids(tok, mcfg, model_context(model.config)) if needs else None
    fisher = fisher_weights(model, list(targets), calibration) if mcfg.fisher or fisher_for_budget else None
    plan = None
    if use_budget:
        plan = allocate(model, rules, budget, rank, calibration, fisher, adapter_rank=adapter_rank)
        rules = plan.rules + rules
        print(f"lorq: bit budget {plan.target_bits} -> {plan.bits_per_weight:.4f} bits/weight planned "
              f"({plan.allocation}, {plan.weighting}-weighted error; solved in {plan.solve_seconds:.2f} s):\n{plan.table()}", flush=True)
    report = quantize_model(model, rules, mcfg, calibration, fisher=fisher if mcfg.fisher else None)
    if not report.modules:
        raise LorqError("no linear layer matched the quantization rules")
    return Base(model, tok, path, report, rules, plan)


QUANT_REPORT = "report.json"  # quantize's summary beside the checkpoint


def run_quantize(cfg: QuantizeConfig, also_reads=()) -> dict:
    if cfg.quant.validate().format is QuantFormat.NONE and not cfg.rules:
        raise LorqError("lorq quantize needs a format (nf, int, fp8, fp4 or int8-outlier)")
    check_ranges(cfg, {"eval_blocks": NON_NEGATIVE})
    check_output_dir(cfg.output, "quantized checkpoint", (QUANT_CONFIG,), reads=[cfg.model, cfg.rules, cfg.method.calib_file, *also_reads],
                     owned=(QUANT_CONFIG, QUANT_REPORT, MERGE_REPORT, *HF_MODEL_FILES))  # also over a quantized merge
    base = prepare_base(cfg.model, cfg.quant, cfg.method, cfg.rules, cfg.rank, cfg.budget)
    model, tok, path, report = base.model, base.tok, base.path, base.report
    if report is None:
        raise LorqError(f"{path} is already quantized")
    budget = base.budget.summary() if base.budget else None
    out = save_quantized(model, tok, cfg.output, report, source=str(cfg.model), rules=base.rules, budget=budget)
    size = sum(f.stat().st_size for f in Path(out).iterdir() if f.is_file())
    summary = {**report.summary(), "output": str(out), "size_on_disk_mb": round(size / 2**20, 2)}
    if budget:
        summary["budget"] = budget
    if cfg.eval_blocks:
        val = eval_blocks(tok, DataConfig()).take(cfg.eval_blocks)
        summary["val_ppl"] = round(perplexity(model, val, progress=True, desc="eval")["ppl"], 4)
    write_json(Path(out) / QUANT_REPORT, summary)
    ppl = f", validation perplexity {summary['val_ppl']:.3f}" if "val_ppl" in summary else ""
    print(f"quantized {summary['quantized_modules']} layers ({', '.join(summary['formats'])}): "
          f"{summary['bits_per_weight']:.3f} bits/weight (all metadata counted), relative weight error "
          f"{summary['relative_error']:.4f}{ppl}, {summary['seconds']:.1f} s, {summary['size_on_disk_mb']} MiB on disk -> {out}")
    return summary


RUN_MARKER = "lorq_run.json"  # written first into every run directory: what lorq may replace there
RUN_MARKERS = (RUN_MARKER, "checkpoints/latest")  # the latter: runs of lorq before the marker
RUN_PARTS = ("adapter", "base", "model", "checkpoints", "metrics.jsonl", "loss.png", "summary.json", RUN_MARKER)
RUN_RESULTS = ("adapter", "base", "model")
# options that may change on --resume: they do not change the trained result (more --steps
# continue a finished run;
# dylora_rank only picks the rank the trained nested adapter is evaluated and exported at)
RESUME_FREE = {"resume", "steps", "eval_every", "eval_blocks", "save_every", "loss_chunk", "grad_checkpointing", "lean_activations", "trim_heap", "tight_heap", "fsdp", "output",
               "dylora_rank", "device"}


def flat_options(cfg: FinetuneConfig) -> dict:
    """Every option that may shape a fine-tuning run's result, flat, as JSON values."""
    flat = {}
    for key, value in asdict(cfg).items():
        flat.update(value if isinstance(value, dict) else {key: value})
    if Path(cfg.model).exists():
        flat["model"] = str(Path(cfg.model).resolve())  # one model, however its path is spelled
    return {k: v for k, v in json.loads(json.dumps(flat, default=str)).items() if k not in RESUME_FREE}


def run_options(cfg: FinetuneConfig) -> dict:
    """The options that shape this run's result, as its checkpoints record them."""
    return shaping(flat_options(cfg))


# options of one optimizer only: a run with another optimizer is the same run whatever they say
OPTIMIZER_OPTIONS = {"lisa_": {"lisa"}, "galore_": {"galore", "qgalore"}, "qgalore_": {"qgalore"}}
LEGACY_VALUES = {"lisa_embeddings": {True: "train", False: "freeze"}}  # recorded before it had three choices


def shaping(options: dict) -> dict:
    """Recorded run options as today's runs record them: the options of an optimizer the run does
    not use left out, values in their current spelling (a checkpoint of an older lorq resumes)."""
    kept = {}
    for k, v in options.items():
        if any(k.startswith(prefix) and options.get("optimizer") not in kinds for prefix, kinds in OPTIMIZER_OPTIONS.items()):
            continue
        kept[k] = LEGACY_VALUES[k].get(v, v) if k in LEGACY_VALUES and isinstance(v, bool) else v
    return kept


# options added with a default that changed what runs without them did: their value before
PREVIOUS_BEHAVIOUR = {"packing": "stream", "galore_states": "fp32"}


def recorded_options(saved: dict) -> dict:
    """A checkpoint's options as this lorq would record them; an option added since it was
    written counts at the value that keeps the behaviour from before the option existed."""
    return shaping({**flat_options(FinetuneConfig()), **PREVIOUS_BEHAVIOUR, **saved})  # the defaults of every optimizer's options too


def trainable_count(model) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def method_conflicts(cfg: FinetuneConfig, lowrank: bool) -> list[str]:
    """Why this combination of init, variant, optimizer and base cannot work (empty: it can)."""
    init, variant, optim, fmt = cfg.start.init, cfg.lora.variant, cfg.optim, QuantFormat(cfg.quant.format)
    lowrank_init = lowrank and cfg.lowrank_as is LowRankUse.INIT
    plain_start = init is LoRAInit.GAUSSIAN and not lowrank_init
    moved_out_of_base = init in RESIDUAL_INITS or lowrank_init
    adapter_options = [f"--{f.name.replace('_', '-')}" for f in fields(LoRAConfig) if getattr(cfg.lora, f.name) != getattr(LoRAConfig(), f.name)]
    rules = [
        (optim.full and (not plain_start or variant is not Variant.LORA or lowrank),
         "full-parameter training (--full, --optimizer galore/qgalore/lisa) trains the base weights: --init, --variant and --lowrank apply to adapters"),
        (optim.full and fmt is not QuantFormat.NONE, "full-parameter training (--full, --optimizer galore/qgalore/lisa) needs a dense base: add --format none"),
        (optim.full and optim.loraplus_ratio != 1.0, "--loraplus-ratio sets the B factors' learning rate; full-parameter training has none"),
        (init is not LoRAInit.GAUSSIAN and lowrank_init,
         f"--init {init.value} and --lowrank {cfg.method.lowrank.value} both choose the adapter's start; pick one (or --lowrank-as compensate)"),
        (variant in (Variant.NOLA, Variant.RANDLORA) and not plain_start,
         f"--variant {variant.value} builds its update from random bases by design: use --init gaussian and no --lowrank init"),
        (variant in QAT_VARIANTS and (not plain_start or lowrank),
         f"--variant {variant.value} starts from the quantizer's own parameters: use --init gaussian and no --lowrank"),
        (variant is Variant.PEQA and fmt is not QuantFormat.INT, "--variant peqa trains the scales of an INT-k base: add --format int"),
        (variant is Variant.L4Q and fmt is not QuantFormat.NONE, "--variant l4q quantizes the weights itself while training: add --format none"),
        (variant is Variant.DYLORA and moved_out_of_base,
         "--variant dylora trains truncated ranks; with a start moved out of the base (--init pissa/olora/nlora/lora-ga, --lowrank ... init) a lower rank would drop part of the base weight"),
        (cfg.lora.dylora_rank and variant is not Variant.DYLORA, "--dylora-rank applies to --variant dylora"),
        (lowrank and fmt is QuantFormat.NONE, f"--lowrank {cfg.method.lowrank.value} compensates quantization error: it needs a format (e.g. --format nf)"),
        (cfg.lowrank_as is LowRankUse.COMPENSATE and not lowrank, "--lowrank-as compensate applies with --lowrank (loftq, lq-lora, eora, ...)"),
        (optim.loraplus_ratio != 1.0 and variant not in (Variant.LORA, Variant.DORA, Variant.DYLORA, Variant.L4Q),
         f"--loraplus-ratio sets the B factors' learning rate; the {variant.value} variant trains no B"),
        (init is LoRAInit.LORA_SB and variant not in (Variant.LORA, Variant.CORE), f"--init lora-sb needs --variant core (got {variant.value})"),
        (optim.full and bool(adapter_options), f"full-parameter training (--full, --optimizer galore/qgalore/lisa) trains the base weights, "
         f"not an adapter: {', '.join(adapter_options)} would be ignored"),
    ]
    return [message for broken, message in rules if broken]


def check_method(cfg: FinetuneConfig, lowrank: bool, say) -> None:
    """Refuse impossible combinations up front; --init lora-sb brings its core variant (before
    the checks: they judge the variant that will train)."""
    core = cfg.start.init is LoRAInit.LORA_SB and cfg.lora.variant is Variant.LORA
    if core:
        cfg.lora.variant = Variant.CORE
    conflicts = method_conflicts(cfg, lowrank)
    if conflicts:
        raise LorqError(conflicts[0])
    if core:
        say("lorq: note: --init lora-sb trains an r×r core between frozen factors: using --variant core", flush=True)


def quantize_untrained_linears(model, lora: LoRAConfig, say) -> None:
    """L4Q's product is one quantized model: decoder linears outside --targets get its INT-k
    format by round-to-nearest."""
    rule = Rule(DECODER_LINEARS, FormatConfig(format="int", bits=lora.qat_bits, group_size=lora.qat_group_size, symmetric=True))
    rest = plan_modules(model, [rule])  # the float nn.Linear ones: the trained layers are quantized already
    if rest:
        say(f"lorq: note: l4q trained the layers matching --targets; the {len(rest)} other decoder linears are quantized to "
            f"INT{lora.qat_bits} g{lora.qat_group_size} by round-to-nearest", flush=True)
        quantize_model(model, [rule], progress=False)


def init_batches(train_blocks, cfg: FinetuneConfig) -> list:
    """The first --init-batches training micro-batches, in training order."""
    from .train.loop import batch_indices

    out = []
    for k in range(cfg.start.init_batches):
        idx = batch_indices(k, len(train_blocks), cfg.train.batch_size, cfg.train.seed)
        b = train_blocks[idx]
        out.append((b.input_ids, b.labels, b.position_ids))
    return out


def save_full_model(model, tok, out: Path, state_dict: dict | None = None) -> None:
    """The fully fine-tuned model as an HF directory, atomically (state_dict: its weights
    gathered, when the model holds only shards)."""
    with atomic_dir(out) as tmp:
        model.save_pretrained(tmp, safe_serialization=True, state_dict=state_dict)
        tok.save_pretrained(tmp)
        for f in tmp.glob("*.safetensors"):  # written by safetensors' save_file: 0600 otherwise
            usual_mode(f)


def drop_stale_results(out: Path, written: set[str]) -> None:
    """Remove the results of an earlier run in `out` that this run did not write: its base/
    beside this run's adapter would pair the two wrongly."""
    for part in RUN_RESULTS:
        if part not in written and (out / part).is_dir():
            shutil.rmtree(out / part)


def run_finetune(cfg: FinetuneConfig, also_reads=()) -> dict:
    cfg.lora.validate()
    cfg.train.validate()
    cfg.data.validate()
    check_records(cfg.data.train_file, cfg.data.validation_file)
    cfg.start.validate()
    cfg.optim.validate()
    device = resolve_device(cfg.device)
    world = init_world(device)  # torchrun: data-parallel ranks; rank 0 prints and writes
    check_divisible(cfg.train.batch_size, world)
    check_fsdp(cfg.train, cfg.optim, world)
    cfg.optim.check_accumulation(cfg.train.grad_accum, world.size)
    say = print if world.main else (lambda *a, **k: None)
    start = time.perf_counter()
    # the run writes beside what is there (adapter/, checkpoints/, ...), but only into its own kind
    reads = [cfg.model, cfg.data.train_file, cfg.data.validation_file, cfg.method.calib_file, *also_reads]
    out = check_output_dir(cfg.output, "fine-tuning run", RUN_MARKERS, reads=reads, parts=RUN_PARTS)
    if not cfg.train.resume and any(out.glob("checkpoints/step-*")):
        say(f"lorq: note: {out} holds an earlier run; this run starts over and replaces it as it goes", flush=True)
    lowrank = cfg.method.validate().lowrank is not LowRankMethod.NONE
    cfg.lowrank_as = LowRankUse(cfg.lowrank_as)
    check_method(cfg, lowrank, say)
    cfg.quant.validate()  # its defaults filled in (bits)
    options = run_options(cfg)  # recorded in every checkpoint as they are now, before loading
    if cfg.train.resume:  # before anything is loaded: a run that cannot resume says so at once
        ckpt = latest_checkpoint(out)
        if ckpt is None:
            raise LorqError(f"--resume: no checkpoint in {out / 'checkpoints'}")
        check_same_options(ckpt, options, recorded_options)
        check_readable(ckpt)
        done = int(ckpt.name.removeprefix("step-"))  # latest_checkpoint accepts only step-<digits>
        if cfg.train.steps < done:
            raise LorqError(f"--resume: the run is at step {done}, past --steps {cfg.train.steps}")
    full = cfg.optim.full
    starts: dict = {}

    def init_adapters(model, tok):  # on the dense weights, before quantization
        nonlocal starts
        blocks = lambda: init_batches(load_blocks(tok, cfg.data)[0], cfg)  # noqa: E731
        torch.manual_seed(cfg.train.seed)
        starts = compute_starts(model, cfg.lora, cfg.start, blocks, progress=world.main)

    # as the LoRA init, every matrix gets factors of the adapter's rank, outside the bit budget
    adapter_rank = cfg.lora.rank if lowrank and cfg.lowrank_as is LowRankUse.INIT else 0
    base = prepare_base(cfg.model, cfg.quant, cfg.method, None, cfg.lora.rank, cfg.budget, adapter_rank,
                        before_quantize=init_adapters if cfg.start.init is not LoRAInit.GAUSSIAN else None,
                        check_config=lambda config: check_block_size(config, cfg.data.block_size))
    model, tok, path, report = base.model, base.tok, base.path, base.report
    if full and is_quantized(model):
        raise LorqError(f"full-parameter training needs a dense base; {path} is quantized")
    train_blocks, val_blocks = load_blocks(tok, cfg.data)

    def mark_run() -> None:  # just before the run's first write into the directory: a run refused before leaves none
        if world.main:
            write_json(out / RUN_MARKER, {"command": "finetune", "note": "a lorq fine-tuning run: lorq may replace what it wrote here"})

    adapter_base, factors = str(cfg.model), {}
    residual = any(s.residual for s in starts.values())
    if report is not None and (lowrank or base.budget or residual):
        if cfg.lowrank_as is LowRankUse.INIT:
            factors = pop_compensation(model)
            for n in factors:  # the factors are the adapter now: the base stores Q only
                report.modules[n].update(nbytes=model.get_submodule(n).qweight().nbytes, lowrank_as="init")
        # the adapter belongs to this exact quantized base (Q was chosen together with the factors)
        budget = base.budget.summary() if base.budget else None
        adapter_base = str(out / "base")
        mark_run()
        if world.main:
            save_quantized(model, tok, out / "base", report, str(cfg.model), base.rules, budget)
    torch.manual_seed(cfg.train.seed)
    if full:
        if cfg.optim.optimizer is OptimizerKind.LISA:
            check_active_layers(model, cfg.optim.lisa_layers)  # before the first evaluation, not after it
        model.requires_grad_(True)
        what = f"full-parameter training ({cfg.optim.optimizer.value})"
    else:
        wrapped = add_adapters(model, cfg.lora)
        if factors:
            init_from_factors(model, cfg.lora.adapter_name, factors)
        apply_starts(model, cfg.lora.adapter_name, starts)
        what = (f"{cfg.lora.variant.value} r={cfg.lora.rank} ({cfg.start.init.value} init, {cfg.optim.optimizer.value}) "
                f"on {len(wrapped)} layers")
    model.to(device)  # loaded, quantized and initialized on the CPU; trained where --device says
    precision = resolve(cfg.train.precision, device)
    val_eval = val_blocks.take(cfg.train.eval_blocks or None)
    say(f"lorq: base {path}{' quantized to ' + ', '.join(report.summary()['formats']) if report else ''}; "
          f"{what}, {trainable_count(model):,} trainable parameters; "
          f"{len(train_blocks)} training / {len(val_eval)} validation blocks of {cfg.data.block_size} tokens; {precision.value} compute"
        + (f"; {'sharded (FSDP)' if cfg.train.fsdp else 'data-parallel'} over {world.size} processes" if world.distributed else ""), flush=True)
    before = perplexity(model, val_eval, cfg.train.batch_size, precision, progress=world.main, desc="eval before")
    say(f"validation perplexity before training: {before['ppl']:.3f}", flush=True)
    n_trainable = trainable_count(model)
    loss = NextTokenLoss(model, cfg.train.loss_chunk)
    mark_run()
    final = train(model, train_blocks, val_blocks, cfg.train, out, initial_val=before, world=world, optim=cfg.optim, loss=loss,
                  options=options)
    nll = loss if is_sharded(loss) else None  # --fsdp: the model runs only through the sharded loss module
    if cfg.lora.variant is Variant.DYLORA and not full:
        for layer in lora_layers(model).values():
            layer.adapters[cfg.lora.adapter_name].set_rank(cfg.lora.dylora_rank or cfg.lora.rank)
    quantized_result = cfg.lora.variant in QAT_VARIANTS and not full
    if quantized_result:  # the product is the quantized model itself: evaluate what is written
        fold_quantized(model, cfg.lora.adapter_name)
        if cfg.lora.variant is Variant.L4Q:
            quantize_untrained_linears(model, cfg.lora, say)
    after = perplexity(model, val_eval, cfg.train.batch_size, precision, progress=world.main, desc="eval after", nll=nll)
    whole = gathered(model.state_dict(keep_vars=True)) if nll is not None else None  # every rank takes part
    writes_model = full or quantized_result  # a model, not an adapter, is the result
    result = out / ("model" if writes_model else "adapter")
    summary = {
        "base": str(path), "quantization": report.summary() if report else None,
        "method": {"init": cfg.start.init.value, "variant": cfg.lora.variant.value, "optimizer": cfg.optim.optimizer.value, "full": full},
        "trainable_parameters": n_trainable, "ppl_before": before["ppl"], "ppl_after": after["ppl"],
        "val_tokens": before["tokens"], "final": final, "seconds": round(time.perf_counter() - start, 1),
        ("model" if writes_model else "adapter"): str(result), "config": json.loads(json.dumps(asdict(cfg), default=str)), "processes": world.size,
    }
    if world.main:
        if quantized_result:
            save_quantized(model, tok, result, source=str(cfg.model))
        elif full:
            dequantize_weights(model)  # qgalore's int8 weights become plain linears for the HF file
            save_full_model(model, tok, result, whole)
        else:
            # a residual init on a dense base: export against the original weights (rank r + r0)
            save_peft(model, result, cfg.lora.adapter_name, base_model=adapter_base, restore_base=residual and report is None)
        drop_stale_results(out, {result.name} | ({"base"} if adapter_base == str(out / "base") else set()))
        plot_loss(out / "metrics.jsonl", out / "loss.png")
        write_json(out / "summary.json", summary)
    kind = ("quantized model (lorq format)" if quantized_result else "model (HF format)" if writes_model
            else "adapter (lorq format)" if cfg.lora.variant in NATIVE_VARIANTS else "adapter (PEFT format)")
    say(f"validation perplexity: {before['ppl']:.3f} before -> {after['ppl']:.3f} after training "
          f"({summary['seconds']:.0f} s). {kind.capitalize()}: {result}; metrics: {out / 'metrics.jsonl'}; plot: {out / 'loss.png'}")
    finish(world)
    return summary


def inference_base(model_name: str, quant: FormatConfig, check_config=None) -> Base:
    """The model as eval, generate and serve run it: quantized on load with --format, or a
    quantized checkpoint as it is (a --format given for one would silently not apply)."""
    base = prepare_base(model_name, quant, check_config=check_config)
    if base.report is None and is_quantized(base.model) and QuantFormat(quant.format) is not QuantFormat.NONE:  # validated by prepare_base
        raise LorqError(f"{base.path} is already quantized; leave out --format")
    return base


def load_for_inference(model_name: str, quant: FormatConfig, adapter: str | None, check_config=None, device: Device = Device.CPU,
                       precision: Precision | None = None):
    """(model, tokenizer, path) on the device; with a precision, its weights held in that
    precision's dtype (cast before the move: a GPU never holds the fp32 copy)."""
    device = resolve_device(device)  # before anything is read: --device cuda without a GPU fails at once
    if adapter is not None and not Path(adapter).is_dir():  # before the model is loaded
        raise LorqError(f"adapter directory {adapter} not found" + (" (it is a file)" if Path(adapter).is_file() else ""))
    base = inference_base(model_name, quant, check_config)
    model, tok, path = base.model, base.tok, base.path
    if adapter:
        load_peft(model, adapter)
    if precision is not None:
        cast_unquantized(model, weights_dtype(precision, device))
    return model.to(device), tok, path


def run_eval(cfg: EvalConfig) -> dict:
    check_ranges(cfg, {"eval_blocks": NON_NEGATIVE, "batch_size": POSITIVE})
    DataConfig(block_size=cfg.block_size).validate()
    check_records(cfg.data_file)
    model, tok, path = load_for_inference(cfg.model, cfg.quant, cfg.adapter, lambda config: check_block_size(config, cfg.block_size), cfg.device)
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
    check_ranges(cfg, {"max_new_tokens": POSITIVE, "temperature": NON_NEGATIVE, "top_p": (lambda v: 0 < v <= 1, "in (0, 1]"),
                       "top_k": NON_NEGATIVE, "repetition_penalty": (lambda v: 0 < v <= 100, "in (0, 100]")})
    if 0 < cfg.temperature < 1e-4:  # logits / 1e-320 overflow to NaN probabilities
        raise LorqError(f"temperature must be 0 (greedy) or at least 1e-4, got {cfg.temperature}")
    try:
        cfg.prompt.encode("utf-8")
    except UnicodeEncodeError:
        raise LorqError("the prompt is not valid Unicode text (it holds an unpaired surrogate)")
    model, tok, _ = load_for_inference(cfg.model, cfg.quant, cfg.adapter, lambda config: check_new_tokens(config, cfg.max_new_tokens), cfg.device,
                                       cfg.precision)
    text = generate_text(model, tok, cfg.prompt, cfg.max_new_tokens, cfg.temperature, cfg.top_p, cfg.seed, cfg.chat,
                         top_k=cfg.top_k, repetition_penalty=cfg.repetition_penalty)
    print(text)
    return text


def serving_server(cfg: ServeConfig) -> Server:
    """The model on its device in its precision, its engine and adapter store, as `lorq serve` runs them."""
    model, tok, _ = load_for_inference(cfg.model, cfg.quant, None, lambda config: check_max_model_len(config, cfg.engine.max_model_len),
                                       cfg.device, cfg.precision)
    name = cfg.served_name or model_label(cfg.model)
    return build_server(model, tok, name, cfg)


def run_serve(cfg: ServeConfig) -> None:
    cfg.validate()
    check_address(cfg.host, cfg.port)
    serve(serving_server(cfg), cfg)
