"""Adapter variants: DoRA against PEFT's DoRA, the others against their paper's formula."""

import copy

import pytest
import torch
import torch.nn as nn

from lorq.adapters import LoRAConfig, add_adapters, lora_layers
from lorq.adapters.lora import LoRALinear
from lorq.adapters.qat import QAT_VARIANTS
from lorq.adapters.variants import Variant
from lorq.quant import FormatConfig, QuantizedLinear

peft = pytest.importorskip("peft")


def layer_with(variant, rank=4, in_f=24, out_f=40, bias=False, **opts):
    torch.manual_seed(0)
    layer = LoRALinear(nn.Linear(in_f, out_f, bias=bias))
    ad = layer.add("a", rank, 8.0, False, 0.0, Variant(variant), **opts)
    return layer, ad


def perturb(ad, seed=1):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for n in ad.trainable_names:
            p = getattr(ad, n)
            p.add_(torch.randn(p.shape, generator=g) * 0.1)


@pytest.mark.parametrize("variant", [v for v in Variant if v not in QAT_VARIANTS])  # those: tests/adapters/test_qat.py
@pytest.mark.parametrize("in_f,out_f", [(24, 40), (40, 24)])
def test_every_variant_starts_at_the_base_and_forward_equals_delta_weight(variant, in_f, out_f):
    layer, ad = layer_with(variant, in_f=in_f, out_f=out_f, bias=True)
    x = torch.randn(3, 5, in_f)
    assert torch.allclose(layer(x), layer.base(x), atol=1e-5)  # the update is zero at step 0
    perturb(ad)
    w = layer.base.weight + ad.delta_weight(layer)
    assert torch.allclose(layer(x), x @ w.T + layer.base.bias, atol=1e-4)
    assert not torch.allclose(layer(x), layer.base(x), atol=1e-3)
    layer.merge("a")  # merging folds exactly that update in; unmerging restores the base
    assert torch.allclose(layer(x), x @ w.T + layer.base.bias, atol=1e-4)
    layer.unmerge("a")
    assert torch.allclose(layer.base.weight, w - ad.delta_weight(layer), atol=1e-5)


def test_only_the_variants_parameters_train(tiny_llama):
    counts = {}
    for v in (Variant.LORA, Variant.DORA, Variant.CORE, Variant.NOLA, Variant.RANDLORA):
        m = copy.deepcopy(tiny_llama)
        add_adapters(m, LoRAConfig(rank=4, targets=["q_proj"], variant=v, nola_bases=8))
        counts[v] = sum(p.numel() for p in m.parameters() if p.requires_grad)
    layers, (out, inp) = len(lora_layers(m)), tiny_llama.model.layers[0].self_attn.q_proj.weight.shape
    assert counts[Variant.LORA] == layers * 4 * (out + inp)
    assert counts[Variant.DORA] == counts[Variant.LORA] + layers * out
    assert counts[Variant.CORE] == layers * 16
    assert counts[Variant.NOLA] == layers * 16
    n_bases = -(-min(out, inp) // 4)
    assert counts[Variant.RANDLORA] == layers * n_bases * (4 + min(out, inp))


def test_dora_matches_peft(tiny_llama):
    torch.manual_seed(0)
    base = copy.deepcopy(tiny_llama)
    cfg = peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "down_proj"], use_dora=True, init_lora_weights=False)
    pm = peft.get_peft_model(base, cfg).eval()
    add_adapters(tiny_llama, LoRAConfig(rank=4, alpha=8, dropout=0.0, targets=["q_proj", "down_proj"], variant=Variant.DORA))
    g = torch.Generator().manual_seed(3)
    for name, layer in lora_layers(tiny_llama).items():
        ad = layer.adapters["default"]
        pl = pm.base_model.model.get_submodule(name)
        with torch.no_grad():
            ad.A.copy_(pl.lora_A["default"].weight)
            ad.B.copy_(pl.lora_B["default"].weight)
            mag = pl.lora_magnitude_vector["default"].weight
            mag.mul_(1 + 0.1 * torch.randn(mag.shape, generator=g))  # a trained magnitude
            ad.magnitude.copy_(mag)
    tiny_llama.eval()
    x = torch.randint(0, 128, (2, 12))
    with torch.no_grad():
        assert torch.allclose(tiny_llama(x).logits, pm(x).logits, atol=1e-4)


def test_dora_magnitude_starts_at_the_row_norms_of_a_quantized_base():
    torch.manual_seed(0)
    q = QuantizedLinear.from_linear(nn.Linear(64, 32, bias=False), FormatConfig(format="nf", bits=4))
    layer = LoRALinear(q)
    ad = layer.add("a", 4, 8.0, variant=Variant.DORA)
    assert torch.allclose(ad.magnitude, q.dequantize().norm(dim=1))
    x = torch.randn(5, 64)
    assert torch.allclose(layer(x), q(x), atol=1e-5)


def dora_reference(w, bias, ad, x_kept, x):
    """base(x) + DoRA's update, the merged weight spelled out (PEFT's formula)."""
    merged = w + ad.scaling * ad.B.detach() @ ad.A.detach()
    scale = ad.magnitude.detach() / merged.norm(dim=1)
    base = x @ w.T + (bias if bias is not None else 0)
    return base + (scale - 1) * (x_kept @ w.T) + scale * (x_kept @ ad.A.T @ ad.B.T) * ad.scaling


def dora_on_nf4(bias: bool, dropout: float = 0.0):
    torch.manual_seed(0)
    q = QuantizedLinear.from_linear(nn.Linear(64, 32, bias=bias), FormatConfig(format="nf", bits=4))
    layer = LoRALinear(q)
    ad = layer.add("a", 4, 8.0, dropout=dropout, variant=Variant.DORA)
    perturb(ad)
    return q, layer, ad


def test_dora_multiplies_by_a_quantized_weight_once_in_forward_and_once_in_backward(monkeypatch):
    """x, its dropped copy and A share one pass through the quantized matmul: one dequantization
    each way, as plain LoRA (the norm's ||W||² is computed once, before the counted step)."""
    from lorq.quant import linear

    q, layer, ad = dora_on_nf4(bias=True, dropout=0.3)
    layer.train()
    x = torch.randn(3, 5, 64, requires_grad=True)
    layer(x)  # the base's ||W||² is cached here
    calls = {"forward": 0, "backward": 0, "dequantize": 0}
    for name in ("forward", "backward"):
        original = getattr(linear._DequantMatmul, name)
        monkeypatch.setattr(linear._DequantMatmul, name, staticmethod(lambda *a, _f=original, _n=name: calls.__setitem__(_n, calls[_n] + 1) or _f(*a)))
    dequantize = QuantizedLinear.dequantize
    monkeypatch.setattr(QuantizedLinear, "dequantize", lambda self, *a: calls.__setitem__("dequantize", calls["dequantize"] + 1) or dequantize(self, *a))
    y = layer(x)
    y.square().sum().backward()
    assert calls == {"forward": 1, "backward": 1, "dequantize": 0}
    assert y.shape == (3, 5, 32)


def test_dora_norm_follows_a_base_weight_changed_in_place():
    layer, ad = layer_with("dora", bias=True)
    perturb(ad)
    x = torch.randn(6, 24)
    with torch.no_grad():
        layer(x)
        layer.base.weight.mul_(1.5)  # as a merge of another adapter into a dense base does
        y = layer(x)
    torch.testing.assert_close(y, dora_reference(layer.base.weight, layer.base.bias, ad, x, x), atol=1e-5, rtol=1e-5)


def test_dora_beside_another_adapter_on_a_quantized_base():
    torch.manual_seed(0)
    q = QuantizedLinear.from_linear(nn.Linear(64, 32, bias=True), FormatConfig(format="nf", bits=4))
    layer = LoRALinear(q)
    dora, lora = layer.add("d", 4, 8.0, variant=Variant.DORA), layer.add("l", 2, 4.0)
    perturb(dora)
    perturb(lora, seed=2)
    x = torch.randn(7, 64)
    with torch.no_grad():
        ref = dora_reference(q.dequantize(), q.bias, dora, x, x) + x @ lora.A.T @ lora.B.T * lora.scaling
        torch.testing.assert_close(layer(x), ref, atol=1e-4, rtol=1e-4)
        layer.active = ["d"]  # alone, it shares the base's matmul: the same output
        torch.testing.assert_close(layer(x), dora_reference(q.dequantize(), q.bias, dora, x, x), atol=1e-4, rtol=1e-4)


def test_dora_under_bf16_autocast_stays_near_its_fp32_output():
    q, layer, ad = dora_on_nf4(bias=False)
    x = torch.randn(9, 64)
    with torch.no_grad():
        ref = layer(x)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            low = layer(x)
    assert low.dtype == torch.bfloat16
    torch.testing.assert_close(low.float(), ref, atol=0.1, rtol=0.03)


def test_dora_with_dropout_on_a_quantized_base_keeps_no_float_weight_for_backward():
    """Dropout makes DoRA multiply the dropped input by the base weight too: in the quantized
    layer's own matmul (beside x), which dequantizes in forward and again in backward, not by a
    dequantized copy autograd would hold until backward. Same values and gradients either way."""
    q, layer, ad = dora_on_nf4(bias=True, dropout=0.3)
    layer.train()
    x = torch.randn(5, 64, requires_grad=True)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(tuple(t.shape)) or t, lambda t: t):
        torch.manual_seed(7)
        y = layer(x)
    assert (32, 64) not in saved
    y.square().sum().backward()
    # reference: the same mask, the dequantized weight spelled out
    torch.manual_seed(7)
    xd = ad.dropout(x.detach())
    x2 = x.detach().clone().requires_grad_(True)
    w = q.dequantize()
    A, B = ad.A.detach().clone().requires_grad_(True), ad.B.detach().clone()
    merged = w + ad.scaling * B @ A
    scale = ad.magnitude.detach() / merged.detach().norm(dim=1)
    kept = x2 * (xd / x.detach())  # the dropped input, differentiable in x2 (x has no zeros)
    ref = x2 @ w.T + q.bias + (scale - 1) * (kept @ w.T) + scale * (kept @ A.T @ B.T) * ad.scaling
    torch.testing.assert_close(y, ref, atol=1e-4, rtol=1e-4)
    ref.square().sum().backward()
    torch.testing.assert_close(x.grad, x2.grad, atol=1e-3, rtol=1e-3)
    torch.testing.assert_close(ad.A.grad, A.grad, atol=1e-3, rtol=1e-3)


def test_dylora_uses_nested_ranks_with_their_own_scaling():
    layer, ad = layer_with(Variant.DYLORA, rank=8)
    perturb(ad)
    x = torch.randn(4, 24)
    layer.eval()
    for b in (1, 3, 8):
        ad.set_rank(b)
        expect = layer.base(x) + (8.0 / b) * x @ ad.A[:b].T @ ad.B[:, :b].T
        assert torch.allclose(layer(x), expect, atol=1e-5)
    layer.train()
    ranks = set()
    for step in range(40):
        ad.begin_step(step, seed=0)
        ranks.add(ad.train_rank)
    assert ranks <= set(range(1, 9)) and len(ranks) >= 5  # sampled over 1..r
    ad.begin_step(7, 0); r7 = ad.train_rank
    ad.begin_step(7, 0); assert ad.train_rank == r7  # a pure function of (seed, step): resumable


def test_nola_is_a_combination_of_fixed_random_bases():
    layer, ad = layer_with(Variant.NOLA, rank=4, nola_bases=6)
    perturb(ad)
    A = sum(ad.alpha_coef[k] * ad.A_bank[k] for k in range(6))
    B = sum(ad.beta_coef[k] * ad.B_bank[k] for k in range(6))
    assert torch.allclose(ad.delta_weight(), ad.scaling * B @ A, atol=1e-6)
    other, ad2 = layer_with(Variant.NOLA, rank=4, nola_bases=6)
    assert ad2.A_bank is ad.A_bank  # one bank per (shape, seed), shared by layers


@pytest.mark.parametrize("in_f,out_f", [(24, 40), (40, 24)])
def test_randlora_update_is_the_sum_over_bases_and_can_be_full_rank(in_f, out_f):
    layer, ad = layer_with(Variant.RANDLORA, rank=4, in_f=in_f, out_f=out_f)
    perturb(ad)
    total = 0
    for i in range(ad.n_bases):
        term = ad.L[i] @ torch.diag(ad.lam[i]) @ ad.S @ torch.diag(ad.gamma[i])  # (large, small)
        total = total + (term if in_f <= out_f else term.T)
    assert torch.allclose(ad.delta_weight(), ad.scaling * total, atol=1e-6)
    assert torch.linalg.matrix_rank(ad.delta_weight()) == min(in_f, out_f) > 4


def test_core_trains_only_an_r_by_r_matrix_between_fixed_svd_factors():
    layer, ad = layer_with(Variant.CORE, rank=4)
    U, S, Vh = torch.linalg.svd(layer.base.weight.detach())
    assert torch.allclose((ad.B @ ad.A).abs(), (U[:, :4] * S[:4] @ Vh[:4]).abs(), atol=1e-3)
    perturb(ad)
    assert torch.allclose(ad.delta_weight(), ad.scaling * ad.B @ ad.R @ ad.A, atol=1e-6)
    assert not ad.A.requires_grad and ad.R.requires_grad
