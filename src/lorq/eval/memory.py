"""Peak resident memory of a phase of work, from the kernel's own accounting.

Linux keeps a per-process high-water mark (VmHWM); writing 5 to /proc/self/clear_refs resets
it to the current RSS (Linux >= 4.0), so the peak of one phase is measured exactly, not
sampled. Elsewhere the process-lifetime peak (getrusage) is the fallback, an upper bound.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import resource
import sys
from dataclasses import dataclass
from pathlib import Path

import torch

STATUS = Path("/proc/self/status")
CLEAR_REFS = Path("/proc/self/clear_refs")
MAPS = Path("/proc/self/maps")


def _status_kib(field: str) -> int | None:
    try:
        for line in STATUS.read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1])
    except OSError:
        return None
    return None


def rss_mib() -> float:
    kib = _status_kib("VmRSS")
    return kib / 1024 if kib is not None else lifetime_peak_mib()


def lifetime_peak_mib() -> float:
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / 2**20 if sys.platform == "darwin" else peak / 1024  # bytes on macOS, KiB on Linux


def _libc():
    try:
        return ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
    except OSError:
        return None


LIBC = _libc()


def release_freed_memory() -> None:
    """Hand freed heap memory back to the OS (glibc's malloc_trim; a no-op elsewhere).

    Streaming work frees a layer's multi-MB buffers before allocating the next layer's; glibc
    raises its mmap threshold after such frees and then serves them from the heap, which it
    does not shrink, so without this the resident set grows by about a layer per layer.
    """
    trim = getattr(LIBC, "malloc_trim", None)
    if trim is not None:
        trim(0)


M_MMAP_THRESHOLD = -3  # glibc's mallopt parameter number
TIGHT_MMAP_THRESHOLD = 128 * 1024  # glibc's own starting threshold, here kept fixed


def tight_heap() -> bool:
    """From now on, every allocation over 128 KiB gets a mapping of its own, unmapped when freed;
    False where malloc is not glibc's (nothing changes).

    By default glibc raises its mmap threshold after each large free (up to 32 MiB), so a
    training step's tensors then come from the heap, whose free gaps between live blocks stay
    resident: a run's peak RSS grows over its first steps and varies between runs (on SmolLM2
    full-parameter runs 15-27% of it was free heap). Fixing the threshold makes RSS follow the
    live tensors, at the cost of the page faults of every fresh mapping (slower steps).
    """
    mallopt = getattr(LIBC, "mallopt", None)
    return mallopt is not None and bool(mallopt(M_MMAP_THRESHOLD, TIGHT_MMAP_THRESHOLD))


def file_mappings() -> list[tuple[int, int]]:
    """(start, end) of this process's memory-mapped files (Linux; empty elsewhere)."""
    spans = []
    try:
        for line in MAPS.read_text().splitlines():
            fields = line.split(maxsplit=5)
            if len(fields) == 6 and fields[4] != "0" and fields[5].startswith("/"):  # an inode: a file, not [heap] or anon
                start, end = fields[0].split("-")
                spans.append((int(start, 16), int(end, 16)))
    except OSError:
        return []
    return spans


def own_file_backed_tensors(model: torch.nn.Module) -> int:
    """Copy the parameters and buffers that still live in a memory-mapped weights file into
    memory of their own; returns the bytes copied.

    transformers maps a safetensors file whole and every tensor loaded from it keeps the mapping,
    so after quantization replaced the float linears, the pages of their weights (read while
    quantizing) stay resident as long as the embeddings still point into the file: ~0.35 GiB of
    SmolLM2-135M's 0.5. Copying what is left lets the mapping go.
    """
    spans = file_mappings()
    mapped = lambda t: any(a <= t.data_ptr() < b for a, b in spans)  # noqa: E731
    copied, seen = 0, set()
    with torch.no_grad():
        for module in model.modules():
            for tensors in (module._parameters, module._buffers):
                for name, t in tensors.items():
                    if t is None or id(t) in seen or t.device.type != "cpu" or not mapped(t):
                        continue
                    seen.add(id(t))  # a tied weight is one Parameter: copied once, still tied
                    t.data = t.data.clone()
                    copied += t.numel() * t.element_size()
    return copied


def reset_peak() -> bool:
    """Reset the high-water mark to the current RSS; False where the kernel does not allow it."""
    try:
        CLEAR_REFS.write_text("5")
        return True
    except OSError:
        return False


@dataclass
class PeakRSS:
    """with PeakRSS() as m: ...  -> m.start_mib, m.peak_mib, m.phase_mib (= peak - start), m.exact."""

    start_mib: float = 0.0
    peak_mib: float = 0.0
    exact: bool = False

    def start(self) -> "PeakRSS":
        self.exact = reset_peak()
        self.start_mib = rss_mib()
        return self

    def stop(self) -> "PeakRSS":
        hwm = _status_kib("VmHWM") if self.exact else None
        self.peak_mib = hwm / 1024 if hwm is not None else lifetime_peak_mib()
        return self

    def __enter__(self) -> "PeakRSS":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    @property
    def phase_mib(self) -> float:
        return max(self.peak_mib - self.start_mib, 0.0)

    def to_json(self) -> dict:
        return {"rss_start_mib": round(self.start_mib, 1), "rss_peak_mib": round(self.peak_mib, 1),
                "phase_peak_mib": round(self.phase_mib, 1), "peak_exact": self.exact}
