"""HQQ against round-to-nearest and its own update rules."""

import math

import pytest
import torch

from lorq.errors import LorqError
from lorq.quant import FormatConfig, QuantFormat
from lorq.quant.affine import AffineWeight
from lorq.quant.hqq import HQQConfig, quantize_hqq, shrink_lp


def heavy_tailed(out=64, inp=256, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(out, inp, generator=g) ** 3 * 0.02


def test_shrink_is_the_generalized_soft_threshold():
    x = torch.tensor([-2.0, -0.01, 0.0, 0.5, 3.0])
    beta, p = 10.0, 0.7
    expected = [math.copysign(1.0, v) * max(abs(v) - abs(v) ** (p - 1) / beta, 0.0) if v != 0 else 0.0 for v in x.tolist()]
    assert torch.allclose(shrink_lp(x, beta, p), torch.tensor(expected))


@pytest.mark.parametrize("bits", [2, 3, 4])
@pytest.mark.parametrize("group", [64, 128])
def test_lowers_the_lp_error_of_rtn(bits, group):
    w = heavy_tailed()
    cfg = FormatConfig(QuantFormat.INT, bits, group).validate()
    rtn = AffineWeight.from_float(w, cfg)
    hqq = quantize_hqq(w, cfg, HQQConfig())
    err = lambda q: (q.dequantize() - w).abs().mean().item()
    assert err(hqq) < err(rtn)
    assert torch.equal(hqq.scale, rtn.scale)  # only the zero point moves


def test_zero_iterations_is_rtn():
    w = heavy_tailed()
    cfg = FormatConfig(QuantFormat.INT, 3, 64).validate()
    assert torch.equal(quantize_hqq(w, cfg, HQQConfig(hqq_iters=0)).dequantize(), AffineWeight.from_float(w, cfg).dequantize())


def test_needs_an_asymmetric_affine_format():
    with pytest.raises(LorqError, match="asymmetric affine"):
        quantize_hqq(torch.randn(4, 64), FormatConfig(QuantFormat.NF).validate(), HQQConfig())


def test_padding_of_a_short_last_group_does_not_count():
    from lorq.quant.affine import as_groups, fit_affine, group_mask
    from lorq.quant.hqq import hqq_zero

    w = heavy_tailed(8, 40)
    wg = as_groups(w, 64)  # one group of 40 real weights + 24 copies of the last one
    params = fit_affine(wg, 3, symmetric=False)
    scale = params["scale"].float()
    z0 = -params["min"].float() / scale
    masked = hqq_zero(wg, scale, z0, 3, HQQConfig(), group_mask(40, 64))
    real_only = hqq_zero(wg[..., :40], scale, z0, 3, HQQConfig())
    assert torch.allclose(masked, real_only)
