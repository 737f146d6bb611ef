"""LLM.int8(): int8 weights, outlier input features in full precision."""

import torch
import torch.nn as nn

from lorq.quant import FormatConfig, QuantFormat, QuantizedLinear


def layer(threshold=6.0):
    return QuantizedLinear.from_linear(nn.Linear(64, 24, bias=False), FormatConfig(QuantFormat.INT8_OUTLIER, outlier_threshold=threshold))


def test_storage_is_vector_wise_int8():
    q = layer()
    assert q.cfg.group_size == 0 and q.cfg.symmetric and q.cfg.bits == 8
    assert q.scale.shape == (24, 1)
    assert 8 * q.nbytes / (24 * 64) == 8 + 16 / 64


def test_decomposition_matches_the_formula():
    q = layer(threshold=3.0)
    x = torch.randn(5, 64)
    x[:, 7] = 10.0  # one outlier feature
    w = q.qweight().dequantize()
    wq = q.qweight().int8_weight().float()
    ws = q.qweight().scale.float().view(1, -1)
    out = (x.abs() >= 3.0).any(0)
    assert out.sum() >= 1 and out[7]
    rest = x.clone()
    rest[:, out] = 0
    xs = rest.abs().amax(1, keepdim=True) / 127
    xq = torch.round(rest / xs)
    expected = (xq @ wq.t()) * xs * ws + x[:, out] @ w[:, out].t()
    with torch.no_grad():
        assert torch.allclose(q(x), expected, atol=1e-5)


def test_limits_of_the_threshold():
    x = torch.randn(4, 64)
    all_outliers = layer(threshold=1e-6)
    with torch.no_grad():  # every feature is an outlier: exactly the dequantized weight in float
        assert torch.allclose(all_outliers(x), x @ all_outliers.qweight().dequantize().t(), atol=1e-5)
        none = layer(threshold=1e6)
        rel = (none(x) - x @ none.qweight().dequantize().t()).norm() / (x @ none.qweight().dequantize().t()).norm()
        assert rel < 0.02  # int8 activations cost little
