"""--precision auto: bf16 only where bf16 matmuls beat fp32 (AMX on a CPU)."""

import torch

from lorq.train import precision
from lorq.train.precision import Precision, has_amx_bf16, resolve

SAPPHIRE = "processor\t: 0\nflags\t\t: fpu avx512f avx512_bf16 amx_bf16 amx_tile amx_int8\n"
NO_AMX = "processor\t: 0\nflags\t\t: fpu avx512f avx512_bf16 avx512_fp16\n"


def test_amx_is_read_from_the_flags_line_only():
    assert has_amx_bf16(SAPPHIRE)
    assert not has_amx_bf16(NO_AMX)
    assert not has_amx_bf16("model name\t: amx_bf16 lookalike\nflags\t\t: fpu\n")
    assert not has_amx_bf16("flags\t\t: fpu amx_bf16x\n")


def test_auto_is_bf16_with_amx_and_fp32_with_avx512_bf16_alone(monkeypatch):
    cpu = torch.device("cpu")
    monkeypatch.setattr(precision, "cpu_has_amx_bf16", lambda: True)
    assert resolve(Precision.AUTO, cpu) is Precision.BF16
    monkeypatch.setattr(precision, "cpu_has_amx_bf16", lambda: False)
    assert resolve(Precision.AUTO, cpu) is Precision.FP32
    assert resolve("bf16", cpu) is Precision.BF16  # an explicit choice is kept
