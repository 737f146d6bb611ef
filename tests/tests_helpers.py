"""Helpers shared by tests (importable because pytest puts tests/ on sys.path)."""

import copy

import torch
import torch.nn as nn

from lorq.adapters import lora_layers
from lorq.quant import QuantizedLinear
from lorq.quant.linear import set_module


def randomize_B(model, name="default", seed=0):
    """Give adapter `name` a nonzero B so it changes the output."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for layer in lora_layers(model).values():
            if name in layer.adapters:
                B = layer.adapters[name].B
                B.copy_(torch.randn(B.shape, generator=g) * 0.05)


def dequantized_copy(model):
    """A dense copy whose linear weights are the dequantized weights of `model`."""
    dense = copy.deepcopy(model)
    for name, m in list(dense.named_modules()):
        if isinstance(m, QuantizedLinear):
            lin = nn.Linear(m.in_features, m.out_features, bias=m.bias is not None)
            lin.weight.data = m.qweight().dequantize(torch.float32)
            if m.bias is not None:
                lin.bias.data = m.bias.data.clone()
            set_module(dense, name, lin)
    return dense
