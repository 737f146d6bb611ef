"""The CLI end to end on a tiny random Llama, and one-line errors (exit 2) for bad input."""

import json

import pytest
import torch

from lorq.cli import main

FAST = ["--steps", "3", "--batch-size", "2", "--block-size", "32", "--eval-blocks", "2", "--eval-every", "3", "--save-every", "3", "--precision", "fp32", "--rank", "4"]


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
    code, stdout, err = run(capsys, "quantize", "--model", tiny_model_dir, "--output", q, "--format", "int4", "--group-size", "32")
    assert code == 0, err and "bits/weight" in stdout
    assert json.loads((q / "lorq_quant.json").read_text())["format_version"] == 1
    code, stdout, err = run(capsys, "eval", "--model", q, "--eval-blocks", "2", "--block-size", "32")
    assert code == 0, err
    assert "perplexity" in stdout
    cfg = tmp_path / "gen.yaml"
    cfg.write_text("prompt: hello\nmax_new_tokens: 3\n")
    code, stdout, err = run(capsys, "generate", "--model", tiny_model_dir, "--config", cfg, "--no-chat")
    assert code == 0, err
    cfg.write_text("lora:\n  rank: 2\ntrain:\n  steps: 1\n  eval_blocks: 1\n  batch_size: 1\ndata:\n  block_size: 16\n")
    code, stdout, err = run(capsys, "finetune", "--model", tiny_model_dir, "--config", cfg, "--output", tmp_path / "y", "--precision", "fp32")
    assert code == 0, err
    assert json.loads((tmp_path / "y" / "adapter" / "adapter_config.json").read_text())["r"] == 2


def test_resume_via_cli(tiny_model_dir, tmp_path, capsys):
    out = tmp_path / "r"
    args = ["finetune", "--model", tiny_model_dir, "--output", out, *FAST]
    assert run(capsys, *args)[0] == 0
    code, stdout, err = run(capsys, *args, "--resume", "--steps", "4")
    assert code == 0, err
    assert "resuming from" in stdout
    assert json.loads((out / "metrics.jsonl").read_text().splitlines()[-1])["step"] == 4


def test_bad_inputs_get_one_line_errors(tiny_model_dir, tmp_path, capsys):
    from transformers import BertConfig, BertModel

    one_line_error(capsys, "eval", "--model", tmp_path / "nope", match="not found")
    one_line_error(capsys, "eval", "--model", "some-org/some-hub-model", match="never downloads")
    bert = tmp_path / "bert"
    BertModel(BertConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=37)).save_pretrained(bert)
    one_line_error(capsys, "eval", "--model", bert, match="not a causal language model")
    one_line_error(capsys, "finetune", "--model", tiny_model_dir, "--targets", "nothing_matches", *FAST[:-2], match="match no linear layer")
    empty = tmp_path / "empty.txt"
    empty.write_text("")
    one_line_error(capsys, "finetune", "--model", tiny_model_dir, "--train-file", empty, *FAST, match="is empty")
    bad = tmp_path / "bad.jsonl"
    bad.write_text("{not json\n")
    one_line_error(capsys, "finetune", "--model", tiny_model_dir, "--train-file", bad, *FAST, match="not valid JSON")
    one_line_error(capsys, "finetune", "--rank", "0", match="rank must be a positive integer")
    one_line_error(capsys, "quantize", "--model", tiny_model_dir, "--bits", "3", "--output", tmp_path / "q3", match="unsupported bits 3")
    one_line_error(capsys, "finetune", "--steps", "many", match="invalid int value")
    one_line_error(capsys, "generate", "--max-new-tokens", "0", match="max-new-tokens must be positive")
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
