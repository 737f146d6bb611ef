"""PEQA and L4Q: their updates follow the papers' formulas, and folding them gives a quantized
layer (lorq's INT-k format) with the trained layer's outputs."""

import pytest
import torch
import torch.nn as nn

from lorq.adapters.lora import LoRALinear
from lorq.adapters.qat import fold_quantized
from lorq.adapters.variants import Variant
from lorq.errors import LorqError
from lorq.quant import FormatConfig, QuantizedLinear
from lorq.quant.affine import AffineWeight


def int_layer(symmetric=False, in_features=96):
    torch.manual_seed(0)
    lin = nn.Linear(in_features, 40, bias=True)
    return QuantizedLinear.from_linear(lin, FormatConfig(format="int", bits=4, group_size=32, symmetric=symmetric).validate())


@pytest.mark.parametrize("symmetric", [False, True])
def test_peqa_trains_the_scales_and_folds_into_the_same_codes(symmetric):
    q = int_layer(symmetric)
    layer = LoRALinear(q)
    ad = layer.add("a", 1, 1.0, variant=Variant.PEQA)
    x = torch.randn(4, 96)
    assert torch.allclose(layer(x), q(x), atol=1e-6) and ad.scale_delta.shape == (40, 3)
    with torch.no_grad():
        ad.scale_delta.copy_(ad.scale0 * 0.1 * torch.randn(40, 3, generator=torch.Generator().manual_seed(1)))
    ratio = ((ad.scale0 + ad.scale_delta) / ad.scale0).repeat_interleave(32, dim=1)
    w_new = ratio * q.dequantize()  # s' (q - z) = (s'/s) · s (q - z)
    assert torch.allclose(layer(x), x @ w_new.T + q.bias, atol=1e-5)
    folded = ad.folded(layer)
    assert torch.equal(folded.qweight().int_codes(), q.qweight().int_codes())  # only the scales moved
    assert torch.allclose(folded(x), layer(x), atol=2e-3)  # fp16 scales
    loss = layer(x).pow(2).sum()
    loss.backward()
    assert ad.scale_delta.grad is not None and ad.scale_delta.grad.abs().sum() > 0


@pytest.mark.parametrize("in_features, symmetric", [(96, False), (100, True)])
def test_peqa_one_matmul_equals_autograd_and_keeps_only_its_input(in_features, symmetric):
    """PEQALinear (one dequantization and matmul, the base dequantized again in backward)
    against autograd through base(x) + x ((Δs/s) ⊙ W_q)ᵀ: same outputs and gradients; of what
    it keeps for backward nothing is weight-sized but the input."""
    layer = LoRALinear(int_layer(symmetric, in_features))
    ad = layer.add("a", 1, 1.0, variant=Variant.PEQA)
    with torch.no_grad():
        ad.scale_delta.copy_(ad.scale0 * 0.1 * torch.randn(ad.scale0.shape, generator=torch.Generator().manual_seed(1)))
    x = torch.randn(2, 5, in_features, requires_grad=True)
    ref = layer.base(x) + ad.delta(x, None, layer)
    ref_grads = torch.autograd.grad(ref.pow(2).sum(), (x, ad.scale_delta))
    kept = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: kept.append(t) or t, lambda t: t):
        out = layer(x)
    grads = torch.autograd.grad(out.pow(2).sum(), (x, ad.scale_delta))
    assert torch.allclose(out, ref, atol=1e-5)
    for got, want in zip(grads, ref_grads):
        assert torch.allclose(got, want, rtol=1e-4, atol=1e-5)
    assert max(t.numel() for t in kept) == x.numel()  # x; Δs and s are (out, groups)


def test_peqa_needs_an_int_base():
    with pytest.raises(LorqError, match="--format int"):
        LoRALinear(nn.Linear(8, 8)).add("a", 1, 1.0, variant=Variant.PEQA)
    nf = QuantizedLinear.from_linear(nn.Linear(64, 8), FormatConfig(format="nf", bits=4).validate())
    with pytest.raises(LorqError, match="--format int"):
        LoRALinear(nf).add("a", 1, 1.0, variant=Variant.PEQA)


def test_l4q_starts_at_symmetric_rtn_and_folds_to_int():
    torch.manual_seed(0)
    lin = nn.Linear(96, 40, bias=False)
    layer = LoRALinear(lin)
    ad = layer.add("a", 4, 8.0, variant=Variant.L4Q, qat_bits=4, qat_group_size=32)
    x = torch.randn(6, 96)
    with torch.no_grad():  # α on the fp16 grid, so lorq's INT format (fp16 scales) is the oracle
        ad.step.copy_(ad.step.half().float())
    cfg = FormatConfig(format="int", bits=4, group_size=32, symmetric=True).validate()
    rtn = AffineWeight.from_params(lin.weight.detach(), cfg, {"scale": ad.step.detach().half()}).dequantize()
    assert torch.allclose(layer(x), x @ rtn.T, atol=1e-5)  # B = 0: the RTN-quantized layer
    with torch.no_grad():
        ad.B.normal_(0, 0.05)
    out = layer(x)
    out.pow(2).sum().backward()
    assert all(getattr(ad, n).grad.abs().sum() > 0 for n in ("A", "B", "step"))  # STE and LSQ gradients
    folded = ad.folded(layer)
    assert folded.cfg.symmetric and torch.allclose(folded(x), out, atol=1e-4)
    values = ad.quantized_weight(layer).detach() / ad.step.detach().repeat_interleave(32, dim=1)
    assert torch.allclose(values, values.round(), atol=1e-4) and values.abs().max() <= 8  # on the 4-bit grid


def test_fold_quantized_replaces_the_wrapped_layers(tiny_llama):
    from lorq.adapters import LoRAConfig, add_adapters

    add_adapters(tiny_llama, LoRAConfig(rank=2, targets=["q_proj"], variant=Variant.L4Q, qat_group_size=32))
    done = fold_quantized(tiny_llama, "default")
    assert len(done) == 2 and all(isinstance(tiny_llama.get_submodule(n), QuantizedLinear) for n in done)


def l4q_layer(in_features=100, bias=True, seed=0):
    """An L4Q layer (group 32: the last of 4 groups short) trained away from its start, some
    weights past the clamp (α shrunk), so every branch of the gradients is taken."""
    torch.manual_seed(seed)
    layer = LoRALinear(nn.Linear(in_features, 40, bias=bias))
    ad = layer.add("a", 4, 8.0, variant=Variant.L4Q, qat_bits=4, qat_group_size=32)
    with torch.no_grad():
        ad.B.normal_(0, 0.05)
        ad.step.mul_(0.6)
    return layer, ad


@pytest.mark.parametrize("in_features, bias", [(100, True), (96, False)])
def test_l4q_one_matmul_equals_autograd_through_the_quantizer(in_features, bias):
    """The fused L4QLinear (one matmul, W_q rebuilt in backward) against autograd through
    base(x) + x (W_q - W)ᵀ, W_q = α · clamp(RoundSTE((W + s B A) / α)): same outputs and
    gradients for x, A, B and α."""
    layer, ad = l4q_layer(in_features, bias)
    x = torch.randn(2, 5, in_features, requires_grad=True)
    params = (x, ad.A, ad.B, ad.step)
    ref = layer.base(x) + ad.delta(x, None, layer)
    ref_grads = torch.autograd.grad(ref.pow(2).sum(), params)
    with torch.no_grad():
        v = (layer.base.weight + ad.scaling * ad.B @ ad.A) / ad.step.repeat_interleave(32, 1)[:, :in_features]
    clamped = (v.round() < -8) | (v.round() > 7)
    assert 0 < clamped.float().mean() < 0.5  # both sides of the clamp are exercised
    out = layer(x)
    grads = torch.autograd.grad(out.pow(2).sum(), params)
    assert torch.allclose(out, ref, atol=1e-5)
    for got, want in zip(grads, ref_grads):
        assert torch.allclose(got, want, rtol=1e-4, atol=1e-5)


def test_l4q_keeps_no_weight_sized_tensor_for_backward():
    layer, ad = l4q_layer()
    kept = []
    x = torch.randn(3, 100)
    weights = {p.untyped_storage().data_ptr() for p in layer.parameters()}
    with torch.autograd.graph.saved_tensors_hooks(lambda t: kept.append(t) or t, lambda t: t):
        out = layer(x)
    own = [t for t in kept if t.untyped_storage().data_ptr() not in weights]
    assert own and max(t.numel() for t in own) <= x.numel()  # only the input; the rest are parameters
    out.sum().backward()
    assert all(getattr(ad, n).grad is not None for n in ("A", "B", "step"))


def test_l4q_under_bf16_autocast_quantizes_in_fp32():
    layer, ad = l4q_layer()
    x = torch.randn(4, 100)
    ref = layer(x)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = layer(x)
        out.float().pow(2).sum().backward()
    assert out.dtype == torch.bfloat16 and torch.allclose(out.float(), ref, atol=0.05, rtol=0.02)
    assert ad.A.grad.dtype == ad.step.grad.dtype == torch.float32
