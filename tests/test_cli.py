"""The CLI end to end on a tiny random Llama, and one-line errors (exit 2) for bad input."""

import json
import os

import pytest
import torch

from lorq.cli import main

FAST = ["--steps", "3", "--batch-size", "2", "--block-size", "32", "--eval-blocks", "2", "--eval-every", "3", "--save-every", "3", "--precision", "fp32", "--rank", "4"]
FULL_FAST = FAST[:-2]  # full-parameter training has no adapter: no --rank


def run(capsys, *args):
    code = main([str(a) for a in args])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def one_line_error(capsys, *args, match: str):
    code, _, err = run(capsys, *args)
    assert code == 2, err
    lines = [l for l in err.splitlines() if l.strip() and "%|" not in l]  # progress bars aside
    assert len(lines) == 1 and lines[0].startswith("lorq: error:"), err
    assert match in lines[0], lines[0]


def test_finetune_writes_a_peft_adapter_that_peft_loads(tiny_model_dir, tmp_path, capsys):
    peft = pytest.importorskip("peft")
    from tests_helpers import dequantized_copy

    from lorq.adapters import load_peft
    from lorq.models.loading import load_model
    from lorq.quant import DECODER_LINEARS, FormatConfig, quantize_model

    out = tmp_path / "run"
    code, stdout, err = run(capsys, "finetune", "--model", tiny_model_dir, "--output", out, *FAST)
    assert code == 0, err
    assert "perplexity" in stdout
    for f in ["adapter/adapter_config.json", "adapter/adapter_model.safetensors", "metrics.jsonl", "loss.png", "summary.json"]:
        assert (out / f).is_file(), f
    summary = json.loads((out / "summary.json").read_text())
    assert summary["trainable_parameters"] > 0 and summary["ppl_after"] > 0

    model, _, _ = load_model(str(tiny_model_dir))
    quantize_model(model, [(DECODER_LINEARS, FormatConfig())], progress=False)
    dense = dequantized_copy(model)
    load_peft(model, out / "adapter")
    pm = peft.PeftModel.from_pretrained(dense, out / "adapter").eval()
    x = torch.randint(0, 1000, (2, 24))
    with torch.no_grad():
        assert (pm(x).logits - model(x).logits).abs().max() <= 1e-4


def test_quantize_eval_generate_and_yaml(tiny_model_dir, tmp_path, capsys):
    q = tmp_path / "q"
    code, stdout, err = run(capsys, "quantize", "--model", tiny_model_dir, "--output", q, "--format", "int", "--group", "32")
    assert code == 0, err and "bits/weight" in stdout
    assert json.loads((q / "lorq_quant.json").read_text())["format_version"] == 2
    code, stdout, err = run(capsys, "eval", "--model", q, "--eval-blocks", "2", "--block-size", "32")
    assert code == 0, err
    assert "perplexity" in stdout
    one_line_error(capsys, "eval", "--model", q, "--format", "nf", match="already quantized; leave out --format")
    one_line_error(capsys, "finetune", "--format", "none", "--lowrank", "loftq", match="needs a format")
    one_line_error(capsys, "finetune", "--model", "/nonexistent", "--format", "none", "--budget-bits", "3", "--output", tmp_path / "b", match="needs a quantization format")
    cfg = tmp_path / "gen.yaml"
    cfg.write_text("prompt: hello\nmax_new_tokens: 3\n")
    code, stdout, err = run(capsys, "generate", "--model", tiny_model_dir, "--config", cfg, "--no-chat")
    assert code == 0, err
    code, stdout, err = run(capsys, "generate", "--model", tiny_model_dir, "--config", cfg, "--no-chat", "--temperature", "0.7", "--top-k", "5",
                            "--repetition-penalty", "1.3")
    assert code == 0, err
    one_line_error(capsys, "generate", "--model", tiny_model_dir, "--top-k", "-1", match="top-k must be >= 0, got -1")
    one_line_error(capsys, "generate", "--model", tiny_model_dir, "--top-p", "0", match="top-p must be in (0, 1], got 0.0")  # the one at fault, by name
    cfg.write_text("lora:\n  rank: 2\ntrain:\n  steps: 1\n  eval_blocks: 1\n  batch_size: 1\ndata:\n  block_size: 16\n")
    code, stdout, err = run(capsys, "finetune", "--model", tiny_model_dir, "--config", cfg, "--output", tmp_path / "y", "--precision", "fp32")
    assert code == 0, err
    assert json.loads((tmp_path / "y" / "adapter" / "adapter_config.json").read_text())["r"] == 2


def test_quantize_methods_rules_and_report(tiny_model_dir, tmp_path, capsys):
    rules = tmp_path / "rules.yaml"
    rules.write_text("- {pattern: 'mlp\\.down_proj', format: int, bits: 8, method: rtn}\n- {pattern: q_proj, format: nf, bits: 3}\n")
    q = tmp_path / "q"
    cfg = tmp_path / "q.yaml"
    cfg.write_text("quant: {format: int, bits: 3, group: 32}\nmethod: gptq\n")  # the --group alias works in YAML too
    code, stdout, err = run(capsys, "quantize", "--model", tiny_model_dir, "--output", q, "--config", cfg,
                            "--rules", rules, "--calib-samples", "4", "--calib-seq-len", "64", "--eval-blocks", "2")
    assert code == 0, err
    assert "bits/weight" in stdout and "validation perplexity" in stdout and "MiB on disk" in stdout
    report = json.loads((q / "report.json").read_text())
    assert set(report) >= {"bits_per_weight", "relative_error", "val_ppl", "seconds", "size_on_disk_mb"}
    modules = json.loads((q / "lorq_quant.json").read_text())["modules"]
    assert modules["model.layers.0.mlp.down_proj"]["bits"] == 8 and modules["model.layers.0.mlp.down_proj"]["method"] == "rtn"
    assert modules["model.layers.0.self_attn.q_proj"]["format"] == "nf" and modules["model.layers.0.self_attn.q_proj"]["method"] == "gptq"
    assert modules["model.layers.0.mlp.up_proj"] | {"method": "gptq", "bits": 3, "group_size": 32} == modules["model.layers.0.mlp.up_proj"]
    # the saved model evaluates to the perplexity the report printed
    code, stdout, err = run(capsys, "eval", "--model", q, "--eval-blocks", "2")
    assert code == 0, err
    assert f"perplexity {report['val_ppl']:.3f}" in stdout


def test_quantize_lowrank_with_a_bit_budget(tiny_model_dir, tmp_path, capsys, monkeypatch):
    q = tmp_path / "lr"
    code, stdout, err = run(capsys, "quantize", "--model", tiny_model_dir, "--output", q, "--lowrank", "lq-lora", "--rank", "4",
                            "--group", "32", "--budget-bits", "5.9", "--budget-ranks", "4", "--budget-weighting", "none", "--eval-blocks", "2")
    assert code == 0, err
    assert "| layer |" in stdout and "lq-lora r4" in stdout  # the per-layer plan and the report
    report = json.loads((q / "report.json").read_text())
    assert report["bits_per_weight"] <= 5.9 and report["budget"]["target_bits"] == 5.9
    meta = json.loads((q / "lorq_quant.json").read_text())
    assert meta["budget"]["allocation"] == "ilp" and len(meta["rules"]) == 15  # 14 per-matrix rules + the default
    assert any(m.get("rank") == 4 and m["lowrank"] == "lq-lora" for m in meta["modules"].values())
    code, stdout, err = run(capsys, "eval", "--model", q, "--eval-blocks", "2")
    assert code == 0, err
    assert float(stdout.split("perplexity ")[1].split()[0]) == pytest.approx(report["val_ppl"], rel=1e-6)
    # eora computes input covariances on calibration data, whatever the rounding method
    code, _, err = run(capsys, "quantize", "--model", tiny_model_dir, "--output", tmp_path / "eora", "--lowrank", "eora", "--rank", "2",
                       "--calibration", tiny_model_dir / "config.json", "--calib-samples", "2", "--calib-seq-len", "16", "--eval-blocks", "0")
    assert code == 0, err
    one_line_error(capsys, "quantize", "--model", tiny_model_dir, "--lowrank", "lorc", "--rank", "0", match="needs --rank >= 1")
    one_line_error(capsys, "quantize", "--model", tiny_model_dir, "--lowrank", "svd", match="invalid choice")
    one_line_error(capsys, "quantize", "--model", tiny_model_dir, "--budget-bits", "2.01", "--budget-weighting", "none", match="below the cheapest")
    import lorq.jobs as jobs
    monkeypatch.setattr(jobs, "fisher_weights", lambda *a, **k: pytest.fail("an unreachable budget is refused before Fisher calibration"))
    one_line_error(capsys, "quantize", "--model", tiny_model_dir, "--budget-bits", "2.01", match="below the cheapest plan, 2.")
    one_line_error(capsys, "quantize", "--model", tiny_model_dir, "--budget-bits", "1.5", match="below the 2 bits of the smallest code")
    one_line_error(capsys, "quantize", "--model", tiny_model_dir, "--budget-bits", "40", match="budget-bits must be")


def finetune_lowrank(capsys, tiny_model_dir, out, *extra) -> dict:
    """Fine-tune on a 3-bit compensated base; the saved base + adapter evaluate to the final perplexity."""
    code, _, err = run(capsys, "finetune", "--model", tiny_model_dir, "--output", out, *FAST, "--format", "nf", "--bits", "3", "--group", "32", *extra)
    assert code == 0, err
    summary = json.loads((out / "summary.json").read_text())
    code, stdout, err = run(capsys, "eval", "--model", out / "base", "--adapter", out / "adapter", "--eval-blocks", "2", "--block-size", "32")
    assert code == 0, err
    assert f"perplexity {summary['ppl_after']:.3f}" in stdout
    return json.loads((out / "base" / "lorq_quant.json").read_text())["modules"]


def test_finetune_from_lq_lora_factors(tiny_model_dir, tmp_path, capsys):
    out = tmp_path / "lq"
    modules = finetune_lowrank(capsys, tiny_model_dir, out, "--lowrank", "lq-lora", "--dropout", "0")
    config = json.loads((out / "adapter" / "adapter_config.json").read_text())
    assert config["base_model_name_or_path"] == str(out / "base")  # the adapter belongs to that Q
    assert not any("rank" in m for m in modules.values())  # the factors moved into the adapter


def test_finetune_over_a_frozen_compensation(tiny_model_dir, tmp_path, capsys):
    modules = finetune_lowrank(capsys, tiny_model_dir, tmp_path / "comp", "--lowrank", "lorc", "--lowrank-as", "compensate")
    assert all(m["rank"] == 4 and m["lowrank"] == "lorc" for m in modules.values())  # the branch stays in the base


def file_modes(root) -> dict[str, int]:
    return {str(f.relative_to(root)): f.stat().st_mode & 0o777 for f in root.rglob("*") if f.is_file()}


def test_resume_via_cli(tiny_model_dir, tmp_path, capsys, monkeypatch):
    out = tmp_path / "r"
    args = ["finetune", "--model", tiny_model_dir, "--output", out, *FAST]
    old_umask = os.umask(0o022)
    try:
        assert run(capsys, *args)[0] == 0
        code, _, err = run(capsys, "quantize", "--model", tiny_model_dir, "--output", tmp_path / "q", "--eval-blocks", "0")
        assert code == 0, err
    finally:
        os.umask(old_umask)
    modes = {**file_modes(out), **file_modes(tmp_path / "q")}  # safetensors' save_file alone makes 0600 files
    assert "adapter/adapter_model.safetensors" in modes and "model.safetensors" in modes
    assert {f: m for f, m in modes.items() if m != 0o644} == {}
    code, stdout, err = run(capsys, *args, "--resume", "--steps", "4")
    assert code == 0, err
    assert "resuming from" in stdout
    assert json.loads((out / "metrics.jsonl").read_text().splitlines()[-1])["step"] == 4
    for changed, match in ((["--format", "int"], "made with --format nf, this command gives int"),
                           (["--block-size", "16"], "--block-size 32, this command gives 16")):
        one_line_error(capsys, *args, "--resume", "--steps", "5", *changed, match=match)
    one_line_error(capsys, "finetune", "--model", "/nonexistent/model", "--output", tmp_path / "none", "--resume", match="no checkpoint")
    one_line_error(capsys, *args, "--resume", "--steps", "3", match="at step 4, past --steps 3")
    latest = out / "checkpoints" / (out / "checkpoints" / "latest").read_text().strip()
    recorded = json.loads((latest / "options.json").read_text())
    # as lorq recorded them before --lisa-embeddings had three choices; other optimizers' options do not matter
    recorded.pop("weight_decay")  # an option added since counts at its default
    (latest / "options.json").write_text(json.dumps({**recorded, "lisa_embeddings": True, "galore_rank": 7}))
    with (out / "metrics.jsonl").open("a") as f:
        f.write("{not json\n[1]\n")  # damaged log lines are dropped on resume
    code, _, err = run(capsys, *args, "--resume", "--steps", "5")
    assert code == 0, err
    assert [json.loads(l)["step"] for l in (out / "metrics.jsonl").read_text().splitlines()][-1] == 5
    latest = out / "checkpoints" / (out / "checkpoints" / "latest").read_text().strip()
    for name, match in (("state.pt", "state.pt is missing or unreadable"), ("trainable.safetensors", "not a readable safetensors file")):
        whole = (latest / name).read_bytes()
        (latest / name).write_bytes(whole[: len(whole) // 2])  # cut short: reported before the model loads
        with monkeypatch.context() as m:
            m.setattr("lorq.jobs.load_model", lambda *a, **k: pytest.fail("the model was loaded before the checkpoint was checked"))
            one_line_error(capsys, *args, "--resume", "--steps", "6", match=match)
        (latest / name).write_bytes(whole)
    (out / "checkpoints" / "latest").write_bytes(b"\xff\xfe")
    one_line_error(capsys, *args, "--resume", "--steps", "6", match="latest is damaged")


def test_bad_inputs_get_one_line_errors(tiny_model_dir, tmp_path, capsys):
    from transformers import BertConfig, BertModel

    one_line_error(capsys, "eval", "--model", tmp_path / "nope", match="not found")
    one_line_error(capsys, "eval", "--model", "some-org/some-hub-model", match="never downloads")
    bert = tmp_path / "bert"
    BertModel(BertConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=37)).save_pretrained(bert)
    one_line_error(capsys, "eval", "--model", bert, match="not a causal language model")
    one_line_error(capsys, "finetune", "--model", tiny_model_dir, "--targets", "nothing_matches", *FAST[:-2], "--output", tmp_path / "run", match="match no linear layer")
    assert not (tmp_path / "run").exists()  # a run refused before its first write leaves no directory behind
    empty = tmp_path / "empty.txt"
    empty.write_text("")
    one_line_error(capsys, "finetune", "--model", tiny_model_dir, "--train-file", empty, *FAST, "--output", tmp_path / "run", match="is empty")
    bad = tmp_path / "bad.jsonl"
    bad.write_text("{not json\n")
    one_line_error(capsys, "finetune", "--model", tiny_model_dir, "--train-file", bad, *FAST, "--output", tmp_path / "run", match="not valid JSON")
    one_line_error(capsys, "finetune", "--rank", "0", match="rank must be a positive integer")
    one_line_error(capsys, "quantize", "--model", tiny_model_dir, "--bits", "5", "--output", tmp_path / "q3", match="unsupported bits 5")
    one_line_error(capsys, "quantize", "--model", tiny_model_dir, "--method", "hqq", "--format", "nf", match="asymmetric affine")
    one_line_error(capsys, "quantize", "--model", tiny_model_dir, "--rules", tmp_path / "missing.yaml", match="rules file")
    one_line_error(capsys, "quantize", "--model", tiny_model_dir, "--rules", tmp_path, match="not found (it is a directory)")
    one_line_error(capsys, "finetune", "--model", tiny_model_dir, "--train-file", tmp_path, *FAST, "--output", tmp_path / "run",
                   match=f"training file {tmp_path} not found (it is a directory)")
    one_line_error(capsys, "eval", "--model", tiny_model_dir, "--data-file", tmp_path, match=f"data file {tmp_path} not found (it is a directory)")
    typo = tmp_path / "typo.yaml"
    typo.write_text("- {pattern: 'mlp\\.down_prj', format: int, bits: 8}\n")
    one_line_error(capsys, "quantize", "--model", tiny_model_dir, "--rules", typo, "--output", tmp_path / "q4", match="matches no linear layer")
    one_line_error(capsys, "quantize", "--model", tiny_model_dir, "--lowrank", "lorc", "--rank", "5000", "--output", tmp_path / "q4", match="exceeds")
    for budget, match in ((["--budget-groups", "3"], "group size"), (["--format", "fp8"], "supports bits")):
        one_line_error(capsys, "quantize", "--model", "/nonexistent", "--budget-bits", "3", *budget, "--output", tmp_path / "q5", match=match)
    one_line_error(capsys, "finetune", "--model", "/nonexistent", "--optimizer", "lisa", "--lisa-layers", "0", match="lisa-layers")
    one_line_error(capsys, "finetune", "--model", "/nonexistent", "--lowrank-as", "compensate", match="applies with --lowrank")
    one_line_error(capsys, "finetune", "--model", "/nonexistent", "--optimizer", "galore", "--format", "none", "--grad-accum", "2", match="grad-accum 1")
    one_line_error(capsys, "quantize", "--format", "int7", match="invalid choice")
    one_line_error(capsys, "quantize", "--group", "3", match="group size must be")
    one_line_error(capsys, "quantize", "--method", "gptq", "--calib-samples", "0", match="calib-samples must be positive, got 0")
    one_line_error(capsys, "quantize", "--model", tiny_model_dir, "--method", "gptq", "--calib-file", tmp_path / "nope.txt", match="not found")
    one_line_error(capsys, "finetune", "--steps", "many", match="invalid int value")
    one_line_error(capsys, "generate", "--max-new-tokens", "0", match="max-new-tokens must be positive")
    one_line_error(capsys, "generate", "--model", tiny_model_dir, "--max-new-tokens", "300", match="model's context of 256")
    one_line_error(capsys, "generate", "--model", tiny_model_dir, "--prompt", "", "--no-chat", match="prompt is empty")
    one_line_error(capsys, "eval", "--model", tiny_model_dir, "--block-size", "300", match="exceeds the model's context of 256")
    one_line_error(capsys, "quantize", "--model", tiny_model_dir, "--output", tmp_path / "q", "--group-size", "2000000000", match="group size must be at most")
    one_line_error(capsys, "quantize", "--model", tiny_model_dir, "--output", tmp_path / "q", "--budget-bits", "4.5", "--budget-ranks", "4",
                   "--eval-blocks", "0", match="--budget-ranks picks ranks of --lowrank factors")
    one_line_error(capsys, "eval", "--model", "", match="--model is empty")
    one_line_error(capsys, "serve", "--model", tiny_model_dir, "--max-model-len", "300", match="exceeds the model's context of 256")
    one_line_error(capsys, "finetune", "--resume", "--model", tiny_model_dir, "--output", tmp_path / "fresh", *FAST, match="no checkpoint")

    # an adapter for another base, and a corrupt safetensors file
    from lorq.adapters import LoRAConfig, add_adapters, save_peft
    from transformers import LlamaForCausalLM

    from conftest import tiny_llama_config

    other = LlamaForCausalLM(tiny_llama_config(hidden_size=32, intermediate_size=64))
    add_adapters(other, LoRAConfig(rank=2))
    save_peft(other, tmp_path / "other")
    one_line_error(capsys, "eval", "--model", tiny_model_dir, "--adapter", tmp_path / "other", "--eval-blocks", "1", match="does not fit the base model")
    (tmp_path / "other" / "adapter_model.safetensors").write_bytes(b"\x00\x01corrupt")
    one_line_error(capsys, "eval", "--model", tiny_model_dir, "--adapter", tmp_path / "other", match="not a readable safetensors")
    assert not any(p.name.startswith(".") for p in tmp_path.iterdir())  # no half-written leftovers


def test_nonsense_values_are_refused_up_front(tiny_model_dir, tmp_path, capsys):
    cases = [
        (["finetune", "--lr", "nan"], "finite"), (["finetune", "--alpha", "inf"], "finite"),
        (["finetune", "--alpha", "0"], "alpha must be a positive"), (["finetune", "--alpha", "-8"], "alpha must be a positive"),
        (["finetune", "--weight-decay", "-1"], "weight-decay"), (["finetune", "--max-grad-norm", "-1"], "max-grad-norm"),
        (["finetune", "--targets", "(unclosed"], "not a valid regular expression"), (["finetune", "--targets", ""], "empty --targets"),
        (["finetune", "--adapter-name", ""], "adapter-name"), (["finetune", "--adapter-name", "a.b"], "adapter-name"),
        (["generate", "--temperature", "nan"], "finite"), (["quantize", "--outlier-threshold", "nan"], "finite"),
        (["quantize", "--format", "int8-outlier", "--outlier-threshold", "0"], "outlier-threshold"),
        (["quantize", "--method", "hqq", "--format", "int", "--hqq-lp-norm", "0"], "hqq-lp-norm"),
        (["quantize", "--method", "hqq", "--format", "int", "--hqq-kappa", "0.5"], "hqq-kappa"),
        (["serve", "--adapter-cache-mb", "nan"], "finite"), (["serve", "--adapter-cache-mb", "1e-9"], "less than one byte"),
        (["serve", "--targets", "["], "not a valid regular expression"), (["serve", "--served-name", ""], "empty"),
        (["serve", "--api-key", "a\nb"], "printable ASCII"), (["generate", "--temperature", "1e-320"], "at least 1e-4"),
        (["generate", "--prompt", "\ud800"], "unpaired surrogate"), (["eval", "--adapter", "/nonexistent"], "not found"),
        (["eval", "--data-file", "/nonexistent.txt"], "not found"), (["finetune", "--train-file", "/nonexistent.txt"], "not found"),
        (["quantize", "--calib-file", "/nonexistent.txt"], "not found"),
        (["quantize", "--format", "int4", "--bits", "8"], "format int4 is 4-bit, not 8"),
        (["quantize", "--format", "nf4", "--bits", "3"], "use format nf with bits 3"),
    ]
    for args, match in cases:
        one_line_error(capsys, *args, "--model", tiny_model_dir, "--output", tmp_path / "out", match=match) if args[0] in ("finetune", "quantize") \
            else one_line_error(capsys, *args, "--model", tiny_model_dir, match=match)
    config = tmp_path / "c.yaml"
    for text, match in (("steps: 1.7\n", "invalid value 1.7"), ("steps: true\n", "invalid value True"),
                        ("lr: true\n", "invalid value True for lr"), ("steps: null\n", "steps cannot be null"),
                        ("output: [a, b]\n", "for output (expected str"), ("targets: [1, true]\n", "for targets"),
                        ("budget_choices: [2.7]\n", "budget-choices"), ("5: 5\n", "option names are text"),
                        ("seed: 99999999999999999999\n", "for seed"), ("format: nf4\nbits: 3\n", "format nf4 is 4-bit, not 3"),
                        ("lisa_embeddings: false\n", "for lisa-embeddings (expected one of auto, train, freeze)"),
                        ("lora: null\n", "lora is a section: give it a mapping"), ("lora: {rank: 2}\nrank: 3\n", "option rank is given twice"),
                        ("quant: {group: 32, group_size: 64}\n", "option group_size is given twice")):
        config.write_text(text)
        one_line_error(capsys, "finetune", "--config", config, match=match)
    config.write_bytes(b"steps: \xff\xfe\n")
    one_line_error(capsys, "finetune", "--config", config, match="not valid YAML")
    one_line_error(capsys, "finetune", "--config", tmp_path, match="not found (it is a directory)")


def test_system_errors_and_the_unexpected_are_one_line(tiny_model_dir, tmp_path, capsys, monkeypatch):
    import socket

    from lorq import jobs

    (tmp_path / "file").write_text("x")
    one_line_error(capsys, "quantize", "--model", tiny_model_dir, "--format", "int", "--output", tmp_path / "file" / "q", match="is a file")
    broken = tmp_path / "truncated"
    broken.mkdir()
    for f in tiny_model_dir.iterdir():
        (broken / f.name).write_bytes(f.read_bytes()[: 100] if f.name == "model.safetensors" else f.read_bytes())
    one_line_error(capsys, "eval", "--model", broken, match="cannot load the model")
    from safetensors.torch import load_file, save_file

    weights = load_file(tiny_model_dir / "model.safetensors")
    save_file({k: v for k, v in weights.items() if k != "model.norm.weight"}, broken / "model.safetensors", metadata={"format": "pt"})
    one_line_error(capsys, "eval", "--model", broken, match="1 weights are missing")  # not silently random
    config = json.loads((tiny_model_dir / "config.json").read_text())
    (broken / "config.json").write_text(json.dumps({**config, "intermediate_size": 2 * config["intermediate_size"]}))
    (broken / "model.safetensors").write_bytes((tiny_model_dir / "model.safetensors").read_bytes())
    one_line_error(capsys, "eval", "--model", broken, match="shapes do not match its config.json")
    layers = config["num_hidden_layers"]
    (broken / "config.json").write_text(json.dumps({**config, "num_hidden_layers": layers - 1}))  # a layer would be dropped silently
    one_line_error(capsys, "eval", "--model", broken, match="are not in its config.json's architecture")
    (broken / "config.json").write_text(json.dumps(config))
    save_file({**weights, "model.layers.0.self_attn.masked_bias": torch.tensor(-1e4)}, broken / "model.safetensors", metadata={"format": "pt"})
    code, _, err = run(capsys, "eval", "--model", broken, "--eval-blocks", "1", "--block-size", "32")
    assert code == 0, err  # a leftover buffer (old GPT-2 / GPT-Neo attention masks) is no weight: it loads as before
    (broken / "config.json").write_text(json.dumps({**config, "max_position_embeddings": -5}))
    one_line_error(capsys, "eval", "--model", broken, match="max_position_embeddings -5; it must be a positive integer")
    (broken / "config.json").write_text(json.dumps({**config, "rms_norm_eps": float("nan")}))  # Python's json writes NaN
    one_line_error(capsys, "eval", "--model", broken, match="non-finite values: rms_norm_eps = nan")
    (broken / "config.json").write_text(json.dumps({**config, "hidden_size": str(config["hidden_size"])}))
    one_line_error(capsys, "eval", "--model", broken, match="expected int, got str")
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        one_line_error(capsys, "serve", "--model", tiny_model_dir, "--port", busy.getsockname()[1], match="cannot listen")

    if os.path.isdir("/proc/self"):  # an output the system refuses (as a read-only mount would): status 1, not 2
        code, _, err = run(capsys, "quantize", "--model", tiny_model_dir, "--output", "/proc/lorq-q", "--eval-blocks", "0")
        assert code == 1 and len(err.strip().splitlines()) == 1 and "cannot create output /proc/lorq-q: /proc refuses new files" in err, err
    for error, line in ((PermissionError(13, "Permission denied", "/data/x"), "lorq: error: Permission denied: /data/x"),
                        (KeyError("a bug"), "lorq: error: KeyError: 'a bug' (unexpected; LORQ_DEBUG=1 shows the traceback)")):
        def broken_job(cfg, error=error):
            raise error

        monkeypatch.setattr(jobs, "run_eval", broken_job)
        code, _, err = run(capsys, "eval")
        assert code == 1 and err.strip().splitlines() == [line], err


def test_every_command_has_help(capsys):
    from lorq.cli import COMMANDS

    for command in COMMANDS:
        with pytest.raises(SystemExit) as exit_:
            main([command, "--help"])
        assert exit_.value.code == 0 and "--model" in capsys.readouterr().out, command


def test_every_option_shows_its_default():
    """README: `--help` lists every option with its default (an explanation that mentions the
    word "default" hid it once)."""
    import argparse

    from lorq.cli import make_parser

    commands = next(a for a in make_parser()._actions if isinstance(a, argparse._SubParsersAction)).choices
    for name, parser in commands.items():
        for action in parser._actions:
            if action.dest != "help":
                assert "default:" in (action.help or ""), f"lorq {name} {action.option_strings[0]}: {action.help}"


def test_merge_and_export_via_cli(tiny_model_dir, adapters, tmp_path, capsys):
    out = tmp_path / "merged"
    code, stdout, err = run(capsys, "merge", "--model", tiny_model_dir, "--adapter", *adapters, "--weights", "1", "0.5",
                            "--format", "nf", "--output", out, "--eval-blocks", "1")
    assert code == 0, err
    assert "naive merge" in stdout and "peak memory" in stdout
    report = json.loads((out / "merge_report.json").read_text())
    assert report["kind"] == "quantized" and report["requant"] == "loftq" and report["ppl_merged"] > 0
    code, stdout, err = run(capsys, "export", "--model", out, "--output", tmp_path / "m.gguf", "--outtype", "q8_0", "--no-verify")
    assert code == 0, err and (tmp_path / "m.gguf").is_file()
    code, stdout, err = run(capsys, "eval", "--model", out, "--eval-blocks", "1", "--block-size", "32")
    assert code == 0, err


def test_merge_and_export_bad_inputs(tiny_model_dir, adapters, tmp_path, capsys):
    base = ["merge", "--model", tiny_model_dir, "--output", tmp_path / "m"]
    one_line_error(capsys, *base, match="at least one adapter")
    one_line_error(capsys, *base, "--adapter", tmp_path / "nope", match="not found")
    one_line_error(capsys, *base, "--adapter", *adapters, "--weights", "1", match="one weight per adapter")
    one_line_error(capsys, *base, "--adapter", adapters[0], "--requant", "fold", "--merge-rank", "4", match="does not apply")
    one_line_error(capsys, *base, "--adapter", adapters[0], "--requant-method", "gptq", match="calibration")
    one_line_error(capsys, "merge", "--model", tiny_model_dir, "--adapter", adapters[0], "--output", tiny_model_dir / "sub", match="overlaps")
    one_line_error(capsys, "export", "--model", tiny_model_dir, "--outtype", "q4", match="invalid choice")
    one_line_error(capsys, "export", "--model", tmp_path / "nope", match="not found")
    assert not (tmp_path / "m").exists() and not (tiny_model_dir / "sub").exists()
    one_line_error(capsys, *base, "--adapter", adapters[0], "--weights", "1e9", "--dtype", "fp16", "--eval-blocks", "0", match="non-finite values")
    one_line_error(capsys, "export", "--model", tiny_model_dir, "--weights", "2", match="there is none")
    lying = tmp_path / "lying"  # a config.json that contradicts the stored tensors
    lying.mkdir()
    for f in tiny_model_dir.iterdir():
        (lying / f.name).write_bytes(f.read_bytes())
    config = json.loads((lying / "config.json").read_text())
    (lying / "config.json").write_text(json.dumps({**config, "vocab_size": 1000}))
    for command in ("merge", "export"):
        one_line_error(capsys, command, "--model", lying, "--adapter", adapters[0], "--output", tmp_path / f"lying-{command}", "--eval-blocks", "0",
                       match="its config.json says (1000, ") if command == "merge" else \
            one_line_error(capsys, command, "--model", lying, "--output", tmp_path / "lying.gguf", match="its config.json says (1000, ")
    for bad in ("nan", "inf"):
        one_line_error(capsys, *base, "--adapter", adapters[0], "--weights", bad, match="finite")
        one_line_error(capsys, "export", "--model", tiny_model_dir, "--adapter", adapters[0], "--weights", bad, "--output", tmp_path / "x.gguf", match="finite")


def test_outputs_never_destroy_the_inputs_or_foreign_files(tiny_model_dir, adapters, tmp_path, capsys):
    before = {p.name: p.read_bytes() for p in tiny_model_dir.iterdir()}
    foreign = tmp_path / "mine"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("keep me")
    fast_quant = ["--format", "int", "--eval-blocks", "0"]
    for out in (tiny_model_dir, tiny_model_dir.parent):
        one_line_error(capsys, "quantize", "--model", tiny_model_dir, "--output", out, *fast_quant, match="overlaps")
    one_line_error(capsys, "quantize", "--model", tiny_model_dir, "--output", foreign, *fast_quant, match="not a quantized checkpoint")
    one_line_error(capsys, "quantize", "--model", tiny_model_dir, "--output", foreign / "notes.txt", *fast_quant, match="not a directory")
    one_line_error(capsys, "merge", "--model", tiny_model_dir, "--adapter", adapters[0], "--output", foreign, match="not a merged model")
    one_line_error(capsys, "finetune", "--model", tiny_model_dir, "--output", foreign, *FAST, match="not a fine-tuning run")
    (foreign / "metrics.jsonl").write_text("{}\n")
    (foreign / "checkpoints" / "step-000100").mkdir(parents=True)  # names alone do not make a lorq run
    one_line_error(capsys, "finetune", "--model", tiny_model_dir, "--output", foreign, *FAST, match="not a fine-tuning run")
    data = tmp_path / "q-old"
    data.mkdir()
    (data / "lorq_quant.json").write_text("{}")
    (data / "calib.txt").write_text("text " * 200)
    (data / "run.yaml").write_text("format: int\n")
    one_line_error(capsys, "quantize", "--model", tiny_model_dir, "--output", data, "--calib-file", data / "calib.txt", match="overlaps")
    one_line_error(capsys, "quantize", "--model", tiny_model_dir, "--output", data, "--config", data / "run.yaml", match="overlaps")
    assert sorted(p.name for p in data.iterdir()) == ["calib.txt", "lorq_quant.json", "run.yaml"]
    for out in (tiny_model_dir / "model.safetensors", foreign / "notes.txt"):
        one_line_error(capsys, "export", "--model", tiny_model_dir, "--output", out, match="overlaps" if out.parent == tiny_model_dir else "not a GGUF file")
    assert {p.name: p.read_bytes() for p in tiny_model_dir.iterdir()} == before
    assert (foreign / "notes.txt").read_text() == "keep me" and (foreign / "checkpoints" / "step-000100").is_dir()
    # an earlier output of the same kind is replaced, as before
    q = tmp_path / "q"
    for _ in range(2):
        code, _, err = run(capsys, "quantize", "--model", tiny_model_dir, "--output", q, *fast_quant)
        assert code == 0, err
    assert (q / "generation_config.json").is_file()  # the model's end-of-sequence ids travel with it
    (q / "NOTES.md").write_text("mine")  # but not over what a user put beside it
    (q / "eval_results").mkdir()
    one_line_error(capsys, "quantize", "--model", tiny_model_dir, "--output", q, *fast_quant,
                   match="also holds what lorq did not write there (NOTES.md, eval_results)")
    assert (q / "NOTES.md").read_text() == "mine" and (q / "lorq_quant.json").is_file()


def test_a_rerun_drops_the_results_it_does_not_write(tiny_model_dir, tmp_path, capsys):
    """A run over a compensated base wrote base/; a plain run into the same directory must not
    leave that base beside its own adapter (eval of the pair would score the wrong base)."""
    out = tmp_path / "ft"
    finetune_lowrank(capsys, tiny_model_dir, out, "--lowrank", "lorc", "--lowrank-as", "compensate")
    code, _, err = run(capsys, "finetune", "--model", tiny_model_dir, "--output", out, *FAST)
    assert code == 0, err
    assert not (out / "base").exists() and (out / "adapter" / "adapter_config.json").is_file()


def test_serve_bad_inputs(tiny_model_dir, tmp_path, capsys):
    one_line_error(capsys, "serve", "--model", tiny_model_dir, "--adapters", tmp_path / "nope", match="not a directory")
    one_line_error(capsys, "serve", "--model", tiny_model_dir, "--port", "0", match="port")
    one_line_error(capsys, "serve", "--model", tiny_model_dir, "--max-batch", "0", match="max-batch must be positive, got 0")
    one_line_error(capsys, "serve", "--model", tmp_path / "nope", match="not found")


def test_options_beyond_the_context_are_refused_before_the_weights_are_read(capsys, tiny_model_dir, tmp_path):
    import shutil

    weightless = tmp_path / "weightless"
    shutil.copytree(tiny_model_dir, weightless)
    for f in weightless.glob("*.safetensors"):
        f.unlink()  # reading the weights would fail: the context errors must come first
    for cmd in (["eval", "--block-size", "300"], ["serve", "--max-model-len", "300"],
                ["generate", "--max-new-tokens", "256"],
                ["finetune", "--block-size", "300", "--output", str(tmp_path / "run")]):
        one_line_error(capsys, cmd[0], "--model", weightless, *cmd[1:], match="context of 256")
    assert not (tmp_path / "run").exists()


def test_an_error_during_a_progress_bar_starts_its_own_line(monkeypatch, capsys):
    from tqdm import tqdm

    from lorq import jobs
    from lorq.errors import LorqError

    def failing(cfg):
        bar = tqdm(total=10, desc="merge")
        bar.update(3)
        raise LorqError("disk says no")

    monkeypatch.setattr(jobs, "run_eval", failing)
    code, _, err = run(capsys, "eval")
    assert code == 2
    assert "\nlorq: error: disk says no" in err, repr(err)


def test_calibration_sequences_stop_at_the_models_context(tiny_model_dir, tmp_path, capsys):
    code, stdout, err = run(capsys, "quantize", "--model", tiny_model_dir, "--output", tmp_path / "q", "--format", "int", "--method", "gptq",
                            "--calib-samples", "2", "--calib-seq-len", "1000", "--eval-blocks", "0")
    assert code == 0, err
    assert "--calib-seq-len 1000 exceeds the model's context; calibrating on 256-token sequences" in stdout


def test_a_diverging_run_stops_with_an_error_and_writes_no_adapter(tiny_model_dir, tmp_path, capsys):
    out = tmp_path / "run"
    one_line_error(capsys, "finetune", "--model", tiny_model_dir, "--output", out, *FAST, "--lr", "1e308", match="training diverged at step")
    assert not (out / "adapter").exists() and not (out / "summary.json").exists()


@pytest.mark.parametrize("extra, match", [
    (["--variant", "l4q", "--format", "none", "--qat-group-size", "3"], "qat-group-size a positive even number"),
    (["--optimizer", "lisa", "--format", "none", "--lisa-layers", "100"], "lisa-layers must be in 1..2"),
])
def test_options_that_cannot_work_are_refused_before_any_evaluation_or_training(tiny_model_dir, tmp_path, capsys, extra, match):
    fast = FULL_FAST if "lisa" in extra else FAST
    code, stdout, err = run(capsys, "finetune", "--model", tiny_model_dir, "--output", tmp_path / "run", *fast, *extra)
    assert code == 2 and match in err, err
    assert "perplexity before" not in stdout and not (tmp_path / "run" / "checkpoints").exists()


def test_device_choice(tiny_model_dir, tmp_path, capsys, monkeypatch):
    """auto runs where CUDA is, else on the CPU; cuda without a GPU is a one-line error."""
    from lorq.errors import LorqError
    from lorq.models.loading import resolve_device

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert resolve_device("cpu").type == "cpu" and resolve_device("auto").type == "cpu"
    with pytest.raises(LorqError, match="sees no CUDA GPU"):
        resolve_device("cuda")
    for command in (["finetune", "--output", tmp_path / "x"], ["eval"], ["generate"], ["serve"]):
        one_line_error(capsys, *command, "--model", tiny_model_dir, "--device", "cuda", match="sees no CUDA GPU")
    code, stdout, err = run(capsys, "generate", "--model", tiny_model_dir, "--device", "cpu", "--max-new-tokens", "3")
    assert code == 0, err


def test_bad_data_files_are_reported_before_the_model_loads(tiny_model_dir, tmp_path, capsys, monkeypatch):
    import lorq.jobs

    def never(*args, **kwargs):
        raise AssertionError("the model was loaded before the data file was checked")

    monkeypatch.setattr(lorq.jobs, "load_model", never)
    empty, bad = tmp_path / "empty.txt", tmp_path / "bad.jsonl"
    empty.write_text("  \n")
    bad.write_text('{"text": "fine"}\nnot json\n')
    for args, match in [(["finetune", "--train-file", bad], "bad.jsonl:2: not valid JSON"),
                        (["finetune", "--validation-file", empty], "empty.txt is empty"),
                        (["eval", "--data-file", bad], "bad.jsonl:2: not valid JSON"),
                        (["quantize", "--method", "gptq", "--calib-file", empty], "empty.txt is empty")]:
        out = ["--output", tmp_path / "out"] if args[0] != "eval" else []
        one_line_error(capsys, *args, "--model", tiny_model_dir, *out, match=match)
