"""Bit budgets: the ILP against brute force, costs against the formats' own storage, and the
plans it produces against the report of the quantization they drive."""

import itertools

import numpy as np
import pytest
import torch

from lorq.errors import LorqError
from lorq.quant import DECODER_LINEARS, FORMATS, FormatConfig, Rule, quantize_model
from lorq.quant.budget import (
    BudgetConfig, Candidate, allocate, budget_candidates, candidates, cheapest_plan_bits, check_reachable, layer_index, matrix_costs, solve_ilp, solve_layerwise,
    storage_bits, weighted_error_by_rank,
)
from lorq.quant.lowrank import factor_nbytes

NF = FormatConfig("nf", group_size=32).validate()


def test_ilp_matches_brute_force():
    rng = np.random.default_rng(0)
    for _ in range(5):
        err = rng.random((5, 3)) * np.array([4.0, 2.0, 1.0])  # more bits, less error
        bits = np.sort(rng.integers(100, 400, (5, 3)), axis=1).astype(float)
        budget = bits.min(1).sum() + 0.5 * (bits.max(1).sum() - bits.min(1).sum())
        best = min(
            (c for c in itertools.product(range(3), repeat=5) if bits[np.arange(5), c].sum() <= budget),
            key=lambda c: err[np.arange(5), c].sum(),
        )
        choice = solve_ilp(err, bits, budget)
        assert bits[np.arange(5), choice].sum() <= budget
        assert err[np.arange(5), choice].sum() == pytest.approx(err[np.arange(5), best].sum())
    with pytest.raises(LorqError, match="below the cheapest"):
        solve_ilp(err, bits, bits.min(1).sum() - 1)


def test_error_by_rank_is_the_truncated_svd_error():
    g = torch.Generator().manual_seed(0)
    e = torch.randn(40, 24, generator=g)
    s2 = torch.linalg.svdvals(e).pow(2)
    assert weighted_error_by_rank(e, [0, 3, 24], None) == pytest.approx([s2.sum().item(), s2[3:].sum().item(), 0.0], abs=1e-3)
    dr, dc = torch.rand(40, generator=g), torch.rand(24, generator=g)
    scaled = dr.unsqueeze(1) * e * dc
    assert weighted_error_by_rank(e, [5], (dr, dc))[0] == pytest.approx(torch.linalg.svdvals(scaled).pow(2)[5:].sum().item(), rel=1e-4)


def test_costs_are_the_formats_own_storage():
    w = torch.randn(32, 64)
    cands = candidates(NF, BudgetConfig(budget_choices=[2, 3, 4, 5]), [0, 4])  # 5 bits is not nf: skipped
    assert [c.describe() for c in cands] == ["nf2 g64", "nf2 g64 r4", "nf3 g64", "nf3 g64 r4", "nf4 g64", "nf4 g64 r4"]
    errs, bits = matrix_costs(w, cands, None)
    for c, e, b in zip(cands, errs, bits):
        qw = FORMATS.get(c.quant.format).from_float(w, c.quant)
        assert b == 8 * (qw.nbytes + factor_nbytes(32, 64, c.rank))
        if c.rank == 0:
            assert e == pytest.approx((w - qw.dequantize(torch.float32)).pow(2).sum().item(), rel=1e-5)
    assert errs[0] > errs[2] > errs[4] and errs[1] < errs[0]


@pytest.mark.parametrize("cfg", [FormatConfig(f, bits=b, group_size=g, double_quant=d, symmetric=sym) for f, b in
                                 (("nf", 2), ("nf", 4), ("int", 3), ("int", 8), ("fp8", 8), ("fp4", 4), ("int8-outlier", 8))
                                 for g, d, sym in ((64, True, False), (0, False, True), (32, False, False))])
def test_storage_follows_from_the_shape_alone(cfg):
    """What the early budget check assumes: any weights of a shape, zero rows and outliers
    included, store in the bits a random matrix of that shape does."""
    cfg.validate()
    w = torch.randn(48, 320) * torch.logspace(-3, 1, 320)
    w[3] = 0
    w[5, 7] = 1e4
    assert storage_bits((48, 320), cfg) == 8 * FORMATS.get(cfg.format).from_float(w, cfg).nbytes


def test_the_cheapest_plan_is_the_ilps_least_total():
    shapes = [(32, 64), (64, 32), (32, 64), (48, 64)]
    cands = candidates(NF, BudgetConfig(budget_choices=[2, 3], budget_groups=[32, 64]), [0, 2])
    least = sum(min(matrix_costs(torch.randn(shape), cands, None)[1]) for shape in shapes)
    assert cheapest_plan_bits(shapes, cands) == least


def test_layerwise_raises_the_most_important_layers_first():
    bits = np.array([[2.0, 4.0]] * 4)  # 2 layers x 2 matrices, two levels
    choice = solve_layerwise([0, 0, 1, 1], {0: 0.1, 1: 0.9}, bits, [0, 1], budget_total=12.0)
    assert choice.tolist() == [0, 0, 1, 1]
    assert solve_layerwise([0, 0, 1, 1], {0: 0.1, 1: 0.9}, bits, [0, 1], 16.0).tolist() == [1, 1, 1, 1]
    assert layer_index("model.layers.17.mlp.up_proj") == 17 and layer_index("lm_head") == -1


@pytest.mark.parametrize("allocation,weighting", [("ilp", "none"), ("ilp", "activation"), ("ilp", "fisher"), ("layerwise", "none")])
def test_allocated_plan_meets_the_budget_everything_counted(tiny_llama, allocation, weighting):
    from lorq.quant.fisher import fisher_weights
    from lorq.quant.quantize import plan_modules

    ids = torch.randint(0, 128, (4, 32), generator=torch.Generator().manual_seed(0))
    rules = [Rule(DECODER_LINEARS, NF, lowrank="lorc", rank=4)]
    fisher = fisher_weights(tiny_llama, list(plan_modules(tiny_llama, rules)), ids, progress=False) if weighting == "fisher" else None
    bcfg = BudgetConfig(budget_bits=3.4, allocation=allocation, budget_weighting=weighting, budget_groups=[32, 64])
    plan = allocate(tiny_llama, rules, bcfg, rank=4, calibration=ids, fisher=fisher, progress=False)
    assert plan.bits_per_weight <= 3.4 and len(plan.choices) == 14
    assert "| layer |" in plan.table() and plan.summary()["allocation"] == allocation
    report = quantize_model(tiny_llama, plan.rules + rules, progress=False)
    assert report.bits_per_weight == pytest.approx(plan.bits_per_weight, rel=1e-9)  # the plan's count is the real storage


def test_a_bigger_budget_never_costs_accuracy(tiny_llama):
    import copy

    rules = [Rule(DECODER_LINEARS, NF)]
    errors = []
    for bits in (2.5, 3.2, 4.2):
        model = copy.deepcopy(tiny_llama)
        plan = allocate(model, rules, BudgetConfig(budget_bits=bits, budget_weighting="none"), 0, None, progress=False)
        errors.append(quantize_model(model, plan.rules, progress=False).rel_error)
    assert errors[0] > errors[1] > errors[2]


def test_budget_errors(tiny_llama):
    rules = [Rule(DECODER_LINEARS, NF)]
    with pytest.raises(LorqError, match="below the cheapest"):  # 2-bit codes, but their scales on top
        allocate(tiny_llama, rules, BudgetConfig(budget_bits=2.01, budget_weighting="none"), 0, None, progress=False)
    with pytest.raises(LorqError, match="below the cheapest plan, 2.1"):  # the same, from the shapes alone
        check_reachable(*budget_candidates(tiny_llama, rules, BudgetConfig(budget_bits=2.01), 0), 2.01)
    check_reachable(*budget_candidates(tiny_llama, rules, BudgetConfig(budget_bits=2.2), 0), 2.2)
    with pytest.raises(LorqError, match="below the 2 bits of the smallest code"):  # known from the options alone
        candidates(NF, BudgetConfig(budget_bits=1.5), [0])
    with pytest.raises(LorqError, match="needs calibration"):
        allocate(tiny_llama, rules, BudgetConfig(budget_bits=3.0, budget_weighting="activation"), 0, None, progress=False)
    with pytest.raises(LorqError, match="Fisher weights"):
        allocate(tiny_llama, rules, BudgetConfig(budget_bits=3.0), 0, None, progress=False)
    with pytest.raises(LorqError, match="budget-bits must be"):
        BudgetConfig(budget_bits=0.5).validate()
    with pytest.raises(LorqError, match="no valid budget choice"):
        candidates(NF, BudgetConfig(budget_choices=[5]), [0])
    assert Candidate(NF, 8).describe() == "nf4 g32 r8"


def test_adapter_factors_are_outside_the_budget(tiny_llama):
    rules = [Rule(DECODER_LINEARS, NF, lowrank="lq-lora", rank=4)]
    plan = allocate(tiny_llama, rules, BudgetConfig(budget_bits=3.2, budget_weighting="none"), 4, None, progress=False, adapter_rank=4)
    assert all(r.rank == 4 and r.lowrank.value == "lq-lora" for r in plan.rules)
    assert plan.bits_per_weight <= 3.2 and not any("r4" in c for c in plan.choices.values())
