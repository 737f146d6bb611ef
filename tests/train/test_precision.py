"""--precision auto: bf16 only where bf16 matmuls beat fp32 ones on this machine."""

import pytest
import torch
import torch.multiprocessing as mp

from lorq.train import precision
from lorq.train.precision import Precision, flags_of, rank0_choice, resolve

SAPPHIRE = "processor\t: 0\nflags\t\t: fpu avx512f avx512_bf16 amx_bf16 amx_tile amx_int8\n"
NO_AMX = "processor\t: 0\nmodel name\t: amx_bf16 lookalike\nflags\t\t: fpu avx512f avx512_bf16 avx512_fp16\n"


def test_flags_come_from_the_flags_line_only():
    assert {"amx_bf16", "avx512_bf16"} <= flags_of(SAPPHIRE)
    assert "amx_bf16" not in flags_of(NO_AMX) and "avx512_bf16" in flags_of(NO_AMX)
    assert flags_of("no flags here") == frozenset()


@pytest.fixture
def cpu_with(monkeypatch):
    """Pretend the CPU has these flags and these (bf16, fp32) GEMM timings."""
    def set_(cpuinfo: str, bf16_s: float = 1.0, fp32_s: float = 1.0):
        monkeypatch.setattr(precision, "cpu_flags", lambda: flags_of(cpuinfo))
        monkeypatch.setattr(precision, "gemm_seconds", lambda dtype: bf16_s if dtype == torch.bfloat16 else fp32_s)
        precision.bf16_gemm_is_faster.cache_clear()

    yield set_
    precision.bf16_gemm_is_faster.cache_clear()


def test_auto_is_bf16_with_amx_without_timing(cpu_with):
    cpu_with(SAPPHIRE, bf16_s=9.0, fp32_s=1.0)  # AMX decides alone
    assert resolve(Precision.AUTO, torch.device("cpu")) is Precision.BF16


@pytest.mark.parametrize("capability, want", [((7, 0), Precision.FP32), ((7, 5), Precision.FP32), ((8, 0), Precision.BF16), ((9, 0), Precision.BF16)])
def test_auto_on_a_gpu_is_bf16_from_ampere_on(monkeypatch, capability, want):
    """V100 / T4 only emulate bf16 (torch.cuda.is_bf16_supported() says yes to them by default)."""
    asked = []
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: asked.append(device) or capability)
    gpu = torch.device("cuda", 1)
    assert resolve(Precision.AUTO, gpu) is want and asked == [gpu]
    assert resolve(Precision.FP32, gpu) is Precision.FP32


def test_auto_times_avx512_bf16_without_amx(cpu_with):
    cpu, auto = torch.device("cpu"), Precision.AUTO
    cpu_with(NO_AMX, bf16_s=0.4, fp32_s=1.0)  # bf16 2.5x faster (a Xeon measured so)
    assert resolve(auto, cpu) is Precision.BF16
    cpu_with(NO_AMX, bf16_s=1.7, fp32_s=1.0)  # bf16 slower (another Xeon measured so)
    assert resolve(auto, cpu) is Precision.FP32
    cpu_with(NO_AMX, bf16_s=0.9, fp32_s=1.0)  # within the margin: not worth bf16's casts and rounding
    assert resolve(auto, cpu) is Precision.FP32
    cpu_with("flags\t: fpu avx2\n", bf16_s=0.1)  # no native bf16: emulated, never chosen
    assert resolve(auto, cpu) is Precision.FP32
    assert resolve("bf16", cpu) is Precision.BF16  # an explicit choice is kept


def _agree(rank: int, store: str, out):
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=2)
    try:
        def decide():
            if rank != 0:
                raise AssertionError("only rank 0 decides (and times)")
            return True

        out[rank] = rank0_choice(decide)
    finally:
        dist.destroy_process_group()


def test_every_rank_takes_rank_0s_choice(tmp_path):
    out = mp.Manager().dict()
    mp.spawn(_agree, args=(str(tmp_path / "store"), out), nprocs=2)
    assert dict(out) == {0: True, 1: True}
    assert rank0_choice(lambda: False) is False  # no process group: the answer itself


def test_timing_leaves_the_runs_random_stream_alone():
    """The dropout masks of a run must not depend on whether auto timed a GEMM."""
    torch.manual_seed(0)
    expected = torch.rand(3)
    torch.manual_seed(0)
    precision.gemm_seconds(torch.float32, n=64, reps=1)
    assert torch.equal(torch.rand(3), expected)
