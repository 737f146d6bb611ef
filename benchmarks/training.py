"""QLoRA fine-tuning speed and memory on this machine: lorq against PEFT + bitsandbytes.

One run, every configuration in its own process (peak resident memory is per process), the
same data (the embedded training split, sequence 256, batch 4, the same batches per step),
LoRA r=16 / alpha 32 on every decoder linear layer of an NF4 + double-quantized base, the same
AdamW schedule and number of steps:
  - PEFT + bitsandbytes (anchor): `BitsAndBytesConfig(load_in_4bit, nf4, double quant)`, fp32
    compute, `get_peft_model`, loss from `model(input_ids, labels=...)` (full logits), a plain loop;
  - lorq with its defaults (`--precision auto`, the fused chunked cross-entropy), and variants
    that show what each option buys: full logits (`--loss-chunk 0`), activation checkpointing,
    fp32 compute (`--precision fp32`), and with `--bf16` forced bf16;
each configuration runs `--rounds` times, interleaved (order reversed every other round), and
is measured after `--warmup` steps: tokens/s, peak RSS, loss per step; MFU = model FLOPs per
second / the machine's bf16 GEMM throughput measured in the same run (fp32 too); and a
torch.profiler breakdown of one lorq step. Writes benchmarks/results/training.{json,md,png}
(`--results NAME`: NAME.{json,md,png}, e.g. to keep another machine's run beside it).

    .venv/bin/python benchmarks/training.py              # about 15 minutes on 2 cores
    .venv/bin/python benchmarks/training.py --steps 4 --warmup 1 --rounds 1   # a quick look
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from quantization import bnb_model, machine  # noqa: E402

from lorq.eval.memory import lifetime_peak_mib, release_freed_memory, reset_peak  # noqa: E402
from lorq.io import atomic_write_text, read_json, save_figure, write_json  # noqa: E402
from lorq.train.precision import BF16_MARGIN  # noqa: E402

RESULTS = Path(__file__).parent / "results"
WORK = RESULTS / ".training_runs"
ANCHOR = "PEFT + bitsandbytes NF4 (anchor)"
CONFIGS = {  # name -> lorq finetune options (None: the PEFT anchor)
    ANCHOR: None,
    "lorq (defaults)": {},
    "lorq, full logits (--loss-chunk 0)": {"loss_chunk": 0},
    "lorq, --grad-checkpointing": {"grad_checkpointing": True},
    "lorq, fp32 compute (--precision fp32)": {"precision": "fp32"},
}
BF16 = "lorq, forced bf16 (--precision bf16)"  # opt-in (--bf16): without AVX512-BF16/AMX it is emulated and very slow
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
BATCH, SEQ = 4, 256


def gemm_gflops(dtype: torch.dtype, n: int = 1024, reps: int = 10) -> float:
    a, b = torch.randn(n, n, dtype=dtype), torch.randn(n, n, dtype=dtype)
    a @ b  # warm-up
    start = time.perf_counter()
    for _ in range(reps):
        a @ b
    return 2 * n**3 * reps / (time.perf_counter() - start) / 1e9


def train_flops_per_token(model) -> float:
    """Forward 2·P plus backward 2·P (gradients of the activations only: the base is frozen)
    over every matmul weight P (decoder linears and the output layer), plus the adapters'
    6·r·(in + out) each; attention scores are left out (small at sequence 256)."""
    cfg = model.config
    per_layer = cfg.hidden_size * (2 * cfg.hidden_size + 2 * cfg.num_key_value_heads * cfg.hidden_size // cfg.num_attention_heads) \
        + 3 * cfg.hidden_size * cfg.intermediate_size
    dense = cfg.num_hidden_layers * per_layer + cfg.hidden_size * cfg.vocab_size
    adapters = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return 4 * dense + 6 * adapters


def batches(train_blocks, steps: int):
    from lorq.train.loop import batch_indices

    for step in range(steps):
        idx = batch_indices(step, len(train_blocks), BATCH, seed=0)
        yield train_blocks[idx]  # with lorq's default document packing: PEFT gets the same position ids


def peft_child(args) -> dict:
    """The anchor: what a PEFT + bitsandbytes user runs (a plain loop, HF's own loss)."""
    from peft import LoraConfig, get_peft_model

    from lorq.models.loading import load_tokenizer, resolve_model
    from lorq.train.data import DataConfig, load_blocks
    from lorq.train.loop import TrainConfig, lr_at

    path = resolve_model(None)
    train_blocks, _ = load_blocks(load_tokenizer(path), DataConfig(block_size=SEQ))
    torch.manual_seed(0)
    model = get_peft_model(bnb_model(path, torch.float32), LoraConfig(r=16, lora_alpha=32, lora_dropout=0.05, target_modules=TARGETS))
    params = [p for p in model.parameters() if p.requires_grad]
    opt, cfg = torch.optim.AdamW(params, lr=1e-3), TrainConfig(steps=args.steps)
    model.train()
    release_freed_memory()
    reset_peak()  # as lorq's loop does: the peak of training, not of loading the model
    losses, seconds = [], []
    for step, b in enumerate(batches(train_blocks, args.steps)):
        t0 = time.perf_counter()
        for g in opt.param_groups:
            g["lr"] = lr_at(step, cfg)
        opt.zero_grad(set_to_none=True)
        # use_cache=False as lorq: with a cache transformers ignores the restarting position ids when masking
        loss = model(input_ids=b.input_ids, labels=b.labels, position_ids=b.position_ids, use_cache=False).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        seconds.append(time.perf_counter() - t0)
        losses.append(loss.item())
    return {"losses": losses, "step_s": seconds, "flops_per_token": train_flops_per_token(model)}


def lorq_child(args, options: dict) -> dict:
    from lorq.adapters import LoRAConfig, add_adapters
    from lorq.jobs import prepare_base
    from lorq.quant import FormatConfig
    from lorq.train.data import DataConfig, load_blocks
    from lorq.train.loop import TrainConfig, train

    base = prepare_base(None, FormatConfig())
    train_blocks, val_blocks = load_blocks(base.tok, DataConfig(block_size=SEQ))
    torch.manual_seed(0)
    add_adapters(base.model, LoRAConfig())
    out = Path(args.out)
    cfg = TrainConfig(steps=args.steps, batch_size=BATCH, eval_every=10**6, eval_blocks=1, save_every=10**6, **options)
    train(base.model, train_blocks, val_blocks.take(1), cfg, out, progress=False)
    rows = [r for r in map(json.loads, (out / "metrics.jsonl").read_text().splitlines()) if "loss" in r]
    result = {"losses": [r["loss"] for r in rows], "step_s": [r["step_s"] for r in rows], "precision": cfg.precision.value,
              "flops_per_token": train_flops_per_token(base.model)}
    if args.profile:
        result["profile"] = profile_step(base.model, train_blocks, cfg)
    return result


def profile_step(model, train_blocks, cfg) -> list[dict]:
    """Where one training step's time goes: the top operators by self CPU time."""
    from torch.profiler import ProfilerActivity, profile

    from lorq.eval.perplexity import next_token_nll
    from lorq.train.precision import autocast, resolve

    b = next(batches(train_blocks, 1))
    precision = resolve(cfg.precision, torch.device("cpu"))
    model.train()
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        with autocast(precision, torch.device("cpu")):
            nll, n = next_token_nll(model, b.input_ids, b.labels, cfg.loss_chunk, b.position_ids)
        (nll / n).backward()
    total = sum(e.self_cpu_time_total for e in prof.key_averages())
    top = sorted(prof.key_averages(), key=lambda e: -e.self_cpu_time_total)[:10]
    return [{"op": e.key, "self_ms": round(e.self_cpu_time_total / 1e3, 1), "share": round(e.self_cpu_time_total / total, 3)} for e in top]


def child(args) -> int:
    options = {**CONFIGS, BF16: {"precision": "bf16"}}[args.child]
    result = peft_child(args) if options is None else lorq_child(args, options)
    result["peak_rss_mib"] = round(lifetime_peak_mib(), 1)
    write_json(args.json, result)
    return 0


def run_config(name: str, args, round_: int) -> dict:
    WORK.mkdir(parents=True, exist_ok=True)
    slug = "".join(c if c.isalnum() else "_" for c in name)[:40] + f"_{round_}"
    cmd = [sys.executable, __file__, "--child", name, "--steps", str(args.steps), "--out", str(WORK / slug), "--json", str(WORK / f"{slug}.json")]
    if name == "lorq (defaults)" and round_ == 0:
        cmd.append("--profile")
    print(f"== round {round_ + 1}: {name}", flush=True)
    subprocess.run(cmd, check=True)
    return read_json(WORK / f"{slug}.json")


def tokens_per_second(step_s: list[float]) -> float:
    return BATCH * SEQ * len(step_s) / sum(step_s)


def combine(name: str, runs: list[dict], warmup: int) -> dict:
    """One row from a configuration's rounds: tokens/s over every measured step of every round,
    the peak RSS of its largest round, the losses of the first (rounds repeat them)."""
    tokens_per_s = tokens_per_second([t for r in runs for t in r["step_s"][warmup:]])
    per_round = [round(tokens_per_second(r["step_s"][warmup:]), 1) for r in runs]
    first = runs[0]
    return {"name": name, **first, "step_s": [r["step_s"] for r in runs], "tokens_per_s_rounds": per_round,
            "peak_rss_mib": max(r["peak_rss_mib"] for r in runs), "profile": next((r["profile"] for r in runs if r.get("profile")), None),
            "tokens_per_s": round(tokens_per_s, 1), "achieved_gflops": round(tokens_per_s * first["flops_per_token"] / 1e9, 2)}


def interleaved(names: list[str], args) -> list[dict]:
    """Every configuration once per round, the order reversed every other round, so the slow
    and fast phases of a shared machine fall on all of them alike."""
    runs = {n: [] for n in names}
    for k in range(args.rounds):
        for name in names if k % 2 == 0 else names[::-1]:
            runs[name].append(run_config(name, args, k))
    return [combine(n, runs[n], args.warmup) for n in names]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=8)
    p.add_argument("--warmup", type=int, default=2, help="first steps left out of tokens/s")
    p.add_argument("--rounds", type=int, default=2, help="runs of every configuration, interleaved (tokens/s pools their steps)")
    p.add_argument("--bf16", action="store_true", help="also run lorq with forced bf16 autocast (slow where the CPU has no native bf16)")
    p.add_argument("--results", default="training", help="results file name under benchmarks/results/ (without suffix)")
    p.add_argument("--child", help=argparse.SUPPRESS)
    p.add_argument("--out", help=argparse.SUPPRESS)
    p.add_argument("--json", help=argparse.SUPPRESS)
    p.add_argument("--profile", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.child:
        return child(args)
    info, start = machine(), time.perf_counter()
    gemm = {"bf16_gflops": round(gemm_gflops(torch.bfloat16), 1), "fp32_gflops": round(gemm_gflops(torch.float32), 1)}
    rows = interleaved([*CONFIGS, *([BF16] if args.bf16 else [])], args)
    gemm_after = {"bf16_gflops": round(gemm_gflops(torch.bfloat16), 1), "fp32_gflops": round(gemm_gflops(torch.float32), 1)}
    peak = max(gemm["bf16_gflops"], gemm_after["bf16_gflops"])
    for r in rows:
        r["mfu_vs_bf16_gemm"] = round(r["achieved_gflops"] / peak, 3)
        r["mfu_vs_fp32_gemm"] = round(r["achieved_gflops"] / max(gemm["fp32_gflops"], gemm_after["fp32_gflops"]), 3)
    anchor = next(r for r in rows if r["name"] == ANCHOR)
    for r in rows:
        r["speed_vs_anchor"] = round(r["tokens_per_s"] / anchor["tokens_per_s"], 2)
        r["rss_vs_anchor"] = round(r["peak_rss_mib"] / anchor["peak_rss_mib"], 2)
    result = {"machine": info, "gemm_before": gemm, "gemm_after": gemm_after,
              "settings": {"steps": args.steps, "warmup": args.warmup, "rounds": args.rounds, "batch": BATCH, "seq": SEQ, "lora": "r16 alpha 32 all decoder linears"},
              "seconds": round(time.perf_counter() - start, 1), "rows": rows}
    lorq = next(r for r in rows if r["name"] == "lorq (defaults)")
    result["targets"] = {
        "lorq >= 3x PEFT + bitsandbytes tokens/s": lorq["speed_vs_anchor"] >= 3,
        "lorq peak RSS <= 0.7x PEFT + bitsandbytes": lorq["rss_vs_anchor"] <= 0.7,
        # without AMX a bf16 GEMM is slower than an fp32 one: the machine's peak is then fp32's, and auto trains in fp32
        "MFU >= 40% of the measured bf16 GEMM throughput (fp32's where that is faster)":
            lorq["mfu_vs_fp32_gemm" if bf16_slower(result) else "mfu_vs_bf16_gemm"] >= 0.4,
    }
    RESULTS.mkdir(exist_ok=True)
    write_json(RESULTS / f"{args.results}.json", result)
    atomic_write_text(RESULTS / f"{args.results}.md", markdown(result))
    plot(rows, RESULTS / f"{args.results}.png")
    print(markdown(result))
    return 0


def bf16_slower(result) -> bool:
    """`--precision auto` trains in fp32 on this machine: no AMX, and the best bf16 GEMM of the
    run is not clearly faster than the best fp32 one (auto's own rule and margin)."""
    runs, m = (result["gemm_before"], result["gemm_after"]), result["machine"]
    bf16, fp32 = max(g["bf16_gflops"] for g in runs), max(g["fp32_gflops"] for g in runs)
    return not m["amx_bf16"] and (not m["avx512_bf16"] or bf16 * BF16_MARGIN <= fp32)


def markdown(result) -> str:
    m, s = result["machine"], result["settings"]
    lines = [
        "# Fine-tuning speed and memory", "",
        f"{m['cpu']}, {m['cores']} cores (AVX512-BF16: {m['avx512_bf16']}, AMX: {m['amx_bf16']}), torch {m['torch']}, "
        f"transformers {m['transformers']}, bitsandbytes {m['bitsandbytes']}; {m['date']}. Embedded SmolLM2-135M-Instruct, NF4 + double "
        f"quantization, LoRA {s['lora']}, batch {s['batch']} x {s['seq']} tokens, {s['steps']} steps ({s['warmup']} warm-up steps "
        f"left out of tokens/s), {s.get('rounds', 1)} interleaved rounds per configuration (tokens/s pools their measured steps), same batches for all. GEMM throughput measured in the same run (1024^3 matmul): "
        f"bf16 {result['gemm_before']['bf16_gflops']} / {result['gemm_after']['bf16_gflops']} GFLOP/s, fp32 "
        f"{result['gemm_before']['fp32_gflops']} / {result['gemm_after']['fp32_gflops']} GFLOP/s (before / after). Whole run {result['seconds'] / 60:.1f} min.", "",
        "| configuration | tokens/s | per round | vs anchor | peak RSS MiB | vs anchor | GFLOP/s | MFU (bf16 GEMM) | MFU (fp32 GEMM) | final loss |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in result["rows"]:
        rounds = " / ".join(f"{t:.0f}" for t in r.get("tokens_per_s_rounds", []))
        lines.append(f"| {r['name']} | {r['tokens_per_s']:.1f} | {rounds} | {r['speed_vs_anchor']:.2f}x | {r['peak_rss_mib']:.0f} | {r['rss_vs_anchor']:.2f}x | "
                     f"{r['achieved_gflops']:.1f} | {100 * r['mfu_vs_bf16_gemm']:.1f}% | {100 * r['mfu_vs_fp32_gemm']:.1f}% | {r['losses'][-1]:.3f} |")
    prof = next((r["profile"] for r in result["rows"] if r.get("profile")), None)
    if prof:
        lines += ["", "Where one lorq step's time goes (torch.profiler, self CPU time, top operators):", "", "| operator | ms | share |", "|---|---|---|"]
        lines += [f"| `{e['op']}` | {e['self_ms']:.0f} | {100 * e['share']:.1f}% |" for e in prof]
    lines += ["", "Targets:", ""] + [f"- {k}: **{'met' if v else 'NOT met'}**" for k, v in result["targets"].items()]
    gemm = result["gemm_before"]
    if bf16_slower(result):
        lines += ["", f"On this CPU bf16 matmuls are not faster than fp32 ones (bf16 GEMM {gemm['bf16_gflops']} GFLOP/s against {gemm['fp32_gflops']} in fp32), so "
                  "`--precision auto` trains in fp32 and the MFU against bf16 is not a meaningful figure here: read the fp32 column (the MFU target is judged on it)."]
    return "\n".join(lines) + "\n"


def plot(rows, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (a, b) = plt.subplots(1, 2, figsize=(14, 4.5), gridspec_kw={"wspace": 0.55})
    for r in rows:
        a.plot(range(1, len(r["losses"]) + 1), r["losses"], marker="o", ms=3, label=r["name"], lw=2.5 if r["name"] == ANCHOR else 1.2)
    a.set_xlabel("step")
    a.set_ylabel("training loss")
    a.legend(fontsize=7)
    y = range(len(rows))
    b.barh(y, [r["tokens_per_s"] for r in rows], color=["tab:gray" if r["name"] == ANCHOR else "tab:blue" for r in rows])
    b.set_yticks(list(y), [r["name"] for r in rows], fontsize=7)
    b.invert_yaxis()
    b.set_xlabel("tokens/s (higher is better)")
    fig.suptitle("QLoRA fine-tuning of SmolLM2-135M on this CPU: lorq vs PEFT + bitsandbytes")
    save_figure(fig, path)


if __name__ == "__main__":
    sys.exit(main())
