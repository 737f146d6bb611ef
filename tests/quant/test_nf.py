"""NF4 + double quantization against bitsandbytes (the oracle), bit for bit."""

import pytest
import torch

from lorq.quant import FormatConfig, QuantFormat
from lorq.quant.levels import NFWeight as NF4Weight
from lorq.quant.nf import dynamic_map_8bit, nf4_levels

F = pytest.importorskip("bitsandbytes.functional")


def bnb_nf4(w: torch.Tensor, double_quant: bool = True, block: int = 64):
    packed, state = F.quantize_4bit(w, blocksize=block, compress_statistics=double_quant, quant_type="nf4")
    return packed.reshape(-1), state, F.dequantize_4bit(packed, state)


def assert_matches_bnb(w: torch.Tensor, double_quant: bool = True, block: int = 64):
    ours = NF4Weight.from_float(w, FormatConfig(QuantFormat.NF, group_size=block, double_quant=double_quant).validate())
    packed, state, values = bnb_nf4(w, double_quant, block)
    assert torch.equal(ours.codes, packed)
    if double_quant:
        assert torch.equal(ours.absmax_codes, state.absmax)
        assert torch.equal(ours.absmax_scale, state.state2.absmax)
        assert torch.equal(ours.absmax_offset.reshape(()), state.offset.reshape(()))
    else:
        assert torch.equal(ours.absmax, state.absmax)
    assert torch.equal(ours.dequantize(torch.float32), values.float())


def test_code_tables_match_bitsandbytes():
    assert torch.equal(nf4_levels(), F.get_4bit_type("nf4", device="cpu"))
    assert torch.equal(dynamic_map_8bit(), F.create_dynamic_map(signed=True))


@pytest.mark.parametrize("seed", range(5))
@pytest.mark.parametrize("shape", [(256, 512), (192, 576), (100, 70)])
def test_random_weights_bit_exact(seed, shape):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(shape, generator=g) * (0.02 + seed)
    w[0, :5] = 0.0
    assert_matches_bnb(w)


def test_without_double_quant_and_other_block():
    w = torch.randn(128, 256, generator=torch.Generator().manual_seed(1))
    assert_matches_bnb(w, double_quant=False)
    assert_matches_bnb(w, block=128)


def test_heavy_tailed_and_zero_blocks():
    torch.manual_seed(3)
    w = torch.distributions.StudentT(2.0).sample((64, 1024)) * 0.01
    w[3] = 0.0  # whole zero blocks
    assert_matches_bnb(w)


def test_storage_is_about_4_127_bits():
    w = torch.randn(1024, 1024)
    qw = NF4Weight.from_float(w, FormatConfig().validate())
    bits = 8 * qw.nbytes / w.numel()
    assert 4.12 < bits < 4.135
    plain = NF4Weight.from_float(w, FormatConfig(double_quant=False).validate())
    assert abs(8 * plain.nbytes / w.numel() - 4.5) < 1e-6


@pytest.mark.real_model
def test_real_weights_bit_exact(real_model):
    model, _, _ = real_model
    for name in ["model.layers.0.self_attn.q_proj", "model.layers.7.mlp.down_proj", "model.layers.29.self_attn.k_proj"]:
        assert_matches_bnb(model.get_submodule(name).weight.data)
