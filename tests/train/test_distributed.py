"""`torchrun --nproc-per-node 2 -m lorq finetune` (gloo, 2 CPU processes) against one process
on the same global batch: the same losses step by step and the same adapter."""

import json
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

ARGS = ["--steps", "3", "--batch-size", "2", "--block-size", "32", "--eval-blocks", "2", "--eval-every", "3",
        "--save-every", "3", "--precision", "fp32", "--rank", "4", "--dropout", "0"]


def finetune(launcher, model_dir, out, *extra):
    cmd = [sys.executable, *launcher, "-m", "lorq", "finetune", "--model", str(model_dir), "--output", str(out), *ARGS, *extra]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    return [json.loads(l) for l in (out / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.skipif(not torch.distributed.is_available(), reason="torch.distributed is not built in")
def test_two_processes_follow_the_single_process_trajectory(tiny_model_dir, tmp_path):
    one = finetune([], tiny_model_dir, tmp_path / "one")
    two = finetune(["-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2"], tiny_model_dir, tmp_path / "two")
    assert [r["step"] for r in one] == [r["step"] for r in two]
    for a, b in zip(one, two):
        for key in ("loss", "val_loss", "grad_norm"):
            if key in a:
                assert b[key] == pytest.approx(a[key], rel=1e-5), (a["step"], key)
    wa, wb = (load_file(tmp_path / d / "adapter" / "adapter_model.safetensors") for d in ("one", "two"))
    assert all(torch.allclose(wa[k], wb[k], atol=1e-5) for k in wa)
    assert json.loads((tmp_path / "two" / "summary.json").read_text())["processes"] == 2
    # resume across ranks: two more steps from the saved checkpoint, as one process would
    more = ["--steps", "5", "--resume"]
    one = finetune([], tiny_model_dir, tmp_path / "one", *more)
    two = finetune(["-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2"], tiny_model_dir, tmp_path / "two", *more)
    assert [r["step"] for r in two][-1] == 5
    assert two[-1]["loss"] == pytest.approx(one[-1]["loss"], rel=1e-5)


def test_a_batch_that_does_not_split_is_an_error(tiny_model_dir, tmp_path):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", "-m", "lorq", "finetune",
           "--model", str(tiny_model_dir), "--output", str(tmp_path / "x"), *ARGS[:2], "--batch-size", "3"]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert done.returncode != 0 and "does not split over 2 processes" in done.stderr
