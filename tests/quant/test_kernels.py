"""Each fast path against the reference dequantize-then-matmul."""

import pytest
import torch
import torch.nn as nn

from lorq.quant import FormatConfig, QuantFormat, QuantizedLinear
from lorq.quant.affine import as_groups


def int4_layer(group=64, out=96, inp=256, device="cpu"):
    lin = nn.Linear(inp, out, bias=False)
    return QuantizedLinear.from_linear(lin, FormatConfig(QuantFormat.INT, 4, group)).to(device)


def reference(q: QuantizedLinear, x: torch.Tensor) -> torch.Tensor:
    """bf16 reference: the dequantized weight with the kernel's bf16 scale/zero rounding."""
    qw = q.qweight()
    scale = qw.scale.float().bfloat16().float()
    zero = (qw.min.float() + 8 * qw.scale.float()).bfloat16().float()
    codes = as_groups(qw.int_codes(), qw.group)
    w = ((codes - 8) * scale.unsqueeze(-1) + zero.unsqueeze(-1)).view(qw.shape)
    return x.float() @ w.t().to(x.device)


def check(q, x):
    assert q.kernel(x) is not None
    y = q(x)
    assert y.dtype == torch.bfloat16
    ref = reference(q, x)
    # bf16 output rounding: within a few bf16 ulps of the output scale
    assert (y.float() - ref).abs().max() <= 1e-2 * ref.abs().max()
    q.use_kernels = False
    try:
        slow = q(x).float()
    finally:
        del q.use_kernels
    assert (y.float() - slow).abs().max() <= 2e-2 * slow.abs().max()


@pytest.mark.parametrize("group", [32, 64, 128])
@pytest.mark.parametrize("batch", [1, 7])
def test_cpu_int4_kernel_matches_reference(group, batch):
    q = int4_layer(group)
    check(q, torch.randn(batch, 3, 256).bfloat16())


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_int4_kernel_matches_reference():
    q = int4_layer(128, out=256, inp=1024, device="cuda")
    check(q, torch.randn(4, 1024, device="cuda").bfloat16())


def test_kernel_only_where_it_applies():
    x16, x32 = torch.randn(2, 256).bfloat16(), torch.randn(2, 256)
    assert int4_layer().kernel(x32) is None  # fp32 activations keep the exact reference path
    for cfg in [FormatConfig(QuantFormat.INT, 3, 64), FormatConfig(QuantFormat.INT, 4, 64, symmetric=True), FormatConfig(QuantFormat.NF, 4, 64)]:
        assert QuantizedLinear.from_linear(nn.Linear(256, 32), cfg).kernel(x16) is None


def test_kernel_cache_follows_the_weights():
    q = int4_layer()
    x = torch.randn(2, 256).bfloat16()
    k1 = q.kernel(x)
    assert q.kernel(x) is k1
    q.scale.mul_(2)  # an in-place change (e.g. training the scales) invalidates the prepared kernel
    assert q.kernel(x) is not k1
