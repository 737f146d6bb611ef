"""`lorq finetune` with each init, variant and optimizer: it trains, the output reloads with the
model's final validation perplexity, and impossible combinations are one-line errors.
(Whether each method improves a real model is benchmarks/methods.py's question.)"""

import json
import os

import pytest
import torch

from test_cli import FAST, FULL_FAST, one_line_error, run


def finetune(capsys, tiny_model_dir, out, *extra, fast=FAST) -> dict:
    code, _, err = run(capsys, "finetune", "--model", tiny_model_dir, "--output", out, *fast, "--lr", "3e-3", "--steps", "6", "--eval-every", "6", *extra)
    assert code == 0, err
    return json.loads((out / "summary.json").read_text())


def reloaded_ppl(capsys, model, adapter=None, *extra) -> float:
    args = ["eval", "--model", model, "--eval-blocks", "2", "--block-size", "32", "--batch-size", "2", *extra]
    code, stdout, err = run(capsys, *args, *(["--adapter", adapter] if adapter else []))
    assert code == 0, err
    return float(stdout.split("perplexity ")[1].split()[0])


@pytest.mark.parametrize("extra", [
    ["--init", "pissa", "--format", "none"],
    ["--init", "olora", "--format", "none", "--variant", "dora"],
    ["--init", "lora-ga", "--format", "none", "--init-batches", "2"],
    ["--init", "nlora", "--format", "none"],
    ["--variant", "dylora", "--format", "none", "--dylora-rank", "2"],
    ["--variant", "randlora", "--format", "none", "--optimizer", "adamw8bit"],
    ["--init", "lora-sb", "--format", "none", "--init-batches", "2"],
    ["--variant", "nola", "--format", "none", "--nola-bases", "8"],
    ["--variant", "dora", "--format", "none", "--loraplus-ratio", "4", "--weight-decay", "0.1"],
], ids=lambda e: "-".join(a for a in e if not a.startswith("-"))[:40])
def test_methods_on_a_dense_base_train_and_reload(tiny_model_dir, tmp_path, capsys, extra):
    s = finetune(capsys, tiny_model_dir, tmp_path / "run", *extra)
    assert s["ppl_after"] != s["ppl_before"]  # it trained (whether a random tiny model improves in 6 steps is noise)
    ppl = reloaded_ppl(capsys, tiny_model_dir, tmp_path / "run" / "adapter", "--precision", "fp32")
    assert ppl == pytest.approx(s["ppl_after"], rel=1e-3)  # the exported adapter applies to the original model


def test_pissa_on_a_quantized_base_quantizes_the_residual(tiny_model_dir, tmp_path, capsys):
    s = finetune(capsys, tiny_model_dir, tmp_path / "run", "--init", "pissa", "--format", "nf", "--bits", "4", "--group-size", "32")
    assert s["ppl_after"] < s["ppl_before"]
    adapter = json.loads((tmp_path / "run" / "adapter" / "adapter_config.json").read_text())
    assert adapter["base_model_name_or_path"] == str(tmp_path / "run" / "base") and adapter["r"] == 4
    ppl = reloaded_ppl(capsys, tmp_path / "run" / "base", tmp_path / "run" / "adapter", "--precision", "fp32")
    assert ppl == pytest.approx(s["ppl_after"], rel=1e-3)


@pytest.mark.parametrize("extra", [["--variant", "peqa", "--format", "int", "--bits", "4", "--group-size", "32"],
                                   ["--variant", "l4q", "--format", "none", "--qat-group-size", "32"],
                                   ["--variant", "l4q", "--format", "none", "--qat-group-size", "32", "--targets", "q_proj"]])
def test_quantization_aware_variants_write_a_quantized_model(tiny_model_dir, tmp_path, capsys, extra):
    s = finetune(capsys, tiny_model_dir, tmp_path / "run", *extra)
    assert s["ppl_after"] != s["ppl_before"] and (tmp_path / "run" / "model" / "lorq_quant.json").is_file()
    meta = json.loads((tmp_path / "run" / "model" / "lorq_quant.json").read_text())
    assert all(m["format"] == "int" for m in meta["modules"].values())
    assert len(meta["modules"]) == 14  # every decoder linear of the 2-layer model, trained (--targets) or not
    # the written model is the product, evaluated as such
    assert reloaded_ppl(capsys, tmp_path / "run" / "model", None, "--precision", "fp32") == pytest.approx(s["ppl_after"], rel=1e-3)


@pytest.mark.parametrize("extra", [["--optimizer", "galore", "--galore-rank", "8", "--galore-gap", "2"],
                                   ["--optimizer", "qgalore", "--galore-rank", "8", "--galore-gap", "2"],
                                   ["--optimizer", "lisa", "--lisa-layers", "1", "--lisa-period", "2"],
                                   ["--full"]])
def test_full_parameter_training_writes_a_model(tiny_model_dir, tmp_path, capsys, extra):
    old_umask = os.umask(0o022)
    try:
        s = finetune(capsys, tiny_model_dir, tmp_path / "run", "--format", "none", *extra, fast=FULL_FAST)
    finally:
        os.umask(old_umask)
    assert (tmp_path / "run" / "model" / "model.safetensors").stat().st_mode & 0o777 == 0o644  # not save_file's 0600
    assert s["ppl_after"] < s["ppl_before"] and s["method"]["full"]
    assert s["final"]["peak_optimizer_state_mb"] > 0
    assert reloaded_ppl(capsys, tmp_path / "run" / "model", None, "--precision", "fp32") == pytest.approx(s["ppl_after"], rel=1e-3)


def test_impossible_combinations_are_one_line_errors(tiny_model_dir, tmp_path, capsys):
    base = ["finetune", "--model", tiny_model_dir, "--output", tmp_path / "x", *FAST]
    one_line_error(capsys, *base, "--optimizer", "galore", match="needs a dense base: add --format none")
    one_line_error(capsys, *base, "--full", "--format", "none", "--init", "pissa", match="apply to adapters")
    one_line_error(capsys, *base, "--init", "pissa", "--variant", "nola", "--format", "none", match="random bases by design")
    one_line_error(capsys, *base, "--init", "pissa", "--lowrank", "loftq", match="both choose the adapter's start")
    one_line_error(capsys, *base, "--init", "lora-sb", "--variant", "dora", match="needs --variant core")
    one_line_error(capsys, *base, "--optimizer", "sgd", match="invalid choice")
    one_line_error(capsys, *base, "--dylora-rank", "9", match="dylora-rank must be in")
    one_line_error(capsys, *base, "--variant", "dylora", "--init", "pissa", "--format", "none", match="drop part of the base")
    one_line_error(capsys, *base, "--variant", "peqa", match="add --format int")
    one_line_error(capsys, *base, "--variant", "dylora", "--lowrank", "loftq", match="drop part of the base")
    one_line_error(capsys, *base, "--variant", "nola", "--loraplus-ratio", "16", match="trains no B")
    one_line_error(capsys, *base, "--dylora-rank", "2", match="applies to --variant dylora")
    one_line_error(capsys, *base, "--optimizer", "lisa", "--format", "none", "--loraplus-ratio", "4", match="full-parameter training has none")
    one_line_error(capsys, *base, "--variant", "l4q", match="add --format none")
    one_line_error(capsys, *base, "--optimizer", "galore", "--format", "none", "--grad-accum", "2", match="grad-accum 1")
    one_line_error(capsys, *base, "--optimizer", "galore", "--format", "none", "--rslora", match="--rank, --rslora would be ignored")
    one_line_error(capsys, *base, "--init", "lora-sb", "--loraplus-ratio", "4", match="the core variant trains no B")
    one_line_error(capsys, *base, "--variant", "peqa", "--format", "int", "--lowrank", "loftq", "--lowrank-as", "compensate",
                   match="starts from the quantizer's own parameters")
    one_line_error(capsys, *base, "--variant", "core", "--rank", "100", "--format", "none", match="lower --rank")


def test_a_finished_dylora_run_exports_again_at_another_rank(tiny_model_dir, tmp_path, capsys):
    """DyLoRA trains every rank <= r at once: --resume with another --dylora-rank retrains nothing
    and writes the same adapter cut at the new rank."""
    from safetensors.torch import load_file

    out = tmp_path / "dy"
    finetune(capsys, tiny_model_dir, out, "--variant", "dylora", "--format", "none", "--dylora-rank", "2")
    first = load_file(out / "adapter" / "adapter_model.safetensors")
    s = finetune(capsys, tiny_model_dir, out, "--variant", "dylora", "--format", "none", "--dylora-rank", "3", "--resume")
    again = load_file(out / "adapter" / "adapter_model.safetensors")
    assert json.loads((out / "adapter" / "adapter_config.json").read_text())["r"] == 3
    for key, t in first.items():
        assert again[key].shape[0 if "lora_A" in key else 1] == 3
        cut = again[key][:2] if "lora_A" in key else again[key][:, :2]
        assert torch.equal(cut, t)
    assert reloaded_ppl(capsys, tiny_model_dir, out / "adapter", "--precision", "fp32") == pytest.approx(s["ppl_after"], rel=1e-3)
