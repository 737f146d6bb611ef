"""Lean RMSNorm / SwiGLU forms against autograd (gradcheck) and transformers' own layers."""

import pytest
import torch
import torch.nn as nn
from transformers import GemmaConfig, GemmaForCausalLM, LlamaForCausalLM, Qwen3Config, Qwen3ForCausalLM
from transformers.models.llama.modeling_llama import LlamaMLP, LlamaRMSNorm

from lorq.adapters import LoRAConfig, add_adapters
from lorq.quant import DECODER_LINEARS, FormatConfig, quantize_model
from lorq.train.lean import GQA_SDPA, RMS_NORMS, SWIGLU_MLPS, RMSNormFn, SwiGLUFn, make_lean, recomputed, restore_stock, swiglu
from tests_helpers import randomize_B
from conftest import tiny_llama_config


def test_gradients_are_the_derivatives():
    torch.manual_seed(0)
    x = torch.randn(3, 5, 8, dtype=torch.float64, requires_grad=True)
    w = torch.randn(8, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda x, w: RMSNormFn.apply(x, w, 1e-6), (x, w))
    g, u = (torch.randn(4, 6, dtype=torch.float64, requires_grad=True) for _ in range(2))
    assert torch.autograd.gradcheck(SwiGLUFn.apply, (g, u))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_rms_norm_equals_transformers(dtype):
    torch.manual_seed(0)
    stock = LlamaRMSNorm(16, eps=1e-5)
    stock.weight.data.normal_()
    x = torch.randn(2, 7, 16).to(dtype).requires_grad_(True)
    ref = stock(x)
    ref_grads = torch.autograd.grad((ref.float() ** 2).sum(), (x, stock.weight))
    out = RMSNormFn.apply(x, stock.weight, stock.variance_epsilon)
    grads = torch.autograd.grad((out.float() ** 2).sum(), (x, stock.weight))
    assert out.dtype == ref.dtype and torch.equal(out, ref)  # the forward is the same computation
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    for a, b in zip(grads, ref_grads):
        assert a.dtype == b.dtype and torch.allclose(a.float(), b.float(), rtol=tol, atol=tol)


def test_recomputed_view_gives_the_same_gradients():
    torch.manual_seed(0)
    g, u = (torch.randn(2, 3, 8, requires_grad=True) for _ in range(2))
    w = torch.randn(8, 5, requires_grad=True)
    h = SwiGLUFn.apply(g, u)
    kept = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: kept.append(t) or t, lambda t: t):
        with recomputed(h, lambda: swiglu(g, u)):
            y = h.reshape(6, 8)[1:] @ w  # keeps a view of h with an offset
    assert not any(t.untyped_storage().data_ptr() == h.untyped_storage().data_ptr() for t in kept)
    got = torch.autograd.grad(y.square().sum(), (g, u, w))
    ref = torch.autograd.grad((swiglu(g, u).reshape(6, 8)[1:] @ w).square().sum(), (g, u, w))
    for a, b in zip(got, ref):
        assert torch.allclose(a, b, atol=1e-6)


def saved_bytes(model, ids, **kw) -> tuple[torch.Tensor, int]:
    """(loss, bytes of the distinct non-parameter tensors autograd keeps for backward)."""
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    seen = {}

    def pack(t):
        key = t.untyped_storage().data_ptr()
        if key not in params:
            seen[key] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = model(ids, labels=ids, **kw).loss
    return loss, sum(seen.values())


def loss_and_grads(model, ids, autocast: bool = False, **kw):
    model.zero_grad(set_to_none=True)
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        loss = model(ids, labels=ids, **kw).loss
    loss.backward()
    return loss.item(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def tiny(kind: str):
    torch.manual_seed(0)
    if kind == "qwen3":  # also normalizes q and k per head
        return Qwen3ForCausalLM(Qwen3Config(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                            num_attention_heads=4, num_key_value_heads=2, head_dim=16)).train()
    return LlamaForCausalLM(tiny_llama_config()).train()


@pytest.mark.parametrize("kind", ["llama", "qwen3"])
@pytest.mark.parametrize("autocast", [False, True])
def test_lean_model_trains_as_the_stock_one_and_keeps_less(kind, autocast):
    model = tiny(kind)
    for p in model.parameters():  # norm weights away from 1, so their gradients matter
        p.data.add_(0.1 * torch.randn_like(p))
    ids = torch.randint(0, 128, (2, 24))
    ref_loss, ref = loss_and_grads(model, ids, autocast)
    _, stock_bytes = saved_bytes(model, ids)
    lean = make_lean(model)
    cfg = model.config
    assert len(lean) == cfg.num_hidden_layers * (3 + 2 * (kind == "qwen3")) + 2  # + the final norm, the attention's config
    loss, grads = loss_and_grads(model, ids, autocast)
    _, lean_bytes = saved_bytes(model, ids)
    restore_stock(lean)
    assert not any("forward" in vars(m) for m in model.modules()) and cfg._attn_implementation == "sdpa"
    assert loss == pytest.approx(ref_loss, rel=1e-6 if not autocast else 1e-3)
    assert grads.keys() == ref.keys()
    tol = 1e-4 if not autocast else 3e-2
    for n in ref:
        assert (grads[n] - ref[n]).norm() <= tol * ref[n].norm() + 1e-7, n
    if kind == "llama" and not autocast:  # per token and layer: two norms' outputs (2H) and silu(gate), silu(gate) * up (2I)
        tokens, H, I = ids.numel(), cfg.hidden_size, cfg.intermediate_size
        assert stock_bytes - lean_bytes == 4 * tokens * (cfg.num_hidden_layers * (2 * H + 2 * I) + H)  # + the final norm's


@pytest.mark.parametrize("autocast", [False, True])
def test_grouped_query_attention_under_a_mask_reads_the_shared_heads_in_place(autocast):
    """Two documents per row (a block-diagonal mask from the restarting positions): transformers
    repeats each key/value head per query head, the lean attention does not; same loss and
    gradients, and exactly those copies fewer kept for backward."""
    model = tiny("llama")
    cfg = model.config
    ids = torch.randint(0, 128, (2, 24))
    doc = dict(position_ids=torch.cat([torch.arange(10), torch.arange(14)]).expand(2, -1), use_cache=False)
    ref_loss, ref = loss_and_grads(model, ids, autocast, **doc)
    assert ref_loss != pytest.approx(loss_and_grads(model, ids, autocast)[0], rel=1e-4)  # the documents are kept apart
    _, stock_bytes = saved_bytes(model, ids, **doc)
    lean = make_lean(model)
    loss, grads = loss_and_grads(model, ids, autocast, **doc)
    _, lean_bytes = saved_bytes(model, ids, **doc)
    restore_stock(lean)
    assert loss == pytest.approx(ref_loss, rel=1e-6 if not autocast else 1e-3)
    for n in ref:
        assert (grads[n] - ref[n]).norm() <= (1e-5 if not autocast else 3e-2) * ref[n].norm() + 1e-7, n
    tokens, H, I, L = ids.numel(), cfg.hidden_size, cfg.intermediate_size, cfg.num_hidden_layers
    repeated = 2 * (cfg.num_attention_heads - cfg.num_key_value_heads) * (H // cfg.num_attention_heads)  # k and v
    if not autocast:
        assert stock_bytes - lean_bytes == 4 * tokens * (L * (2 * H + 2 * I + repeated) + H)


def test_lora_on_a_quantized_base_gets_the_same_adapter_gradients():
    model = tiny("llama")
    quantize_model(model, [(DECODER_LINEARS, FormatConfig())], progress=False)
    add_adapters(model, LoRAConfig(rank=4, dropout=0.0))
    randomize_B(model)
    ids = torch.randint(0, 128, (2, 24))
    ref_loss, ref = loss_and_grads(model, ids)
    lean = make_lean(model)
    loss, grads = loss_and_grads(model, ids)
    restore_stock(lean)
    assert ref and grads.keys() == ref.keys() and loss == pytest.approx(ref_loss, rel=1e-6)
    for n in ref:
        assert torch.allclose(grads[n], ref[n], rtol=1e-4, atol=1e-7), n


def test_other_forms_are_left_alone():
    torch.manual_seed(0)
    gemma = GemmaForCausalLM(GemmaConfig(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=1,
                                         num_attention_heads=4, num_key_value_heads=2, head_dim=16))
    lean = make_lean(gemma)  # (1 + weight) norms, a GELU MLP: only its attention
    assert lean == [gemma.config] and gemma.config._attn_implementation == GQA_SDPA
    restore_stock(lean)
    assert gemma.config._attn_implementation == "sdpa"
    silu_mlp = tiny("llama").model.layers[0].mlp
    silu_mlp.act_fn = nn.GELU()
    assert make_lean(silu_mlp) == []


@pytest.mark.parametrize("name", RMS_NORMS + SWIGLU_MLPS)
def test_every_listed_class_has_llamas_forward(name):
    """The lean forms replace these classes' forwards: each must still be LlamaRMSNorm's or
    LlamaMLP's (a transformers upgrade that changes one fails here)."""
    import importlib
    import inspect

    model = {"Phi3": "phi3", "Granite": "granite", "SmolLM3": "smollm3", "Olmo2": "olmo2", "Qwen2": "qwen2",
             "Qwen3": "qwen3", "Mistral": "mistral", "Llama": "llama"}
    prefix = next(p for p in model if name.startswith(p))
    cls = getattr(importlib.import_module(f"transformers.models.{model[prefix]}.modeling_{model[prefix]}"), name)
    llama = LlamaRMSNorm if name.endswith("RMSNorm") else LlamaMLP
    assert inspect.getsource(cls.forward) == inspect.getsource(llama.forward)
