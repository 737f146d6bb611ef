"""Adapter methods and optimizers under one budget, against PEFT's LoRA on a bitsandbytes NF4 base.

Every method trains the embedded SmolLM2-135M-Instruct on the embedded task (CPython docs) with
the same budget: the same steps, batches (a pure function of seed and step), block size, seed,
warm-up + cosine schedule and validation blocks; each method sweeps 3 learning rates (its own
grid: methods with few parameters need larger ones) and the best final validation loss is
reported; `--extend` adds one more past the end of the sweep where a row's best sits (repeat
until every row is bracketed). Adapter methods run on lorq's NF4 base (double quantization); full-parameter methods
(full AdamW, GaLore, Q-GaLore, LISA) need a dense base and run on fp32 (Q-GaLore turns the
decoder's weights into int8 itself); PEQA trains the scales of an INT4 base, and L4Q trains on the
fp32 base and writes an INT4 model, whose perplexity is the one reported. The anchor, PEFT LoRA r16 on a
bitsandbytes NF4 + double-quant base (fp32 compute, a plain loop over the same batches and
schedule), runs in the same invocation. Each run is its own process (peak memory is per process;
the loop resets the high-water mark when training starts). Rows marked --tight-heap / --trim-heap repeat full
fine-tuning and the GaLores, one learning rate each (their twin's best), with glibc's heap kept
tight (every tensor over 128 KiB mapped on its own: peak RSS is what the live tensors need,
without the free heap gaps that make the default rows' peaks drift by up to 15% between runs) /
trimmed after each forward pass.

Writes benchmarks/results/methods.{json,md} and methods.png (validation loss vs steps at the best
learning rate of each method).

    .venv/bin/python benchmarks/methods.py                      # about 85 minutes on 2 cores
    .venv/bin/python benchmarks/methods.py --steps 4 --only "LoRA;PiSSA" --lrs 1   # a quick look
"""

from __future__ import annotations

import argparse
import json
import math
import shutil
import subprocess
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from quantization import bnb_model, machine  # noqa: E402

from lorq.eval.memory import lifetime_peak_mib, release_freed_memory, reset_peak  # noqa: E402
from lorq.io import atomic_write_text, read_json, save_figure, write_json  # noqa: E402

RESULTS = Path(__file__).parent / "results"
WORK = RESULTS / ".methods_runs"
ANCHOR = "PEFT LoRA, bitsandbytes NF4 (anchor)"
ADAPTER_LRS = [3e-4, 1e-3, 3e-3]
FEW_PARAM_LRS = [3e-3, 1e-2, 3e-2]
FULL_LRS = [1e-5, 3e-5, 1e-4]
GALORE_LRS = [3e-5, 1e-4, 3e-4]  # GaLore scales its projected update by 0.25
SCALE_LRS = [1e-5, 3e-5, 1e-4]  # PEQA moves quantization scales of ~1e-2 directly
# name -> (finetune options, learning rates). Full-parameter methods set format "none".
METHODS: dict[str, tuple[dict, list[float]]] = {
    ANCHOR: ({}, ADAPTER_LRS),
    "LoRA": ({}, ADAPTER_LRS),
    "rsLoRA": ({"rslora": True}, ADAPTER_LRS),
    "LoRA+ (B lr x16)": ({"loraplus_ratio": 16.0}, ADAPTER_LRS),
    "LoRA, 8-bit AdamW": ({"optimizer": "adamw8bit"}, ADAPTER_LRS),
    "DoRA": ({"variant": "dora"}, ADAPTER_LRS),
    "DyLoRA (nested ranks, eval at r)": ({"variant": "dylora"}, ADAPTER_LRS),
    "PiSSA": ({"init": "pissa"}, ADAPTER_LRS),
    "OLoRA": ({"init": "olora"}, ADAPTER_LRS),
    "NLoRA (Nystrom)": ({"init": "nlora"}, ADAPTER_LRS),
    "LoRA-GA": ({"init": "lora-ga"}, ADAPTER_LRS),
    "LoftQ init": ({"lowrank": "loftq"}, ADAPTER_LRS),
    "LoRA-SB (r x r core)": ({"init": "lora-sb"}, FEW_PARAM_LRS),
    "LoRA-XS (core, SVD of W)": ({"variant": "core"}, FEW_PARAM_LRS),
    "NOLA": ({"variant": "nola"}, FEW_PARAM_LRS),
    "RandLoRA": ({"variant": "randlora"}, FEW_PARAM_LRS),
    "PEQA (INT4 g64 base, scales only)": ({"variant": "peqa", "format": "int", "bits": 4}, SCALE_LRS),
    "L4Q (QAT LoRA, writes INT4 g64)": ({"variant": "l4q", "format": "none"}, ADAPTER_LRS),
    "Full fine-tuning (AdamW, fp32 base)": ({"full": True, "format": "none"}, FULL_LRS),
    "GaLore (fp32 base)": ({"optimizer": "galore", "format": "none"}, GALORE_LRS),
    "8-bit GaLore (fp32 base)": ({"optimizer": "galore", "galore_states": "int8", "format": "none"}, GALORE_LRS),
    "Q-GaLore (int8 weights)": ({"optimizer": "qgalore", "format": "none"}, GALORE_LRS),
    "LISA (2 layers, default: tied embeddings frozen, fp32 base)": ({"optimizer": "lisa", "format": "none"}, FULL_LRS),
    "LISA (2 layers, embeddings trained as in the paper, fp32 base)": ({"optimizer": "lisa", "format": "none", "lisa_embeddings": "train"}, FULL_LRS),
}
FULL = "Full fine-tuning (AdamW, fp32 base)"
GALORES = ("GaLore (fp32 base)", "8-bit GaLore (fp32 base)")
TIGHT = ", --tight-heap"
# the same training as the rows they name (same losses), the heap kept tight, so that peak RSS
# is what the live tensors need; one learning rate each, their twin's best
QGALORE = "Q-GaLore (int8 weights)"
TRIM = ", --trim-heap"  # the same, the heap trimmed after each forward instead
for option, suffix in (("tight_heap", TIGHT), ("trim_heap", TRIM)):
    METHODS.update({name + suffix: ({**METHODS[name][0], option: True}, [lr]) for name, lr in ((FULL, 1e-4), *((g, 3e-4) for g in (*GALORES, QGALORE)))})
PLAIN = "LoRA"
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def finetune_config(options: dict, lr: float, args, out: Path):
    from lorq.cli import leaf_fields
    from lorq.jobs import FinetuneConfig

    cfg = FinetuneConfig(output=str(out))
    settings = {"steps": args.steps, "batch_size": args.batch, "block_size": args.block, "lr": lr, "warmup_steps": args.warmup,
                "eval_every": args.eval_every, "eval_blocks": args.eval_blocks, "save_every": 10**6, "precision": "fp32",
                "seed": 0, "galore_gap": max(1, args.steps // 2), "lisa_period": max(1, args.steps // 5), **options}
    fields = leaf_fields(FinetuneConfig)
    for key, value in settings.items():
        path, _, _ = fields[key]
        target = cfg
        for p in path[:-1]:
            target = getattr(target, p)
        setattr(target, path[-1], value)
    return cfg


def lorq_child(options: dict, lr: float, args, out: Path) -> dict:
    from lorq.jobs import run_finetune

    summary = run_finetune(finetune_config(options, lr, args, out))
    rows = [json.loads(l) for l in (out / "metrics.jsonl").read_text().splitlines()]
    curve = [(r["step"], r["val_loss"]) for r in rows if "val_loss" in r]
    train = [r for r in rows if "loss" in r]
    return {"val_curve": curve, "ppl_before": summary["ppl_before"], "ppl_after": summary["ppl_after"],
            "trainable_parameters": summary["trainable_parameters"],
            "peak_rss_mib": max(r["peak_rss_mb"] for r in train), "peak_optimizer_state_mib": train[-1]["peak_optimizer_state_mb"],
            "step_s": [r["step_s"] for r in train], "tokens_per_step": args.batch * args.block}


def peft_child(lr: float, args) -> dict:
    """The anchor: PEFT LoRA on bitsandbytes NF4, the same batches, schedule and validation."""
    from peft import LoraConfig, get_peft_model

    from lorq.eval.perplexity import perplexity
    from lorq.models.loading import load_tokenizer, resolve_model
    from lorq.train.data import DataConfig, load_blocks
    from lorq.train.loop import TrainConfig, batch_indices, lr_at

    path = resolve_model(None)
    train_blocks, val_blocks = load_blocks(load_tokenizer(path), DataConfig(block_size=args.block))
    val = val_blocks.take(args.eval_blocks)
    torch.manual_seed(0)
    base = bnb_model(path, torch.float32)
    for m in base.modules():
        # bitsandbytes 0.50 on a CPU with AVX512-BF16 repacks a Linear4bit's weight for inference at
        # its first eval forward, and later training forwards backprop through the repacked op
        # (gemv_4bit), which has no autograd kernel: the gradients through the base are silently
        # wrong and the adapter barely learns. Keeping the training layout avoids that.
        if hasattr(m, "support_avx512bf16_for_cpu"):
            m.support_avx512bf16_for_cpu = False
    model = get_peft_model(base, LoraConfig(r=16, lora_alpha=32, lora_dropout=0.05, target_modules=TARGETS))
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)  # lorq's default (torch's is 0.01)
    cfg = TrainConfig(steps=args.steps, lr=lr, warmup_steps=args.warmup)
    before = perplexity(model, val, args.batch)
    curve, seconds, peak = [(0, before["loss"])], [], 0.0
    release_freed_memory()
    reset_peak()  # as lorq's loop does: the peak of training, not of loading
    for step in range(args.steps):
        t0 = time.perf_counter()
        model.train()
        for g in opt.param_groups:
            g["lr"] = lr_at(step, cfg)
        opt.zero_grad(set_to_none=True)
        idx = batch_indices(step, len(train_blocks), args.batch, 0)
        b = train_blocks[idx]  # lorq's default document packing: the same position ids
        model(input_ids=b.input_ids, labels=b.labels, position_ids=b.position_ids, use_cache=False).loss.backward()  # a cache would unmask documents
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        seconds.append(time.perf_counter() - t0)
        peak = max(peak, lifetime_peak_mib())
        if (step + 1) % args.eval_every == 0 or step + 1 == args.steps:
            curve.append((step + 1, perplexity(model, val, args.batch)["loss"]))
    state = sum(t.numel() * t.element_size() for st in opt.state.values() for t in st.values() if torch.is_tensor(t))
    return {"val_curve": curve, "ppl_before": before["ppl"], "ppl_after": math.exp(curve[-1][1]),
            "trainable_parameters": sum(p.numel() for p in params), "peak_rss_mib": peak,
            "peak_optimizer_state_mib": state / 2**20, "step_s": seconds, "tokens_per_step": args.batch * args.block}


def child(args) -> int:
    if args.threads:
        torch.set_num_threads(args.threads)
    options, _ = METHODS[args.child]
    out = Path(args.out)
    result = peft_child(args.lr, args) if args.child == ANCHOR else lorq_child(options, args.lr, args, out)
    result["threads"] = torch.get_num_threads()
    write_json(args.json, result)
    return 0


SETTINGS = ("steps", "batch", "block", "warmup", "eval_every", "eval_blocks")


def run_one(name: str, lr: float, args) -> dict | None:
    slug = "".join(c if c.isalnum() else "_" for c in name)[:40] + f"_lr{lr:g}"
    out, js, log = WORK / slug, WORK / f"{slug}.json", WORK / f"{slug}.log"
    settings = {k: getattr(args, k) for k in SETTINGS}
    cmd = [sys.executable, __file__, "--child", name, "--lr", str(lr), "--out", str(out), "--json", str(js), "--threads", str(args.threads),
           *sum(([f"--{k.replace('_', '-')}", str(getattr(args, k))] for k in SETTINGS), [])]
    t0 = time.perf_counter()
    if args.reuse and js.is_file() and read_json(js).get("settings") == settings:
        code = 0  # measured earlier with the same settings
    elif args.collect:
        return {"lr": lr, "failed": "not run"}
    else:
        with open(log, "w") as f:
            code = subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT).returncode
        for weights in ("model", "checkpoints"):  # never read again: a full-parameter run writes ~2 GiB, a whole sweep ~40
            shutil.rmtree(out / weights, ignore_errors=True)
        if code == 0:
            write_json(js, {**read_json(js), "settings": settings})
    took = time.perf_counter() - t0
    if code != 0:
        tail = log.read_text().strip().splitlines()[-1:] or ["?"]
        print(f"   {name} lr {lr:g}: FAILED ({tail[0][:200]})", flush=True)
        return {"lr": lr, "failed": tail[0][:300]}
    r = read_json(js)
    measured = r["step_s"][1:] or r["step_s"]
    r.pop("settings", None)
    r.update(lr=lr, wall_s=r.get("wall_s", round(took, 1)), tokens_per_s=round(r["tokens_per_step"] * len(measured) / sum(measured), 1),
             final_val_loss=r["val_curve"][-1][1])
    print(f"   {name} lr {lr:g}: val loss {r['final_val_loss']:.4f}, ppl {r['ppl_after']:.2f}, {r['tokens_per_s']:.0f} tok/s, "
          f"peak RSS {r['peak_rss_mib']:.0f} MiB, optimizer state {r['peak_optimizer_state_mib']:.1f} MiB ({took:.0f} s)", flush=True)
    return r


def steps_to_reach(curve: list, target: float) -> int | None:
    return next((s for s, loss in curve if s > 0 and loss <= target), None)


def summarize(rows: list[dict], args) -> dict:
    by = {r["name"]: r for r in rows if r.get("best")}
    plain = by.get(PLAIN)
    untrained_nf4 = plain["best"]["ppl_before"] if plain else None
    targets = {}
    for r in rows:
        b = r.get("best")
        if not b:
            continue
        dense = "format" in METHODS[r["name"]][0]
        r["untrained_ppl"] = b["ppl_before"] if dense or r["name"] == ANCHOR else untrained_nf4
        r["beats_untrained"] = b["ppl_after"] < r["untrained_ppl"]
    run = [r for r in rows if r.get("best")]
    missing = "" if len(run) == len(rows) else f" (of the {len(run)} methods run)"
    targets[f"every method lowers validation perplexity below the untrained model{missing}"] = all(r.get("beats_untrained") for r in run)
    if plain:
        goal, total = plain["best"]["final_val_loss"], args.steps
        for name in ("PiSSA", "LoRA-GA"):
            if name in by:
                reach = steps_to_reach(by[name]["best"]["val_curve"], goal)
                by[name]["steps_to_lora_final"] = reach
                targets[f"{name} reaches plain LoRA's final validation loss in <= 60% of its steps"] = reach is not None and reach <= 0.6 * total
    judged = [(FULL, g, "peak_rss_mib", 0.6, "peak memory", "") for g in GALORES] + \
             [(FULL, "LISA (2 layers, default: tied embeddings frozen, fp32 base)", "peak_optimizer_state_mib", 0.25, "peak optimizer memory", "")] + \
             [(FULL + how, g + how, "peak_rss_mib", 0.6, "peak memory", f", both with{how[1:]}") for how in (TRIM, TIGHT) for g in GALORES]
    for base, name, key, bound, what, how in judged:
        if name in by and base in by:
            ratio = by[name]["best"][key] / by[base]["best"][key]
            by[name][f"{key}_vs_full"] = round(ratio, 3)
            targets[f"{name.split(' (')[0]} {what} <= {bound}x full fine-tuning with AdamW{how}"] = ratio <= bound
    for base, name in ((FULL, QGALORE), (FULL + TRIM, QGALORE + TRIM), (FULL + TIGHT, QGALORE + TIGHT)):  # GaLore with int8 weights: reported beside the target, not judged by it
        if name in by and base in by:
            by[name]["peak_rss_mib_vs_full"] = round(by[name]["best"]["peak_rss_mib"] / by[base]["best"]["peak_rss_mib"], 3)
    return targets


def in_methods_order(rows: list[dict]) -> list[dict]:
    """Rows as METHODS lists them (a row new to the results goes where METHODS has it)."""
    order = {name: i for i, name in enumerate(METHODS)}
    return sorted(rows, key=lambda r: order.get(r["name"], len(order)))


def next_lr(lr: float, up: bool) -> float:
    """The neighbour of lr in the 1-3-10 series the grids use (3e-3 -> 1e-2 up, 1e-3 down)."""
    exp = math.floor(math.log10(lr) + 1e-9)
    one = round(lr / 10**exp) < 2  # mantissa 1 (else 3)
    if up:
        return float(f"3e{exp}") if one else float(f"1e{exp + 1}")
    return float(f"3e{exp - 1}") if one else float(f"1e{exp}")


def beyond(row: dict) -> float | None:
    """The learning rate past the end of those tried where the row's best sits (None: bracketed)."""
    tried = sorted(x["lr"] for x in row["runs"] if "failed" not in x)
    if not row.get("best") or len(tried) < 2:
        return None
    best = row["best"]["lr"]
    return next_lr(best, up=True) if best == tried[-1] else next_lr(best, up=False) if best == tried[0] else None


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=24)
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--block", type=int, default=64)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--eval-every", type=int, default=4)
    p.add_argument("--eval-blocks", type=int, default=8)
    p.add_argument("--lrs", type=int, default=3, help="learning rates per method (the first N of its grid)")
    p.add_argument("--grid-index", type=int, help="run only this learning rate of each method's grid (0, 1 or 2)")
    p.add_argument("--only", help="method names separated by semicolons (default: all)")
    p.add_argument("--update", action="store_true", help="re-measure the --only methods and replace their rows in the existing results (with --grid-index: only that learning rate, the row's other runs kept)")
    p.add_argument("--extend", action="store_true", help="for each method whose best learning rate is the lowest or highest it tried, run the next one beyond it (1-3-10 series), keeping the row's other runs")
    p.add_argument("--reuse", action="store_true", help="reuse runs already measured with the same settings (an interrupted benchmark goes on)")
    p.add_argument("--collect", action="store_true", help="with --reuse: only gather the runs already made; the others are reported as not run")
    p.add_argument("--render", action="store_true", help="only rewrite methods.md and methods.png from methods.json (nothing is run)")
    p.add_argument("--jobs", type=int, default=1, help="runs at a time (each with --threads torch threads)")
    p.add_argument("--threads", type=int, default=0, help="torch threads per run (0: torch's default)")
    p.add_argument("--child", help=argparse.SUPPRESS)
    p.add_argument("--lr", type=float, help=argparse.SUPPRESS)
    p.add_argument("--out", help=argparse.SUPPRESS)
    p.add_argument("--json", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.child:
        return child(args)
    if args.render:
        result = read_json(RESULTS / "methods.json")
        result["rows"] = in_methods_order(result["rows"])
        result["targets"] = summarize(result["rows"], argparse.Namespace(**result["settings"]))
        write_json(RESULTS / "methods.json", result)
        atomic_write_text(RESULTS / "methods.md", markdown(result))
        plot(result["rows"], RESULTS / "methods.png")
        return 0
    names = [n for n in METHODS if not args.only or n in args.only.split(";")]
    WORK.mkdir(parents=True, exist_ok=True)
    info, start, rows = machine(), time.perf_counter(), []
    previous = read_json(RESULTS / "methods.json") if args.update or args.extend else None
    from concurrent.futures import ThreadPoolExecutor

    def lrs_of(name: str) -> list[float]:
        """The grid's first --lrs; re-measuring a row (--update) also repeats the rates its sweep was extended to."""
        grid = METHODS[name][1][: args.lrs]
        if not args.update or args.grid_index is not None:
            return grid
        tried = [x["lr"] for r in (previous or {}).get("rows", []) if r["name"] == name for x in r["runs"] if x.get("failed") != "not run"]
        return sorted(set(grid) | set(tried))

    jobs = [(name, lr) for name in names for i, lr in enumerate(lrs_of(name)) if args.grid_index in (None, i)]
    if args.extend:
        edge = {r["name"]: beyond(r) for r in previous["rows"]}
        names = [n for n in names if edge.get(n) is not None]
        jobs = [(n, edge[n]) for n in names]
        print("extending: " + "; ".join(f"{n} lr {lr:g}" for n, lr in jobs), flush=True)
    with ThreadPoolExecutor(max_workers=max(1, args.jobs)) as pool:  # each run is its own process
        done = dict(zip(jobs, pool.map(lambda job: run_one(*job, args), jobs)))
    for name in names:
        options, lrs = METHODS[name]
        runs = [done[(name, lr)] for lr in lrs_of(name) if (name, lr) in done]
        if args.extend:
            runs = [done[j] for j in jobs if j[0] == name]
        if previous and (args.grid_index is not None or args.extend):  # one learning rate more: keep the row's others
            kept = {x["lr"]: x for r in previous["rows"] if r["name"] == name for x in r["runs"] if x.get("failed") != "not run"}
            runs = sorted([*runs, *(x for lr, x in kept.items() if (name, lr) not in done)], key=lambda x: x["lr"])
        ok = [r for r in runs if "failed" not in r]
        best = min(ok, key=lambda r: r["final_val_loss"]) if ok else None
        old = next((r for r in (previous or {}).get("rows", []) if r["name"] == name), {})
        mark = ({} if not previous or not old else {"extended": info["date"]} if args.extend else  # a new row: first measured
                {"filled_in": info["date"]} if args.grid_index is not None else {"remeasured": info["date"]})
        keep = {k: old[k] for k in ("remeasured", "filled_in", "extended", "renamed") if k in old and args.extend}
        if args.update and args.grid_index is None:  # every rate the row had, measured again
            keep = {k: old[k] for k in ("extended", "renamed") if k in old}
        rows.append({"name": name, "options": options, "runs": runs, "best": best, **keep, **mark})
    if previous:  # the other rows as they were measured
        fresh = {r["name"]: r for r in rows}
        rows = in_methods_order([fresh.pop(r["name"], r) for r in previous["rows"]] + list(fresh.values()))
        info = previous["machine"]
    result = {"machine": info, "seconds": round(time.perf_counter() - start + (previous or {}).get("seconds", 0), 1),
              "settings": {k: getattr(args, k) for k in (*SETTINGS, "lrs", "jobs")}
              | {"rank": 16, "alpha": 32, "targets": "all decoder linears", "seed": 0}, "rows": rows,
              "notes": (previous or {}).get("notes", [])}  # dated remarks on rows kept from earlier runs
    result["targets"] = summarize(rows, args)
    RESULTS.mkdir(exist_ok=True)
    write_json(RESULTS / "methods.json", result)
    atomic_write_text(RESULTS / "methods.md", markdown(result))
    plot(rows, RESULTS / "methods.png")
    print(markdown(result))
    return 0


def markdown(result) -> str:
    m, s = result["machine"], result["settings"]
    lines = [
        "# Adapter methods and optimizers, one budget", "",
        f"{m['cpu']}, {m['cores']} cores, torch {m['torch']}, transformers {m['transformers']}, bitsandbytes {m['bitsandbytes']}; {m['date']}. "
        f"Embedded SmolLM2-135M-Instruct, embedded CPython-docs task; {s['steps']} steps x {s['batch']} blocks x {s['block']} tokens, "
        f"{s['warmup']} warm-up steps then cosine, seed 0, validation loss on {s['eval_blocks']} blocks every {s['eval_every']} steps; "
        f"rank {s['rank']}, alpha {s['alpha']}, {s['targets']}; {s['lrs']} learning rates per method, the best final validation loss kept. "
        f"Adapter methods on lorq NF4 (double quant); full-parameter methods on the fp32 base. The training steps of all runs took "
        f"{sum(sum(x.get('step_s', [])) for r in result['rows'] for x in r['runs']) / 60:.0f} min in all (plus loading and validation).", "",
        "| method | best lr | val loss | val ppl | untrained ppl | trainable params | peak RSS MiB | optimizer state MiB | tokens/s | lrs tried (final val loss) |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in result["rows"]:
        b = r["best"]
        tried = ", ".join(f"{x['lr']:g} ({x['final_val_loss']:.3f})" if "failed" not in x else f"{x['lr']:g} ({x['failed'][:40]})" for x in r["runs"])
        if not b:
            what = "not run" if all(x.get("failed") == "not run" for x in r["runs"]) else "failed"
            lines.append(f"| {r['name']} | - | {what} | | | | | | | {tried} |")
            continue
        notes = ([f"re-measured {r['remeasured']}"] if r.get("remeasured") else []) + \
                ([f"learning rates added {r['filled_in']}"] if r.get("filled_in") else []) + \
                ([f"sweep extended {r['extended']}"] if r.get("extended") else []) + \
                ([f"renamed {r['renamed']['date']}"] if r.get("renamed") else [])
        name = f"{r['name']} ({'; '.join(notes)})" if notes else r["name"]
        lines.append(f"| {name} | {b['lr']:g} | {b['final_val_loss']:.4f} | {b['ppl_after']:.2f} | {r.get('untrained_ppl', 0):.2f} | "
                     f"{b['trainable_parameters']:,} | {b['peak_rss_mib']:.0f} | {b['peak_optimizer_state_mib']:.1f} | {b['tokens_per_s']:.0f}{'*' if b.get('threads') == 1 else ''} | {tried} |")
    by = {r["name"]: r for r in result["rows"] if r["best"]}
    extra = []
    if PLAIN in by and ANCHOR in by:
        a, b = by[ANCHOR]["best"], by[PLAIN]["best"]
        extra.append(f"- lorq LoRA against the anchor (same rank, targets, batches, schedule, best of the learning rates tried each): validation loss "
                     f"{b['final_val_loss']:.4f} vs {a['final_val_loss']:.4f}, perplexity {b['ppl_after']:.2f} vs {a['ppl_after']:.2f}, "
                     f"peak RSS {b['peak_rss_mib']:.0f} vs {a['peak_rss_mib']:.0f} MiB"
                     + (f", tokens/s {b['tokens_per_s']:.0f} vs {a['tokens_per_s']:.0f}" if a.get("threads") == b.get("threads") else
                        " (their tokens/s were measured with different thread counts: not compared)"))
    extra += [f"- {r['name']}: reaches plain LoRA's final validation loss at step {r['steps_to_lora_final']} of {s['steps']}"
             if r.get("steps_to_lora_final") else f"- {r['name']}: does not reach plain LoRA's final validation loss within {s['steps']} steps"
             for r in result["rows"] if "steps_to_lora_final" in r]
    extra += [f"- {r['name']}: {k.replace('_mib_vs_full', '').replace('_', ' ')} = {v}x full fine-tuning"
              + next((how for how in (TIGHT, TRIM) if r["name"].endswith(how)), "") for r in result["rows"] for k, v in r.items() if k.endswith("_vs_full")]
    if any(r["best"] and r["best"].get("threads") == 1 for r in result["rows"]):
        extra.append("- tokens/s marked * come from runs made two at a time with one torch thread each (the others ran alone with two): "
                     "compare them with each other, not with the unmarked ones")
    if any(r.get("remeasured") for r in result["rows"]):
        extra.append("- rows marked \"re-measured\": every learning rate of their grid measured again on that date with the code of "
                     "that date (`--update`), after a change to the method or to bring the row to the current code and machine")
    if any(r.get("filled_in") for r in result["rows"]):
        extra.append("- rows marked \"learning rates added\": the learning rates missing from the first run were measured on that date "
                     "with the code of that date (`--update --grid-index`); the row's other runs are the original ones")
    if any(r.get("extended") for r in result["rows"]):
        extra.append("- rows marked \"sweep extended\": their best learning rate was the lowest or highest of their grid, so the next "
                     "one beyond it (1-3-10 series) was measured on that date with the code of that date (`--extend`); the best of all "
                     "the learning rates tried is reported")
    extra += [f"- row renamed on {r['renamed']['date']}: {r['renamed']['why']}; its runs are those measured under its former "
              f"name, {r['renamed']['from']!r}, with the same configuration" for r in result["rows"] if r.get("renamed")]
    extra += [f"- {note}" for note in result.get("notes", [])]
    lines += ["", *extra, "", "Targets:", ""] + [f"- {k}: **{'met' if v else 'NOT met'}**" for k, v in result["targets"].items()]
    return "\n".join(lines) + "\n"


def plot(rows, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(11, 6))
    for r in rows:
        if r["best"]:
            steps, losses = zip(*r["best"]["val_curve"])
            ax.plot(steps, losses, marker="o", ms=3, lw=2.5 if r["name"] in (ANCHOR, PLAIN) else 1.1,
                    ls="--" if "fp32 base" in r["name"] else "-", label=f"{r['name']} (lr {r['best']['lr']:g})")
    ax.set_xlabel("step")
    ax.set_ylabel("validation loss (best learning rate)")
    ax.legend(fontsize=7, ncol=2)
    ax.set_title("SmolLM2-135M on the embedded task: every method, one budget")
    save_figure(fig, path)


if __name__ == "__main__":
    sys.exit(main())
