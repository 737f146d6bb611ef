"""Initializations from the literature: PiSSA and OLoRA against PEFT's own, the gradient-based
ones against their defining equations, and every residual init leaves the model unchanged."""

import copy

import pytest
import torch

from lorq.adapters import LoRAConfig, add_adapters, lora_layers
from lorq.adapters.init import INITS, InitConfig, LoRAInit, apply_starts, compute_starts, full_gradients
from lorq.adapters.variants import Variant
from lorq.errors import LorqError

peft = pytest.importorskip("peft")

TARGETS = ["q_proj", "up_proj"]


def batches(n=2, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [(x, x.clone()) for x in (torch.randint(0, 128, (2, 16), generator=g) for _ in range(n))]


def started(model, init, variant=Variant.LORA, rank=4, **kw):
    """The model with adapter 'default' started by `init`, and the starts."""
    lora = LoRAConfig(rank=rank, alpha=8.0, dropout=0.0, targets=TARGETS, variant=variant)
    starts = compute_starts(model, lora, InitConfig(init=init, **kw), batches=batches, progress=False)
    add_adapters(model, lora)
    apply_starts(model, "default", starts)
    return model.eval(), starts


def logits(model, x):
    with torch.no_grad():
        return model(x).logits


@pytest.mark.parametrize("init", [LoRAInit.PISSA, LoRAInit.OLORA, LoRAInit.NLORA, LoRAInit.LORA_GA])
@pytest.mark.parametrize("variant", [Variant.LORA, Variant.DORA, Variant.CORE])
def test_residual_inits_leave_the_model_unchanged(tiny_llama, init, variant):
    x = torch.randint(0, 128, (2, 10))
    before = logits(tiny_llama, x)
    model, starts = started(tiny_llama, init, variant)
    assert set(starts) == set(lora_layers(model)) and all(s.residual for s in starts.values())
    assert torch.allclose(logits(model, x), before, atol=1e-4)
    ad = lora_layers(model)["model.layers.0.self_attn.q_proj"].adapters["default"]
    assert ad.delta_weight(lora_layers(model)["model.layers.0.self_attn.q_proj"]).abs().max() > 1e-3


@pytest.mark.parametrize("ours,theirs", [(LoRAInit.PISSA, "pissa"), (LoRAInit.OLORA, "olora")])
def test_pissa_and_olora_equal_peft(tiny_llama, ours, theirs):
    pm = peft.get_peft_model(copy.deepcopy(tiny_llama), peft.LoraConfig(r=4, lora_alpha=8, target_modules=TARGETS, init_lora_weights=theirs))
    model, _ = started(tiny_llama, ours, svd_iters=0)
    for name, layer in lora_layers(model).items():
        pl = pm.base_model.model.get_submodule(name)
        ad = layer.adapters["default"]
        # singular vectors are defined up to sign: compare the products, and the residual base
        assert torch.allclose(ad.B @ ad.A, pl.lora_B["default"].weight @ pl.lora_A["default"].weight, atol=1e-4)
        assert torch.allclose(layer.base.weight, pl.base_layer.weight, atol=1e-4)


def test_pissa_randomized_svd_is_close_to_the_exact_one(tiny_llama):
    w = tiny_llama.model.layers[1].mlp.up_proj.weight  # a pretrained-like decaying spectrum
    U, _, Vh = torch.linalg.svd(w.detach(), full_matrices=False)
    with torch.no_grad():
        w.copy_(U * 0.7 ** torch.arange(U.shape[1]) @ Vh)
    exact, _ = started(copy.deepcopy(tiny_llama), LoRAInit.PISSA, svd_iters=0)
    fast, _ = started(tiny_llama, LoRAInit.PISSA, svd_iters=8)
    a, b = (lora_layers(m)["model.layers.1.mlp.up_proj"] for m in (exact, fast))
    rel = (a.adapters["default"].delta_weight() - b.adapters["default"].delta_weight()).norm() / a.adapters["default"].delta_weight().norm()
    assert rel < 0.2


def test_lora_ga_takes_its_factors_from_the_gradients_svd(tiny_llama):
    G = full_gradients(tiny_llama, ["model.layers.0.self_attn.q_proj"], batches())["model.layers.0.self_attn.q_proj"]
    model, starts = started(tiny_llama, LoRAInit.LORA_GA, ga_gamma=4.0, svd_iters=0)
    st = starts["model.layers.0.self_attn.q_proj"]
    U, S, Vh = torch.linalg.svd(G)
    c = G.shape[0] ** 0.25 / 2.0
    # A spans G's top-r right singular vectors, B the next r left ones, both scaled by c
    assert torch.allclose((st.A @ Vh[:4].T).abs().sum(0) / c, torch.ones(4), atol=0.05)
    assert torch.allclose((U[:, 4:8].T @ st.B).abs().sum(0) / c, torch.ones(4), atol=0.05)


def test_lora_sb_starts_at_the_best_rank_r_approximation_of_the_first_step(tiny_llama):
    name = "model.layers.1.mlp.up_proj"
    G = full_gradients(tiny_llama, [name], batches())[name]
    W0 = tiny_llama.get_submodule(name).weight.detach().clone()
    model, starts = started(tiny_llama, LoRAInit.LORA_SB, Variant.CORE, svd_iters=0)
    layer = lora_layers(model)[name]
    assert torch.equal(layer.base.weight, W0)  # no residual: the model moves by the approximated step
    step = -1e-5 * G / G.pow(2).mean().sqrt()  # --sb-step
    U, S, Vh = torch.linalg.svd(step)
    best = U[:, :4] * S[:4] @ Vh[:4]
    assert (layer.adapters["default"].delta_weight() - best).norm() / best.norm() < 1e-4
    assert [n for n, p in layer.named_parameters() if p.requires_grad] == ["adapters.default.R"]


def test_the_gradient_estimate_keeps_packed_documents_apart(tiny_llama):
    """lora-ga / lora-sb see the batches as training does: a packed row with document position
    ids gives the gradient of its documents run one by one."""
    from lorq.train.data import pack

    name = "model.layers.0.mlp.up_proj"
    g = torch.Generator().manual_seed(1)
    a, b = torch.randint(0, 128, (10,), generator=g).tolist(), torch.randint(0, 128, (14,), generator=g).tolist()
    row = pack(a + b, a + b, [0, 10], 24, "docs").as_documents()
    packed = full_gradients(tiny_llama, [name], [(row.input_ids, row.labels, row.position_ids)])[name]
    alone = full_gradients(tiny_llama, [name], [(torch.tensor([a]), torch.tensor([a])), (torch.tensor([b]), torch.tensor([b]))])[name]
    stream = full_gradients(tiny_llama, [name], [(row.input_ids, row.labels)])[name]
    torch.testing.assert_close(packed, alone, rtol=1e-4, atol=1e-6)
    assert not torch.allclose(stream, alone, rtol=1e-3, atol=1e-6)


def test_gradient_estimate_is_the_mean_loss_gradient(tiny_llama):
    name = "model.layers.0.mlp.up_proj"
    G = full_gradients(tiny_llama, [name], batches(1))[name]
    (x, y), = batches(1)
    w = tiny_llama.get_submodule(name).weight
    w.requires_grad_(True)
    tiny_llama(input_ids=x, labels=y).loss.backward()  # transformers' mean next-token loss
    assert torch.allclose(G, w.grad, atol=1e-6)


def test_bad_combinations_are_refused(tiny_llama):
    with pytest.raises(LorqError, match="random by design"):
        started(copy.deepcopy(tiny_llama), LoRAInit.PISSA, Variant.NOLA)
    with pytest.raises(LorqError, match="exceeds"):
        started(tiny_llama, LoRAInit.PISSA, rank=4096)
    assert set(INITS) == set(LoRAInit) - {LoRAInit.GAUSSIAN}


@pytest.mark.parametrize("init", [LoRAInit.PISSA, LoRAInit.OLORA, LoRAInit.NLORA, LoRAInit.LORA_GA])
def test_a_residual_init_on_a_tied_output_layer_is_refused_before_any_weight_changes(init):
    """W - ΔW₀ on lm_head would also change the tied input embedding (the model would no longer be
    the base at step 0, and the rank-2r export would not restore it)."""
    from conftest import tiny_llama_config
    from transformers import LlamaForCausalLM

    torch.manual_seed(0)
    model = LlamaForCausalLM(tiny_llama_config(tie_word_embeddings=True)).eval()
    before = copy.deepcopy(model.state_dict())
    lora = LoRAConfig(rank=4, alpha=8.0, dropout=0.0, targets=["q_proj", "lm_head"])
    with pytest.raises(LorqError, match="lm_head's weight is shared with model.embed_tokens"):
        compute_starts(model, lora, InitConfig(init=init), batches=batches, progress=False)
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())  # q_proj untouched too


def test_nlora_sketch_never_exceeds_the_weight_and_finds_a_decaying_spectrum():
    from lorq.adapters.init import nlora

    g = torch.Generator().manual_seed(0)
    flat = torch.randn(96, 64, generator=g)
    U, _, Vh = torch.linalg.svd(flat, full_matrices=False)
    decaying = U * 0.6 ** torch.arange(64) @ Vh
    for W in (flat, decaying):
        approx = nlora(W, None, 8, 2.0, InitConfig()).delta(2.0)
        assert approx.norm() <= W.norm() * (1 + 1e-5)  # a projection of W: the residual cannot blow up
    S = torch.linalg.svdvals(decaying)
    best = S[8:].norm() / S.norm()
    assert (decaying - approx).norm() / decaying.norm() <= best + 0.02
