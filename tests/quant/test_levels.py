"""NF-k, FP8 and FP4 level formats: tables against their definitions, rounding, storage."""

import pytest
import torch

from lorq.quant import FORMATS, FormatConfig, QuantFormat
from lorq.quant.levels import fp4_e2m1_levels, fp8_e4m3_levels, levels_for
from lorq.quant.nf import nf4_levels, normal_float_levels


def cfg(fmt, bits=None, group=64, double_quant=True):
    return FormatConfig(fmt, bits=bits, group_size=group, double_quant=double_quant).validate()


def test_nf_construction_reproduces_the_qlora_table():
    assert torch.allclose(normal_float_levels(4), nf4_levels(), atol=1e-6)


@pytest.mark.parametrize("bits", [2, 3])
def test_nf_k_levels_are_normal_quantiles_with_exact_zero(bits):
    levels = normal_float_levels(bits)
    assert levels.numel() == 2**bits
    assert levels[0] == -1 and levels[-1] == 1 and (levels == 0).sum() == 1
    assert (levels.diff() > 0).all()
    # one more positive than negative level, as in NF4
    assert (levels > 0).sum() == 2 ** (bits - 1) and (levels < 0).sum() == 2 ** (bits - 1) - 1


def test_fp8_levels_are_every_finite_e4m3_value():
    v = fp8_e4m3_levels() * 448
    x = torch.linspace(-448, 448, 20001)
    assert torch.isin(x.to(torch.float8_e4m3fn).float(), v).all()
    assert v.numel() == 253


def test_fp4_levels_are_e2m1():
    assert sorted((fp4_e2m1_levels() * 6).abs().unique().tolist()) == [0, 0.5, 1, 1.5, 2, 3, 4, 6]


@pytest.mark.parametrize("fmt,bits", [(QuantFormat.NF, 2), (QuantFormat.NF, 3), (QuantFormat.NF, 4), (QuantFormat.FP8, 8), (QuantFormat.FP4, 4)])
@pytest.mark.parametrize("double_quant", [False, True])
def test_rounds_to_the_nearest_scaled_level(fmt, bits, double_quant):
    w = torch.randn(32, 128)
    c = cfg(fmt, bits, 64, double_quant)
    qw = FORMATS.get(fmt).from_float(w, c)
    absmax = w.view(-1, 64).abs().amax(1, keepdim=True)
    levels = levels_for(fmt, bits)
    nearest = levels[(w.view(-1, 64, 1) / absmax.unsqueeze(-1) - levels).abs().argmin(-1)] * qw.block_absmax().view(-1, 1)
    assert torch.allclose(qw.dequantize().view(-1, 64), nearest, atol=1e-6)
    if not double_quant:  # the absmax of each block is represented exactly
        assert torch.allclose(qw.dequantize().view(-1, 64).abs().amax(1), absmax.squeeze(1))
    again = FORMATS.get(fmt).from_state_dict(qw.state_dict(), qw.shape, qw.cfg)
    assert torch.equal(again.dequantize(), qw.dequantize())


def test_fp8_agrees_with_torch_float8_cast():
    w = torch.randn(16, 64)
    qw = FORMATS.get(QuantFormat.FP8).from_float(w, cfg(QuantFormat.FP8, double_quant=False))
    scale = (w.view(-1, 64).abs().amax(1, keepdim=True) / 448)
    ref = ((w.view(-1, 64) / scale).to(torch.float8_e4m3fn).float() * scale).view(16, 64)
    close = torch.isclose(qw.dequantize(), ref, rtol=1e-6, atol=1e-7)
    assert close.float().mean() > 0.99  # only exact ties may round differently


@pytest.mark.parametrize("fmt,bits,expected", [(QuantFormat.NF, 2, 2.127), (QuantFormat.NF, 3, 3.127), (QuantFormat.FP4, 4, 4.127), (QuantFormat.FP8, 8, 8.127)])
def test_bits_per_weight_with_double_quant(fmt, bits, expected):
    w = torch.randn(1024, 1024)
    qw = FORMATS.get(fmt).from_float(w, cfg(fmt, bits))
    assert abs(8 * qw.nbytes / w.numel() - expected) < 1e-3


def test_per_channel_blocks_are_rows():
    w = torch.randn(8, 96)
    qw = FORMATS.get(QuantFormat.NF).from_float(w, cfg(QuantFormat.NF, 4, 0, False))
    assert qw.absmax.shape == (8,) and torch.allclose(qw.absmax, w.abs().amax(1))


@pytest.mark.parametrize("fmt,bits", [(QuantFormat.NF, 3), (QuantFormat.FP4, 4)])
def test_clip_search_lowers_the_error(fmt, bits):
    w = torch.randn(32, 256) ** 3
    c = cfg(fmt, bits, 64, double_quant=False)
    plain = FORMATS.get(fmt).from_float(w, c)
    c.clip_search = True
    searched = FORMATS.get(fmt).from_float(w, c)
    err = lambda q: (q.dequantize() - w).pow(2).view(32, -1, 64).sum(-1)
    assert (err(searched) <= err(plain) + 1e-6).all() and err(searched).sum() < 0.95 * err(plain).sum()


@pytest.mark.parametrize("fmt,bits", [(QuantFormat.NF, 4), (QuantFormat.NF, 3), (QuantFormat.NF, 2), (QuantFormat.FP8, 8), (QuantFormat.INT, 4), (QuantFormat.INT, 3)])
def test_half_precision_dequantization_is_the_rounded_float_one(fmt, bits):
    w = torch.randn(24, 192)
    qw = FORMATS.get(fmt).from_float(w, cfg(fmt, bits))
    exact = qw.dequantize(torch.float32)
    half = qw.dequantize(torch.bfloat16)
    assert half.dtype == torch.bfloat16
    assert torch.allclose(half.float(), exact, rtol=2e-2, atol=1e-3 * exact.abs().max().item())
