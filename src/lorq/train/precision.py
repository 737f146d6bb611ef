"""Compute precision: bf16 autocast where the hardware runs bf16 matmuls faster than fp32, else fp32."""

from __future__ import annotations

import time
from contextlib import nullcontext
from enum import Enum
from functools import lru_cache
from pathlib import Path

import torch


class Precision(str, Enum):
    AUTO = "auto"
    BF16 = "bf16"
    FP32 = "fp32"


INFERENCE_PRECISION_HELP = ("weights and compute: fp32, bf16 (quantized weights stay as stored) or auto: bf16 on an Ampere or newer GPU "
                            "and on a CPU whose bf16 matmuls are faster than fp32 (AMX; timed once without it), else fp32")
BF16_MARGIN = 0.8  # bf16 must beat fp32 by this much: it also pays casts and a coarser result


@lru_cache(maxsize=None)
def cpu_flags() -> frozenset[str]:
    """The CPU's feature flags from /proc/cpuinfo (empty where there is none)."""
    try:
        return flags_of(Path("/proc/cpuinfo").read_text())
    except OSError:
        return frozenset()


def flags_of(cpuinfo: str) -> frozenset[str]:
    line = next((l for l in cpuinfo.splitlines() if l.startswith("flags")), "")
    return frozenset(line.partition(":")[2].split())


def gemm_seconds(dtype: torch.dtype, n: int = 768, reps: int = 3) -> float:
    """Best of `reps` timings of one n x n x n matmul (its own generator: the run's random
    stream, and so its dropout masks, must not depend on whether this ran)."""
    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(n, n, generator=g).to(dtype), torch.randn(n, n, generator=g).to(dtype)
    a @ b  # warm-up: the library picks and caches its kernel
    best = float("inf")
    for _ in range(reps):
        start = time.perf_counter()
        a @ b
        best = min(best, time.perf_counter() - start)
    return best


def rank0_choice(decide) -> bool:
    """decide() on rank 0, the same answer on every rank of a process group (ranks must agree
    on a precision: their CPUs or timings may differ); decide() itself without a group."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        return decide()
    device = f"cuda:{torch.cuda.current_device()}" if dist.get_backend() == "nccl" else "cpu"
    t = torch.tensor([int(decide()) if dist.get_rank() == 0 else 0], device=device)
    dist.broadcast(t, src=0)
    return bool(t.item())


def cpu_bf16_is_faster() -> bool:
    """AMX always wins. AVX512-BF16 without AMX depends on the part: on one such 2-core Xeon a
    bf16 GEMM ran at 145-180 GFLOP/s against 50-70 in fp32, on another at 156 against 260
    (a QLoRA step took 1.6x as long in bf16), so a flag cannot decide and a timing does."""
    flags = cpu_flags()
    if "amx_bf16" in flags:
        return True
    if "avx512_bf16" not in flags:
        return False  # bf16 would be emulated
    return gemm_seconds(torch.bfloat16) < BF16_MARGIN * gemm_seconds(torch.float32)


@lru_cache(maxsize=None)
def bf16_gemm_is_faster() -> bool:
    """Whether bf16 matmuls beat fp32 ones on this CPU: decided once per process, by rank 0
    under torchrun (every rank calls this at the same point: it is a collective there)."""
    return rank0_choice(cpu_bf16_is_faster)


def resolve(precision: Precision, device: torch.device) -> Precision:
    precision = Precision(precision)
    if precision is not Precision.AUTO:
        return precision
    if device.type == "cuda":  # native bf16 from Ampere (8.x) on; older GPUs only emulate it, slowly
        return Precision.BF16 if torch.cuda.get_device_capability(device)[0] >= 8 else Precision.FP32
    return Precision.BF16 if bf16_gemm_is_faster() else Precision.FP32


def weights_dtype(precision: Precision, device: torch.device) -> torch.dtype:
    """The dtype inference (generate, serve) holds its weights and runs in: casting them once
    spares the per-step casts autocast would redo on frozen weights."""
    return torch.bfloat16 if resolve(precision, device) is Precision.BF16 else torch.float32


def autocast(precision: Precision, device: torch.device):
    """Autocast context for a resolved precision (fp32 parameters stay fp32)."""
    if Precision(precision) is Precision.BF16:
        return torch.autocast(device_type=device.type, dtype=torch.bfloat16)
    return nullcontext()
