import pytest
import torch
import torch.nn as nn

from lorq.errors import LorqError
from lorq.quant import DECODER_LINEARS, FormatConfig, QuantFormat, QuantizedLinear, quantize_model
from lorq.quant.checkpoint import QUANT_CONFIG, load_quantized, save_quantized


class NoTokenizer:
    """The tiny random model has no tokenizer; checkpoints are still complete without one."""

    def save_pretrained(self, path):
        pass


@pytest.mark.parametrize("fmt", [QuantFormat.NF4, QuantFormat.INT4])
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


def test_checkpoint_roundtrip_is_exact(tiny_llama, tmp_path):
    quantize_model(tiny_llama, [(r"self_attn", FormatConfig(QuantFormat.INT4, group_size=32)), (DECODER_LINEARS, FormatConfig())], progress=False)
    out = save_quantized(tiny_llama, NoTokenizer(), tmp_path / "q")
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


def test_checkpoint_errors(tiny_llama, tmp_path):
    import json

    quantize_model(tiny_llama, [(DECODER_LINEARS, FormatConfig())], progress=False)
    out = save_quantized(tiny_llama, NoTokenizer(), tmp_path / "q")
    meta = json.loads((out / QUANT_CONFIG).read_text())
    meta["format_version"] = 99
    (out / QUANT_CONFIG).write_text(json.dumps(meta))
    with pytest.raises(LorqError, match="format_version 99"):
        load_quantized(out)
    meta["format_version"] = 1
    (out / QUANT_CONFIG).write_text(json.dumps(meta))
    (out / "model.safetensors").write_bytes(b"\x00garbage")
    with pytest.raises(LorqError, match="not a readable safetensors"):
        load_quantized(out)
