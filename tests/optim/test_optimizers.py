"""Optimizers: 8-bit AdamW against torch's AdamW and bitsandbytes' 8-bit AdamW, GaLore against its
update rule, LISA's layer sampling and freed state, LoRA+ groups; resumes are exact."""


import pytest
import torch
import torch.nn as nn

from lorq.adapters import LoRAConfig, add_adapters
from lorq.errors import LorqError
from lorq.optim import AdamW8bit, GaLoreAdamW, OptimConfig, OptimizerKind, build_optimizer
from lorq.optim.adamw8bit import adam_direction_8bit
from lorq.optim.galore import project, project_back, projection
from lorq.optim.lisa import decoder_layers
from lorq.train.checkpoint import latest_checkpoint
from lorq.train.loop import TrainConfig, train

from train.test_loop import toy_blocks


def regression(opt_cls, steps=60, **kw):
    """Loss curve of a least-squares problem with a (256, 64) weight under an optimizer."""
    g = torch.Generator().manual_seed(0)
    X, W_true = torch.randn(512, 64, generator=g), torch.randn(256, 64, generator=g)
    Y = X @ W_true.T
    w = nn.Parameter(torch.zeros(256, 64))
    opt = opt_cls([w], **kw)
    losses = []
    for _ in range(steps):
        opt.zero_grad()
        loss = ((X @ w.T - Y) ** 2).mean()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return losses, w.detach(), opt


def test_adamw8bit_follows_adamw_and_bitsandbytes():
    ref, w_ref, _ = regression(torch.optim.AdamW, lr=0.05, weight_decay=0.01)
    ours, w_ours, opt = regression(AdamW8bit, lr=0.05, weight_decay=0.01, min_8bit_size=1)
    assert ours[-1] < 0.05 * ours[0]
    assert (w_ours - w_ref).norm() / w_ref.norm() < 0.05
    bnb = pytest.importorskip("bitsandbytes")
    theirs, w_bnb, _ = regression(bnb.optim.AdamW8bit, lr=0.05, weight_decay=0.01, min_8bit_size=1)
    assert (w_ours - w_ref).norm() <= 1.1 * (w_bnb - w_ref).norm() + 1e-3  # as close to fp32 AdamW as bitsandbytes
    state = opt.state[next(iter(opt.state))]
    assert state["v_codes"].dtype == torch.uint8
    assert state["m_codes"].dtype == torch.uint8 and state["m_codes"].numel() == 256 * 64
    assert sum(t.numel() * t.element_size() for t in state.values()) < 0.3 * 2 * 4 * 256 * 64


def test_galore_first_step_is_the_projected_sign_of_the_gradient():
    w = nn.Parameter(torch.randn(32, 48))
    G = torch.randn(32, 48)
    w.grad = G.clone()
    before = w.detach().clone()
    opt = GaLoreAdamW([{"params": [w], "rank": 4}], lr=0.1, scale=0.5, eps=0.0, svd_iters=0)
    opt.step()
    st = opt.state[w]
    P = st["P"]
    assert P.shape == (32, 4) and st["left"] and st["exp_avg"].shape == (4, 48)
    U, _, _ = torch.linalg.svd(G)
    assert torch.allclose((P.T @ U[:, :4]).abs().sum(0), torch.ones(4), atol=1e-3)  # top-4 left singular vectors
    R = P.T @ G  # Adam's first step is m̂ / sqrt(v̂) = sign(R)
    assert torch.allclose(w.detach(), before - 0.1 * 0.5 * P @ torch.sign(R), atol=1e-5)
    tall = torch.randn(48, 32)
    Pt = torch.linalg.svd(tall, full_matrices=False)[2][:4].T  # right side when m > n
    assert project(tall, Pt, False).shape == (48, 4) and project_back(torch.ones(48, 4), Pt, False).shape == (48, 32)


def test_galore_step_on_a_tall_matrix_projects_from_the_right_with_decay_first():
    w = nn.Parameter(torch.randn(48, 32))
    G = torch.randn(48, 32)
    w.grad = G.clone()
    before = w.detach().clone()
    opt = GaLoreAdamW([{"params": [w], "rank": 4}], lr=0.1, scale=0.5, eps=0.0, weight_decay=0.2, svd_iters=0)
    opt.step()
    st = opt.state[w]
    P = st["P"]
    assert P.shape == (32, 4) and not st["left"] and st["exp_avg"].shape == (48, 4)
    expected = before * (1 - 0.1 * 0.2) - 0.1 * 0.5 * torch.sign(G @ P) @ P.T
    assert torch.allclose(w.detach(), expected, atol=1e-5)


@pytest.mark.parametrize("shape", [(40, 300), (300, 40)])
def test_a_kept_projection_owns_only_its_own_values(shape):
    """The randomized SVD's factors are views into a wider sketch; the state keeps a copy."""
    P, _ = projection(torch.randn(*shape), 4, iters=2)
    assert P.shape == (40, 4) and P.untyped_storage().nbytes() == P.numel() * P.element_size()


def full_model():
    from transformers import LlamaForCausalLM

    from conftest import tiny_llama_config

    torch.manual_seed(0)
    return LlamaForCausalLM(tiny_llama_config(num_hidden_layers=4))


def cfg(**kw):
    base = dict(steps=6, batch_size=2, grad_accum=1, lr=3e-3, warmup_steps=1, eval_every=3, save_every=3, eval_blocks=2,
                precision="fp32", max_grad_norm=0.0)
    base.update(kw)
    return TrainConfig(**base)


def params(model):
    return {n: p.detach().clone() for n, p in model.named_parameters()}


def test_galore_unprojected_parameters_take_torch_adamw_steps():
    """Embeddings and norms get plain AdamW: the same steps as torch.optim.AdamW."""
    torch.manual_seed(0)
    a = nn.Parameter(torch.randn(40, 24))
    b = nn.Parameter(a.detach().clone())
    ours = GaLoreAdamW([{"params": [a], "rank": 0}], lr=1e-2, weight_decay=0.1)
    ref = torch.optim.AdamW([b], lr=1e-2, weight_decay=0.1)
    for step in range(4):
        g = torch.randn(40, 24, generator=torch.Generator().manual_seed(step))
        a.grad, b.grad = g.clone(), g.clone()
        ours.step()
        ref.step()
        assert torch.allclose(a, b, atol=1e-6, rtol=1e-5), step


def test_galore_layerwise_holds_no_gradient_after_backward():
    """Every parameter, the embeddings included, is updated in its hook and its gradient freed."""
    model = full_model()
    before = params(model)
    plan = build_optimizer(model, OptimConfig(optimizer=OptimizerKind.GALORE, galore_rank=8), lr=1e-3, weight_decay=0.0, max_norm=1.0)
    try:
        ids = torch.randint(0, 128, (2, 16), generator=torch.Generator().manual_seed(0))
        model(input_ids=ids, labels=ids).loss.backward()
    finally:
        plan.close()
    assert all(p.grad is None for p in model.parameters())
    assert all(not torch.equal(before[n], p) for n, p in model.named_parameters())


def test_galore_layerwise_updates_equal_the_step_at_the_end(tmp_path):
    data = toy_blocks()
    a, b = full_model(), full_model()
    oc = dict(optimizer=OptimizerKind.GALORE, galore_rank=8, galore_gap=2)
    train(a, data, data, cfg(), tmp_path / "a", progress=False, optim=OptimConfig(**oc, galore_layerwise=True))
    train(b, data, data, cfg(), tmp_path / "b", progress=False, optim=OptimConfig(**oc, galore_layerwise=False))
    pa, pb = params(a), params(b)
    assert all(torch.allclose(pa[n], pb[n], atol=1e-5) for n in pa)
    assert any(not torch.equal(pa[n], p) for n, p in params(full_model()).items())


@pytest.mark.parametrize("signed", [True, False])
def test_8bit_codes_are_the_nearest_levels(signed):
    """The lookup table's code equals a binary search over the decision midpoints, at and
    around every midpoint, for zeros, subnormals and random values."""
    from lorq.optim.adamw8bit import levels, nearest_codes

    _, mid = levels(signed)
    x = torch.randn(100_000, generator=torch.Generator().manual_seed(0))
    x = x / x.abs().max()
    edges = torch.cat([mid, torch.nextafter(mid, torch.tensor(2.0)), torch.nextafter(mid, torch.tensor(-2.0)),
                       torch.tensor([0.0, -0.0, 1.0, -1.0, 1e-30, -1e-30, 1e-45, -1e-45, 3e-8])])
    v = torch.cat([x, edges]).clamp(-1, 1)
    v = v if signed else v[v >= 0]
    assert torch.equal(nearest_codes(v, signed), torch.searchsorted(mid, v).to(torch.uint8))


def test_8bit_moments_chunk_by_chunk_equal_one_pass(monkeypatch):
    """Chunks only bound the temporaries: the same codes, absmaxes and direction as one pass."""
    import lorq.optim.adamw8bit as a8

    g = [torch.randn(3 * 1024 + 100, generator=torch.Generator().manual_seed(s)) for s in range(3)]
    runs = []
    for chunk in (1 << 30, 1024):
        monkeypatch.setattr(a8, "CHUNK", chunk)
        st: dict = {}
        runs.append(([adam_direction_8bit(st, x, t + 1, (0.9, 0.999), 1e-8) for t, x in enumerate(g)], st))
    (d1, st1), (d2, st2) = runs
    assert all(torch.equal(a, b) for a, b in zip(d1, d2))
    assert all(torch.equal(st1[k], st2[k]) for k in st1) and st1["m_codes"].dtype == torch.uint8


def test_8bit_galore_follows_galore_with_a_quarter_of_the_state():
    """8-bit GaLore (Zhao et al. 2024, sec. 5) keeps both the projected moments and the
    unprojected matrices' in 8 bits, and trains as 32-bit GaLore does."""
    def run(states):
        g = torch.Generator().manual_seed(0)
        X, W_true = torch.randn(512, 64, generator=g), torch.randn(256, 64, generator=g)
        Y = X @ W_true.T
        w, e = nn.Parameter(torch.zeros(256, 64)), nn.Parameter(torch.zeros(256, 64))  # projected (rank 16), plain
        opt = GaLoreAdamW([{"params": [w], "rank": 16}, {"params": [e], "rank": 0}], lr=0.05, update_gap=10, states=states)
        losses = []
        for _ in range(60):
            opt.zero_grad()
            lw, le = ((X @ w.T - Y) ** 2).mean(), ((X @ e.T - Y) ** 2).mean()
            (lw + le).backward()
            opt.step()
            losses.append((lw.item(), le.item()))
        held = sum(t.numel() * t.element_size() for st in opt.state.values() for k, t in st.items() if torch.is_tensor(t) and k != "P")
        return losses, e.detach(), held, opt

    l32, e32, held32, _ = run("fp32")
    l8, e8, held8, opt = run("int8")
    # a rank-16 subspace of a rank-64 problem: the loss follows 32-bit GaLore's, its sign-like
    # steps in the subspace do not (weights 30% apart at the same loss)
    assert all(abs(a[0] - b[0]) < 0.01 * a[0] for a, b in zip(l32, l8)) and l8[-1][0] < 0.8 * l8[0][0]
    assert (e8 - e32).norm() / e32.norm() < 0.05 and l8[-1][1] < 0.02 * l8[0][1]
    assert held8 < 0.3 * held32
    assert all(st["m_codes"].dtype == torch.uint8 and st["v_codes"].dtype == torch.uint8 for st in opt.state.values())
    with pytest.raises(ValueError, match="int8"):
        GaLoreAdamW([nn.Parameter(torch.zeros(2, 2))], states="int4")


def test_galore_state_saved_before_the_states_option_resumes_in_fp32():
    w = nn.Parameter(torch.randn(32, 48))
    opt = GaLoreAdamW([{"params": [w], "rank": 4}], lr=0.1)
    w.grad = torch.randn(32, 48)
    opt.step()
    saved = opt.state_dict()
    for group in saved["param_groups"]:
        del group["states"]  # as a checkpoint written before --galore-states
    fresh = GaLoreAdamW([{"params": [w], "rank": 4}], lr=0.1)
    fresh.load_state_dict(saved)
    fresh.step()
    assert fresh.state[w]["exp_avg"].dtype == torch.float32 and fresh.state[w]["adam_step"] == 2


@pytest.mark.parametrize("oc", [dict(optimizer=OptimizerKind.GALORE, galore_rank=8, galore_gap=2),
                                dict(optimizer=OptimizerKind.GALORE, galore_rank=8, galore_gap=2, galore_states="int8"),
                                dict(optimizer=OptimizerKind.LISA, lisa_layers=1, lisa_period=3),  # resumes at a period boundary
                                dict(optimizer=OptimizerKind.ADAMW8BIT, full=True)])  # full: tensors past min_8bit_size
def test_resume_equals_an_uninterrupted_run(tmp_path, oc):
    data = toy_blocks()

    make = full_model

    def stop(step):
        if step == 4:  # killed after step 4; the last checkpoint is step 3
            raise KeyboardInterrupt

    whole = make()
    train(whole, data, data, cfg(), tmp_path / "whole", progress=False, optim=OptimConfig(**oc))
    with pytest.raises(KeyboardInterrupt):
        train(make(), data, data, cfg(), tmp_path / "cut", progress=False, optim=OptimConfig(**oc), on_step=stop)
    assert latest_checkpoint(tmp_path / "cut").name == "step-000003"
    resumed = make()
    train(resumed, data, data, cfg(resume=True), tmp_path / "cut", progress=False, optim=OptimConfig(**oc))
    pw, pr = params(whole), params(resumed)
    assert all(torch.equal(pw[n], pr[n]) for n in pw), [n for n in pw if not torch.equal(pw[n], pr[n])][:3]


def test_adamw8bit_state_stays_8bit_through_a_checkpoint():
    _, _, opt = regression(AdamW8bit, steps=3, lr=0.05, min_8bit_size=1)
    fresh = AdamW8bit([nn.Parameter(torch.zeros(256, 64))], lr=0.05, min_8bit_size=1)
    fresh.load_state_dict(opt.state_dict())  # torch casts state to the parameter's dtype on load
    st = next(iter(fresh.state.values()))
    assert st["m_codes"].dtype == torch.uint8 and st["v_codes"].dtype == torch.uint8


def test_no_weight_decay_on_tensors_whose_neutral_value_is_not_zero(tiny_llama):
    from lorq.adapters.variants import Variant

    add_adapters(tiny_llama, LoRAConfig(rank=4, targets=["q_proj"], variant=Variant.DORA))
    plan = build_optimizer(tiny_llama, OptimConfig(), lr=1e-3, weight_decay=0.1)
    decay = {id(p): g["weight_decay"] for g in plan.optimizer.param_groups for p in g["params"]}
    layer = tiny_llama.model.layers[0].self_attn.q_proj.adapters["default"]
    assert decay[id(layer.magnitude)] == 0.0 and decay[id(layer.A)] == 0.1


def test_lisa_trains_only_the_sampled_layers_and_frees_the_rest():
    model = full_model()
    plan = build_optimizer(model, OptimConfig(optimizer=OptimizerKind.LISA, lisa_layers=1, lisa_period=2), lr=1e-3, weight_decay=0.0, seed=3)
    layers = decoder_layers(model)
    assert layers == [f"model.layers.{i}" for i in range(4)]
    x = toy_blocks().input_ids[:2]
    seen = []
    for step in range(8):
        plan.begin_step(step)
        active = [i for i, n in enumerate(layers) if next(model.get_submodule(n).parameters()).requires_grad]
        assert len(active) == 1 and model.model.embed_tokens.weight.requires_grad and model.lm_head.weight.requires_grad
        if step % 2:
            assert active == seen[-1]  # fixed within a period
        seen.append(active)
        plan.optimizer.zero_grad(set_to_none=True)
        model(input_ids=x, labels=x).loss.backward()
        plan.step(1.0)
        states = {id(p) for p in plan.optimizer.state}
        in_layers = [p for n in layers for p in model.get_submodule(n).parameters()]
        held = [p for p in in_layers if id(p) in states]
        assert all(p.requires_grad for p in held) and len(held) == len(list(model.get_submodule(layers[active[0]]).parameters()))
    assert len({tuple(a) for a in seen}) > 1  # resampled across periods


def test_loraplus_gives_b_a_larger_learning_rate(tiny_llama):
    add_adapters(tiny_llama, LoRAConfig(rank=4))
    plan = build_optimizer(tiny_llama, OptimConfig(loraplus_ratio=16), lr=1e-3, weight_decay=0.0)
    groups = {g["lr_scale"]: g for g in plan.optimizer.param_groups}
    assert set(groups) == {1.0, 16.0} and groups[16.0]["lr"] == pytest.approx(1.6e-2)
    b_ids = {id(l.adapters["default"].B) for l in tiny_llama.modules() if hasattr(l, "adapters")}
    assert {id(p) for p in groups[16.0]["params"]} == b_ids


def test_bad_optimizer_options():
    with pytest.raises(LorqError):
        OptimConfig(galore_rank=0).validate()
    with pytest.raises(LorqError, match="nothing to train"):
        build_optimizer(full_model().requires_grad_(False), OptimConfig(), 1e-3, 0.0)
    with pytest.raises(LorqError, match="lisa-layers"):
        build_optimizer(full_model(), OptimConfig(optimizer=OptimizerKind.LISA, lisa_layers=9), 1e-3, 0.0)
    assert OptimConfig(optimizer="galore").validate().full


@pytest.mark.parametrize("tied, choice, trained", [(False, "auto", True), (True, "auto", False), (True, "train", True),
                                                   (False, "freeze", False)])
def test_lisa_trains_the_embeddings_unless_tied_or_told(tied, choice, trained):
    from transformers import LlamaForCausalLM

    from conftest import tiny_llama_config

    model = LlamaForCausalLM(tiny_llama_config(num_hidden_layers=4, tie_word_embeddings=tied))
    assert (model.lm_head.weight is model.model.embed_tokens.weight) == tied
    plan = build_optimizer(model, OptimConfig(optimizer="lisa", lisa_layers=1, lisa_embeddings=choice).validate(), 1e-3, 0.0)
    plan.begin_step(0)
    outside = [model.model.embed_tokens.weight, model.lm_head.weight, model.model.norm.weight]
    assert all(p.requires_grad == trained for p in outside)
    x = toy_blocks().input_ids[:2]
    model(input_ids=x, labels=x).loss.backward()
    plan.step(1.0)
    assert (id(model.model.embed_tokens.weight) in {id(p) for p in plan.optimizer.state}) == trained


def test_recorded_run_options_read_in_todays_spelling():
    from lorq.jobs import shaping

    lisa = {"optimizer": "lisa", "lisa_embeddings": True, "lisa_layers": 2, "galore_rank": 128, "lr": 1e-4}
    assert shaping(lisa) == {"optimizer": "lisa", "lisa_embeddings": "train", "lisa_layers": 2, "lr": 1e-4}
    assert shaping({**lisa, "lisa_embeddings": False})["lisa_embeddings"] == "freeze"
    assert shaping({**lisa, "optimizer": "adamw"}) == {"optimizer": "adamw", "lr": 1e-4}
    assert shaping({"optimizer": "qgalore", "galore_rank": 8, "qgalore_similarity": 0.4}) == {"optimizer": "qgalore", "galore_rank": 8, "qgalore_similarity": 0.4}


def test_a_lisa_option_added_since_a_checkpoint_counts_at_its_default():
    from lorq.jobs import FinetuneConfig, flat_options, recorded_options, run_options

    cfg = FinetuneConfig()
    cfg.optim.optimizer = "lisa"
    now = run_options(cfg)
    older = {k: v for k, v in flat_options(cfg).items() if k != "lisa_period"}  # written before lisa_period existed
    assert recorded_options(older) == now


def test_qgalore_keeps_8bit_moments_by_default_and_older_runs_resume_with_fp32_ones():
    from lorq.jobs import FinetuneConfig, flat_options, recorded_options, run_options

    assert OptimConfig(optimizer="qgalore").validate().galore_states == "int8"
    assert OptimConfig(optimizer="galore").validate().galore_states == "fp32"
    for kind, before in (("qgalore", "int8"), ("galore", "fp32")):
        cfg = FinetuneConfig()
        cfg.optim.optimizer = kind
        older = {k: v for k, v in flat_options(cfg).items() if k != "galore_states"}  # written before the option
        assert recorded_options(older)["galore_states"] == "fp32"
        cfg.optim.validate()
        assert run_options(cfg)["galore_states"] == before


def test_a_run_from_before_document_packing_resumes_as_the_stream_it_was():
    from lorq.jobs import FinetuneConfig, flat_options, recorded_options, run_options

    cfg = FinetuneConfig()
    older = {k: v for k, v in flat_options(cfg).items() if k != "packing"}
    assert recorded_options(older)["packing"] == "stream" != run_options(cfg)["packing"]
    cfg.data.packing = "stream"
    assert recorded_options(older) == run_options(cfg)


@pytest.mark.parametrize("field,value,message", [
    ("qgalore_similarity", 0.0, r"qgalore-similarity must be in \(0, 1\], got 0.0"),
    ("qgalore_similarity", float("nan"), r"qgalore-similarity must be in \(0, 1\], got nan"),
    ("galore_rank", 0, "galore-rank must be positive, got 0"),
    ("lisa_period", -1, "lisa-period must be positive, got -1"),
])
def test_out_of_range_options_are_named(field, value, message):
    with pytest.raises(LorqError, match=message):
        OptimConfig(**{field: value}).validate()
