"""Low-rank + quantized decompositions and bit budgets on the embedded model, against bitsandbytes NF4.

One run measures, on the same validation data:
  - fp32 (reference) and bitsandbytes NF4 + double quantization (the anchor line);
  - RTN / HQQ / GPTQ alone at 2, 3 and 4 bits;
  - low-rank compensation (LoRC, QPiSSA, LoftQ, LQ-LoRA, Fisher-weighted LQ-LoRA, EoRA) at
    rank 8 on RTN's 3-bit codes, rank 16 on 2-bit codes, and EoRA on GPTQ;
  - mixed precision from the ILP bit budget (2.25 to 4.25 bits/weight, Fisher-weighted error),
    alone and with EoRA or Fisher-weighted LQ-LoRA factors, and from layer-wise importance;
  - fine-tuning: QLoRA (NF4 base + LoRA r16) against LQ-LoRA (an ILP-allocated <= 3.0-bit base
    with Fisher-weighted LQ-LoRA factors of rank 16 that initialize the LoRA), same data, steps,
    seed and learning rate;
and writes benchmarks/results/lowrank.{json,md,png} (+ lowrank_finetune.png).

    .venv/bin/python benchmarks/lowrank.py             # everything (about 1.5 h on 2 cores)
    .venv/bin/python benchmarks/lowrank.py --quick     # a few rows and a short fine-tune
    .venv/bin/python benchmarks/lowrank.py --resume    # continue an interrupted run (or add missing rows)
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm.auto import tqdm

sys.path.insert(0, str(Path(__file__).parent))
from quantization import bnb_bits_per_weight, bnb_model, fmt, machine  # noqa: E402  (shared anchor helpers)

from lorq.eval import perplexity  # noqa: E402
from lorq.io import atomic_write_text, save_figure, write_json  # noqa: E402
from lorq.jobs import FinetuneConfig, calibration_ids, run_finetune  # noqa: E402
from lorq.models.loading import load_model, resolve_model  # noqa: E402
from lorq.quant import DECODER_LINEARS, FormatConfig, MethodConfig, QuantFormat, QuantMethod, Rule, quantize_model  # noqa: E402
from lorq.quant.budget import Allocation, BudgetConfig, allocate  # noqa: E402
from lorq.quant.linear import match_modules  # noqa: E402
from lorq.quant.fisher import fisher_weights  # noqa: E402
from lorq.quant.lowrank import LowRankMethod  # noqa: E402
from lorq.train.data import DataConfig, eval_blocks  # noqa: E402
from lorq.train.loop import TrainConfig  # noqa: E402

RESULTS = Path(__file__).parent / "results"
ANCHOR = "bitsandbytes nf4 + double quant (anchor)"
FORMAT_OF = {QuantMethod.RTN: QuantFormat.NF, QuantMethod.HQQ: QuantFormat.INT, QuantMethod.GPTQ: QuantFormat.NF}
LOWRANK = [LowRankMethod.LORC, LowRankMethod.QPISSA, LowRankMethod.LOFTQ, LowRankMethod.LQ_LORA, LowRankMethod.EORA]


@dataclass(frozen=True)
class Spec:
    method: QuantMethod
    bits: int
    lowrank: LowRankMethod = LowRankMethod.NONE
    rank: int = 0
    fisher: bool = False
    budget: float | None = None
    allocation: Allocation = Allocation.ILP
    budget_ranks: tuple[int, ...] = ()

    @property
    def iters(self) -> int:
        return 2 if self.method is QuantMethod.GPTQ else 5  # each GPTQ alternation re-runs GPTQ on every matrix

    @property
    def series(self) -> str:
        lowrank = f" + {self.lowrank.value}{' (fisher)' if self.fisher else ''}" if self.rank else ""
        return (f"{self.allocation.value} {self.method.value}" if self.budget is not None else self.method.value) + lowrank

    @property
    def name(self) -> str:
        if self.budget is not None:
            return f"{self.series} @ {self.budget:.2f} bits"
        fmt = FORMAT_OF[self.method].value
        return f"{self.series} {fmt}{self.bits} g64" + (f" r{self.rank}" if self.rank else "")


def grid(quick: bool) -> list[Spec]:
    R, H, G = QuantMethod.RTN, QuantMethod.HQQ, QuantMethod.GPTQ
    if quick:
        return [Spec(R, 3), Spec(R, 3, LowRankMethod.LQ_LORA, 8), Spec(R, 3, budget=3.25)]
    specs = [Spec(m, b) for m in (R, H) for b in (2, 3, 4)] + [Spec(G, b) for b in (3, 4)]  # gptq nf2 diverges (quantization.md)
    specs += [Spec(R, 3, lr, 8) for lr in LOWRANK] + [Spec(R, 3, LowRankMethod.LQ_LORA, 8, fisher=True)]
    specs += [Spec(R, 2, lr, 16) for lr in (LowRankMethod.LORC, LowRankMethod.LQ_LORA, LowRankMethod.EORA)]
    specs += [Spec(G, 3, LowRankMethod.EORA, 8)]
    specs += [Spec(R, 3, budget=b) for b in (2.25, 2.75, 3.25, 4.25)]
    specs += [Spec(R, 3, LowRankMethod.EORA, 8, budget=b, budget_ranks=(0, 8)) for b in (2.25, 2.75, 3.25)]
    specs += [Spec(R, 3, LowRankMethod.LQ_LORA, 8, fisher=True, budget=3.25, budget_ranks=(0, 8))]
    specs += [Spec(R, 3, budget=3.25, allocation=Allocation.LAYERWISE)]
    specs += [Spec(G, 3, budget=3.25), Spec(G, 3, LowRankMethod.EORA, 8, budget=3.25, budget_ranks=(0, 8))]
    return specs


class Bench:
    def __init__(self, args):
        self.args = args
        self.base, self.tok, self.path = load_model(None)
        self.val = eval_blocks(self.tok, DataConfig(block_size=args.block_size)).take(args.eval_blocks or None)
        self.calib = calibration_ids(self.tok, MethodConfig(calib_samples=args.calib_samples))
        self._fisher = None

    def fisher(self) -> dict:
        """Fisher row/column weights of every decoder linear of the dense model (computed once)."""
        if self._fisher is None:
            names = match_modules(self.base, [DECODER_LINEARS], (torch.nn.Linear,))
            self._fisher = fisher_weights(self.base, names, self.calib)
        return self._fisher

    def run(self, spec: Spec) -> dict:
        model = copy.deepcopy(self.base)
        quant = FormatConfig(FORMAT_OF[spec.method], spec.bits, 64).validate()
        mcfg = MethodConfig(method=spec.method, act_order=spec.method is QuantMethod.GPTQ, calib_samples=self.args.calib_samples,
                            lowrank=spec.lowrank, lowrank_iters=spec.iters, fisher=spec.fisher)
        rules = [Rule(DECODER_LINEARS, quant, spec.method, spec.lowrank, spec.rank)]
        start, plan = time.perf_counter(), None
        if spec.budget is not None:
            bcfg = BudgetConfig(budget_bits=spec.budget, allocation=spec.allocation, budget_weighting="fisher", budget_ranks=list(spec.budget_ranks))
            plan = allocate(model, rules, bcfg, spec.rank, self.calib, self.fisher(), progress=False)
            rules = plan.rules + rules
        report = quantize_model(model, rules, mcfg, self.calib, progress=False, fisher=self.fisher() if spec.fisher else None)
        seconds = time.perf_counter() - start
        row = {"name": spec.name, "series": spec.series, "bits_per_weight": report.bits_per_weight, "relative_error": report.rel_error,
               "seconds": seconds, "ppl": perplexity(model, self.val)["ppl"], "formats": report.summary()["formats"]}
        if plan is not None:
            row.update(ilp_solve_s=plan.solve_seconds, plan_s=plan.seconds, plan_table=plan.table())
        return row


def finetune_phase(args, out_dir: Path, done: dict | None = None) -> dict:
    """QLoRA against LQ-LoRA fine-tuning, same data/steps/seed/lr, through `lorq finetune`
    (runs already in `done` are kept)."""
    train = dict(steps=args.finetune_steps, batch_size=args.finetune_batch, lr=args.finetune_lr, eval_every=max(args.finetune_steps // 4, 1),
                 save_every=args.finetune_steps, eval_blocks=0, seed=0, precision="fp32")
    runs = {
        "qlora nf4 + lora r16": FinetuneConfig(output=str(out_dir / "qlora"), quant=FormatConfig("nf", 4, 64), train=TrainConfig(**train)),
        f"lq-lora @ {args.finetune_bits} bits + r16 init": FinetuneConfig(
            output=str(out_dir / "lq-lora"), quant=FormatConfig("nf", 3, 64),
            method=MethodConfig(lowrank="lq-lora", fisher=True, calib_samples=args.calib_samples),
            budget=BudgetConfig(budget_bits=args.finetune_bits, budget_weighting="fisher"), train=TrainConfig(**train)),
        f"lq-lora (gptq codes) @ {args.finetune_bits} bits + r16 init": FinetuneConfig(
            output=str(out_dir / "lq-lora-gptq"), quant=FormatConfig("nf", 3, 64),
            method=MethodConfig(method="gptq", act_order=True, lowrank="lq-lora", lowrank_iters=2, fisher=True, calib_samples=args.calib_samples),
            budget=BudgetConfig(budget_bits=args.finetune_bits, budget_weighting="fisher"), train=TrainConfig(**train)),
    }
    result = dict((done or {}).get("runs", {}))
    for name, cfg in runs.items():
        if name in result:
            continue
        s = run_finetune(cfg)
        curve = [json.loads(line) for line in (Path(cfg.output) / "metrics.jsonl").read_text().splitlines()]
        result[name] = {"base_bits_per_weight": s["quantization"]["bits_per_weight"], "trainable_parameters": s["trainable_parameters"],
                        "ppl_before": s["ppl_before"], "ppl_after": s["ppl_after"], "seconds": s["seconds"],
                        "val_curve": [(m["step"], m["val_loss"]) for m in curve if "val_loss" in m],
                        "train_curve": [(m["step"], m["loss"]) for m in curve if "loss" in m]}
    return {"steps": args.finetune_steps, "lr": args.finetune_lr, "batch": f"{args.finetune_batch} x 256 tokens", "runs": result}


def targets(rows, ref, anchor, ft) -> dict:
    t = {}
    cheap = [r for r in rows if r.get("series") and r["bits_per_weight"] <= 3.25 + 1e-9]
    if cheap:
        best = min(cheap, key=lambda r: r["ppl"])
        t["training_free_le_3.25_bits"] = {"config": best["name"], "bits": best["bits_per_weight"], "ppl": best["ppl"],
                                           "limit": 1.5 * anchor["ppl"], "met": best["ppl"] <= 1.5 * anchor["ppl"]}
    solves = [r["ilp_solve_s"] for r in rows if "ilp_solve_s" in r and r["series"].startswith("ilp")]
    if solves:
        plans = [r["plan_s"] for r in rows if "plan_s" in r and r["series"].startswith("ilp")]
        t["ilp_210_matrices_seconds"] = {"solve_max": max(solves), "with_error_table_max": max(plans), "limit": 30, "met": max(solves) < 30}
    if ft:
        q = next(r for n, r in ft["runs"].items() if n.startswith("qlora"))
        ln, lq = min(((n, r) for n, r in ft["runs"].items() if n.startswith("lq-lora")), key=lambda nr: nr[1]["ppl_after"])
        t["lq_lora_finetune_le_qlora"] = {"qlora_ppl": q["ppl_after"], "best_lq_lora": ln, "lq_lora_ppl": lq["ppl_after"],
                                          "lq_lora_base_bits": lq["base_bits_per_weight"], "met": lq["ppl_after"] <= q["ppl_after"]}
    lows = [r for r in rows if r.get("series") and r["bits_per_weight"] <= 2.3]
    t["curve_reaches_2.25_bits"] = {"rows_at_or_below_2.3_bits": len(lows), "met": bool(lows)}
    return t


def breaking_points(rows, anchor) -> list[str]:
    """Per series: the fewest bits at which perplexity stays within 2x the anchor."""
    out = []
    for series in sorted({r["series"] for r in rows if r.get("series")}):
        pts = sorted((r["bits_per_weight"], r["ppl"]) for r in rows if r.get("series") == series)
        ok = [b for b, p in pts if p <= 2 * anchor["ppl"]]
        out.append(f"- {series}: " + (f"within 2x of bitsandbytes NF4 down to {min(ok):.2f} bits/weight" if ok else "never within 2x of bitsandbytes NF4")
                   + "; measured " + ", ".join(f"{b:.2f} bits -> {p:.1f}" for b, p in pts))
    return out


def markdown(result) -> str:
    m, a = result["machine"], result["settings"]
    rows, anchor = result["rows"], result["rows"][1]
    lines = [
        "# Low-rank + quantized decompositions and bit budgets (SmolLM2-135M-Instruct, embedded)", "",
        f"Machine: {m['cpu']}, {m['cores']} cores, CPU capability {m['cpu_capability']}; torch {m['torch']}, "
        f"transformers {m['transformers']}, bitsandbytes {m['bitsandbytes']}; {m['date']}.", "",
        f"Perplexity: fp32 compute on {a['eval_tokens']} validation tokens of the pydoc corpus ({a['eval_blocks']} blocks of {a['block_size']}: "
        "the whole embedded validation split). Bits/weight count everything of the 210 decoder linear matrices: codes, scales, zeros, "
        "double-quantized absmax and the fp16 low-rank factors. Calibration (GPTQ, EoRA, Fisher): "
        f"{a['calib_samples']} sequences of 512 tokens from the training split. All groups are 64; GPTQ uses act-order; LoftQ/LQ-LoRA "
        "alternate 5 times with RTN/HQQ and 2 times with GPTQ. Budgets: ILP over nf2/nf3/nf4 (and the listed ranks) minimizing the "
        "Fisher-weighted error; seconds include the error table, the allocation and the quantization.", "",
        "| configuration | bits/weight | perplexity | vs bnb NF4 | seconds |", "|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(f"| {r['name']} | {fmt(r['bits_per_weight'])} | {fmt(r['ppl'], '.2f')} | {fmt(r['ppl'] / anchor['ppl'], '.2f')}x | {fmt(r.get('seconds'), '.1f')} |")
    lines += ["", "## Where each method breaks", ""] + breaking_points(rows, anchor)
    ft = result.get("finetune")
    if ft:
        lines += ["", f"## Fine-tuning: QLoRA vs LQ-LoRA ({ft['steps']} steps, batch {ft['batch']}, lr {ft['lr']}, seed 0, same data)", "",
                  "| run | base bits/weight | trainable params | ppl before | ppl after | seconds |", "|---|---|---|---|---|---|"]
        for name, r in ft["runs"].items():
            lines.append(f"| {name} | {r['base_bits_per_weight']:.3f} | {r['trainable_parameters']:,} | {r['ppl_before']:.2f} | {r['ppl_after']:.2f} | {r['seconds']:.0f} |")
    lines += ["", "## Targets", ""]
    for name, t in result["targets"].items():
        lines.append(f"- **{name}**: " + ", ".join(f"{k} = {fmt(v, '.3f') if isinstance(v, float) else v}" for k, v in t.items()))
    best_plan = next((r for r in rows if r["name"] == result["targets"].get("training_free_le_3.25_bits", {}).get("config") and "plan_table" in r), None)
    if best_plan:
        lines += ["", f"## Plan of {best_plan['name']}", "", best_plan["plan_table"]]
    return "\n".join(lines) + "\n"


def plot(rows, ref, anchor, ft, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(9, 5.5))
    series: dict = {}
    for r in rows:
        if r.get("series"):
            series.setdefault(r["series"], []).append((r["bits_per_weight"], r["ppl"]))
    top = 300.0  # 2-bit points diverge (10^3 to 10^9): drawn at the top edge, values in the table
    colors = plt.get_cmap("tab20").colors
    for i, (label, pts) in enumerate(sorted(series.items())):
        pts.sort()
        xs, ys = [p[0] for p in pts], [min(p[1], top) for p in pts]
        ax.plot(xs, ys, marker="osD^v<>"[i % 7], color=colors[i % len(colors)], label=label, linestyle="-" if len(pts) > 1 else "none")
    ax.axhline(ref["ppl"], color="k", linestyle="--", label=f"fp32 ({ref['ppl']:.2f})")
    ax.axhline(anchor["ppl"], color="red", linestyle=":", label=f"bitsandbytes nf4 ({anchor['ppl']:.2f}, {anchor['bits_per_weight']:.2f} bits)")
    ax.set_yscale("log")
    ax.set_ylim(ref["ppl"] * 0.9, top * 1.05)
    ax.set_xlabel("bits per weight (codes, metadata and low-rank factors counted)")
    ax.set_ylabel(f"validation perplexity (log scale; >= {top:.0f} = diverged)")
    ax.set_title("SmolLM2-135M: perplexity vs bits, low-rank compensation and budgets")
    ax.legend(fontsize=6, ncol=2)
    ax.grid(alpha=0.3)
    save_figure(fig, path)
    if ft:
        fig, ax = plt.subplots(figsize=(7, 4.5))
        for name, r in ft["runs"].items():
            ax.plot(*zip(*r["val_curve"]), marker="o", label=f"{name} (val)")
            ax.plot(*zip(*r["train_curve"]), alpha=0.4, label=f"{name} (train)")
        ax.set_xlabel("step")
        ax.set_ylabel("loss")
        ax.set_title("QLoRA vs LQ-LoRA fine-tuning")
        ax.legend(fontsize=7)
        ax.grid(alpha=0.3)
        save_figure(fig, path.with_name(path.stem + "_finetune.png"))


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="a few rows and a short fine-tune, to check the script")
    p.add_argument("--resume", action="store_true", help="keep the rows of an interrupted run (results/lowrank.partial.json)")
    p.add_argument("--block-size", type=int, default=512)
    p.add_argument("--eval-blocks", type=int, default=0, help="validation blocks (0 = the whole split)")
    p.add_argument("--calib-samples", type=int, default=16)
    p.add_argument("--finetune-steps", type=int, default=40)
    p.add_argument("--finetune-lr", type=float, default=1e-3)
    p.add_argument("--finetune-batch", type=int, default=2, help="blocks of 256 tokens per step")
    p.add_argument("--finetune-bits", type=float, default=3.0)
    p.add_argument("--no-finetune", action="store_true")
    p.add_argument("--out", default=str(RESULTS / "lowrank"))
    args = p.parse_args(argv)
    if args.quick:
        args.finetune_steps, args.calib_samples = 2, 4
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    partial = out.with_suffix(".partial.json")
    bench = Bench(args)
    info = machine()
    settings = {"block_size": args.block_size, "eval_blocks": len(bench.val), "eval_tokens": int(bench.val.labels[:, 1:].ne(-100).sum()),
                "calib_samples": args.calib_samples}
    previous = partial if partial.is_file() else out.with_suffix(".json")  # an interrupted run, or a finished one to extend
    state = json.loads(previous.read_text()) if args.resume and previous.is_file() else {"rows": [], "finetune": None}
    state = {"rows": state["rows"], "finetune": state.get("finetune")}
    rows = state["rows"]
    if not rows:
        print("anchors: fp32 and bitsandbytes NF4 ...", flush=True)
        rows.append({"name": "fp32 dense", "bits_per_weight": 32.0, "ppl": perplexity(bench.base, bench.val)["ppl"]})
        anchor = bnb_model(resolve_model(None), torch.float32)
        rows.append({"name": ANCHOR, "bits_per_weight": bnb_bits_per_weight(anchor), "ppl": perplexity(anchor, bench.val)["ppl"]})
        del anchor
        write_json(partial, {"machine": info, "settings": settings, **state})
    done = {r["name"] for r in rows}
    for spec in tqdm([s for s in grid(args.quick) if s.name not in done], desc="lowrank", unit="config"):
        rows.append(bench.run(spec))
        write_json(partial, {"machine": info, "settings": settings, **state})
        r = rows[-1]
        tqdm.write(f"{r['name']}: {r['bits_per_weight']:.3f} bits/weight, ppl {r['ppl']:.2f}, {r['seconds']:.0f} s")
    if not args.no_finetune and len((state.get("finetune") or {}).get("runs", {})) < 3:
        state["finetune"] = finetune_phase(args, out.parent / ".lowrank_runs", state.get("finetune"))
        write_json(partial, {"machine": info, "settings": settings, **state})
    result = {"machine": info, "settings": settings, "rows": rows, "finetune": state.get("finetune")}
    result["targets"] = targets(rows, rows[0], rows[1], result["finetune"])
    write_json(out.with_suffix(".json"), result)
    atomic_write_text(out.with_suffix(".md"), markdown(result))
    plot(rows, rows[0], rows[1], result["finetune"], out.with_suffix(".png"))
    partial.unlink(missing_ok=True)
    print(markdown(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
