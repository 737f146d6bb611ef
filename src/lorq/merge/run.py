"""`lorq merge`: the streaming merge, then the report (perplexity of base + unmerged adapters
vs the merged model, and vs the naive merge for a quantized base; size, time, peak memory)."""

from __future__ import annotations

import math
import time
from pathlib import Path

import torch
import torch.nn as nn

from ..adapters.lora import lora_layers
from ..errors import LorqError
from ..eval.memory import PeakRSS
from ..eval.perplexity import perplexity
from ..io import atomic_dir, check_output_dir, write_json
from ..models.loading import HF_MODEL_FILES, QUANT_CONFIG, load_model
from ..quant import QuantizedLinear
from ..quant.checkpoint import quant_meta
from ..quant.linear import set_module
from ..train.data import DataConfig, eval_blocks
from .delta import AdapterUpdate, apply_unmerged
from .merge import (
    MergeConfig, OutDtype, Requant, Source, check_targets, merge_dense, merge_quantized, open_source, requantize,
    rules_of, write_side_files,
)

REPORT = "merge_report.json"


def naive_merge_in_place(model: nn.Module, update: AdapterUpdate, cfg: MergeConfig) -> None:
    """Replace every adapted layer by its naive merge: quant(Q + L + ΔW), or W + ΔW if dense."""
    for name, layer in lora_layers(model).items():
        B, A = update.stacked(name)
        base = layer.base
        if isinstance(base, QuantizedLinear):
            merged, _, _ = requantize(base, B, A, Requant.NAIVE, 0, cfg.method_config)
        else:
            merged = base
            with torch.no_grad():
                merged.weight += (B @ A).to(merged.weight.dtype)
        set_module(model, name, merged)


@torch.no_grad()
def first_logits(model: nn.Module, ids: torch.Tensor) -> torch.Tensor:
    return model(input_ids=ids).logits.float()


def evaluate(cfg: MergeConfig, update: AdapterUpdate, out: Path, quantized_out: bool) -> dict:
    """Perplexities and the largest logit difference on the first validation block."""
    from ..jobs import prepare_base

    base = prepare_base(cfg.model, cfg.quant)
    model = base.model
    apply_unmerged(model, update)
    val = eval_blocks(base.tok, DataConfig()).take(cfg.eval_blocks)
    probe = val.input_ids[:1]
    result = {"eval_tokens": 0}
    ref = perplexity(model, val, progress=True, desc="eval unmerged")
    ref_logits = first_logits(model, probe)
    result.update(eval_tokens=ref["tokens"], ppl_unmerged=round(ref["ppl"], 4))
    if quantized_out and cfg.compare_naive and cfg.requant is not Requant.NAIVE:
        naive_merge_in_place(model, update, cfg)
        naive = perplexity(model, val, progress=True, desc="eval naive merge")
        result.update(ppl_naive=round(naive["ppl"], 4), max_abs_logit_diff_naive=(first_logits(model, probe) - ref_logits).abs().max().item())
    del model, base
    merged, _, _ = load_model(str(out))
    result["ppl_merged"] = round(perplexity(merged, val, progress=True, desc="eval merged")["ppl"], 4)
    result["max_abs_logit_diff"] = (first_logits(merged, probe) - ref_logits).abs().max().item()
    result["ppl_change_pct"] = round(100 * (result["ppl_merged"] / result["ppl_unmerged"] - 1), 3)
    return result


def file_mib(paths) -> list[float]:
    return [p.stat().st_size / 2**20 for p in paths if p.is_file()]


QUANTIZED_ONLY = ("requant", "requant_method", "merge_rank", "merge_iters", "dequantize", "compare_naive")


def note_ignored(cfg: MergeConfig, quantized: bool, dense: bool) -> None:
    """Options of a quantized merge set on a dense one, or a dense output's dtype set on a
    quantized one: said, not silently dropped."""
    default = MergeConfig()
    set_ = [f"--{n.replace('_', '-')}" for n in QUANTIZED_ONLY if getattr(cfg, n) != getattr(default, n)]
    if set_ and not quantized:
        verb, them = ("applies", "it is") if len(set_) == 1 else ("apply", "they are")
        print(f"lorq: note: {', '.join(set_)} {verb} to a quantized base; this base is dense, so {them} ignored", flush=True)
    if not dense and cfg.dtype is not OutDtype.AUTO:
        print("lorq: note: --dtype applies to a dense output; this merge writes a quantized model, so it is ignored "
              "(--dequantize writes a dense one)", flush=True)


def write_merge(cfg: MergeConfig, src: Source, progress: bool, finish, also_reads=()) -> tuple[AdapterUpdate, bool, dict, PeakRSS]:
    """Read the adapters, stream the merge into cfg.output (atomically); (update, dense, details,
    memory of the merge). finish(tmp, update, dense, details, mem) runs on the written directory
    before it takes the output's place (it evaluates and writes the report, which marks the
    directory as a merge): a failure there leaves an earlier output as it was."""
    mem = PeakRSS().start()  # everything the merge holds, from reading the adapters to the last file
    update = AdapterUpdate.read(cfg.adapter, cfg.weights)
    check_targets(src, update)
    dense = not src.quantized or cfg.dequantize
    note_ignored(cfg, src.quantized, dense)
    # never over (or into) the base or an adapter being read, nor over anything but an earlier merge
    out = check_output_dir(cfg.output, "merged model", (REPORT,), reads=[cfg.model, src.path, *update.paths, *also_reads],
                           owned=(REPORT, QUANT_CONFIG, *HF_MODEL_FILES))
    details = {}
    with atomic_dir(out) as tmp:
        if dense:
            merge_dense(src, update, tmp, cfg.dtype, cfg.max_shard_mb * 2**20, progress)
        else:
            specs, report, bits = merge_quantized(src, update, tmp, cfg, progress)
            merge_info = {"adapters": [str(p) for p in update.paths], "weights": update.weights, "requant": cfg.requant.value}
            write_json(tmp / QUANT_CONFIG, quant_meta(specs, report, str(cfg.model), rules_of(src), merge=merge_info))
            details = {"bits_per_weight": round(bits, 4), "relative_error_vs_exact": round(report.rel_error, 6),
                       "merged_modules": len(report.modules), "requant": cfg.requant.value, "requant_method": cfg.requant_method.value}
        write_side_files(src, tmp, cfg.dtype, dense)
        mem.stop()  # the merge ends here: what finish() loads is not the merge's
        finish(tmp, update, dense, details, mem)
    return update, dense, details, mem


def run_merge(cfg: MergeConfig, progress: bool = True, also_reads=()) -> dict:
    cfg.validate()
    start = time.perf_counter()
    src = open_source(cfg.model, cfg.quant)  # config, tensor index, a weightless skeleton (and the libraries' imports)
    out = Path(cfg.output)
    summary = {}

    def finish(tmp: Path, update: AdapterUpdate, dense: bool, details: dict, mem: PeakRSS) -> None:
        seconds = time.perf_counter() - start
        shards = file_mib(sorted(tmp.glob("*.safetensors")))
        adapter_mib = update.nbytes() / 2**20
        summary.update({
            "base": str(src.path), "adapters": [str(p) for p in update.paths], "weights": update.weights,
            "output": str(out), "kind": "dense" if dense else "quantized", **details,
            "seconds": round(seconds, 2), "size_on_disk_mib": round(sum(file_mib(tmp.iterdir())), 2),
            "largest_shard_mib": round(max(shards), 2), "adapter_mib": round(adapter_mib, 2), "memory": mem.to_json(),
        })
        # the target: the merge holds at most the final model, one shard and the adapter
        summary["memory_bound_mib"] = round(summary["size_on_disk_mib"] + summary["largest_shard_mib"] + adapter_mib, 1)
        if cfg.eval_blocks:
            summary.update(evaluate(cfg, update, tmp, not dense))
        if not math.isfinite(summary.get("ppl_merged", 0.0)):  # finite weights can still overflow in the forward pass
            raise LorqError(f"the merged model's perplexity is {summary['ppl_merged']} (base + unmerged adapters: {summary['ppl_unmerged']}): "
                            f"the adapters or --weights make the model diverge; nothing was written")
        write_json(tmp / REPORT, summary)  # also marks the directory as a merge, which the next one may replace

    write_merge(cfg, src, progress, finish, also_reads)
    print(one_line(summary))
    return summary


def one_line(s: dict) -> str:
    kind = s["kind"] + (f", {s['requant']} {s['bits_per_weight']:.3f} bits/weight" if s["kind"] == "quantized" else "")
    ppl = ""
    if "ppl_merged" in s:
        naive = f"; naive merge {s['ppl_naive']:.3f}" if "ppl_naive" in s else ""
        ppl = (f": perplexity {s['ppl_unmerged']:.3f} unmerged -> {s['ppl_merged']:.3f} merged ({s['ppl_change_pct']:+.2f}%{naive}), "
               f"max |Δlogit| {s['max_abs_logit_diff']:.2e}")
    mem = s["memory"]
    return (f"merged {len(s['adapters'])} adapter(s) into {s['output']} ({kind}){ppl}; {s['size_on_disk_mib']:.1f} MiB on disk, "
            f"{s['seconds']:.1f} s, peak memory +{mem['phase_peak_mib']:.0f} MiB (bound {s['memory_bound_mib']:.0f} MiB). Report: {Path(s['output']) / REPORT}")
