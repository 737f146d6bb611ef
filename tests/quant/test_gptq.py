"""GPTQ against its objective ||(W - Q) X||² and against RTN, its limit for uncorrelated inputs."""

import pytest
import torch

from lorq.errors import LorqError
from lorq.quant import FORMATS, DECODER_LINEARS, FormatConfig, MethodConfig, QuantFormat, QuantizedLinear, QuantMethod, Rule, quantize_model
from lorq.quant.gptq import GPTQConfig, HessianAccumulator, quantize_gptq


def correlated_inputs(n=2048, d=128, seed=0):
    g = torch.Generator().manual_seed(seed)
    basis = torch.randn(16, d, generator=g)
    return torch.randn(n, 16, generator=g) @ basis + 0.1 * torch.randn(n, d, generator=g)


def output_error(qw, w, x):
    return ((x @ (w - qw.dequantize()).t()) ** 2).sum().item()


CONFIGS = [
    FormatConfig(QuantFormat.INT, 4, 64), FormatConfig(QuantFormat.INT, 3, 32), FormatConfig(QuantFormat.INT, 2, 64),
    FormatConfig(QuantFormat.INT, 4, 0, symmetric=True), FormatConfig(QuantFormat.NF, 4, 64), FormatConfig(QuantFormat.FP4, 4, 64),
    FormatConfig(QuantFormat.INT8_OUTLIER),  # GPTQ picks the int8 codes; the outlier split stays at run time
]


@pytest.mark.parametrize("cfg", CONFIGS, ids=lambda c: c.describe() if c.bits else str(c.format))
@pytest.mark.parametrize("act_order", [False, True])
def test_beats_rtn_on_the_layer_output(cfg, act_order):
    cfg.validate()
    torch.manual_seed(0)
    w, x = torch.randn(48, 128), correlated_inputs()
    acc = HessianAccumulator()
    acc.add(x)
    gptq = quantize_gptq(w, acc.hessian(), cfg, GPTQConfig(act_order=act_order))
    rtn = FORMATS.get(cfg.format).from_float(w, cfg)
    assert type(gptq) is type(rtn)
    assert output_error(gptq, w, x) < 0.8 * output_error(rtn, w, x)


@pytest.mark.parametrize("cfg", CONFIGS[:2] + CONFIGS[4:5], ids=lambda c: c.describe() if c.bits else str(c.format))
def test_identity_hessian_reduces_to_rtn(cfg):
    cfg.validate()
    w = torch.randn(32, 128)
    gptq = quantize_gptq(w, torch.eye(128), cfg, GPTQConfig())
    rtn = FORMATS.get(cfg.format).from_float(w, cfg)
    assert torch.equal(gptq.dequantize(), rtn.dequantize())


def test_hessian_accumulator():
    x = torch.randn(3, 10, 8)
    acc = HessianAccumulator()
    acc.add(x[:1])
    acc.add(x[1:])
    flat = x.reshape(-1, 8).double()
    assert torch.allclose(acc.hessian(), 2 / 30 * flat.t() @ flat)


def test_layerwise_gptq_on_a_model_beats_rtn(tiny_llama):
    import copy

    calib = torch.randint(0, 128, (8, 32), generator=torch.Generator().manual_seed(0))
    cfg = FormatConfig(QuantFormat.INT, 3, 32).validate()
    with torch.no_grad():
        ref = tiny_llama(calib).logits
    errs = {}
    for method in (QuantMethod.RTN, QuantMethod.GPTQ):
        m = copy.deepcopy(tiny_llama)
        report = quantize_model(m, [Rule(DECODER_LINEARS, cfg, method)], MethodConfig(method=method), calib, progress=False)
        assert len(report.modules) == 14 and all(v["method"] == method.value for v in report.modules.values())
        assert all(isinstance(m.get_submodule(n), QuantizedLinear) for n in report.modules)
        with torch.no_grad():
            errs[method] = (m(calib).logits - ref).pow(2).mean().item()
    assert errs[QuantMethod.GPTQ] < errs[QuantMethod.RTN]


def test_short_last_group_and_its_limits():
    w, x = torch.randn(16, 96), correlated_inputs(d=96)
    acc = HessianAccumulator()
    acc.add(x)
    cfg = FormatConfig(QuantFormat.INT, 4, 64).validate()  # groups of 64 and 32
    q = quantize_gptq(w, acc.hessian(), cfg, GPTQConfig())
    assert q.scale.shape == (16, 2)
    assert torch.equal(quantize_gptq(w, torch.eye(96), cfg, GPTQConfig()).dequantize(), FORMATS.get(cfg.format).from_float(w, cfg).dequantize())
    with pytest.raises(LorqError, match="must divide"):
        quantize_gptq(w, acc.hessian(), FormatConfig(QuantFormat.NF, 4, 64).validate(), GPTQConfig())
