import pytest
import torch

from lorq.errors import LorqError
from lorq.quant import FormatConfig, QuantFormat
from lorq.quant.affine import AffineWeight


def int_cfg(bits=4, group=32, symmetric=False):
    return FormatConfig(QuantFormat.INT, bits=bits, group_size=group, symmetric=symmetric).validate()


@pytest.mark.parametrize("symmetric", [False, True])
@pytest.mark.parametrize("group", [32, 64, 128, 0])
@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_error_within_half_step(bits, group, symmetric):
    w = torch.randn(48, 256)
    qw = AffineWeight.from_float(w, int_cfg(bits, group, symmetric))
    deq = qw.dequantize()
    g = group or 256
    step = qw.scale.float().repeat_interleave(g, dim=1)
    assert ((deq - w).abs() <= step / 2 + 2e-3 * w.abs().max()).all()
    if not symmetric:  # per-group min is represented (up to fp16 rounding)
        assert torch.allclose(deq.view(48, -1, g).amin(-1), w.view(48, -1, g).amin(-1), atol=1e-2)


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_values_on_the_grid_are_exact(bits):
    scale, lo = 0.125, -1.0  # exactly representable in fp16
    codes = torch.randint(0, 2**bits, (8, 64)).float()
    codes[:, 0], codes[:, 1] = 0, 2**bits - 1  # each group spans the full range
    w = codes * scale + lo
    assert torch.equal(AffineWeight.from_float(w, int_cfg(bits, 64)).dequantize(), w)


def test_symmetric_matches_gptq_convention():
    w = torch.tensor([[-1.0, 0.5, 0.25, 1.0]])
    qw = AffineWeight.from_float(w, int_cfg(4, 4, symmetric=True))
    s = torch.tensor(2 * 1.0 / 15).half().float()  # scale = 2·absmax / (2^k - 1) in fp16, w ≈ (q - 8)·s
    expected = (torch.round(w / s) + 8).clamp(0, 15)
    assert torch.equal(qw.dequantize(), (expected - 8) * s)
    assert qw.min is None


@pytest.mark.parametrize("bits,symmetric,expected", [(4, False, 4.5), (3, False, 3.5), (2, True, 2.25), (8, False, 8.5)])
def test_bits_per_weight_counts_metadata(bits, symmetric, expected):
    w = torch.randn(64, 128)
    qw = AffineWeight.from_float(w, int_cfg(bits, 64, symmetric))
    assert 8 * qw.nbytes / w.numel() == expected
    again = AffineWeight.from_state_dict(qw.state_dict(), qw.shape, qw.cfg)
    assert torch.equal(again.dequantize(), qw.dequantize())


def test_short_last_group():
    """group 128 on a 576-wide layer: 4 full groups and one of 64 per row."""
    w = torch.randn(8, 576)
    qw = AffineWeight.from_float(w, int_cfg(4, 128))
    assert qw.scale.shape == (8, 5)
    last = w[:, 512:]
    assert torch.allclose(qw.scale[:, -1].float(), (last.amax(1) - last.amin(1)) / 15, rtol=1e-3)
    step = qw.scale.float().repeat_interleave(128, dim=1)[:, :576]
    assert ((qw.dequantize() - w).abs() <= step / 2 + 1e-3).all()
    assert qw.nbytes == 8 * 576 // 2 + 2 * 2 * 8 * 5


def test_unsupported_bits_rejected():
    with pytest.raises(LorqError, match="unsupported bits 5"):
        FormatConfig(QuantFormat.INT, bits=5).validate()
    with pytest.raises(LorqError, match="unsupported bits 3"):
        FormatConfig(QuantFormat.FP8, bits=3).validate()


@pytest.mark.parametrize("bits,symmetric", [(2, False), (3, False), (4, True)])
def test_clip_search_never_raises_a_groups_error(bits, symmetric):
    w = torch.randn(32, 256) ** 3  # heavy tails: clipping the range pays
    plain = AffineWeight.from_float(w, int_cfg(bits, 64, symmetric))
    cfg = int_cfg(bits, 64, symmetric)
    cfg.clip_search = True
    searched = AffineWeight.from_float(w, cfg)
    group_err = lambda q: (q.dequantize() - w).pow(2).view(32, -1, 64).sum(-1)
    assert (group_err(searched) <= group_err(plain) + 1e-6).all()
    assert group_err(searched).sum() < 0.95 * group_err(plain).sum()


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_float_codes_are_the_unpacked_codes(bits):
    q = AffineWeight.from_float(torch.randn(7, 41), int_cfg(bits, 8))  # 287 codes: a partial last byte
    assert torch.equal(q.float_codes(), q.int_codes().float())
