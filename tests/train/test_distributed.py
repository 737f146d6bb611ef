"""`torchrun --nproc-per-node 2 -m lorq finetune` (gloo, 2 CPU processes) against one process
on the same global batch: the same losses step by step and the same adapter."""

import json
import os
import shutil
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

from lorq.errors import LorqError

ARGS = ["--steps", "3", "--batch-size", "2", "--block-size", "32", "--eval-blocks", "2", "--eval-every", "3",
        "--save-every", "3", "--precision", "fp32"]
ADAPTER = ["--rank", "4"]  # and the default dropout 0.05: two ranks draw the masks one process would


def in_tmp(path) -> dict:
    """The environment with TMPDIR in the test's own directory: torchrun leaves a
    torchelastic_* directory behind in the temporary directory per launch."""
    return {**os.environ, "TMPDIR": str(path)}


def finetune(launcher, model_dir, out, *extra):
    cmd = [sys.executable, *launcher, "-m", "lorq", "finetune", "--model", str(model_dir), "--output", str(out), *ARGS, *extra]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=in_tmp(out.parent))
    assert done.returncode == 0, done.stderr[-3000:]
    return [json.loads(l) for l in (out / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.skipif(not torch.distributed.is_available(), reason="torch.distributed is not built in")
def test_two_processes_follow_the_single_process_trajectory(tiny_model_dir, tmp_path):
    one = finetune([], tiny_model_dir, tmp_path / "one", *ADAPTER)
    two = finetune(["-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2"], tiny_model_dir, tmp_path / "two", *ADAPTER)
    assert [r["step"] for r in one] == [r["step"] for r in two]
    for a, b in zip(one, two):
        for key in ("loss", "val_loss", "grad_norm"):
            if key in a:
                assert b[key] == pytest.approx(a[key], rel=1e-5), (a["step"], key)
    wa, wb = (load_file(tmp_path / d / "adapter" / "adapter_model.safetensors") for d in ("one", "two"))
    assert all(torch.allclose(wa[k], wb[k], atol=1e-5) for k in wa)
    assert json.loads((tmp_path / "two" / "summary.json").read_text())["processes"] == 2
    # resume across ranks: two more steps from the saved checkpoint, as one process would
    more = [*ADAPTER, "--steps", "5", "--resume"]
    one = finetune([], tiny_model_dir, tmp_path / "one", *more)
    two = finetune(["-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2"], tiny_model_dir, tmp_path / "two", *more)
    assert [r["step"] for r in two][-1] == 5
    assert two[-1]["loss"] == pytest.approx(one[-1]["loss"], rel=1e-5)


def test_a_batch_that_does_not_split_is_an_error(tiny_model_dir, tmp_path):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", "-m", "lorq", "finetune",
           "--model", str(tiny_model_dir), "--output", str(tmp_path / "x"), *ARGS[:2], "--batch-size", "3"]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=in_tmp(tmp_path))
    assert done.returncode != 0 and "does not split over 2 processes" in done.stderr


TORCHRUN = ["-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2"]
FULL = ["--full", "--format", "none"]


@pytest.fixture(scope="module")
def tied_model_dir(tmp_path_factory, real_tokenizer_dir):
    """The tiny Llama with its output layer tied to the embeddings, as SmolLM2's is."""
    from conftest import tiny_llama_config
    from transformers import LlamaForCausalLM

    from lorq.models.loading import load_tokenizer

    path = tmp_path_factory.mktemp("tied-llama")
    torch.manual_seed(0)
    tok = load_tokenizer(real_tokenizer_dir)
    LlamaForCausalLM(tiny_llama_config(vocab_size=len(tok), max_position_embeddings=256, tie_word_embeddings=True)).save_pretrained(path)
    tok.save_pretrained(path)
    return path


def same_trajectory(a, b, loss_rel=1e-5, grad_rel=1e-4):
    """Same losses step by step; the gradient norm sums shards in another order (fp32)."""
    assert [r["step"] for r in a] == [r["step"] for r in b]
    for x, y in zip(a, b):
        for key, rel in (("loss", loss_rel), ("val_loss", loss_rel), ("grad_norm", grad_rel)):
            if key in x:
                assert y[key] == pytest.approx(x[key], rel=rel), (x["step"], key)


@pytest.mark.skipif(not torch.distributed.is_available(), reason="torch.distributed is not built in")
def test_fsdp_shards_full_training_and_follows_one_process(tied_model_dir, tmp_path):
    one = finetune([], tied_model_dir, tmp_path / "one", *FULL)
    two = finetune(TORCHRUN, tied_model_dir, tmp_path / "two", *FULL, "--fsdp")
    same_trajectory(one, two)
    # each rank holds half of the AdamW state (the layers' dims split evenly over 2)
    assert two[-1]["optimizer_state_mb"] == pytest.approx(one[-1]["optimizer_state_mb"] / 2, rel=0.01)
    wa, wb = (load_file(tmp_path / d / "model" / "model.safetensors") for d in ("one", "two"))
    assert set(wa) == set(wb) and "lm_head.weight" not in wb  # gathered whole, the tie kept
    assert all(torch.allclose(wa[k], wb[k], atol=1e-5) for k in wa)
    # checkpoints are whole either way: FSDP resumes a single-process one, and the other way round
    for src, dst in (("one", "fsdp-from-one"), ("two", "one-from-fsdp")):
        shutil.copytree(tmp_path / src, tmp_path / dst)
    more = ["--steps", "5", "--resume"]
    reference = finetune([], tied_model_dir, tmp_path / "one", *FULL, *more)
    for launcher, out, extra in ((TORCHRUN, "fsdp-from-one", ["--fsdp"]), ([], "one-from-fsdp", [])):
        resumed = finetune(launcher, tied_model_dir, tmp_path / out, *FULL, *more, *extra)
        same_trajectory(reference, resumed)


def test_fsdp_is_refused_where_it_cannot_shard():
    from lorq.optim import OptimConfig
    from lorq.train.distributed import World
    from lorq.train.loop import TrainConfig, check_fsdp

    fsdp = TrainConfig(fsdp=True)
    with pytest.raises(LorqError, match="one process"):
        check_fsdp(fsdp, OptimConfig(full=True).validate(), World())
    for optim in (OptimConfig(), OptimConfig(optimizer="qgalore")):
        with pytest.raises(LorqError, match="--fsdp shards full-parameter training with AdamW"):
            check_fsdp(fsdp, optim.validate(), World(0, 2))
    for optim in (OptimConfig(full=True), OptimConfig(optimizer="galore"), OptimConfig(optimizer="lisa")):  # allowed
        check_fsdp(fsdp, optim.validate(), World(0, 2))
    with pytest.raises(LorqError, match="--galore-states fp32"):
        check_fsdp(fsdp, OptimConfig(optimizer="galore", galore_states="int8").validate(), World(0, 2))
    check_fsdp(TrainConfig(), OptimConfig().validate(), World(0, 2))  # DDP: nothing to check
    with pytest.raises(LorqError, match="DDP cannot follow"):
        check_fsdp(TrainConfig(), OptimConfig(optimizer="lisa").validate(), World(0, 2))


@pytest.mark.skipif(not torch.distributed.is_available(), reason="torch.distributed is not built in")
def test_lisa_switches_layers_under_fsdp_as_in_one_process(tied_model_dir, tmp_path):
    """One of the two layers trained at a time, resampled every 2 steps (layers 0, 1, 0 with
    seed 0): the sharded run trains the same layers (no gradient for the frozen one)."""
    lisa = [*FULL[1:], "--optimizer", "lisa", "--lisa-layers", "1", "--lisa-period", "2", "--steps", "5", "--eval-every", "5", "--save-every", "5"]
    one = finetune([], tied_model_dir, tmp_path / "one", *lisa)
    two = finetune(TORCHRUN, tied_model_dir, tmp_path / "two", *lisa, "--fsdp")
    same_trajectory(one, two)
    wa, wb = (load_file(tmp_path / d / "model" / "model.safetensors") for d in ("one", "two"))
    assert all(torch.allclose(wa[k], wb[k], atol=1e-5) for k in wa)


@pytest.mark.skipif(not torch.distributed.is_available(), reason="torch.distributed is not built in")
def test_galore_under_fsdp_projects_whole_gradients_and_resumes(tied_model_dir, tmp_path):
    """Rank 64 makes the 64 x 64 matrices' projected moments shaped like their weights: they
    must stay whole (not sharded) through a checkpoint; the projection is refreshed every 2 steps."""
    galore = [*FULL[1:], "--optimizer", "galore", "--galore-rank", "64", "--galore-gap", "2", "--no-galore-layerwise",
              "--eval-every", "5", "--save-every", "3"]
    one = finetune([], tied_model_dir, tmp_path / "one", *galore, "--steps", "5")
    finetune(TORCHRUN, tied_model_dir, tmp_path / "two", *galore, "--fsdp", "--steps", "3")
    two = finetune(TORCHRUN, tied_model_dir, tmp_path / "two", *galore, "--fsdp", "--steps", "5", "--resume")
    # at full rank the SVD basis of near-equal singular values turns with fp32-level gradient
    # differences, and Adam's per-coordinate steps in that basis with it: looser than AdamW's
    same_trajectory(one, two, loss_rel=1e-4, grad_rel=2e-3)
