"""Multi-adapter serving on this machine: lorq's engine against PEFT, in one run.

The embedded SmolLM2-135M (fp32; bf16 where this CPU's bf16 matmuls are faster, see --precision), N = 1, 10, 100, 1000 PEFT-format adapters (random, ranks 4 / 8 /
16 in turn on q_proj and v_proj, stored fp16 on disk), one workload of `--requests` greedy
completions (prompts of 16–128 tokens cut from CPython's documentation, 16–64 new tokens each),
every request sent at t = 0, adapters drawn by a power law (Zipf, alpha 1) or uniformly:
  - lorq: the serving engine (continuous batching, segment / gather LoRA, adapter LRU cache),
    in process, at most `--batch` sequences decoding together; the single-adapter run (every
    request on adapter 0) is the reference of the 0.8x target;
  - PEFT mixed batch (anchor): `PeftModel` with all N adapters loaded, transformers' generate
    with `adapter_names`, static batches of `--batch` requests in arrival order, left-padded,
    each batch running to its longest request;
  - PEFT swap/merge: one adapter at a time: merge it into the base, generate its requests in
    batches, unmerge.
A last row serves the 100 adapters on the NF4 (double-quantized) base, as `lorq serve --format nf` does.
Throughput counts only the tokens each request asked for; latency is from t = 0 to the request's
last token. Writes benchmarks/results/serving.{json,md,png}.

    .venv/bin/python benchmarks/serving.py                  # about 20 minutes on 2 cores
    .venv/bin/python benchmarks/serving.py --adapters 1 10 --requests 16   # a quick look
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import time
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import save_file

sys.path.insert(0, str(Path(__file__).parent))
from quantization import machine  # noqa: E402

from lorq.eval.memory import rss_mib  # noqa: E402
from lorq.io import atomic_write_text, save_figure, write_json  # noqa: E402
from lorq.models.loading import load_model, resolve_model  # noqa: E402
from lorq.quant import cast_unquantized  # noqa: E402
from lorq.serve import AdapterStore, Engine, EngineConfig, SamplingParams  # noqa: E402
from lorq.train.precision import Precision, weights_dtype  # noqa: E402

RESULTS = Path(__file__).parent / "results"
WORK = RESULTS / ".serving_adapters"
RANKS = (4, 8, 16)
TARGETS = ("q_proj", "v_proj")


def write_adapters(model, n: int, root: Path) -> list[str]:
    """n PEFT adapters for the model (kept between runs: same seed, same files)."""
    names = [f"a{i:04d}" for i in range(n)]
    layers = {name: m for name, m in model.named_modules() if name.rsplit(".", 1)[-1] in TARGETS}
    for i, name in enumerate(names):
        out = root / name
        if (out / "adapter_model.safetensors").is_file():
            continue
        g = torch.Generator().manual_seed(i)
        r = RANKS[i % len(RANKS)]
        tensors = {}
        for module, layer in layers.items():
            tensors[f"base_model.model.{module}.lora_A.weight"] = (torch.randn(r, layer.in_features, generator=g) / layer.in_features**0.5).half()
            tensors[f"base_model.model.{module}.lora_B.weight"] = (torch.randn(layer.out_features, r, generator=g) * 0.02).half()
        out.mkdir(parents=True, exist_ok=True)
        config = {"peft_type": "LORA", "task_type": "CAUSAL_LM", "r": r, "lora_alpha": 2 * r, "target_modules": list(TARGETS),
                  "lora_dropout": 0.0, "bias": "none", "use_rslora": False, "fan_in_fan_out": False, "base_model_name_or_path": ""}
        save_file(tensors, str(out / "adapter_model.safetensors"))
        atomic_write_text(out / "adapter_config.json", json.dumps(config))
    return names


def workload(tok, n_requests: int, seed: int = 0) -> list[tuple[list[int], int]]:
    """(prompt ids, max new tokens) per request: 16–128-token slices of the documentation."""
    from pydoc_data.topics import topics

    rng = random.Random(seed)
    text = " ".join(topics[k] for k in sorted(topics))
    ids = tok(text[:400_000], add_special_tokens=False)["input_ids"]
    out = []
    for _ in range(n_requests):
        length, start = rng.randint(16, 128), rng.randrange(len(ids) - 200)
        out.append((ids[start : start + length], rng.randint(16, 64)))
    return out


def popularity(n_adapters: int, n_requests: int, kind: str, seed: int = 0) -> list[int]:
    rng = np.random.default_rng(seed)
    if kind == "single":
        return [0] * n_requests
    if kind == "uniform":
        return rng.integers(0, n_adapters, n_requests).tolist()
    p = 1.0 / np.arange(1, n_adapters + 1)  # Zipf, alpha 1 (S-LoRA's power-law popularity)
    return rng.choice(n_adapters, n_requests, p=p / p.sum()).tolist()


def summarize(latencies: list[float], tokens: int, seconds: float) -> dict:
    lat = np.array(latencies)
    return {"tokens": tokens, "seconds": round(seconds, 2), "tok_s": round(tokens / seconds, 2),
            "p50_s": round(float(np.percentile(lat, 50)), 2), "p99_s": round(float(np.percentile(lat, 99)), 2)}


def run_lorq(engine: Engine, store: AdapterStore, names, jobs, which) -> dict:
    store.stats.hits = store.stats.misses = store.stats.evictions = 0
    steps = engine.steps
    start = time.perf_counter()
    finished = {}
    reqs = []
    for (prompt, n), a in zip(jobs, which):
        adapter = store.acquire(names[a]) if a is not None else None
        reqs.append((prompt, adapter, SamplingParams(max_tokens=n, temperature=0.0, ignore_eos=True)))
    engine.on_finish = lambda seq: finished.__setitem__(seq.id, time.perf_counter())
    seqs = engine.generate(reqs)
    seconds = time.perf_counter() - start
    for seq in seqs:
        if seq.adapter is not None:
            store.release(seq.adapter.name)
    row = summarize([finished[s.id] - start for s in seqs], sum(len(s.generated) for s in seqs), seconds)
    row.update(steps=engine.steps - steps, cache_misses=store.stats.misses, adapter_mib=round(store.nbytes / 2**20, 1), rss_mib=round(rss_mib()))
    return row, [s.generated for s in seqs]


def peft_model(path, names, root, dtype: torch.dtype):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(path, dtype=dtype).eval()
    start = time.perf_counter()
    # adapters in the run's dtype, as lorq holds them (PEFT would upcast bf16 ones to fp32)
    model = PeftModel.from_pretrained(base, str(root / names[0]), adapter_name=names[0], autocast_adapter_dtype=False)
    for name in names[1:]:
        model.load_adapter(str(root / name), adapter_name=name, autocast_adapter_dtype=False)
    return model.eval(), time.perf_counter() - start


def padded(jobs, pad_id):
    width = max(len(p) for p, _ in jobs)
    ids = torch.tensor([[pad_id] * (width - len(p)) + p for p, _ in jobs])
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p, _ in jobs])
    return ids, mask


@torch.inference_mode()
def run_peft_mixed(model, tok, names, jobs, which, batch: int) -> dict:
    start, latencies, tokens, outs = time.perf_counter(), [], 0, []
    for b in range(0, len(jobs), batch):
        chunk, adapters = jobs[b : b + batch], [names[a] for a in which[b : b + batch]]
        ids, mask = padded(chunk, tok.pad_token_id)
        out = model.generate(input_ids=ids, attention_mask=mask, adapter_names=adapters, max_new_tokens=max(n for _, n in chunk),
                             do_sample=False, temperature=None, top_p=None, top_k=None, pad_token_id=tok.pad_token_id, eos_token_id=None)
        done = time.perf_counter() - start
        for row, (_, n) in zip(out[:, ids.shape[1] :], chunk):
            outs.append(row[:n].tolist())
            latencies.append(done)
            tokens += n
    return summarize(latencies, tokens, time.perf_counter() - start), outs


@torch.inference_mode()
def run_peft_swap(model, tok, names, jobs, which, batch: int) -> dict:
    """Merge one adapter, serve all of its requests, unmerge; adapters in order of first request."""
    start, latencies, tokens = time.perf_counter(), [], 0
    order = list(dict.fromkeys(which))
    for a in order:
        mine = [j for j, w in zip(jobs, which) if w == a]
        model.set_adapter(names[a])
        model.merge_adapter()
        for b in range(0, len(mine), batch):
            chunk = mine[b : b + batch]
            ids, mask = padded(chunk, tok.pad_token_id)
            model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=max(n for _, n in chunk), do_sample=False,
                           temperature=None, top_p=None, top_k=None, pad_token_id=tok.pad_token_id, eos_token_id=None)
            latencies += [time.perf_counter() - start] * len(chunk)
            tokens += sum(n for _, n in chunk)
        model.unmerge_adapter()
    return summarize(latencies, tokens, time.perf_counter() - start)


def agreement(a: list[list[int]], b: list[list[int]]) -> float:
    return sum(x == y for x, y in zip(a, b)) / len(a)


def table(res: dict) -> str:
    m = res["machine"]
    lines = [
        "# Multi-adapter serving: lorq's engine vs PEFT",
        "",
        f"{m['cpu']}, {m['cores']} cores, torch {m['torch']}, transformers {m['transformers']}, peft {res['peft']}; {m['date']}.",
        f"SmolLM2-135M {res.get('dtype', 'float32')} weights and compute for every system; {res['requests']} greedy requests sent at once (prompts 16–128 tokens, 16–64 new tokens each), "
        f"batch {res['batch']}; adapters ranks {'/'.join(map(str, RANKS))} on {' + '.join(TARGETS)}. "
        "Ratios are against lorq with every request on one adapter (single) and against PEFT's mixed batch at the same N, same run.",
        "",
        "| adapters | popularity | system | tok/s | p50 s | p99 s | vs lorq single | vs PEFT mixed | same tokens as PEFT |",
        "|---:|---|---|---:|---:|---:|---:|---:|---:|",
    ]
    single = next(r["tok_s"] for r in res["rows"] if r["system"] == "lorq" and r["popularity"] == "single")
    for r in res["rows"]:
        peft = next((p["tok_s"] for p in res["rows"] if p["system"] == "PEFT mixed batch" and p["adapters"] == r["adapters"]), None)
        vs_peft = f"{r['tok_s'] / peft:.2f}x" if peft else "–"
        same = f"{r['agree'] * 100:.0f}%" if "agree" in r else ""
        lines.append(f"| {r['adapters']} | {r['popularity']} | {r['system']} | {r['tok_s']:.1f} | {r['p50_s']:.1f} | {r['p99_s']:.1f} | "
                     f"{r['tok_s'] / single:.2f}x | {vs_peft} | {same} |")
    lines += ["", "Adapter host memory and load times:", ""]
    lines += [f"- {k}: {v}" for k, v in res["notes"].items()]
    return "\n".join(lines) + "\n"


def plot(res: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax, ax2) = plt.subplots(1, 2, figsize=(11, 4))
    series = {}
    for r in res["rows"]:
        if r["popularity"] in ("power-law", "single", "uniform") and r["adapters"] >= 1:
            key = f"{r['system']} ({r['popularity'] if r['popularity'] != 'single' else 'power-law'})"
            series.setdefault(key, []).append((r["adapters"], r["tok_s"], r["p99_s"]))
    for key, pts in series.items():
        pts.sort()
        ax.plot([p[0] for p in pts], [p[1] for p in pts], "o-", label=key)
        ax2.plot([p[0] for p in pts], [p[2] for p in pts], "o-", label=key)
    for a, title in ((ax, "throughput (generated tokens/s)"), (ax2, "p99 latency (s)")):
        a.set_xscale("log")
        a.set_xlabel("adapters")
        a.set_title(title)
        a.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.suptitle(f"Multi-adapter serving, SmolLM2-135M, {res['machine']['cpu']} ({res['machine']['cores']} cores)", fontsize=9)
    fig.tight_layout()
    save_figure(fig, path)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--adapters", type=int, nargs="+", default=[1, 10, 100, 1000])
    ap.add_argument("--requests", type=int, default=64)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--peft-max", type=int, default=100, help="largest N PEFT is run at (loading 1000 adapters into PEFT takes long)")
    ap.add_argument("--out", default=str(RESULTS / "serving"))
    ap.add_argument("--no-nf4", dest="nf4", action="store_false", help="skip the row on an NF4 base")
    ap.add_argument("--precision", choices=[p.value for p in Precision], default="auto",
                    help="weights and compute of every system (auto: as `lorq serve` picks, bf16 where this CPU's bf16 matmuls are faster)")
    args = ap.parse_args()
    import peft

    torch.manual_seed(0)
    path = resolve_model(None)
    dtype = weights_dtype(Precision(args.precision), torch.device("cpu"))
    model, tok, _ = load_model(None, dtype=dtype)
    jobs = workload(tok, args.requests)
    all_names = write_adapters(model, max(args.adapters), WORK)
    engine = Engine(model, tok, EngineConfig(max_batch=args.batch, max_batch_tokens=4096))
    engine.generate([(jobs[0][0], None, SamplingParams(max_tokens=4, temperature=0.0))])  # warm-up
    rows, notes = [], {}
    base_row, _ = run_lorq(engine, AdapterStore(None, engine.layers, 1), all_names, jobs, [None] * len(jobs))
    rows.append({"adapters": 0, "popularity": "none", "system": "lorq (base model only)", **base_row})
    print(rows[-1], flush=True)
    for n in sorted(args.adapters):
        names = all_names[:n]
        store = AdapterStore(WORK, engine.layers, 16 * 2**30, engine.dtype)
        start = time.perf_counter()
        for name in names:
            store.register(name) if name not in store.names else None
        notes[f"lorq, {n} adapter{'s' * (n > 1)}"] = f"{store.nbytes / 2**20:.0f} MiB of adapter weights in host memory, read in {time.perf_counter() - start:.1f} s"
        kinds = ["single"] if n == 1 else ["power-law", "uniform"]
        peft_rows, peft_outs = {}, None
        if n <= args.peft_max:
            pmodel, load_s = peft_model(path, names, WORK, dtype)
            notes[f"PEFT, {n} adapter{'s' * (n > 1)}"] = f"loaded in {load_s:.1f} s"
            which = popularity(n, len(jobs), kinds[0])
            peft_row, peft_outs = run_peft_mixed(pmodel, tok, names, jobs, which, args.batch)
            peft_rows["PEFT mixed batch"] = peft_row
            peft_rows["PEFT swap/merge one at a time"] = run_peft_swap(pmodel, tok, names, jobs, which, args.batch)
            del pmodel
        for kind in kinds:
            which = popularity(n, len(jobs), kind)
            row, outs = run_lorq(engine, store, names, jobs, which)
            if peft_outs is not None and kind == kinds[0]:
                row["agree"] = agreement(outs, peft_outs)
            rows.append({"adapters": n, "popularity": kind, "system": "lorq", **row})
            print(rows[-1], flush=True)
            if kind == kinds[0]:
                for system, r in peft_rows.items():
                    rows.append({"adapters": n, "popularity": kind, "system": system, **r})
                    print(rows[-1], flush=True)
        if n > args.peft_max:
            notes[f"PEFT, {n} adapters"] = f"not run (--peft-max {args.peft_max}): PEFT's load_adapter time grows faster than linearly with the adapters already loaded"
        del store
    if args.nf4:  # the same adapters on an NF4 (double-quantized) base: what `lorq serve --format nf` runs
        from lorq.jobs import prepare_base
        from lorq.quant import FormatConfig

        n = 100 if 100 in args.adapters else max(args.adapters)
        qbase = prepare_base(None, FormatConfig(format="nf4"))
        qengine = Engine(cast_unquantized(qbase.model, dtype), qbase.tok, EngineConfig(max_batch=args.batch, max_batch_tokens=4096))
        qengine.generate([(jobs[0][0], None, SamplingParams(max_tokens=4, temperature=0.0))])  # warm-up
        qstore = AdapterStore(WORK, qengine.layers, 16 * 2**30, qengine.dtype)
        for name in all_names[:n]:
            qstore.register(name)
        row, _ = run_lorq(qengine, qstore, all_names[:n], jobs, popularity(n, len(jobs), "power-law"))
        rows.append({"adapters": n, "popularity": "power-law", "system": "lorq, NF4 base", **row})
        print(rows[-1], flush=True)
    res = {"machine": machine(), "peft": peft.__version__, "dtype": str(dtype).removeprefix("torch."), "requests": len(jobs), "batch": args.batch, "rows": rows, "notes": notes}
    out = Path(args.out)
    write_json(out.with_suffix(".json"), res)
    atomic_write_text(out.with_suffix(".md"), table(res))
    plot(res, out.with_suffix(".png"))
    print(table(res))


if __name__ == "__main__":
    main()
