"""The adapters' input dropout (only the dropped positions drawn) and the fused LoRA addition."""

import pytest
import torch
import torch.nn as nn

from lorq.adapters import LoRAConfig, add_adapters
from lorq.adapters.lora import LoRALinear, lora_layers
from lorq.adapters import variants
from lorq.adapters.variants import Dropout, dropped_positions, geometric

from tests_helpers import randomize_B


def test_eval_mode_and_p0_are_the_identity():
    x = torch.randn(5, 7)
    assert Dropout(0.3).eval()(x) is x
    assert Dropout(0.0).train()(x) is x
    assert Dropout(0.3).train()(torch.randn(0, 7)).shape == (0, 7)  # no tokens: nothing to draw


@pytest.mark.parametrize("p", [0.05, 0.1, 0.5])
def test_drop_rate_and_expectation(p):
    torch.manual_seed(0)
    d = Dropout(p).train()
    x = torch.ones(1_000_003)
    y = d(x)
    scale = 1 / (1 - p)
    values = y.unique().tolist()
    assert len(values) == 2 and values[0] == 0.0 and values[1] == pytest.approx(scale)
    dropped = (y == 0).float().mean().item()
    assert dropped == pytest.approx(p, abs=5 * (p * (1 - p) / x.numel()) ** 0.5 + 1e-5)  # 5 sigma
    assert y.mean().item() == pytest.approx(1.0, abs=0.01)  # inverted dropout keeps E[y] = x


@pytest.mark.parametrize("margin", [6, -3])  # -3: short first draws, so the drawing goes on
@pytest.mark.parametrize("p", [0.05, 0.5, 0.95])
def test_dropped_positions_are_bernoulli_trials(monkeypatch, margin, p):
    """Geometric gaps give i.i.d. Bernoulli(p) drops: the right count, every position as likely
    (first and second halves, even and odd), neighbours independent, none twice, none past n."""
    monkeypatch.setattr(variants, "GAP_MARGIN", margin)
    torch.manual_seed(0)
    n, runs = 20_001, 20
    pos = [dropped_positions(n, p) for _ in range(runs)]
    for q in pos:
        assert q.numel() == 0 or (q.min() >= 0 and q.max() < n and bool((q.diff() > 0).all()))
    hits = torch.zeros(n)
    for q in pos:
        hits[q] += 1
    if p >= 0.5:  # both ends can be dropped (missed in all runs with probability <= 0.5^20)
        assert hits[0] > 0 and hits[-1] > 0
    trials, sigma = n * runs, (n * runs * p * (1 - p)) ** 0.5
    assert abs(hits.sum().item() - p * trials) < 5 * sigma
    for part in (hits[: n // 2], hits[n // 2 :], hits[::2], hits[1::2]):
        m = part.numel() * runs
        assert abs(part.sum().item() - p * m) < 5 * (m * p * (1 - p)) ** 0.5
    pairs = 0  # neighbours both dropped: as often as p² if they are independent
    for q in pos:
        dropped = torch.zeros(n, dtype=torch.bool).index_fill_(0, q, True)
        pairs += (dropped[1:] & dropped[:-1]).sum().item()
    m = (n - 1) * runs
    assert abs(pairs - p * p * m) < 5 * (m * p * p * (1 - p * p)) ** 0.5


@pytest.mark.parametrize("p", [0.05, 0.5])
def test_gaps_follow_the_geometric_law(p):
    torch.manual_seed(0)
    n = 200_000
    g = geometric(n, p)
    assert g.dtype == torch.long and g.min() >= 1
    for k in range(1, 6):  # P(G = k) = (1 - p)^(k - 1) p, each within 5 sigma
        q = (1 - p) ** (k - 1) * p
        assert abs((g == k).sum().item() - q * n) < 5 * (n * q * (1 - q)) ** 0.5


def test_masks_follow_the_seed_and_gradients_follow_the_mask():
    d = Dropout(0.2).train()
    x = torch.randn(3, 100, requires_grad=True)
    torch.manual_seed(1)
    a = d(x)
    torch.manual_seed(1)
    b = d(x)
    c = d(x)
    assert torch.equal(a, b) and not torch.equal(b, c)
    a.sum().backward()
    kept = a != 0
    assert torch.allclose(x.grad[kept], torch.full_like(x.grad[kept], 1 / 0.8))
    assert torch.all(x.grad[~kept] == 0)


def test_kept_defers_the_rescale():
    torch.manual_seed(2)
    d = Dropout(0.25).train()
    x = torch.randn(64, 32)
    kept, rescale = d.kept(x)
    assert rescale == pytest.approx(4 / 3)
    assert torch.all((kept == 0) | (kept == x))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fused_addition_equals_base_plus_delta_with_dropout_on(dtype):
    """LoRALinear adds (s·A dropout(x)) Bᵀ with one addmm; the same RNG state gives the same
    result as base(x) + delta(x) from the variant's own delta."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(32, 48))
    add_adapters(model, LoRAConfig(rank=4, alpha=8, dropout=0.3, targets=["0"]))
    randomize_B(model)
    layer = lora_layers(model)["0"]
    layer.train()
    assert isinstance(layer, LoRALinear)
    x = torch.randn(2, 5, 32)
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=dtype is torch.bfloat16):
        torch.manual_seed(7)
        fused = layer(x)
        torch.manual_seed(7)
        xc = x.to(dtype)
        base = layer.base(xc)
        plain = base + layer.adapters["default"].delta(xc, base, layer).to(base.dtype)
    assert fused.dtype == plain.dtype
    assert torch.allclose(fused.float(), plain.float(), atol=1e-5 if dtype is torch.float32 else 3e-2)


def test_ranks_keep_their_rows_of_the_single_process_mask():
    x = torch.randn(4, 5, 7)  # odd sizes: the ranks' rows straddle 64-bit draws
    whole = Dropout(0.3).train()
    torch.manual_seed(3)
    want = whole(x)
    parts = []
    for rank in range(2):
        d = Dropout(0.3).train()
        d.share = (rank, 2)
        torch.manual_seed(3)  # every rank's generator is seeded alike
        parts.append(d(x.chunk(2)[rank]))
    assert torch.equal(torch.cat(parts), want)
