import pytest
import torch

from lorq.errors import LorqError
from lorq.quant import FormatConfig, QuantFormat
from lorq.quant.affine import AffineWeight
from lorq.quant.packing import pack_4bit, unpack_4bit


def int4(group=32):
    return FormatConfig(QuantFormat.INT4, group_size=group)


@pytest.mark.parametrize("n", [1, 2, 7, 64, 1001])
def test_pack_unpack_roundtrip(n):
    codes = torch.randint(0, 16, (n,), dtype=torch.uint8)
    packed = pack_4bit(codes)
    assert packed.numel() == (n + 1) // 2
    assert torch.equal(unpack_4bit(packed, n), codes)
    if n >= 2:  # first element in the high nibble
        assert packed[0].item() == (codes[0].item() << 4) | codes[1].item()


@pytest.mark.parametrize("group", [32, 64, 128])
def test_error_within_half_step(group):
    w = torch.randn(96, 256)
    qw = AffineWeight.from_float(w, int4(group))
    deq = qw.dequantize()
    step = qw.scale.float().repeat_interleave(group, dim=1)
    assert ((deq - w).abs() <= step / 2 + 2e-3 * w.abs().max()).all()
    # per-group min and max are represented (up to fp16 rounding of scale and min)
    wg, dg = w.view(96, -1, group), deq.view(96, -1, group)
    assert torch.allclose(dg.amin(-1), wg.amin(-1), atol=1e-2)


def test_values_on_the_grid_are_exact():
    scale, lo = 0.125, -1.0  # exactly representable in fp16
    codes = torch.randint(0, 16, (8, 64)).float()
    codes[:, 0], codes[:, 1] = 0, 15  # each group spans the full range
    w = codes * scale + lo
    assert torch.equal(AffineWeight.from_float(w, int4(64)).dequantize(), w)


def test_storage_and_state_roundtrip():
    w = torch.randn(64, 128)
    qw = AffineWeight.from_float(w, int4(64))
    assert qw.nbytes == 64 * 128 // 2 + 2 * (64 * 2) * 2  # codes + fp16 scale and min per group
    again = AffineWeight.from_state_dict(qw.state_dict(), qw.shape, qw.cfg)
    assert torch.equal(again.dequantize(), qw.dequantize())


def test_group_must_divide_input_dim():
    with pytest.raises(LorqError, match="does not divide"):
        AffineWeight.from_float(torch.randn(4, 100), int4(64))


def test_unsupported_bits_rejected():
    with pytest.raises(LorqError, match="unsupported bits 3"):
        FormatConfig(QuantFormat.INT4, bits=3).validate()
