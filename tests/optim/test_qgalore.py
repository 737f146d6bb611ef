"""Q-GaLore: int8 weights with unbiased stochastic rounding, the weight gradient handed to the
optimizer from backward, INT4 projections, lazy refreshes, and exact resumes."""

import pytest
import torch
import torch.nn as nn

from lorq.optim import OptimConfig, OptimizerKind, build_optimizer
from lorq.optim.qgalore import Int8Linear, QGaLoreAdamW, int8_codes


def test_int8_linear_matches_its_dequantized_weight_and_passes_the_weight_gradient():
    torch.manual_seed(0)
    lin = nn.Linear(200, 24)
    q = Int8Linear(lin)
    assert q.codes.dtype == torch.int8 and q.scale.shape == (24, 2)
    w = q.weight_float()
    assert (w - lin.weight).abs().max() <= q.scale.max() / 2 + 1e-6  # nearest rounding at init
    x = torch.randn(3, 5, 200, requires_grad=True)
    got = {}
    q.grad_hook = lambda layer, g: got.setdefault("w", g)
    y = q(x)
    assert torch.allclose(y, x @ w.T + lin.bias, atol=1e-5)
    y.pow(2).sum().backward()
    ref_w = w.clone().requires_grad_(True)
    x2 = x.detach().clone().requires_grad_(True)
    (x2 @ ref_w.T + lin.bias).pow(2).sum().backward()
    assert torch.allclose(got["w"], ref_w.grad, atol=1e-3) and torch.allclose(x.grad, x2.grad, atol=1e-4)


def test_stochastic_rounding_is_unbiased():
    w = torch.full((1, 128), 0.3)
    scale = torch.ones(1, 1)
    g = torch.Generator().manual_seed(0)
    mean = torch.stack([int8_codes(w, scale, g).float() for _ in range(400)]).mean()
    assert abs(float(mean) - 0.3) < 0.02  # nearest rounding would give 0 forever


def test_projections_are_int4_and_refresh_lazily_when_the_subspace_settles():
    torch.manual_seed(0)
    q = Int8Linear(nn.Linear(128, 64, bias=False))
    opt = QGaLoreAdamW([{"params": [q.codes], "rank": 4, "int8": True}], {"q": q}, similarity=0.9, lr=1e-3, update_gap=2, svd_iters=0)
    G = torch.randn(64, 128)
    for _ in range(12):
        opt.int8_hook(q, G)  # the same gradient every step: the subspace never moves
    st = opt.state[q.codes]
    assert "P" not in st and st["P_codes"].dtype == torch.uint8 and (st["P_rows"], st["P_cols"]) == (64, 4)
    assert st["gap"] > 2  # refreshed less and less often


def test_a_scale_grows_when_an_update_takes_a_weight_past_its_range():
    q = Int8Linear(nn.Linear(128, 8, bias=False))
    opt = QGaLoreAdamW([{"params": [q.codes], "rank": 2, "int8": True}], {"q": q}, lr=10.0, update_gap=2, svd_iters=0)
    before = q.scale.clone()
    opt.int8_hook(q, -torch.ones(8, 128))  # a huge step up
    assert (q.scale > before).any() and q.weight_float().max() > 127 * before.max()


def test_qgalore_trains_and_resumes_exactly(tmp_path):
    from train.test_loop import toy_blocks

    from optim.test_optimizers import cfg, full_model, params
    from lorq.train.loop import train

    from lorq.eval.perplexity import perplexity

    data = toy_blocks()
    oc = OptimConfig(optimizer=OptimizerKind.QGALORE, galore_rank=8, galore_gap=2)
    whole = full_model()
    before = perplexity(whole, data.take(2), 2)["loss"]
    out = train(whole, data, data, cfg(steps=6, lr=1e-2), tmp_path / "whole", progress=False, optim=oc)
    assert out["val_loss"] < before - 0.05  # int8 weights with stochastic rounding do learn

    def stop(step):
        if step == 4:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        train(full_model(), data, data, cfg(steps=6, lr=1e-2), tmp_path / "cut", progress=False, optim=oc, on_step=stop)
    resumed = full_model()
    train(resumed, data, data, cfg(steps=6, lr=1e-2, resume=True), tmp_path / "cut", progress=False, optim=oc)
    a, b = dict(whole.named_buffers()), dict(resumed.named_buffers())
    codes = [n for n in a if n.endswith(".codes")]
    assert codes and all(torch.equal(a[n], b[n]) for n in codes)
    pa, pb = params(whole), params(resumed)
    assert all(torch.equal(pa[n], pb[n]) for n in pa)


def test_qgalore_plan_checkpoints_the_int8_codes():
    from optim.test_optimizers import full_model

    model = full_model()
    plan = build_optimizer(model, OptimConfig(optimizer=OptimizerKind.QGALORE), lr=1e-3, weight_decay=0.0)
    assert any(n.endswith(".codes") and t.dtype == torch.int8 for n, t in plan.params.items())
    assert not any(isinstance(m, nn.Linear) and "layers" in n for n, m in model.named_modules())


def test_int8_weights_let_the_loaded_float_weights_file_go(tmp_path):
    """The float weights are gone from memory once the int8 codes replace them, even when the
    model was loaded from a memory-mapped safetensors file (the embeddings would pin it)."""
    import gc
    from pathlib import Path

    from conftest import tiny_llama_config
    from transformers import AutoModelForCausalLM, LlamaForCausalLM

    from lorq.optim.qgalore import quantize_weights_int8

    LlamaForCausalLM(tiny_llama_config(tie_word_embeddings=True)).save_pretrained(tmp_path)
    model = AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.float32)
    maps, weights = Path("/proc/self/maps"), str(tmp_path / "model.safetensors")
    if not maps.exists() or weights not in maps.read_text():
        pytest.skip("no memory-mapped weights here")
    quantize_weights_int8(model)
    gc.collect()
    assert weights not in maps.read_text()
