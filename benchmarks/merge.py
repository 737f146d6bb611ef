"""Merging an adapter into its base, dense and quantized, and GGUF export, against PEFT.

One run, on the embedded model and one QLoRA adapter (trained here with `lorq finetune`'s
defaults unless --adapter is given), measures:
  - dense merge: `lorq merge` (streaming) vs PEFT's merge_and_unload + save_pretrained
    (anchor): logits against base + unmerged adapter, time, peak memory, size;
  - quantized (NF4) merge: `lorq merge --requant naive|lorc|loftq|fold` (loftq also at half
    the rank) vs PEFT's merge_and_unload on a bitsandbytes NF4 base (anchor: dequantize, add,
    re-quantize): perplexity of base + unmerged adapter vs the merged model;
  - GGUF export of the dense merge as F16 and Q8_0, read back by transformers;
every merge in its own process, its peak resident memory measured from its start (Linux's
reset high-water mark), compared with the bound final model + one shard + adapter.
Writes benchmarks/results/merge.{json,md,png}.

    .venv/bin/python benchmarks/merge.py                          # about 25 minutes on 2 cores
    .venv/bin/python benchmarks/merge.py --adapter runs/finetune/adapter   # reuse an adapter
    .venv/bin/python benchmarks/merge.py --quick                  # 4 eval blocks, 3 training steps
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from quantization import bnb_bits_per_weight, bnb_model, fmt, machine  # noqa: E402

from lorq.eval.memory import PeakRSS  # noqa: E402
from lorq.eval.perplexity import perplexity  # noqa: E402
from lorq.io import atomic_write_text, read_json, save_figure, write_json  # noqa: E402
from lorq.models.loading import load_tokenizer, resolve_model  # noqa: E402
from lorq.train.data import DataConfig, eval_blocks  # noqa: E402

RESULTS = Path(__file__).parent / "results"
WORK = RESULTS / ".merge_runs"
QUANT_RUNS = [("naive", []), ("lorc", []), ("loftq", []), ("loftq", ["--merge-rank", "8"]), ("fold", [])]


def lorq(*args) -> None:
    subprocess.run([sys.executable, "-m", "lorq", *map(str, args)], check=True)


def train_adapter(steps: int) -> Path:
    out = WORK / f"finetune-{steps}"
    if not (out / "adapter" / "adapter_config.json").is_file():
        lorq("finetune", "--output", out, "--steps", steps)
    return out / "adapter"


def merge_row(name: str, adapter: Path, blocks: int, *extra) -> dict:
    out = WORK / name.replace(" ", "_")
    lorq("merge", "--adapter", adapter, "--output", out, "--eval-blocks", blocks, "--no-compare-naive", *extra)
    return {"name": name, "tool": "lorq", **read_json(out / "merge_report.json")}


def val_blocks(n: int):
    return eval_blocks(load_tokenizer(resolve_model(None)), DataConfig()).take(n)


def child(args) -> int:
    """One PEFT anchor in this (fresh) process; writes its row to --json."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    path = resolve_model(None)
    val = val_blocks(args.eval_blocks)
    probe = val.input_ids[:1]
    start = time.perf_counter()
    if args.child == "peft-dense":  # load, merge and save: the whole model in memory, as PEFT works
        with PeakRSS() as mem:
            model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32), args.adapter).eval()
            merged = model.merge_and_unload()
            merged.save_pretrained(args.out)
        seconds = time.perf_counter() - start
        reference = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32), args.adapter).eval()
        with torch.no_grad():
            diff = (merged(input_ids=probe).logits - reference(input_ids=probe).logits).abs().max().item()
        size = sum(f.stat().st_size for f in Path(args.out).iterdir()) / 2**20
        row = {"kind": "dense", "seconds": round(seconds, 2), "memory": mem.to_json(), "size_on_disk_mib": round(size, 2),
               "max_abs_logit_diff": diff, "ppl_merged": round(perplexity(merged, val)["ppl"], 4)}
    else:  # peft-bnb: dequantize, add, re-quantize inside bitsandbytes' Linear4bit (in memory; no streaming)
        with PeakRSS() as load:
            model = PeftModel.from_pretrained(bnb_model(path, torch.float32), args.adapter).eval()
        unmerged = perplexity(model, val)["ppl"]
        start = time.perf_counter()
        with PeakRSS() as mem:
            merged = model.merge_and_unload()
        seconds = time.perf_counter() - start
        memory = {**mem.to_json(), "phase_peak_mib": round(load.phase_mib + mem.phase_mib, 1), "note": "load + merge phases"}
        row = {"kind": "quantized", "requant": "naive (bitsandbytes)", "seconds": round(seconds, 2), "memory": memory,
               "bits_per_weight": round(bnb_bits_per_weight(merged), 4), "ppl_unmerged": round(unmerged, 4),
               "ppl_merged": round(perplexity(merged, val)["ppl"], 4)}
        row["ppl_change_pct"] = round(100 * (row["ppl_merged"] / row["ppl_unmerged"] - 1), 3)
    write_json(args.json, row)
    return 0


def peft_row(name: str, which: str, adapter: Path, blocks: int) -> dict:
    out = WORK / name.replace(" ", "_")
    subprocess.run([sys.executable, __file__, "--child", which, "--adapter", str(adapter), "--out", str(out),
                    "--json", str(out) + ".json", "--eval-blocks", str(blocks)], check=True)
    return {"name": name, "tool": "peft", **read_json(str(out) + ".json")}


def gguf_rows(dense_dir: Path, blocks: int) -> list[dict]:
    from lorq.merge import ExportConfig, export_gguf
    from lorq.merge.gguf import load_gguf

    val = val_blocks(blocks)
    rows = []
    for outtype in ("f16", "q8_0"):
        out = WORK / f"merged-{outtype}.gguf"
        summary = export_gguf(ExportConfig(model=str(dense_dir), output=str(out), outtype=outtype))
        summary["ppl_gguf"] = round(perplexity(load_gguf(out), val)["ppl"], 4)
        rows.append({"name": f"GGUF {outtype} of the dense merge", **summary})
    return rows


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--adapter", type=Path, help="PEFT adapter of the embedded model (default: train one)")
    p.add_argument("--steps", type=int, default=20, help="training steps when the adapter is trained here")
    p.add_argument("--eval-blocks", type=int, default=16)
    p.add_argument("--quick", action="store_true")
    p.add_argument("--child", choices=["peft-dense", "peft-bnb"], help=argparse.SUPPRESS)
    p.add_argument("--out", type=Path, help=argparse.SUPPRESS)
    p.add_argument("--json", type=Path, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.child:
        return child(args)
    if args.quick:
        args.steps, args.eval_blocks = min(args.steps, 3), min(args.eval_blocks, 4)
    WORK.mkdir(parents=True, exist_ok=True)
    info, start = machine(), time.perf_counter()
    adapter = args.adapter or train_adapter(args.steps)
    n = args.eval_blocks
    rows = [merge_row("lorq dense", adapter, n), peft_row("PEFT merge_and_unload, dense (anchor)", "peft-dense", adapter, n)]
    rows += [merge_row(f"lorq nf4 {rq}{' r8' if extra else ''}", adapter, n, "--format", "nf", "--requant", rq, *extra) for rq, extra in QUANT_RUNS]
    rows.append(peft_row("PEFT + bitsandbytes nf4 merge (anchor)", "peft-bnb", adapter, n))
    rows += gguf_rows(WORK / "lorq_dense", n)
    shown = os.path.relpath(adapter) if not str(os.path.relpath(adapter)).startswith("..") else str(adapter)
    result = {"machine": info, "settings": {"adapter": shown, "steps": args.steps, "eval_blocks": n, "block_size": 256},
              "seconds": round(time.perf_counter() - start, 1), "rows": rows}
    result["targets"] = targets(rows)
    RESULTS.mkdir(exist_ok=True)
    write_json(RESULTS / "merge.json", result)
    atomic_write_text(RESULTS / "merge.md", markdown(result))
    plot(rows, RESULTS / "merge.png")
    print(markdown(result))
    return 0


def by_name(rows, name):
    return next(r for r in rows if r["name"] == name)


def targets(rows) -> dict:
    loftq, dense = by_name(rows, "lorq nf4 loftq"), by_name(rows, "lorq dense")
    merges = [r for r in rows if r.get("tool") == "lorq"]
    return {
        "quantized merge within 1% of base + unmerged adapter": abs(loftq["ppl_change_pct"]) <= 1.0,
        "dense merge matches unmerged logits within fp32 rounding (max |Δlogit| <= 1e-3)": dense["max_abs_logit_diff"] <= 1e-3,
        "peak memory <= final model + one shard + adapter (every lorq merge)": all(r["memory"]["phase_peak_mib"] <= r["memory_bound_mib"] for r in merges),
    }


def markdown(result) -> str:
    m, rows = result["machine"], result["rows"]
    lines = [
        "# Merge and export", "",
        f"{m['cpu']}, {m['cores']} cores, torch {m['torch']}, transformers {m['transformers']}, bitsandbytes {m['bitsandbytes']}; {m['date']}. "
        f"Embedded SmolLM2-135M-Instruct, adapter {result['settings']['adapter']} (LoRA r16 on all 210 decoder linears, trained on the NF4 base); "
        f"perplexity on {result['settings']['eval_blocks']} validation blocks of 256 tokens. Peak memory: the merge's own rise in resident memory "
        f"(phase peak); bound = final model on disk + largest shard + adapter. Whole run {result['seconds'] / 60:.1f} min.", "",
        "| merge | bits/weight | ppl unmerged | ppl merged | change | max abs Δlogit | time s | peak MiB | bound MiB | size MiB |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        if "memory" not in r:
            continue
        change = f"{r['ppl_change_pct']:+.2f}%" if "ppl_change_pct" in r else ""
        lines.append(f"| {r['name']} | {fmt(r.get('bits_per_weight'))} | {fmt(r.get('ppl_unmerged'))} | {fmt(r.get('ppl_merged'))} | {change} | "
                     f"{fmt(r.get('max_abs_logit_diff'), '.2e')} | {r['seconds']:.1f} | {r['memory']['phase_peak_mib']:.0f} | "
                     f"{fmt(r.get('memory_bound_mib'), '.0f')} | {fmt(r.get('size_on_disk_mib'), '.1f')} |")
    lines += ["", "| GGUF export | size MiB | time s | max abs Δlogit vs source | ppl (read back by transformers) |", "|---|---|---|---|---|"]
    for r in rows:
        if "outtype" in r:
            lines.append(f"| {r['name']} | {r['size_mib']:.1f} | {r['seconds']:.1f} | {r['max_abs_logit_diff']:.2e} | {r['ppl_gguf']:.3f} |")
    lines += ["", "Targets:", ""] + [f"- {k}: **{'met' if v else 'NOT met'}**" for k, v in result["targets"].items()]
    return "\n".join(lines) + "\n"


def plot(rows, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    merges = [r for r in rows if "memory" in r]
    fig, (a, b) = plt.subplots(1, 2, figsize=(13, 4.8))
    names = [r["name"] for r in merges]
    y = range(len(merges))
    a.barh(y, [r.get("ppl_merged") or 0 for r in merges], color=["tab:gray" if r["tool"] == "peft" else "tab:blue" for r in merges])
    ref = [(i, r["ppl_unmerged"]) for i, r in zip(y, merges) if r.get("ppl_unmerged")]
    a.scatter([v for _, v in ref], [i for i, _ in ref], marker="|", s=300, color="tab:green", label="base + unmerged adapter")
    a.legend(loc="lower right", fontsize=8)
    a.set_xlim(left=min(r["ppl_unmerged"] for r in merges if r.get("ppl_unmerged")) * 0.8)
    a.set_yticks(list(y), names, fontsize=8)
    a.invert_yaxis()
    a.set_xlabel("validation perplexity of the merged model (lower is better)")
    b.barh(y, [r["memory"]["phase_peak_mib"] for r in merges], color="tab:orange", label="peak memory of the merge")
    bounds = [(i, r["memory_bound_mib"]) for i, r in zip(y, merges) if r.get("memory_bound_mib")]
    b.scatter([v for _, v in bounds], [i for i, _ in bounds], marker="|", s=300, color="k", label="bound: model + shard + adapter")
    b.set_yticks(list(y), [""] * len(merges))
    b.invert_yaxis()
    b.set_xlabel("MiB")
    b.legend(loc="lower right", fontsize=8)
    fig.suptitle("Merging a QLoRA adapter into SmolLM2-135M (dense and NF4), lorq vs PEFT")
    save_figure(fig, path)


if __name__ == "__main__":
    sys.exit(main())
