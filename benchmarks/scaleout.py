"""Full-parameter fine-tuning over several processes: DDP against FSDP2, in one run.

The embedded SmolLM2-135M (dense fp32 weights, `--full`, AdamW), the same global batch
(4 blocks of 256 tokens per step, the same batches), `--precision auto`:
  - one process (reference);
  - `torchrun --nproc-per-node N`: DDP, every rank holding the whole model, its gradients and
    its AdamW state;
  - the same with `--fsdp`: each rank holds 1/N of the weights, gradients and AdamW state,
    a decoder layer's weights are all-gathered just before it runs.
And both again with `--grad-checkpointing`. Each rank runs on 1 of this machine's cores (torchrun's OMP_NUM_THREADS=1; the single process
uses them all). Recorded from rank 0's metrics: peak RSS since training started, AdamW state
held, tokens/s of the whole job after the first step, loss. Writes
benchmarks/results/scaleout.{json,md}.

    .venv/bin/python benchmarks/scaleout.py            # about 7 minutes on 2 cores
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from quantization import machine  # noqa: E402
from training import BATCH, SEQ, tokens_per_second  # noqa: E402

from lorq.io import atomic_write_text, write_json  # noqa: E402

RESULTS = Path(__file__).parent / "results"
WORK = RESULTS / ".scaleout_runs"


def finetune(name: str, processes: int, extra: list[str], steps: int) -> dict:
    out = WORK / name.replace(" ", "_")
    shutil.rmtree(out, ignore_errors=True)
    launcher = ["-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={processes}"] if processes > 1 else []
    cmd = [sys.executable, *launcher, "-m", "lorq", "finetune", "--output", str(out), "--full", "--format", "none",
           "--steps", str(steps), "--batch-size", str(BATCH), "--block-size", str(SEQ), "--eval-blocks", "4", "--eval-every", str(steps),
           "--save-every", str(steps), *extra]
    print(f"{name}: {' '.join(cmd[1:])}", flush=True)
    done = subprocess.run(cmd, capture_output=True, text=True)
    if done.returncode != 0:
        raise SystemExit(f"{name} failed:\n{done.stderr[-2000:]}")
    records = [json.loads(l) for l in (out / "metrics.jsonl").read_text().splitlines()]
    trained = [r for r in records if "loss" in r]
    return {"system": name, "processes": processes,
            "tokens_per_s": round(tokens_per_second([r["step_s"] for r in trained[1:]]), 1),  # the first step warms up
            "peak_rss_mib": max(r["peak_rss_mb"] for r in trained), "optimizer_state_mib": trained[-1]["optimizer_state_mb"],
            "losses": [round(r["loss"], 4) for r in trained], "val_loss": trained[-1].get("val_loss")}


def markdown(result: dict) -> str:
    rows, m = result["rows"], result["machine"]
    ddp = {"checkpointing" in r["system"]: r for r in rows if r["system"].startswith("DDP")}  # the DDP row of the same setting
    lines = ["# Full-parameter fine-tuning over processes: DDP vs FSDP2", "",
             f"{m['cpu']}, {m['cores']} cores, torch {m['torch']}, transformers {m['transformers']}; {result['when']}.", "",
             result["setup"], "",
             "| system | processes | tokens/s | peak RSS (rank 0) | vs DDP | AdamW state per rank | vs DDP | final train loss | val loss |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        d = ddp["checkpointing" in r["system"]]
        lines.append(f"| {r['system']} | {r['processes']} | {r['tokens_per_s']:.1f} | {r['peak_rss_mib']:.0f} MiB | "
                     f"{r['peak_rss_mib'] / d['peak_rss_mib']:.2f}x | {r['optimizer_state_mib']:.0f} MiB | "
                     f"{r['optimizer_state_mib'] / d['optimizer_state_mib']:.2f}x | {r['losses'][-1]:.4f} | {r['val_loss']:.4f} |")
    lines += ["", "Ratios are against the DDP row with the same --grad-checkpointing setting.", "",
              "Loss per step: " + "; ".join(f"{r['system']}: {', '.join(map(str, r['losses']))}" for r in rows), ""]
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=6)
    p.add_argument("--processes", type=int, default=2)
    args = p.parse_args(argv)
    n = args.processes
    rows = [finetune("one process", 1, [], args.steps)]
    for ckpt in ([], ["--grad-checkpointing"]):
        for sharding in ([], ["--fsdp"]):
            name = f"{'FSDP2 (--fsdp)' if sharding else 'DDP'}{', --grad-checkpointing' if ckpt else ''}"
            rows.append(finetune(name, n, sharding + ckpt, args.steps))
    result = {"machine": machine(), "when": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "torch": torch.__version__,
              "setup": (f"Embedded SmolLM2-135M, `lorq finetune --full --format none` (AdamW, `--precision auto`), {args.steps} steps "
                        "of 4 x 256 tokens (the same global batches in every run), tokens/s over the steps after the first; "
                        "peak RSS since training started and AdamW state as rank 0 records them."),
              "rows": rows}
    RESULTS.mkdir(exist_ok=True)
    write_json(RESULTS / "scaleout.json", result)
    atomic_write_text(RESULTS / "scaleout.md", markdown(result))
    print(markdown(result))
    shutil.rmtree(WORK, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
