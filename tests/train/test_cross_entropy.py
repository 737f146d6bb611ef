"""The fused output-layer cross-entropy against torch's own (the oracle)."""

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from lorq.train.cross_entropy import fusable, linear_cross_entropy, weight_in


def reference(h, head, t):
    return F.cross_entropy(head(h).float(), t, reduction="sum")


@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("chunk", [1, 7, 64, 1000])
def test_loss_and_every_gradient_equal_torch_cross_entropy(bias, chunk):
    torch.manual_seed(0)
    head = nn.Linear(24, 90, bias=bias)
    h = torch.randn(45, 24, requires_grad=True)
    t = torch.randint(0, 90, (45,))
    params = [h, head.weight] + ([head.bias] if bias else [])
    ref = reference(h, head, t)
    ref_grads = torch.autograd.grad(3 * ref, params)
    out = linear_cross_entropy(h, head, t, chunk)
    grads = torch.autograd.grad(3 * out, params)  # the incoming gradient scales them
    assert out.item() == pytest.approx(ref.item(), rel=1e-6)
    for g, r in zip(grads, ref_grads):
        assert torch.allclose(g, r, atol=1e-5)


def test_frozen_head_gets_no_gradient_and_h_does():
    torch.manual_seed(0)
    head = nn.Linear(16, 50, bias=False).requires_grad_(False)
    h = torch.randn(10, 16, requires_grad=True)
    linear_cross_entropy(h, head, torch.randint(0, 50, (10,)), 4).backward()
    assert head.weight.grad is None and h.grad is not None and h.grad.abs().sum() > 0


def test_bf16_autocast_is_close_to_the_fp32_loss():
    torch.manual_seed(0)
    head = nn.Linear(64, 500, bias=False).requires_grad_(False)
    h = torch.randn(33, 64, requires_grad=True)
    t = torch.randint(0, 500, (33,))
    ref = reference(h, head, t)
    (g_ref,) = torch.autograd.grad(ref, h)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = linear_cross_entropy(h, head, t, 8)
    (g,) = torch.autograd.grad(out, h)
    assert out.dtype == torch.float32 and g.dtype == h.dtype
    assert out.item() == pytest.approx(ref.item(), rel=2e-2)
    assert torch.nn.functional.cosine_similarity(g.flatten(), g_ref.flatten(), dim=0) > 0.99


def test_a_frozen_heads_cast_is_reused_until_the_weight_changes():
    torch.manual_seed(0)
    head = nn.Linear(16, 50, bias=False).requires_grad_(False)
    first = weight_in(head, torch.bfloat16)
    assert weight_in(head, torch.bfloat16) is first  # kept, not cast again
    with torch.no_grad():
        head.weight.mul_(2)  # in place: the version counter moves
    again = weight_in(head, torch.bfloat16)
    assert again is not first and torch.equal(again, head.weight.to(torch.bfloat16))
    head.weight = nn.Parameter(torch.randn(50, 16), requires_grad=False)  # replaced
    assert torch.equal(weight_in(head, torch.bfloat16), head.weight.to(torch.bfloat16))
    head.weight.requires_grad_(True)  # trained: a fresh cast per call, none kept around
    assert weight_in(head, torch.bfloat16) is not weight_in(head, torch.bfloat16)
    assert weight_in(head, torch.float32) is head.weight


def test_only_plain_linear_heads_fuse():
    from lorq.adapters.lora import LoRALinear

    assert fusable(nn.Linear(4, 4))
    assert not fusable(LoRALinear(nn.Linear(4, 4)))


def test_a_tied_weight_gets_the_sum_of_both_gradients():
    """The output layer shared with another use (a tied embedding): its two gradients add up,
    the fused one scaled in place by the incoming gradient."""
    torch.manual_seed(0)
    head = nn.Linear(12, 40, bias=False)
    h = torch.randn(9, 12)
    t = torch.randint(0, 40, (9,))
    tied = lambda loss: 0.5 * loss + F.embedding(t, head.weight).square().sum()  # noqa: E731
    (ref,) = torch.autograd.grad(tied(reference(h, head, t)), head.weight)
    (got,) = torch.autograd.grad(tied(linear_cross_entropy(h, head, t, 4)), head.weight)
    assert torch.allclose(got, ref, atol=1e-5)


def test_bf16_weight_gradient_is_close_to_the_fp32_one():
    torch.manual_seed(0)
    head = nn.Linear(64, 300, bias=False)
    h = torch.randn(40, 64)
    t = torch.randint(0, 300, (40,))
    (ref,) = torch.autograd.grad(reference(h, head, t), head.weight)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = linear_cross_entropy(h, head, t, 16)
    (g,) = torch.autograd.grad(out, head.weight)
    assert g.dtype == torch.float32
    assert torch.nn.functional.cosine_similarity(g.flatten(), ref.flatten(), dim=0) > 0.99


def test_a_second_backward_through_the_same_loss_is_refused():
    head = nn.Linear(8, 20, bias=False)
    out = linear_cross_entropy(torch.randn(5, 8), head, torch.randint(0, 20, (5,)), 2)
    out.backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="runs once"):
        out.backward()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_the_outer_product_accumulates_into_the_fp32_buffer_itself(dtype):
    from lorq.train.cross_entropy import accumulate_outer

    torch.manual_seed(0)
    acc, g, h = torch.randn(30, 8), torch.randn(5, 30).to(dtype), torch.randn(5, 8).to(dtype)
    want, where = acc + g.float().t() @ h.float(), acc.data_ptr()
    accumulate_outer(acc, g, h)
    assert acc.data_ptr() == where and acc.dtype == torch.float32  # no (V, H) copy replaces it
    torch.testing.assert_close(acc, want, atol=0.05 if dtype == torch.bfloat16 else 1e-5, rtol=0.02 if dtype == torch.bfloat16 else 1e-5)


@pytest.mark.parametrize("tokens", [12, 100])  # under the hidden size 32: the (V, H) gradient waits for the lookup
@pytest.mark.parametrize("autocast", [False, True])
def test_tied_lookup_gets_the_head_gradient_plus_its_rows(tokens, autocast):
    from lorq.train.cross_entropy import TiedGradient, defers_weight_gradient, tied_lookup

    torch.manual_seed(0)
    emb = nn.Embedding(80, 32)
    head = nn.Linear(32, 80, bias=False)
    head.weight = emb.weight
    ids, t = torch.randint(0, 80, (tokens,)), torch.randint(0, 80, (tokens,))
    mix = torch.randn(32, 32) / 32**0.5  # stands for the decoder between lookup and head
    tied = TiedGradient()
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):  # the reference too: same rounding of the mix
        ref = reference(emb(ids) @ mix, head, t)
        out = linear_cross_entropy(tied_lookup(ids, emb, tied) @ mix, head, t, 5, tied)
    (ref_grad,) = torch.autograd.grad(ref, emb.weight)
    (grad,) = torch.autograd.grad(2 * out, emb.weight)
    assert defers_weight_gradient(tokens, 32, torch.bfloat16 if autocast else torch.float32) == (tokens < (64 if autocast else 32))
    tol = 2e-2 if autocast else 1e-5
    assert out.item() == pytest.approx(ref.item(), rel=tol)
    assert torch.allclose(grad, 2 * ref_grad, atol=tol * ref_grad.abs().max())
    assert tied.grad is None and tied.logits_grad is None  # handed on, nothing left behind
