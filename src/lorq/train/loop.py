"""The one training loop: AdamW, linear warmup + cosine decay, gradient clipping and
accumulation, autocast, periodic validation, JSONL metrics, atomic checkpoints, resume.

Batches are a pure function of (seed, step), the RNG state is checkpointed, so a killed
and resumed run ends with exactly the adapter of an uninterrupted one.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
import torch.nn as nn
from tqdm.auto import tqdm

from ..errors import LorqError
from ..eval.perplexity import LOSS_CHUNK, next_token_nll, perplexity
from ..eval.memory import lifetime_peak_mib, release_freed_memory, reset_peak, tight_heap
from ..adapters.variants import Adapter
from ..io import atomic_write_text
from ..optim import OptimConfig, OptimizerKind, StateFormat, build_optimizer
from ..optim.lisa import decoder_layers
from ..options import NON_NEGATIVE, POSITIVE, check_ranges, opt
from .checkpoint import latest_checkpoint, load_checkpoint, save_checkpoint
from .data import IGNORE, Blocks
from .lean import make_lean, restore_stock
from .distributed import World, check_divisible, full_state, is_sharded, no_sync, shard, wrap
from .precision import Precision, autocast, resolve


@dataclass
class TrainConfig:
    """Optimization and bookkeeping of `lorq finetune`."""

    steps: int = opt(20, "optimizer steps")
    batch_size: int = opt(4, "blocks per micro-batch")
    grad_accum: int = opt(1, "micro-batches per optimizer step")
    lr: float = opt(1e-3, "peak learning rate (AdamW)")
    warmup_steps: int = opt(3, "linear warmup steps before cosine decay to zero")
    weight_decay: float = opt(0.0, "AdamW weight decay")
    max_grad_norm: float = opt(1.0, "gradient clipping norm (0 disables)")
    seed: int = opt(0, "seed for adapter init, data order and dropout")
    eval_every: int = opt(10, "validate every N steps (and at the end)")
    eval_blocks: int = opt(16, "validation blocks used for perplexity (0 = all)")
    save_every: int = opt(10, "checkpoint every N steps (and at the end)")
    precision: Precision = opt(Precision.AUTO, "compute precision: auto (bf16 where bf16 matmuls are faster: an Ampere or newer GPU, AMX, or AVX512-BF16 when timed so), bf16 or fp32")
    loss_chunk: int = opt(LOSS_CHUNK, "tokens per chunk of output layer + cross-entropy, so the full logits tensor is never held (0 = full logits)")
    grad_checkpointing: bool = opt(False, "recompute each decoder layer's activations in backward instead of storing them (less memory, ~30% more compute)")
    lean_activations: bool = opt(True, "RMSNorms keep only their input and SwiGLU MLPs only gate and up for backward, the rest recomputed elementwise (no matmul), and on the CPU grouped-query attention under a mask keeps its shared key/value heads unrepeated: about a third less activation memory, the same results up to rounding (Llama/Mistral/Qwen/... layers; off under --grad-checkpointing)")
    trim_heap: bool = opt(False, "after each forward pass, hand the heap's free pages back to the OS (glibc's malloc_trim) before backward allocates the gradients, so the forward's freed temporaries, gaps between the activations it keeps, are not resident through backward: peak RSS 3-20% lower on SmolLM2 runs, but backward faults those pages in again (the default NF4 LoRA run: -6% peak RSS, +8% step time)")
    tight_heap: bool = opt(False, "give every tensor over 128 KiB memory of its own, returned to the OS when freed (glibc's malloc): peak RSS then follows the live tensors instead of the heap with its free gaps (0.82-0.88x the default's peak on SmolLM2 full-parameter runs), but steps are 1.4-2x slower; for the rest of the process")
    resume: bool = opt(False, "continue from the latest checkpoint in --output")
    fsdp: bool = opt(False, "under torchrun with --full (AdamW), galore or lisa: shard weights, gradients and optimizer state over the processes (FSDP2) instead of replicating them (DDP)")

    def validate(self) -> "TrainConfig":
        check_ranges(self, {**{k: POSITIVE for k in ("steps", "batch_size", "grad_accum", "eval_every", "save_every", "lr")},
                            **{k: NON_NEGATIVE for k in ("warmup_steps", "eval_blocks", "loss_chunk", "weight_decay", "max_grad_norm")}})
        self.precision = Precision(self.precision)
        return self


def lr_at(step: int, cfg: TrainConfig) -> float:
    """Learning rate of optimizer step `step` (0-based): linear warmup, then cosine to 0."""
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    progress = (step - cfg.warmup_steps) / max(1, cfg.steps - cfg.warmup_steps)
    return cfg.lr * 0.5 * (1.0 + math.cos(math.pi * min(progress, 1.0)))


def check_finite_step(step: int, loss: float, grad_norm: float, out_dir: Path) -> None:
    """A NaN or infinite loss or gradient ends the run before it writes anything from it."""
    if math.isfinite(loss) and math.isfinite(grad_norm):
        return
    kept = latest_checkpoint(out_dir)
    raise LorqError(f"training diverged at step {step} (loss {loss}, gradient norm {grad_norm}): lower --lr or check the data; "
                    + (f"the last checkpoint, {kept.name}, is intact" if kept else "no checkpoint was written"))


def batch_indices(step: int, n_blocks: int, per_step: int, seed: int) -> torch.Tensor:
    """Block indices of step `step`: consecutive slices of per-epoch seeded permutations."""
    first = step * per_step
    out = []
    for pos in range(first, first + per_step):
        epoch, i = divmod(pos, n_blocks)
        # modulo 2^64: manual_seed takes 64 bits; the usual seeds are unchanged by it
        perm = torch.randperm(n_blocks, generator=torch.Generator().manual_seed((seed * 100003 + epoch) % 2**64))
        out.append(perm[i])
    return torch.stack(out)


def record_step(line: str) -> int | None:
    """The step of one metrics.jsonl line (0 if it names none); None for a damaged line, which
    a resumed run drops with the records after its checkpoint."""
    try:
        record = json.loads(line)
    except json.JSONDecodeError:
        return None
    step = record.get("step", 0) if isinstance(record, dict) else None
    return step if isinstance(step, int) and not isinstance(step, bool) else None


class MetricsLog:
    """metrics.jsonl: one JSON object per line; on resume, records after the checkpoint are dropped."""

    def __init__(self, path: Path, keep_up_to: int):
        self.path = path
        old = path.read_text(errors="replace").splitlines() if path.is_file() else []
        kept = [l for l in old if (step := record_step(l)) is not None and step <= keep_up_to]
        atomic_write_text(path, "".join(l + "\n" for l in kept))

    def write(self, record: dict) -> None:
        with self.path.open("a") as f:
            f.write(json.dumps(record) + "\n")


def peak_memory(device: torch.device) -> dict:
    """Peak resident memory since training started (and peak CUDA memory on a GPU), MiB."""
    out = {"peak_rss_mb": round(lifetime_peak_mib(), 1)}
    if device.type == "cuda":
        out["peak_cuda_mb"] = round(torch.cuda.max_memory_allocated(device) / 2**20, 1)
    return out


def set_grad_checkpointing(model, on: bool) -> None:
    """transformers' per-layer activation checkpointing (non-reentrant: the frozen embeddings'
    outputs need no grad for it to work); its newer name where transformers has it."""
    supported = getattr(model, "supports_gradient_checkpointing", False)
    if on and not supported:
        raise LorqError(f"{type(model).__name__} does not support gradient checkpointing")
    kwargs = {"use_reentrant": False}
    if hasattr(model, "activation_checkpointing_enable"):
        if on:
            model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
        elif supported:
            model.activation_checkpointing_disable()
    elif on:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
    elif supported:
        model.gradient_checkpointing_disable()


class NextTokenLoss(nn.Module):
    """The model with its loss as forward, so that DistributedDataParallel sees the whole step."""

    def __init__(self, model: nn.Module, chunk: int):
        super().__init__()
        self.model, self.chunk = model, chunk

    def forward(self, input_ids: torch.Tensor, labels: torch.Tensor, position_ids: torch.Tensor | None = None):
        return next_token_nll(self.model, input_ids, labels, self.chunk, position_ids)


def check_fsdp(cfg: TrainConfig, optim: OptimConfig, world: World) -> None:
    """Whether the run can be data-parallel the way it asks (DDP, or FSDP with --fsdp)."""
    if optim.optimizer is OptimizerKind.LISA and world.distributed and not cfg.fsdp:
        raise LorqError("lisa changes the trained layers every period, which DDP cannot follow; add --fsdp (or run one process)")
    if not cfg.fsdp:
        return
    if not world.distributed:
        raise LorqError("--fsdp shards over the processes of torchrun; this is one process (run it without --fsdp)")
    if not optim.full or optim.optimizer not in (OptimizerKind.ADAMW, OptimizerKind.GALORE, OptimizerKind.LISA):
        raise LorqError("--fsdp shards full-parameter training with AdamW (--full), GaLore or LISA; adapters are small enough "
                        "to replicate (drop --fsdp), and qgalore's int8 weights update inside their own backward, outside the shards")
    if optim.optimizer is OptimizerKind.GALORE and optim.galore_states is not StateFormat.FP32:
        raise LorqError("--fsdp shards galore's fp32 moments only; use --galore-states fp32 (or drop --fsdp)")


def train(model, train_blocks: Blocks, val_blocks: Blocks, cfg: TrainConfig, out_dir: str | Path,
          on_step: Callable[[int], None] | None = None, progress: bool = True, initial_val: dict | None = None,
          world: World = World(), optim: OptimConfig | None = None, loss: NextTokenLoss | None = None,
          options: dict | None = None) -> dict:
    """Train the parameters with requires_grad; returns the final metrics.

    `initial_val` (perplexity() of the untrained model) is logged as step 0 of a fresh run.
    world: the data-parallel ranks (distributed.init_world() under torchrun); rank 0 writes.
    optim: the optimizer (AdamW by default; see lorq.optim).
    loss: the module trained through (NextTokenLoss(model, cfg.loss_chunk) if None); with
    cfg.fsdp it is sharded in place, and the model can then only be run through it.
    """
    cfg.validate()
    optim = (optim or OptimConfig()).validate()
    check_divisible(cfg.batch_size, world)
    check_fsdp(cfg, optim, world)
    progress = progress and world.main
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    device = next(model.parameters()).device
    precision = resolve(cfg.precision, device)
    set_grad_checkpointing(model, cfg.grad_checkpointing)
    loss = loss if loss is not None else NextTokenLoss(model, cfg.loss_chunk)
    if cfg.fsdp and not is_sharded(loss):
        names = decoder_layers(model)
        if not names:
            raise LorqError(f"--fsdp: no decoder layers found in {type(model).__name__}")
        shard(loss, [model.get_submodule(n) for n in names])  # before the optimizer: it must hold the shards
    loss_fn = wrap(loss, world)
    root = loss_fn if is_sharded(loss_fn) else None  # sharded: the model runs only through its root
    plan = build_optimizer(model, optim, cfg.lr, cfg.weight_decay, cfg.seed, cfg.grad_accum, cfg.max_grad_norm, world.size)
    optimizer = plan.optimizer
    adapters = [m for m in model.modules() if isinstance(m, Adapter)]
    for ad in adapters:  # each rank keeps its rows of the global micro-batch's dropout masks
        ad.dropout.share = (world.rank, world.size)
    start = 0
    if cfg.resume:
        ckpt = latest_checkpoint(out_dir)
        if ckpt is None:
            raise LorqError(f"--resume: no checkpoint in {out_dir / 'checkpoints'}")
        start = load_checkpoint(ckpt, plan.params, optimizer, at_step=plan.begin_step, kind=optim.optimizer.value)
        print(f"lorq: resuming from {ckpt} (step {start})", flush=True)
    metrics = MetricsLog(out_dir / "metrics.jsonl", keep_up_to=start if cfg.resume else -1) if world.main else None
    if metrics is not None and start == 0 and initial_val is not None:
        metrics.write({"step": 0, "val_loss": initial_val["loss"], "val_ppl": initial_val["ppl"]})
    per_step = cfg.batch_size * cfg.grad_accum
    model.train()
    if cfg.tight_heap and not tight_heap():
        print("lorq: --tight-heap needs glibc's malloc; this process has another (ignored)", flush=True)
    release_freed_memory()  # what loading and quantizing freed goes back to the OS, not counted as training's
    reset_peak()  # the high-water mark of training, not of loading and quantizing the model
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    last: dict = {}
    peak_state = 0.0
    lean = make_lean(model) if cfg.lean_activations and not cfg.grad_checkpointing else []
    bar = tqdm(range(start, cfg.steps), initial=start, total=cfg.steps, desc="finetune", unit="step", disable=not progress)
    try:
        for step in bar:
            t0 = time.perf_counter()
            lr = lr_at(step, cfg)
            for g in optimizer.param_groups:
                g["lr"] = lr * g.get("lr_scale", 1.0)  # LoRA+ groups scale the schedule
            plan.begin_step(step)
            for ad in adapters:
                ad.begin_step(step, cfg.seed)
            optimizer.zero_grad(set_to_none=True)
            idx = batch_indices(step, len(train_blocks), per_step, cfg.seed)
            loss_sum, tokens = 0.0, 0
            micros = idx.split(cfg.batch_size)
            for i, micro in enumerate(micros):
                mine = world.share(micro)
                micro_blocks = train_blocks[mine]
                x, y = micro_blocks.input_ids.to(device), micro_blocks.labels.to(device)
                pos = micro_blocks.position_ids.to(device) if micro_blocks.position_ids is not None else None
                n_all = world.all_sum(int((y[:, 1:] != IGNORE).sum()))  # labelled tokens of the whole micro-batch
                with no_sync(loss_fn, i < len(micros) - 1), autocast(precision, device):
                    nll, n = loss_fn(x, y, pos)
                    if cfg.trim_heap:
                        release_freed_memory()
                    # DDP averages over ranks: x world.size makes it the single-process gradient
                    (nll * world.size / max(n_all, 1) / cfg.grad_accum).backward()
                loss_sum += nll.item()
                tokens += n
            loss_sum, tokens = world.all_sum(loss_sum), world.all_sum(tokens)
            grad_norm = plan.step(cfg.max_grad_norm)
            check_finite_step(step + 1, loss_sum / max(tokens, 1), float(grad_norm), out_dir)
            dt = time.perf_counter() - t0
            state_mb = plan.state_bytes() / 2**20
            peak_state = max(peak_state, state_mb)
            last = {"step": step + 1, "loss": loss_sum / max(tokens, 1), "lr": lr, "grad_norm": float(grad_norm),
                    "tokens_per_s": x.numel() * world.size * cfg.grad_accum / dt, "step_s": dt, **peak_memory(device),
                    "optimizer_state_mb": round(state_mb, 2), "peak_optimizer_state_mb": round(peak_state, 2)}
            bar.set_postfix(loss=f"{last['loss']:.3f}", tok_s=f"{last['tokens_per_s']:.0f}")
            if (step + 1) % cfg.eval_every == 0 or step + 1 == cfg.steps:
                val = perplexity(model, val_blocks.take(cfg.eval_blocks or None), cfg.batch_size, precision, nll=root)
                last.update(val_loss=val["loss"], val_ppl=val["ppl"])
                if world.main:
                    bar.write(f"step {step + 1}: train loss {last['loss']:.4f}, validation loss {val['loss']:.4f}, perplexity {val['ppl']:.2f}")
            if world.main:
                metrics.write(last)
            if (step + 1) % cfg.save_every == 0 or step + 1 == cfg.steps:
                params, state = plan.params, optimizer.state_dict()
                if root is not None:  # every rank takes part in gathering the shards
                    params, state = full_state(params, state)
                if world.main:
                    save_checkpoint(out_dir, step + 1, params, state, kind=optim.optimizer.value, options=options)
            if on_step is not None:
                on_step(step + 1)
    finally:  # layerwise GaLore hooks and lean forwards must not outlive the run, even a failed one
        bar.close()
        plan.close()
        restore_stock(lean)
    for p in plan.params.values():  # LISA leaves only its last layers trainable; restore the set
        if p.is_floating_point():
            p.requires_grad_(True)
    set_grad_checkpointing(model, False)
    model.eval()
    return {**last, "precision": precision.value}
