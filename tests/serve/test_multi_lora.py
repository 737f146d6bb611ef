import pytest
import torch
import torch.nn as nn

from lorq.adapters.lora import LoRALinear
from lorq.errors import LorqError
from lorq.serve import multi_lora
from lorq.serve.multi_lora import AdapterWeights, GatherCache, MultiLoRALinear, StepPlan, StepRef, read_adapter


def adapters_for(base: nn.Linear, ranks: list[int]):
    """AdapterWeights and, as the oracle, a LoRALinear with the same adapters."""
    ref = LoRALinear(base)
    out = []
    for i, r in enumerate(ranks):
        ad = ref.add(f"a{i}", r, alpha=2.0 * r + 1, rslora=i % 2 == 1)
        with torch.no_grad():
            ad.B.normal_()
        out.append(AdapterWeights(f"a{i}", {"layer": (ad.A.detach(), ad.B.detach(), ad.scaling)}))
    return ref, out


def test_segment_and_gather_equal_lora_linear_per_token():
    torch.manual_seed(0)
    base = nn.Linear(24, 40)
    ref, ads = adapters_for(base, [2, 8, 4, 8])
    other = AdapterWeights("other", {"elsewhere": ads[0].modules["layer"]})  # adapts another module only
    x = torch.randn(20, 24)
    # tokens 0-4: prompt of a1, 5-6: base-only prompt, 7-11: prompt of a0, 12-14: prompt of a1 again,
    # then one decode token each for a2, a3, base, a1, other, a3, a0
    prefill = [(ads[1], 0, 5), (ads[0], 7, 12), (ads[1], 12, 15)]
    decode = [(ads[2], 15), (ads[3], 16), (ads[1], 18), (other, 19)]
    decode_more = [(ads[3], 17)]
    plan = StepPlan(prefill, decode + decode_more)
    step = StepRef()
    layer = MultiLoRALinear(base, "layer", step)
    step.plan = plan
    got = layer(x.unsqueeze(0))[0]
    want = base(x).clone()
    per_token = {t: a for a, s, e in prefill for t in range(s, e)} | {t: a for a, t in decode + decode_more}
    for t, a in per_token.items():
        if a is not other:
            want[t] = ref(x[t], adapter_index=torch.tensor(int(a.name[1:])))
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    step.plan = None
    torch.testing.assert_close(layer(x), base(x))


def test_gather_groups_ranks_without_padding():
    torch.manual_seed(1)
    base = nn.Linear(8, 8)
    _, ads = adapters_for(base, [1, 3])
    plan = StepPlan([], [(ads[0], 0), (ads[1], 1), (ads[0], 2)])
    x = torch.randn(3, 8)
    out = plan.apply("layer", x, torch.zeros(3, 8))
    for t, a in enumerate([ads[0], ads[1], ads[0]]):
        A, B, s = a.modules["layer"]
        torch.testing.assert_close(out[t], s * B @ (A @ x[t]), atol=1e-6, rtol=1e-5)


def test_decode_stacks_are_kept_while_the_layout_lasts(monkeypatch):
    """Steps decoding the same adapters in the same order reuse the stacks of the first; another
    layout gathers afresh; a layout over the budget is gathered at every step, kept by none.
    Every step's output is the per-token LoRA of the oracle."""
    torch.manual_seed(2)
    base = nn.Linear(16, 12)
    ref, ads = adapters_for(base, [2, 4, 2])
    built = []
    real = multi_lora.stacked
    monkeypatch.setattr(multi_lora, "stacked", lambda *a: built.append(a[2]) or real(*a))
    cache = GatherCache()

    def step(layout, cache):
        x = torch.randn(len(layout), 16)
        out = StepPlan([], [(ads[a], t) for t, a in enumerate(layout)], cache=cache).apply("layer", x, base(x))
        want = torch.stack([ref(x[t], adapter_index=torch.tensor(a)) for t, a in enumerate(layout)])
        torch.testing.assert_close(out, want, atol=1e-5, rtol=1e-5)

    step([0, 1, 2, 1], cache)
    assert len(built) == 2 and cache.adapters == [ads[0], ads[1], ads[2], ads[1]]  # ranks 2 and 4
    step([0, 1, 2, 1], cache)
    assert len(built) == 2  # the same layout: nothing gathered
    step([1, 0, 2, 1], cache)
    assert len(built) == 4  # another order: gathered again
    small = GatherCache(budget=sum(a.nbytes for a in ads) - 1)
    step([0, 1, 2], small)
    step([0, 1, 2], small)
    assert len(built) == 8 and small.key is None and not small.stacks


def test_read_adapter_checks_the_served_layers(tiny_model_dir, adapters):
    from lorq.models.loading import load_model
    from lorq.serve.multi_lora import wrap_for_serving

    model, _, _ = load_model(str(tiny_model_dir))
    _, layers = wrap_for_serving(model, [r"self_attn\."])
    w = read_adapter("b", adapters[1], layers, torch.float32)  # attention-only adapter fits
    assert w.ranks == [8] and w.nbytes == sum(A.numel() * 4 + B.numel() * 4 for A, B, _ in w.modules.values())
    with pytest.raises(LorqError, match="not an adaptable layer"):
        read_adapter("a", adapters[0], layers, torch.float32)  # also targets the MLP


def test_a_model_with_adapters_of_its_own_is_refused(tiny_model_dir, adapters):
    from lorq.jobs import load_for_inference
    from lorq.quant.base import no_quant
    from lorq.serve.multi_lora import wrap_for_serving

    model, _, _ = load_for_inference(str(tiny_model_dir), no_quant(), adapters[0])
    with pytest.raises(LorqError, match="without adapters"):
        wrap_for_serving(model, [r"layers\.\d+\."])
