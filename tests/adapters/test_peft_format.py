"""PEFT is the oracle: lorq's adapters load in PEFT with the same logits, and back."""

import copy
import json

import pytest
import torch

from lorq.adapters import LoRAConfig, add_adapters, load_peft, save_peft
from lorq.errors import LorqError
from lorq.quant import DECODER_LINEARS, FormatConfig, quantize_model

peft = pytest.importorskip("peft")

from tests_helpers import dequantized_copy, randomize_B  # noqa: E402


def logits(model, x):
    with torch.no_grad():
        return model(x).logits


def test_lorq_adapter_loads_in_peft(tiny_llama, tmp_path):
    base = copy.deepcopy(tiny_llama)
    add_adapters(tiny_llama, LoRAConfig(rank=4, alpha=8, dropout=0.0, targets=[r"q_proj|v_proj|down_proj"]))
    randomize_B(tiny_llama)
    save_peft(tiny_llama, tmp_path / "ad")
    cfg = json.loads((tmp_path / "ad" / "adapter_config.json").read_text())
    assert cfg["target_modules"] == ["down_proj", "q_proj", "v_proj"] and cfg["r"] == 4
    x = torch.randint(0, 128, (2, 16))
    pm = peft.PeftModel.from_pretrained(base, tmp_path / "ad").eval()
    assert (logits(pm, x) - logits(tiny_llama, x)).abs().max() <= 1e-4


def test_peft_adapter_loads_in_lorq(tiny_llama, tmp_path):
    base = copy.deepcopy(tiny_llama)
    pristine = copy.deepcopy(tiny_llama)
    cfg = peft.LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "k_proj", "o_proj", "up_proj"], init_lora_weights=False, use_rslora=True)
    pm = peft.get_peft_model(tiny_llama, cfg).eval()
    pm.save_pretrained(tmp_path / "p")
    load_peft(base, tmp_path / "p")
    x = torch.randint(0, 128, (2, 16))
    assert (logits(pm, x) - logits(base, x)).abs().max() <= 1e-4
    save_peft(base, tmp_path / "again")  # and back out: rsLoRA scaling survives the round trip
    assert json.loads((tmp_path / "again" / "adapter_config.json").read_text())["use_rslora"] is True
    pm2 = peft.PeftModel.from_pretrained(pristine, tmp_path / "again").eval()
    assert (logits(pm2, x) - logits(pm, x)).abs().max() <= 1e-5


def test_adapter_on_quantized_base_matches_peft_on_dequantized_weights(tiny_llama, tmp_path):
    quantize_model(tiny_llama, [(DECODER_LINEARS, FormatConfig())], progress=False)
    dense = dequantized_copy(tiny_llama)
    add_adapters(tiny_llama, LoRAConfig(rank=4, dropout=0.0))
    randomize_B(tiny_llama)
    save_peft(tiny_llama, tmp_path / "ad")
    pm = peft.PeftModel.from_pretrained(dense, tmp_path / "ad").eval()
    x = torch.randint(0, 128, (2, 16))
    assert (logits(pm, x) - logits(tiny_llama, x)).abs().max() <= 1e-4


@pytest.mark.parametrize("targets", [["q_proj", "v_proj"], ["self_attn.o_proj", "down_proj"], r"model\.layers\.1\.mlp\.(up|down)_proj", "all-linear"])
def test_target_modules_pick_what_peft_picks(tiny_llama, targets):
    peft = pytest.importorskip("peft")
    from lorq.adapters.peft_format import targeted

    wrapped = peft.get_peft_model(copy.deepcopy(tiny_llama), peft.LoraConfig(r=2, target_modules=targets))
    theirs = {n.removeprefix("base_model.model.") for n, m in wrapped.named_modules() if hasattr(m, "lora_A")}
    ours = {n for n, m in tiny_llama.named_modules() if isinstance(m, torch.nn.Linear) and targeted(n, targets)}
    assert ours == theirs and theirs


def test_mismatched_adapter_is_rejected(tiny_llama, tmp_path):
    from transformers import LlamaForCausalLM

    from conftest import tiny_llama_config

    other = LlamaForCausalLM(tiny_llama_config(hidden_size=32, intermediate_size=64))
    add_adapters(other, LoRAConfig(rank=4))
    save_peft(other, tmp_path / "other")
    with pytest.raises(LorqError, match="does not fit the base model"):
        load_peft(tiny_llama, tmp_path / "other")
    (tmp_path / "other" / "adapter_model.safetensors").write_bytes(b"not safetensors")
    with pytest.raises(LorqError, match="not a readable safetensors"):
        load_peft(tiny_llama, tmp_path / "other")
    with pytest.raises(LorqError, match="not found"):
        load_peft(tiny_llama, tmp_path / "missing")


@pytest.mark.parametrize("change, message", [
    (lambda c: [c], "not a JSON object"), (lambda c: {**c, "lora_alpha": "x"}, "lora_alpha must be a finite number"),
    (lambda c: {**c, "lora_alpha": None}, "lora_alpha must be a finite number"),
    (lambda c: {**c, "lora_alpha": float("nan")}, "lora_alpha must be a finite number"),
    (lambda c: {**c, "alpha_pattern": {"q_proj": float("inf")}}, "finite numbers"), (lambda c: {**c, "alpha_pattern": "bad"}, "alpha_pattern"),
    (lambda c: {**c, "alpha_pattern": {"(": 3}}, "not a valid regex"),
    (lambda c: {**c, "use_rslora": "yes"}, "use_rslora must be true or false"),
    (lambda c: {**c, "layers_to_transform": [0]}, "layers_to_transform"),
    (lambda c: {**c, "r": 8}, "has rank 4 but adapter_config.json says r = 8"),
    (lambda c: {**c, "r": "4"}, "r must be a positive integer"), (lambda c: {**c, "r": True}, "r must be a positive integer"),
    (lambda c: {**c, "lora_dropout": "x"}, "lora_dropout must be"), (lambda c: {**c, "lora_dropout": None}, "lora_dropout must be"),
    (lambda c: {**c, "lora_dropout": 2.0}, "lora_dropout must be"),
    (lambda c: {**c, "rank_pattern": [1]}, "rank_pattern must map"), (lambda c: {**c, "rank_pattern": {"q_proj": 0}}, "rank_pattern must map"),
    (lambda c: {**c, "target_modules": ["nothing_here"]}, "lie outside adapter_config.json's target_modules"),
    (lambda c: {**c, "target_modules": r"model\.layers\.0\..*"}, "weights for model.layers.1.* lie outside"),
    (lambda c: {**c, "target_modules": 5}, "target_modules must be a list"), (lambda c: {**c, "target_modules": "("}, "not a valid regex"),
])
def test_a_malformed_adapter_config_is_one_error(tiny_llama, tmp_path, change, message):
    """Every reader of PEFT adapters (eval, generate, merge, export, serve) gets a LorqError, not
    a KeyError or TypeError from inside the scaling."""
    add_adapters(tiny_llama, LoRAConfig(rank=4))
    save_peft(tiny_llama, tmp_path / "ad")
    path = tmp_path / "ad" / "adapter_config.json"
    path.write_text(json.dumps(change(json.loads(path.read_text()))))
    with pytest.raises(LorqError, match=message):
        load_peft(copy.deepcopy(tiny_llama), tmp_path / "ad")


def poison_first(tensors: dict, width: int, config: dict) -> str:
    key = sorted(tensors)[0]
    tensors[key][0, 0] = float("inf")
    return f"{key} holds NaN or infinite values"


def target_the_norm(tensors: dict, width: int, config: dict) -> str:
    config["target_modules"].append("norm")
    tensors["base_model.model.model.norm.lora_A.weight"] = torch.zeros(4, width)
    tensors["base_model.model.model.norm.lora_B.weight"] = torch.zeros(width, 4)
    return "targets model.norm, which is a .*RMSNorm, not a linear layer"


@pytest.mark.parametrize("edit", [poison_first, target_the_norm])
def test_bad_adapter_tensors_are_refused(tiny_llama, tmp_path, edit):
    """Non-finite weights, or a pair on a layer that is not linear: one error, not NaN outputs
    or an AttributeError."""
    from safetensors.torch import load_file, save_file

    add_adapters(tiny_llama, LoRAConfig(rank=4))
    save_peft(tiny_llama, tmp_path / "ad")
    file = tmp_path / "ad" / "adapter_model.safetensors"
    tensors, config = load_file(file), json.loads((tmp_path / "ad" / "adapter_config.json").read_text())
    message = edit(tensors, tiny_llama.config.hidden_size, config)
    save_file(tensors, file)
    (tmp_path / "ad" / "adapter_config.json").write_text(json.dumps(config))
    with pytest.raises(LorqError, match=message):
        load_peft(copy.deepcopy(tiny_llama), tmp_path / "ad")
