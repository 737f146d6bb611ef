import json

import pytest
import torch
import torch.nn as nn

from lorq.errors import LorqError
from lorq.quant import DECODER_LINEARS, FormatConfig, QuantFormat, QuantizedLinear, QuantMethod, Rule, load_rules, quantize_model
from lorq.quant.checkpoint import QUANT_CONFIG, load_quantized, save_quantized


class NoTokenizer:
    """The tiny random model has no tokenizer; checkpoints are still complete without one."""

    def save_pretrained(self, path):
        pass


@pytest.mark.parametrize("fmt", [QuantFormat.NF, QuantFormat.INT])
def test_forward_and_input_grad_match_dequantized_reference(fmt):
    lin = nn.Linear(128, 48, bias=True)
    q = QuantizedLinear.from_linear(lin, FormatConfig(fmt, group_size=64))
    w = q.qweight().dequantize()
    x = torch.randn(3, 5, 128, requires_grad=True)
    x_ref = x.detach().clone().requires_grad_(True)
    y = q(x)
    y_ref = torch.nn.functional.linear(x_ref, w, lin.bias.detach())
    assert torch.allclose(y, y_ref, atol=1e-6)
    g = torch.randn_like(y)
    y.backward(g)
    y_ref.backward(g)
    assert torch.allclose(x.grad, x_ref.grad, atol=1e-6)
    assert not any(p.requires_grad for p in q.parameters())


def test_quantize_model_targets_decoder_linears_only(tiny_llama):
    report = quantize_model(tiny_llama, [(DECODER_LINEARS, FormatConfig())], progress=False)
    kinds = {n: type(m) for n, m in tiny_llama.named_modules()}
    assert kinds["lm_head"] is nn.Linear
    assert kinds["model.layers.0.self_attn.q_proj"] is QuantizedLinear
    assert len(report.modules) == 2 * 7
    assert 4.12 < report.bits_per_weight < 4.2
    assert 0 < report.rel_error < 0.2


MIXED_RULES = [
    Rule(r"q_proj", FormatConfig(QuantFormat.INT, 3, 32), QuantMethod.HQQ),
    Rule(r"k_proj", FormatConfig(QuantFormat.NF, 2, 0)),
    Rule(r"v_proj", FormatConfig(QuantFormat.FP8, group_size=32)),
    Rule(r"o_proj", FormatConfig(QuantFormat.FP4, double_quant=False)),
    Rule(r"gate_proj", FormatConfig(QuantFormat.INT8_OUTLIER)),
    Rule(r"up_proj", FormatConfig(QuantFormat.INT, 2, 64, symmetric=True)),
    Rule(r"down_proj", FormatConfig(QuantFormat.NONE)),
    Rule(DECODER_LINEARS, FormatConfig()),
]


def test_checkpoint_roundtrip_is_exact(tiny_llama, tmp_path):
    rules = [Rule(r.pattern, r.quant.validate(), r.method) for r in MIXED_RULES]
    report = quantize_model(tiny_llama, rules, progress=False)
    assert "model.layers.0.mlp.down_proj" not in report.modules and len(report.modules) == 12
    out = save_quantized(tiny_llama, NoTokenizer(), tmp_path / "q", report, rules=rules)
    meta = json.loads((out / QUANT_CONFIG).read_text())
    assert meta["format_version"] == 2 and meta["rules"][0] == rules[0].to_json()
    assert meta["modules"]["model.layers.1.self_attn.q_proj"]["method"] == "hqq"
    again = load_quantized(out)
    for name, m in tiny_llama.named_modules():
        if isinstance(m, QuantizedLinear):
            m2 = again.get_submodule(name)
            assert m2.cfg == m.cfg
            for k, v in m.qweight().state_dict().items():
                assert torch.equal(v, m2.qweight().state_dict()[k])
    x = torch.randint(0, 128, (2, 16))
    with torch.no_grad():
        assert torch.equal(tiny_llama(x).logits, again(x).logits)


def test_release_1_checkpoint_loads(tiny_llama, tmp_path):
    """format_version 1 named its formats nf4/int4 and had no bits/method/rules keys."""
    quantize_model(tiny_llama, [(r"self_attn", FormatConfig(QuantFormat.INT, group_size=32)), (DECODER_LINEARS, FormatConfig())], progress=False)
    out = save_quantized(tiny_llama, NoTokenizer(), tmp_path / "q")
    meta = json.loads((out / QUANT_CONFIG).read_text())
    v1_keys = ("in_features", "out_features", "format", "bits", "group_size", "double_quant")
    meta = {"format_version": 1, "source": "", "modules": {
        n: {**{k: m[k] for k in v1_keys}, "format": {"nf": "nf4", "int": "int4"}[m["format"]]} for n, m in meta["modules"].items()
    }}
    (out / QUANT_CONFIG).write_text(json.dumps(meta))
    again = load_quantized(out)
    x = torch.randint(0, 128, (2, 16))
    with torch.no_grad():
        assert torch.equal(tiny_llama(x).logits, again(x).logits)


def test_checkpoint_errors(tiny_llama, tmp_path):
    quantize_model(tiny_llama, [(DECODER_LINEARS, FormatConfig())], progress=False)
    out = save_quantized(tiny_llama, NoTokenizer(), tmp_path / "q")
    meta = json.loads((out / QUANT_CONFIG).read_text())
    meta["format_version"] = 99
    (out / QUANT_CONFIG).write_text(json.dumps(meta))
    with pytest.raises(LorqError, match="format_version 99.*newer lorq"):
        load_quantized(out)
    meta["format_version"] = 2
    for bad, message in (([], "is not a JSON object"), ({**meta, "modules": {**meta["modules"], "model.norm": {}}}, "RMSNorm in the model, not a linear")):
        (out / QUANT_CONFIG).write_text(json.dumps(bad))
        with pytest.raises(LorqError, match=message):
            load_quantized(out)
    good = dict(meta["modules"]["model.layers.0.self_attn.q_proj"])
    meta["modules"]["model.layers.0.self_attn.q_proj"] = "nf"
    (out / QUANT_CONFIG).write_text(json.dumps(meta))
    with pytest.raises(LorqError, match="is not a mapping"):
        load_quantized(out)
    from safetensors.torch import load_file, save_file

    tensors = load_file(out / "model.safetensors")
    cut = dict(tensors)
    cut["model.layers.0.self_attn.q_proj.absmax_codes"] = cut["model.layers.0.self_attn.q_proj.absmax_codes"][:3].clone()
    save_file(cut, out / "model.safetensors")
    meta["modules"]["model.layers.0.self_attn.q_proj"] = good
    (out / QUANT_CONFIG).write_text(json.dumps(meta))
    with pytest.raises(LorqError, match="q_proj: its tensors do not fit its config"):
        load_quantized(out)  # at load, not at the first forward
    del cut["model.layers.0.self_attn.q_proj.absmax_codes"]
    save_file(cut, out / "model.safetensors")
    with pytest.raises(LorqError, match="absmax_codes missing or extra"):
        load_quantized(out)  # not silently a different weight
    save_file(tensors, out / "model.safetensors")
    meta["modules"]["model.layers.0.self_attn.q_proj"]["group_size"] = 32  # contradicts the stored scales
    (out / QUANT_CONFIG).write_text(json.dumps(meta))
    with pytest.raises(LorqError, match="do not fit its config"):
        load_quantized(out)
    meta["modules"]["model.layers.0.self_attn.q_proj"]["group_size"] = good["group_size"]
    meta["modules"]["model.layers.0.self_attn.q_proj"]["format"] = "int7"
    (out / QUANT_CONFIG).write_text(json.dumps(meta))
    with pytest.raises(LorqError, match="invalid settings for model.layers.0.self_attn.q_proj"):
        load_quantized(out)
    meta["format_version"] = 1
    (out / QUANT_CONFIG).write_text(json.dumps(meta))
    (out / "model.safetensors").write_bytes(b"\x00garbage")
    with pytest.raises(LorqError, match="not a readable safetensors"):
        load_quantized(out)


def test_rules_file(tmp_path):
    f = tmp_path / "rules.yaml"
    f.write_text("- {pattern: 'mlp\\.down_proj', format: int, bits: 8, group: 128}\n- {pattern: k_proj, format: fp8, method: rtn}\n")
    rules = load_rules(f, FormatConfig(QuantFormat.INT, 3, 64).validate(), QuantMethod.HQQ)
    assert rules[0].quant == FormatConfig(QuantFormat.INT, 8, 128).validate() and rules[0].method is QuantMethod.HQQ
    assert rules[1].quant.bits == 8 and rules[1].quant.group_size == 64 and rules[1].method is QuantMethod.RTN
    f.write_text("- {pattern: x, format: int, group: 32}\n")  # same format as the default: its bits stay
    assert load_rules(f, FormatConfig(QuantFormat.INT, 3, 64).validate(), QuantMethod.RTN)[0].quant.bits == 3
    for text, msg in [("- {format: int}", "needs a 'pattern'"), ("- {pattern: '(', bits: 4}", "not a valid regex"),
                      ("- {pattern: x, method: awq}", "unknown quantization method"), ("{}", "non-empty list"),
                      ("- {pattern: x, bits: 5}", "unsupported bits 5"), ("- {pattern: x, colour: red}", "unknown quantization setting"),
                      ("- {pattern: x, format: nf5}", "unknown quantization format"), ("- {pattern: x, format: [nf]}", "unknown quantization format"),
                      ("- {pattern: x, group_size: '64'}", "group-size must be a number"), ("- {pattern: x, bits: 4.0}", "bits must be a number"),
                      ("- {pattern: x, symmetric: 'yes'}", "symmetric must be true or false"),
                      ("- {pattern: x, format: int4, bits: 8}", "format int4 is 4-bit, not 8")]:
        f.write_text(text)
        with pytest.raises(LorqError, match=msg):
            load_rules(f, FormatConfig().validate(), QuantMethod.RTN)


def test_cast_unquantized_keeps_the_stored_tensors(tiny_llama):
    from lorq.quant import cast_unquantized

    quantize_model(tiny_llama, [(DECODER_LINEARS, FormatConfig(QuantFormat.INT, 4, 32))], progress=False)
    q = tiny_llama.model.layers[0].self_attn.q_proj
    before = {k: v.clone() for k, v in q.qweight().state_dict().items()}
    x = torch.randint(0, 128, (1, 12))
    with torch.no_grad():
        ref = tiny_llama(x).logits
        cast_unquantized(tiny_llama, torch.bfloat16)
        out = tiny_llama(x).logits
    assert tiny_llama.model.embed_tokens.weight.dtype == torch.bfloat16
    for k, v in q.qweight().state_dict().items():
        assert v.dtype == before[k].dtype and torch.equal(v, before[k])
    assert q.kernel(torch.zeros(1, 64, dtype=torch.bfloat16)) is not None  # bf16 activations take the int4 kernel
    assert (out.float() - ref).abs().max() < 0.05 * ref.abs().max()


def test_cast_unquantized_is_transformers_bf16_model(tiny_model_dir):
    """A dense model cast to bf16 equals the one transformers loads in bf16, logits bit for bit
    at positions far apart (its rotary frequencies stay fp32 there too)."""
    from transformers import AutoModelForCausalLM

    from lorq.quant import cast_unquantized

    ref = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.bfloat16).eval()
    cast = cast_unquantized(AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32).eval(), torch.bfloat16)
    assert cast.model.rotary_emb.inv_freq.dtype == ref.model.rotary_emb.inv_freq.dtype == torch.float32
    x = torch.randint(0, 1000, (1, 256))
    with torch.no_grad():
        assert torch.equal(cast(x).logits, ref(x).logits)
