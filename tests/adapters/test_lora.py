import math

import pytest
import torch
import torch.nn as nn

from lorq.adapters import LoRAConfig, LoRALinear, adapter_routing, add_adapters, lora_layers
from lorq.errors import LorqError
from lorq.quant import DECODER_LINEARS, FormatConfig, QuantizedLinear, quantize_model
from tests_helpers import randomize_B


def test_zero_init_keeps_base_and_only_adapters_train(tiny_llama):
    x = torch.randint(0, 128, (2, 12))
    with torch.no_grad():
        ref = tiny_llama(x).logits
    wrapped = add_adapters(tiny_llama, LoRAConfig(rank=4, dropout=0.0))
    assert len(wrapped) == 14 and "lm_head" not in wrapped
    with torch.no_grad():
        assert torch.equal(tiny_llama(x).logits, ref)
    trainable = {n for n, p in tiny_llama.named_parameters() if p.requires_grad}
    assert trainable and all(".adapters.default." in n for n in trainable)


@pytest.mark.parametrize("rslora", [False, True])
def test_update_is_scaled_BA(rslora):
    base = nn.Linear(32, 16)
    layer = LoRALinear(base)
    ad = layer.add("a", rank=4, alpha=8, rslora=rslora)
    assert ad.scaling == (8 / math.sqrt(4) if rslora else 8 / 4)
    nn.init.normal_(ad.B)
    x = torch.randn(5, 32)
    expected = base(x) + ad.scaling * x @ ad.A.T @ ad.B.T
    assert torch.allclose(layer(x), expected, atol=1e-5)


def test_merge_unmerge_dense_and_refuse_quantized():
    base = nn.Linear(32, 16)
    layer = LoRALinear(base)
    nn.init.normal_(layer.add("a", 4, 8.0).B)
    x = torch.randn(3, 32)
    unmerged = layer(x)
    w0 = base.weight.detach().clone()
    layer.merge("a")
    assert torch.allclose(layer(x), unmerged, atol=1e-5)
    layer.unmerge("a")
    assert torch.allclose(base.weight, w0, atol=1e-6)
    qlayer = LoRALinear(QuantizedLinear.from_linear(nn.Linear(64, 16), FormatConfig()))
    qlayer.add("a", 4, 8.0)
    with pytest.raises(LorqError):
        qlayer.merge("a")


def test_mixed_batch_routing_equals_single_adapter_runs(tiny_llama):
    quantize_model(tiny_llama, [(DECODER_LINEARS, FormatConfig())], progress=False)
    add_adapters(tiny_llama, LoRAConfig(rank=4, dropout=0.0), "a")
    add_adapters(tiny_llama, LoRAConfig(rank=8, dropout=0.0), "b")
    randomize_B(tiny_llama, "a", 1)
    randomize_B(tiny_llama, "b", 2)
    x = torch.randint(0, 128, (3, 10))
    layers = lora_layers(tiny_llama).values()

    def run_only(active):
        for l in layers:
            l.active = active
        with torch.no_grad():
            return tiny_llama(x).logits

    ref = [run_only(["a"]), run_only(["b"]), run_only([])]
    with adapter_routing(tiny_llama, torch.tensor([0, 1, -1])), torch.no_grad():
        mixed = tiny_llama(x).logits
    for i in range(3):
        assert torch.allclose(mixed[i], ref[i][i], atol=1e-5)


def test_bad_configs(tiny_llama):
    with pytest.raises(LorqError, match="match no linear layer"):
        add_adapters(tiny_llama, LoRAConfig(targets=["no_such_module"]))
    with pytest.raises(LorqError, match="rank must be a positive"):
        add_adapters(tiny_llama, LoRAConfig(rank=0))
