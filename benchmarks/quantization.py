"""Quantization benchmark on the embedded model: every lorq method against bitsandbytes NF4.

One run measures, side by side on this machine:
  - the fp32 model (reference perplexity) and the bf16 dense model (the speed denominator);
  - bitsandbytes NF4 + double quantization through transformers' BitsAndBytesConfig (the anchor);
  - lorq: rtn-nf, rtn-int, hqq-int, gptq-int and gptq-nf at 2, 3 and 4 bits, groups 64 and 128,
    plus fp8, fp4, int8-outlier and a few 4-bit variants;
and writes benchmarks/results/quantization.{json,md,png}.

Two phases. Quality: bits/weight, perplexity (fp32 compute, validation split) and quantize
time of every configuration. Speed: prefill (one 256-token prompt) and batch-1 greedy decode
with bf16 activations (the int4 kernels need them) for the dense models, bitsandbytes and
every storage format, back to back, reported as ratios to the bf16 dense model of the same
phase. Speed depends on the storage format only, not on how the codes were chosen, so each
storage format is measured once (round-to-nearest codes).

    .venv/bin/python benchmarks/quantization.py            # both phases (about an hour on 2 cores)
    .venv/bin/python benchmarks/quantization.py --quick    # a few rows, to check the script
    .venv/bin/python benchmarks/quantization.py --quality-from benchmarks/results/quantization.json   # re-run the speed phase
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import sys
import time
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

import torch
from tqdm.auto import tqdm

from lorq.eval import perplexity
from lorq.eval.speed import decode_tokens_per_s, prefill_tokens_per_s
from lorq.io import atomic_write_text, save_figure, write_json
from lorq.jobs import calibration_ids
from lorq.models.loading import load_model, resolve_model
from lorq.quant import DECODER_LINEARS, FormatConfig, MethodConfig, QuantFormat, QuantMethod, Rule, cast_unquantized, quantize_model
from lorq.train.data import DataConfig, eval_blocks
from lorq.train.precision import cpu_flags

RESULTS = Path(__file__).parent / "results"


@dataclass(frozen=True)
class Spec:
    method: QuantMethod
    fmt: QuantFormat
    bits: int
    group: int
    symmetric: bool = False
    double_quant: bool = True
    act_order: bool = False
    headline: bool = True  # False: shown, but not a quality result (see `note`)
    note: str = ""

    @property
    def name(self) -> str:
        extra = ("" if self.double_quant or self.fmt not in LEVEL_FORMATS else " no-dq") + (" act-order" if self.act_order else "")
        return f"lorq {self.method.value} {self.format_config().describe()}{extra}"

    def format_config(self) -> FormatConfig:
        return FormatConfig(self.fmt, self.bits, self.group, self.double_quant, self.symmetric).validate()

    def storage_key(self) -> tuple:
        return (self.fmt, self.bits, self.group, self.symmetric, self.double_quant)


LEVEL_FORMATS = (QuantFormat.NF, QuantFormat.FP8, QuantFormat.FP4)
GRID_METHODS = [(QuantMethod.RTN, QuantFormat.NF), (QuantMethod.RTN, QuantFormat.INT), (QuantMethod.HQQ, QuantFormat.INT),
                (QuantMethod.GPTQ, QuantFormat.INT), (QuantMethod.GPTQ, QuantFormat.NF)]
ANCHOR = "bitsandbytes nf4 + double quant (anchor)"
LOSSLESS_NOTE = "group-32 INT4 matches the GGUF's Q4_1 grid: lossless by construction, not a quality result"


def grid(bits=(2, 3, 4), groups=(64, 128)) -> list[Spec]:
    specs = [Spec(m, f, b, g) for b in bits for g in groups for m, f in GRID_METHODS]
    # GPTQ on level formats needs blocks that divide every row (576 = 4.5 x 128 here)
    return [s for s in specs if not (s.method is QuantMethod.GPTQ and s.fmt is QuantFormat.NF and 576 % s.group)]


def extras() -> list[Spec]:
    return [
        Spec(QuantMethod.GPTQ, QuantFormat.INT, 4, 64, symmetric=True),
        Spec(QuantMethod.GPTQ, QuantFormat.INT, 4, 128, act_order=True),
        Spec(QuantMethod.GPTQ, QuantFormat.NF, 4, 64, act_order=True),
        Spec(QuantMethod.RTN, QuantFormat.NF, 4, 64, double_quant=False),
        Spec(QuantMethod.RTN, QuantFormat.FP8, 8, 64),
        Spec(QuantMethod.RTN, QuantFormat.FP4, 4, 64),
        Spec(QuantMethod.RTN, QuantFormat.INT8_OUTLIER, 8, 0),
        Spec(QuantMethod.RTN, QuantFormat.INT, 4, 32, headline=False, note=LOSSLESS_NOTE),
    ]


def quick() -> list[Spec]:
    return [Spec(QuantMethod.RTN, QuantFormat.NF, 4, 64), Spec(QuantMethod.HQQ, QuantFormat.INT, 4, 64),
            Spec(QuantMethod.GPTQ, QuantFormat.INT, 3, 128)]


def machine() -> dict:
    flags = ""
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        pass
    model = next((line.split(":", 1)[1].strip() for line in flags.splitlines() if line.startswith("model name")), platform.processor())
    import bitsandbytes
    import transformers

    return {
        "cpu": model, "cores": os.cpu_count(), "torch": torch.__version__, "transformers": transformers.__version__,
        "bitsandbytes": bitsandbytes.__version__, "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        # the flags line as --precision auto reads it (not a match anywhere in the file)
        "avx512_bf16": "avx512_bf16" in cpu_flags(), "amx_bf16": "amx_bf16" in cpu_flags(), "python": platform.python_version(),
        "date": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
    }


def speeds(model, args) -> dict:
    return {"prefill_tok_s": prefill_tokens_per_s(model, args.prefill_tokens), "decode_tok_s": decode_tokens_per_s(model, args.decode_tokens)}


def bnb_model(path, compute_dtype):
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    qc = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True, bnb_4bit_compute_dtype=compute_dtype)
    return AutoModelForCausalLM.from_pretrained(path, quantization_config=qc, dtype=compute_dtype, device_map="cpu").eval()


def bnb_bits_per_weight(model) -> float:
    """Packed codes + absmax codes + second-level absmax + offset of every Linear4bit, per weight."""
    import bitsandbytes as bnb

    nbytes = numel = 0
    for m in model.modules():
        if isinstance(m, bnb.nn.Linear4bit):
            qs = m.weight.quant_state
            numel += m.in_features * m.out_features
            parts = [m.weight.data, qs.absmax] + ([qs.state2.absmax, qs.offset] if qs.nested else [])
            nbytes += sum(t.numel() * t.element_size() for t in parts)
    return 8 * nbytes / numel


def lorq_row(spec: Spec, base, val, calib, args) -> dict:
    """Quality of one configuration: bits/weight, error, perplexity, quantize time."""
    model = copy.deepcopy(base)
    mcfg = MethodConfig(method=spec.method, act_order=spec.act_order, calib_samples=args.calib_samples)
    report = quantize_model(model, [Rule(DECODER_LINEARS, spec.format_config(), spec.method)], mcfg,
                            calib if spec.method is QuantMethod.GPTQ else None, progress=False)
    return {"name": spec.name, "method": spec.method.value, "format": spec.fmt.value, "bits": spec.bits, "group": spec.group,
            "symmetric": spec.symmetric, "double_quant": spec.double_quant, "headline": spec.headline, "note": spec.note,
            "bits_per_weight": report.bits_per_weight, "relative_error": report.rel_error, "quantize_s": report.seconds,
            "ppl": perplexity(model, val)["ppl"]}


def row_spec(row: dict) -> Spec:
    """The configuration a lorq row measured (rows of earlier runs may lack the newer keys)."""
    return Spec(QuantMethod(row["method"]), QuantFormat(row["format"]), row["bits"], row["group"],
                row.get("symmetric", " sym" in row["name"]), row.get("double_quant", "no-dq" not in row["name"]),
                "act-order" in row["name"], row["headline"], row.get("note", ""))


def storage_spec(row: dict) -> Spec:
    """The round-to-nearest configuration with the row's storage format (speed depends only on it)."""
    s = row_spec(row)
    return Spec(QuantMethod.RTN, s.fmt, s.bits, s.group, s.symmetric, s.double_quant)


def normalized(rows: list[dict]) -> list[dict]:
    """Rows of an earlier run, lorq names rebuilt from their fields (naming may have changed)."""
    for r in rows:
        if r["name"].startswith("lorq"):
            spec = row_spec(r)
            r.update(name=spec.name, symmetric=spec.symmetric, double_quant=spec.double_quant)
    return rows


def quality_phase(base, tok, path, args, out, info) -> list[dict]:
    val = eval_blocks(tok, DataConfig(block_size=args.block_size)).take(args.eval_blocks)
    calib = calibration_ids(tok, MethodConfig(calib_samples=args.calib_samples))
    partial = out.with_suffix(".partial.json")
    if args.resume and partial.is_file():  # an interrupted run: keep its rows, measure the rest
        rows = normalized(json.loads(partial.read_text())["rows"])
        print(f"quality: resuming {partial} ({len(rows)} rows done)", flush=True)
        done = {r["name"] for r in rows}
        for spec in tqdm([s for s in (quick() if args.quick else grid() + extras()) if s.name not in done], desc="quality", unit="config"):
            rows.append(lorq_row(spec, base, val, calib, args))
            write_json(partial, {"machine": info, "rows": rows})
            tqdm.write(f"{rows[-1]['name']}: {rows[-1]['bits_per_weight']:.3f} bits/weight, ppl {rows[-1]['ppl']:.3f}, {rows[-1]['quantize_s']:.1f} s")
        return rows
    print("quality: fp32 / bf16 dense and bitsandbytes NF4 ...", flush=True)
    rows = [{"name": "fp32 dense", "method": "-", "format": "fp32", "bits_per_weight": 32.0, "headline": True, "note": "reference",
             "ppl": perplexity(base, val)["ppl"]},
            {"name": "bf16 dense", "method": "-", "format": "bf16", "bits_per_weight": 16.0, "headline": True, "note": "speed denominator",
             "ppl": perplexity(cast_unquantized(copy.deepcopy(base), torch.bfloat16), val)["ppl"]}]
    start = time.perf_counter()
    anchor_model = bnb_model(path, torch.float32)
    rows.append({"name": ANCHOR, "method": "bnb", "format": "nf4", "bits": 4, "group": 64,
                 "bits_per_weight": bnb_bits_per_weight(anchor_model), "headline": True, "note": "anchor",
                 "quantize_s": time.perf_counter() - start, "ppl": perplexity(anchor_model, val)["ppl"]})
    del anchor_model
    for spec in tqdm(quick() if args.quick else grid() + extras(), desc="quality", unit="config"):
        rows.append(lorq_row(spec, base, val, calib, args))
        write_json(out.with_suffix(".partial.json"), {"machine": info, "rows": rows})  # survives an interrupted run
        tqdm.write(f"{rows[-1]['name']}: {rows[-1]['bits_per_weight']:.3f} bits/weight, ppl {rows[-1]['ppl']:.3f}, {rows[-1]['quantize_s']:.1f} s")
    return rows


def speed_phase(rows: list[dict], base, path, args) -> None:
    """Prefill and decode speed of every storage format, back to back with the dense and
    bitsandbytes denominators, so that all speeds share one quiet stretch of machine time."""
    print("speed: fp32 / bf16 dense and bitsandbytes NF4 ...", flush=True)
    by_name = {r["name"]: r for r in rows}
    by_name["fp32 dense"].update(speeds(base, args))
    by_name["bf16 dense"].update(speeds(cast_unquantized(copy.deepcopy(base), torch.bfloat16), args))
    by_name[ANCHOR].update(speeds(bnb_model(path, torch.bfloat16), args))
    lorq_rows = [r for r in rows if r["name"].startswith("lorq")]
    cache: dict = {}
    for r in tqdm(lorq_rows, desc="speed", unit="config"):
        spec = storage_spec(r)
        if spec.storage_key() not in cache:
            model = copy.deepcopy(base)
            quantize_model(model, [Rule(DECODER_LINEARS, spec.format_config())], progress=False)
            cache[spec.storage_key()] = speeds(cast_unquantized(model, torch.bfloat16), args)
        r.update(cache[spec.storage_key()])
    dense16 = by_name["bf16 dense"]
    for r in rows:
        for k in ("prefill_tok_s", "decode_tok_s"):
            if k in r:
                r[k.replace("_tok_s", "_vs_bf16")] = r[k] / dense16[k]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="three lorq rows only (checks the script; written as quantization-quick.*)")
    ap.add_argument("--eval-blocks", type=int, default=16, help="validation blocks for perplexity")
    ap.add_argument("--block-size", type=int, default=256, help="tokens per validation block")
    ap.add_argument("--calib-samples", type=int, default=16, help="GPTQ calibration sequences of 512 tokens")
    ap.add_argument("--prefill-tokens", type=int, default=256)
    ap.add_argument("--decode-tokens", type=int, default=32)
    ap.add_argument("--no-speed", action="store_true", help="skip the speed phase")
    ap.add_argument("--quality-from", type=Path, help="take the quality phase (perplexity, bits, quantize time) from an earlier "
                    "results JSON and run only the speed phase")
    ap.add_argument("--resume", action="store_true", help="continue an interrupted quality phase from its .partial.json")
    ap.add_argument("--out", type=Path, default=RESULTS)
    args = ap.parse_args(argv)
    torch.manual_seed(0)
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    hf_logging.set_verbosity_error()
    info = machine()
    base, tok, _ = load_model("smollm2-135m-instruct")
    base.eval()
    path = resolve_model("smollm2-135m-instruct")
    out = args.out / ("quantization-quick" if args.quick else "quantization")
    args.out.mkdir(parents=True, exist_ok=True)
    if args.quality_from:
        earlier = json.loads(args.quality_from.read_text())
        speed_keys = ("prefill_tok_s", "decode_tok_s", "prefill_vs_bf16", "decode_vs_bf16")
        rows = normalized([{k: v for k, v in r.items() if k not in speed_keys} for r in earlier["rows"]])
        info["quality_phase"] = {"from": str(args.quality_from), "machine": earlier["machine"], "settings": earlier.get("settings")}
        for k in ("eval_blocks", "block_size", "calib_samples"):  # the table's text describes the earlier phase
            setattr(args, k, int(earlier.get("settings", {}).get(k, getattr(args, k))))
    else:
        rows = quality_phase(base, tok, path, args, out, info)
    if not args.no_speed:
        speed_phase(rows, base, path, args)
    by_name = {r["name"]: r for r in rows}
    result = {"machine": info, "settings": {k: str(v) for k, v in vars(args).items()}, "rows": rows,
              "targets": targets(rows, by_name["fp32 dense"], by_name[ANCHOR], by_name["bf16 dense"])}
    write_json(out.with_suffix(".json"), result)
    out.with_suffix(".partial.json").unlink(missing_ok=True)
    atomic_write_text(out.with_suffix(".md"), markdown(result, args))
    plot(rows, by_name["fp32 dense"], by_name[ANCHOR], out.with_suffix(".png"))
    print(f"wrote {out}.json, .md and .png")
    return 0


def targets(rows, ref, anchor, dense16) -> dict:
    lorq = [r for r in rows if r["name"].startswith("lorq") and r["headline"]]
    t = {}
    nf4 = next((r for r in lorq if r["name"] == "lorq rtn nf4 g64"), None)
    if nf4:
        t["nf4_ppl_equals_bnb"] = {"lorq": nf4["ppl"], "bnb": anchor["ppl"], "met": abs(nf4["ppl"] - anchor["ppl"]) <= 1e-3 * anchor["ppl"]}
    four = [r for r in lorq if r["bits"] == 4 and r["bits_per_weight"] <= 4.25 + 1e-9 and r["group"] >= 64]
    if four:
        best = min(four, key=lambda r: r["ppl"])
        closed = (anchor["ppl"] - best["ppl"]) / (anchor["ppl"] - ref["ppl"])
        t["best_4bit_gap_closed"] = {"config": best["name"], "ppl": best["ppl"], "fraction_of_gap_closed": closed, "met": closed >= 2 / 3}
    int4 = [r for r in lorq if r["format"] == "int" and r["bits"] == 4 and "decode_tok_s" in r]
    if int4 and "decode_tok_s" in anchor:
        d = max(r["decode_tok_s"] for r in int4)
        t["int4_decode_speedup"] = {"vs_bf16_dense": d / dense16["decode_tok_s"], "vs_bnb_nf4": d / anchor["decode_tok_s"],
                                    "met": d >= 3 * dense16["decode_tok_s"] and d >= 10 * anchor["decode_tok_s"]}
    for method, limit in (("hqq", 60), ("gptq", 600)):
        times = [r["quantize_s"] for r in rows if r.get("method") == method]
        if times:
            t[f"{method}_seconds"] = {"max": max(times), "limit": limit, "met": max(times) < limit}
    return t


def fmt(v, spec=".3f"):
    return "" if v is None else (f"{v:{spec}}" if isinstance(v, float) else str(v))


def markdown(result, args) -> str:
    m = result["machine"]
    lines = [
        "# Quantization benchmark (SmolLM2-135M-Instruct, embedded)", "",
        f"Machine: {m['cpu']}, {m['cores']} cores, CPU capability {m['cpu_capability']}, AVX512-BF16 {m['avx512_bf16']}, "
        f"AMX {m['amx_bf16']}; torch {m['torch']}, transformers {m['transformers']}, bitsandbytes {m['bitsandbytes']}; {m['date']}.", "",
        f"Perplexity: fp32 compute, {args.eval_blocks} validation blocks of {args.block_size} tokens of the pydoc corpus. "
        f"Speeds: bf16 activations, prefill of {args.prefill_tokens} tokens and batch-1 greedy decode of {args.decode_tokens} tokens "
        "(transformers' generate), as ratios to the bf16 dense model measured in the same speed phase, once per storage format. "
        "Bits/weight count codes and every scale, zero and absmax of the 210 decoder linear layers. "
        f"GPTQ: {args.calib_samples} calibration sequences of 512 tokens from the training split."
        + (f" The quality columns come from the run recorded in {m['quality_phase']['from']} ({m['quality_phase']['machine']['date']});"
           f" the speed phase ran on {m['date']}." if "quality_phase" in m else ""), "",
        "| configuration | bits/weight | perplexity | quantize s | prefill vs bf16 | decode vs bf16 | note |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in result["rows"]:
        lines.append(f"| {r['name']} | {fmt(r.get('bits_per_weight'))} | {fmt(r['ppl'], '.2f')} | {fmt(r.get('quantize_s'), '.1f')} | "
                     f"{fmt(r.get('prefill_vs_bf16'), '.2f')} | {fmt(r.get('decode_vs_bf16'), '.2f')} | {r.get('note', '')} |")
    lines += ["", "## Targets", ""]
    for name, t in result["targets"].items():
        lines.append(f"- **{name}**: " + ", ".join(f"{k} = {fmt(v, '.3f') if isinstance(v, float) else v}" for k, v in t.items()))
    return "\n".join(lines) + "\n"


def plot(rows, ref, anchor, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 5))
    series: dict = {}
    for r in rows:
        if r["name"].startswith("lorq") and r["headline"] and r["format"] in ("nf", "int") and r.get("group") in (64, 128) \
                and "sym" not in r["name"] and "act-order" not in r["name"] and "no-dq" not in r["name"]:
            series.setdefault(f"{r['method']}-{r['format']} g{r['group']}", []).append((r["bits_per_weight"], r["ppl"]))
    for label, pts in sorted(series.items()):
        pts.sort()
        ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=label)
    ax.axhline(ref["ppl"], color="k", linestyle="--", label=f"fp32 ({ref['ppl']:.2f})")
    ax.scatter([anchor["bits_per_weight"]], [anchor["ppl"]], marker="*", s=200, color="red", zorder=5, label=f"bitsandbytes nf4 ({anchor['ppl']:.2f})")
    ax.set_yscale("log")
    ax.set_xlabel("bits per weight (all metadata counted)")
    ax.set_ylabel("validation perplexity (log scale)")
    ax.set_title("SmolLM2-135M: perplexity vs bits")
    ax.legend(fontsize=7, ncol=2)
    ax.grid(alpha=0.3)
    save_figure(fig, path)


if __name__ == "__main__":
    sys.exit(main())
