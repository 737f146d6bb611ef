"""Exports of every method: PEFT loads what PEFT can represent with the same logits, and every
exported adapter reloads in lorq with the same logits."""

import copy
import json

import pytest
import torch

from lorq.adapters import LoRAConfig, add_adapters, load_peft, lora_layers, save_peft
from lorq.adapters.init import InitConfig, LoRAInit, apply_starts, compute_starts
from lorq.adapters.variants import Variant
from lorq.errors import LorqError

peft = pytest.importorskip("peft")

TARGETS = ["q_proj", "v_proj", "down_proj"]
X = torch.randint(0, 128, (2, 12), generator=torch.Generator().manual_seed(0))


def trained(model, variant=Variant.LORA, init=LoRAInit.GAUSSIAN, rank=4, **kw):
    """`model` with adapter 'default' (started by `init`) whose trainable tensors were moved."""
    lora = LoRAConfig(rank=rank, alpha=8.0, dropout=0.0, targets=TARGETS, variant=variant, nola_bases=8, **kw)
    starts = compute_starts(model, lora, InitConfig(init=init, svd_iters=0), batches=lambda: [(X, X)], progress=False)
    add_adapters(model, lora)
    apply_starts(model, "default", starts)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(torch.randn(p.shape, generator=g) * 0.05)
    return model.eval()


def logits(model, x):
    with torch.no_grad():
        return model(x).logits


@pytest.mark.parametrize("init", [LoRAInit.PISSA, LoRAInit.OLORA, LoRAInit.LORA_GA])
@pytest.mark.parametrize("variant", [Variant.LORA, Variant.DORA])
def test_residual_inits_export_as_rank_2r_against_the_original_base(tiny_llama, tmp_path, init, variant):
    original = copy.deepcopy(tiny_llama)
    model = trained(tiny_llama, variant, init)
    save_peft(model, tmp_path / "ad", restore_base=True)
    cfg = json.loads((tmp_path / "ad" / "adapter_config.json").read_text())
    assert cfg["r"] == 8 and cfg["use_dora"] == (variant is Variant.DORA)
    pm = peft.PeftModel.from_pretrained(copy.deepcopy(original), tmp_path / "ad").eval()
    assert torch.allclose(logits(pm, X), logits(model, X), atol=1e-4)
    load_peft(original, tmp_path / "ad")
    assert torch.allclose(logits(original.eval(), X), logits(model, X), atol=1e-4)


def test_dora_round_trips_through_peft(tiny_llama, tmp_path):
    original = copy.deepcopy(tiny_llama)
    model = trained(tiny_llama, Variant.DORA)
    save_peft(model, tmp_path / "ad")
    pm = peft.PeftModel.from_pretrained(copy.deepcopy(original), tmp_path / "ad").eval()
    assert torch.allclose(logits(pm, X), logits(model, X), atol=1e-4)
    pm.save_pretrained(tmp_path / "from_peft")  # and PEFT's own DoRA file loads in lorq
    load_peft(original, tmp_path / "from_peft")
    assert torch.allclose(logits(original.eval(), X), logits(model, X), atol=1e-4)


def test_dylora_exports_at_the_chosen_rank(tiny_llama, tmp_path):
    original = copy.deepcopy(tiny_llama)
    model = trained(tiny_llama, Variant.DYLORA, rank=8)
    for layer in lora_layers(model).values():
        layer.adapters["default"].set_rank(3)
    save_peft(model, tmp_path / "ad")
    assert json.loads((tmp_path / "ad" / "adapter_config.json").read_text())["r"] == 3
    pm = peft.PeftModel.from_pretrained(original, tmp_path / "ad").eval()
    assert torch.allclose(logits(pm, X), logits(model, X), atol=1e-4)


@pytest.mark.parametrize("variant,init", [(Variant.CORE, LoRAInit.GAUSSIAN), (Variant.CORE, LoRAInit.PISSA),
                                          (Variant.NOLA, LoRAInit.GAUSSIAN), (Variant.RANDLORA, LoRAInit.GAUSSIAN)])
def test_native_variants_reload_identically(tiny_llama, tmp_path, variant, init):
    original = copy.deepcopy(tiny_llama)
    model = trained(tiny_llama, variant, init)
    save_peft(model, tmp_path / "ad", restore_base=True)
    cfg = json.loads((tmp_path / "ad" / "adapter_config.json").read_text())
    assert cfg["peft_type"] == "LORQ" and cfg["variant"] == variant.value
    load_peft(original, tmp_path / "ad")
    assert torch.allclose(logits(original.eval(), X), logits(model, X), atol=1e-5)
    with pytest.raises(LorqError, match="lorq-native"):  # PEFT-only consumers refuse it clearly
        from lorq.adapters.peft_format import read_peft
        read_peft(tmp_path / "ad")


def test_native_adapter_on_the_wrong_model_is_a_clear_error(tiny_llama, tmp_path):
    from conftest import tiny_llama_config
    from transformers import LlamaForCausalLM

    model = trained(tiny_llama, Variant.NOLA)
    save_peft(model, tmp_path / "ad")
    other = LlamaForCausalLM(tiny_llama_config(hidden_size=32))
    with pytest.raises(LorqError, match="does not fit"):
        load_peft(other, tmp_path / "ad")


def drop_starts(tensors):
    for k in [k for k in tensors if k.endswith(("start_A", "start_B"))]:
        tensors.pop(k)


@pytest.mark.parametrize("edit,match", [
    (lambda c, t: c.update(options=[1, 2]), "options must be an object"),
    (lambda c, t: c.update(r=0), "r must be a positive integer"),
    (lambda c, t: c.update(r=True), "r must be a positive integer"),
    (lambda c, t: c.update(lora_alpha="32"), "lora_alpha must be a positive finite number"),
    (lambda c, t: c.update(lora_alpha=float("nan")), "lora_alpha must be"),
    (lambda c, t: c.update(use_rslora="yes"), "true or false"),
    (lambda c, t: c.update(modules=c["modules"] * 2), "distinct"),
    (lambda c, t: c.update(variant="lora"), "variant must be one of"),
    (lambda c, t: c.update(format_version=2), "format_version"),
    (lambda c, t: c.update(options={"nola_bases": 8, "bogus": 1}), "do not fit"),
    (lambda c, t: t.update(extra=torch.zeros(2)), "unexpected tensor 'extra'"),
    (lambda c, t: t.update({k: torch.full_like(v, float("nan")) for k, v in list(t.items())[:1]}), "NaN or infinite"),
    (lambda c, t: t.pop(next(k for k in t if k.endswith("start_A"))), "start_B / start_A"),
    (lambda c, t: drop_starts(t), "restore_base is true but the file holds no start_B"),
    (lambda c, t: c.update(restore_base=False), "restore_base is false but the file holds start_B"),
])
def test_malformed_native_files_are_clear_errors_and_leave_the_base_alone(tiny_llama, tmp_path, edit, match):
    from safetensors.torch import load_file, save_file

    original = copy.deepcopy(tiny_llama)
    model = trained(tiny_llama, Variant.CORE, LoRAInit.PISSA)  # a residual init: the file holds start_B / start_A
    save_peft(model, tmp_path / "ad", restore_base=True)
    cfg_path, w_path = tmp_path / "ad" / "adapter_config.json", tmp_path / "ad" / "adapter_model.safetensors"
    cfg, tensors = json.loads(cfg_path.read_text()), load_file(w_path)
    edit(cfg, tensors)
    cfg_path.write_text(json.dumps(cfg))
    save_file(tensors, str(w_path))
    before = {n: p.clone() for n, p in original.named_parameters()}
    with pytest.raises(LorqError, match=match):
        load_peft(original, tmp_path / "ad")
    assert all(torch.equal(p, before[n]) for n, p in original.named_parameters() if n in before)


def test_peqa_and_l4q_refuse_to_be_saved_as_adapters(tiny_llama, tmp_path):
    add_adapters(tiny_llama, LoRAConfig(rank=2, targets=["q_proj"], variant=Variant.L4Q, qat_group_size=32))
    with pytest.raises(LorqError, match="fold it into the quantized model"):
        save_peft(tiny_llama, tmp_path / "ad")
