"""W ≈ Q + L1·L2 decompositions against their objectives (Eckart–Young, the output error) and
the frozen compensation branch of QuantizedLinear (forward, storage, checkpoints)."""

import pytest
import torch

from lorq.errors import LorqError
from lorq.quant import FORMATS, DECODER_LINEARS, FormatConfig, MethodConfig, QuantizedLinear, Rule, quantize_model
from lorq.quant.checkpoint import save_quantized
from lorq.quant.fisher import fisher_weights, rank1_sqrt
from lorq.quant.lowrank import Context, LowRankMethod, decompose, factor_nbytes, svd_r, weighted_svd_r

NF3 = FormatConfig("nf", bits=3, group_size=32).validate()


def rtn(w):
    return FORMATS.get(NF3.format).from_float(w, NF3)


def structured_weight(out=96, inp=128, seed=0):
    """Low-rank signal plus noise, with a few large columns (as real LLM weights have)."""
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(out, 6, generator=g) @ torch.randn(6, inp, generator=g) * 0.05 + 0.02 * torch.randn(out, inp, generator=g)
    w[:, :3] *= 8
    return w


def correlated_inputs(n=2048, d=128, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 12, generator=g) @ torch.randn(12, d, generator=g) + 0.1 * torch.randn(n, d, generator=g)


def residual(w, qw, l1, l2):
    return w - qw.dequantize(torch.float32) - l1.float() @ l2.float()


def test_svd_r_is_the_eckart_young_optimum():
    e = structured_weight()
    s = torch.linalg.svdvals(e)
    for r in (1, 4, 16):
        l1, l2 = svd_r(e, r)
        assert l1.shape == (96, r) and l2.shape == (r, 128)
        assert (e - l1 @ l2).pow(2).sum().item() == pytest.approx(s[r:].pow(2).sum().item(), rel=1e-4)
        l1, l2 = svd_r(e, r, randomized=True)  # Halko et al.: near-optimal on a decaying spectrum
        assert (e - l1 @ l2).pow(2).sum().item() <= 1.02 * s[r:].pow(2).sum().item()


def test_weighted_svd_minimizes_the_weighted_error():
    e = structured_weight(seed=3)
    g = torch.Generator().manual_seed(4)
    ctx = Context(row_weight=torch.rand(96, generator=g) + 0.1, col_weight=torch.rand(128, generator=g) + 0.1)
    weighted = lambda m: (ctx.row_weight.unsqueeze(1) * m * ctx.col_weight).pow(2).sum().item()  # noqa: E731
    lw = weighted_svd_r(e, 4, ctx)
    plain = svd_r(e, 4)
    assert weighted(e - lw[0] @ lw[1]) < weighted(e - plain[0] @ plain[1])
    uniform = Context(row_weight=torch.full((96,), 2.0), col_weight=torch.full((128,), 0.5))
    assert torch.allclose(torch.mm(*weighted_svd_r(e, 4, uniform)), torch.mm(*plain), atol=1e-5)


@pytest.mark.parametrize("method", [m for m in LowRankMethod if m is not LowRankMethod.NONE])
def test_every_decomposition_beats_quantization_alone(method):
    w, x = structured_weight(), correlated_inputs()
    ctx = Context(iters=4, hessian=x.t() @ x / len(x))
    qw, l1, l2 = decompose(method, w, 8, rtn, ctx)
    assert l1.dtype == l2.dtype == torch.float16 and l1.shape == (96, 8) and l2.shape == (8, 128)
    alone = (w - rtn(w).dequantize(torch.float32)).norm()
    assert residual(w, qw, l1, l2).norm() < 0.9 * alone


def test_lorc_and_qpissa_are_what_their_papers_say():
    w = structured_weight()
    qw, l1, l2 = decompose("lorc", w, 8, rtn, Context())
    assert torch.equal(qw.state_dict()["codes"], rtn(w).state_dict()["codes"])  # Q is plain RTN of W
    qw, l1, l2 = decompose("qpissa", w, 8, rtn, Context())
    p1, p2 = svd_r(w, 8)
    assert torch.allclose(l1.float() @ l2.float(), p1 @ p2, atol=2e-3)  # principal components of W itself
    assert torch.equal(qw.state_dict()["codes"], rtn(w - l1.float() @ l2.float()).state_dict()["codes"])


def test_loftq_with_one_iteration_is_lorc_and_more_iterations_help():
    w = structured_weight(seed=5)
    one = decompose("loftq", w, 8, rtn, Context(iters=1))
    lorc = decompose("lorc", w, 8, rtn, Context())
    assert torch.equal(one[1], lorc[1]) and torch.equal(one[2], lorc[2])
    five = decompose("loftq", w, 8, rtn, Context(iters=5))
    assert residual(w, *five).norm() <= residual(w, *one).norm()


def test_lq_lora_keeps_its_best_iterate():
    w = structured_weight(seed=6)
    errs = [residual(w, *decompose("lq-lora", w, 8, rtn, Context(iters=t))).norm().item() for t in (1, 2, 4, 8)]
    assert all(b <= a + 1e-6 for a, b in zip(errs, errs[1:]))


def test_eora_minimizes_the_output_error():
    w, x = structured_weight(seed=7), correlated_inputs()
    ctx = Context(hessian=x.t() @ x)
    out_err = lambda d: (residual(w, *d) @ x.t()).norm().item()  # noqa: E731
    eora = decompose("eora", w, 8, rtn, ctx)
    lorc = decompose("lorc", w, 8, rtn, ctx)
    assert torch.equal(eora[0].state_dict()["codes"], lorc[0].state_dict()["codes"])  # same Q, other L
    assert out_err(eora) < 0.9 * out_err(lorc)
    with pytest.raises(LorqError, match="covariance"):
        decompose("eora", w, 8, rtn, Context())


def test_rank1_fisher_weights_are_exact_for_a_rank1_fisher():
    a, b = torch.rand(5, dtype=torch.float64) + 0.1, torch.rand(7, dtype=torch.float64) + 0.1
    f = a.unsqueeze(1) * b  # F = a bᵀ
    dr, dc = rank1_sqrt(f.sum(1), f.sum(0))
    assert torch.allclose(dr.unsqueeze(1) * dc, f.sqrt())


def test_fisher_weights_of_a_model(tiny_llama):
    ids = torch.randint(0, 128, (4, 16), generator=torch.Generator().manual_seed(0))
    names = ["model.layers.0.self_attn.q_proj", "model.layers.1.mlp.down_proj"]
    weights = fisher_weights(tiny_llama, names, ids, progress=False)
    assert weights[names[0]][0].shape == (64,) and weights[names[1]][1].shape == (128,)
    assert all((t > 0).all() for pair in weights.values() for t in pair)
    assert not any(p.requires_grad is False for p in tiny_llama.parameters())  # flags restored
    assert all(p.grad is None for p in tiny_llama.parameters())


def test_compensated_layer_forward_storage_and_protocol():
    w, b = structured_weight(), torch.randn(96)
    qw, l1, l2 = decompose("lq-lora", w, 8, rtn, Context())
    layer = QuantizedLinear.from_weight(qw, b, (l1, l2))
    x = torch.randn(3, 5, 128)
    ref = x @ (qw.dequantize(torch.float32) + l1.float() @ l2.float()).t() + b
    assert torch.allclose(layer(x), ref, atol=1e-4)
    assert layer.rank == 8 and layer.nbytes == qw.nbytes + factor_nbytes(96, 128, 8) + 96 * 4
    assert torch.allclose(layer.dequantize(), qw.dequantize(torch.float32) + l1.float() @ l2.float())
    x.requires_grad_(True)
    layer(x).sum().backward()  # the input gradient includes the low-rank branch
    assert torch.allclose(x.grad, (torch.ones(3, 5, 96) @ layer.dequantize()), atol=1e-4)
    with pytest.raises(ValueError, match="do not fit"):
        QuantizedLinear.from_weight(qw, None, (l2, l1))


def test_compensated_model_checkpoint_round_trip(tiny_llama, tiny_model_dir, tmp_path):
    from lorq.models.loading import load_model

    model, tok, _ = load_model(str(tiny_model_dir))
    ids = torch.randint(0, 100, (2, 24), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        dense = model(input_ids=ids).logits
    plain = quantize_model(load_model(str(tiny_model_dir))[0], [Rule(DECODER_LINEARS, NF3)], progress=False)
    report = quantize_model(model, [Rule(DECODER_LINEARS, NF3, lowrank="lq-lora", rank=4)], MethodConfig(lowrank_iters=3), progress=False)
    assert report.rel_error < plain.rel_error
    numel = report.n_weights
    assert report.bits_per_weight == pytest.approx(8 * sum(m.nbytes for m in model.modules() if isinstance(m, QuantizedLinear)) / numel)
    assert report.bits_per_weight > plain.bits_per_weight  # the fp16 factors are counted
    assert report.summary()["formats"] == ["rtn nf3 g32 + lq-lora r4"]
    save_quantized(model, tok, tmp_path / "q", report, rules=[Rule(DECODER_LINEARS, NF3, lowrank="lq-lora", rank=4)])
    again = load_model(str(tmp_path / "q"))[0]
    with torch.no_grad():
        a, b = model(input_ids=ids).logits, again(input_ids=ids).logits
    assert torch.equal(a, b) and not torch.equal(a, dense)
    assert again.get_submodule("model.layers.0.mlp.up_proj").rank == 4


def test_rules_with_lowrank():
    with pytest.raises(LorqError, match="needs rank"):
        Rule(DECODER_LINEARS, NF3, lowrank="lorc")
    r = Rule.from_json({"pattern": "q_proj", "lowrank": "eora", "rank": 8}, NF3)
    assert r.lowrank is LowRankMethod.EORA and r.rank == 8 and r.to_json()["lowrank"] == "eora"
    assert Rule.from_json({"pattern": "q_proj"}, NF3, default_lowrank=LowRankMethod.LORC, default_rank=4).rank == 4
    with pytest.raises(LorqError, match="unknown low-rank method"):
        Rule.from_json({"pattern": "q_proj", "lowrank": "svd"}, NF3)


def test_eora_through_calibration(tiny_llama):
    ids = torch.randint(0, 128, (4, 32), generator=torch.Generator().manual_seed(0))
    report = quantize_model(tiny_llama, [Rule(DECODER_LINEARS, NF3, lowrank="eora", rank=4)], calibration=ids, progress=False)
    assert len(report.modules) == 14 and all(m["lowrank"] == "eora" for m in report.modules.values())
    with pytest.raises(LorqError, match="calibration"):
        quantize_model(tiny_llama.__class__(tiny_llama.config), [Rule(DECODER_LINEARS, NF3, lowrank="eora", rank=4)], progress=False)
