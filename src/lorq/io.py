"""File I/O that never leaves a half-written result behind, and checked safetensors reads."""

from __future__ import annotations

import fnmatch
import json
import math
import os
import re
import secrets
import shutil
import struct
import tempfile
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch

from .errors import LorqError, SystemRefusal


@contextmanager
def atomic_dir(path: str | Path):
    """Yield a temporary sibling directory; on success it replaces `path` in one rename.

    An interrupted write leaves only the hidden temporary directory (removed on the way out),
    never a partial `path`. A previous `path` is moved aside first and deleted after the swap
    (put back if the swap itself is interrupted); a file there is never replaced by a directory.
    """
    path = Path(os.path.abspath(path))  # `.` has no name to build the temporary's from
    if path.exists() and not path.is_dir():
        raise LorqError(f"{path} exists and is not a directory; choose another output")
    path.parent.mkdir(parents=True, exist_ok=True)
    # short sibling names: a legal output name close to 255 characters must still have room
    tmp = Path(tempfile.mkdtemp(prefix=".lorq-tmp-", dir=path.parent))
    tmp.chmod(0o777 & ~current_umask())  # mkdtemp makes it 0700; the output gets the usual mode
    old = None
    try:
        yield tmp
        if path.exists():
            old = path.with_name(f".{path.name[:64]}.lorq-old-{os.getpid()}-{tmp.name[-8:]}")  # names its output, still short
            os.replace(path, old)
        os.replace(tmp, path)
    finally:
        if old is not None and not path.exists() and old.exists():
            os.replace(old, path)  # interrupted between the two renames: the previous output returns
        for leftover in (tmp, old):
            if leftover is not None and leftover.exists():
                shutil.rmtree(leftover, ignore_errors=True)


def current_umask() -> int:
    """The process's umask, read without setting it (os.umask would, racing other threads)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except OSError:
        pass
    return 0o022


def temp_sibling(path: Path, suffix: str = "") -> Path:
    """A hidden temporary name beside `path`, short whatever the length of path's own name."""
    return path.with_name(f".lorq-tmp-{os.getpid()}-{secrets.token_hex(4)}{suffix}")


def overlaps(a: Path, b: Path) -> bool:
    """One path is the other, or lies inside it."""
    a, b = Path(a).resolve(), Path(b).resolve()
    return a == b or a in b.parents or b in a.parents


def check_inputs_apart(out: Path, reads) -> None:
    for p in reads:
        if p and Path(p).exists() and overlaps(out, Path(p)):
            raise LorqError(f"output {out} overlaps {p}, which this command reads; choose another output")


def check_creatable(out: Path) -> None:
    """The output can be made: its nearest existing ancestor is a directory we may write in."""
    parent = Path(os.path.abspath(out)).parent
    while not parent.exists():
        parent = parent.parent
    if not parent.is_dir():
        raise LorqError(f"cannot create output {out}: {parent} is a file")
    try:  # a real file, before the work: access() passes root where the system still refuses (/proc, a read-only mount)
        fd, probe = tempfile.mkstemp(prefix=".lorq-probe-", dir=parent)
        os.close(fd)
        os.unlink(probe)
    except OSError as e:
        raise SystemRefusal(f"cannot create output {out}: {parent} refuses new files ({e.strerror})")


def check_output_name(out: str | Path) -> Path:
    """An output named plainly: not empty (which would mean the working directory), not a
    symbolic link (replacing it would replace the link, not what it points to)."""
    if not str(out).strip():
        raise LorqError("--output is empty; give a path")
    out = Path(out)
    if out.is_symlink():
        raise LorqError(f"output {out} is a symbolic link; give the path it points to ({os.path.realpath(out)})")
    return out


def foreign_entries(out: Path, owned: tuple[str, ...]) -> list[str]:
    """Entries of out that match none of the glob patterns `owned`."""
    return sorted(e.name for e in out.iterdir() if not any(fnmatch.fnmatchcase(e.name, p) for p in owned))


def check_output_dir(out: str | Path, kind: str, markers: tuple[str, ...], reads=(), parts: tuple[str, ...] = (),
                     owned: tuple[str, ...] = ()) -> Path:
    """Refuse an output directory whose writing would destroy something that is not ours: the
    current directory (or one above it), a path that overlaps an input, a file, or a non-empty
    directory holding none of `markers` (the files by which an earlier lorq output of this kind
    is recognised, and may be replaced). parts: the output writes these entries inside the
    directory (replacing them) instead of replacing the directory itself. owned: for a
    directory replaced whole, glob patterns of every entry an earlier output may hold; an
    entry matching none (a user's notes) refuses the output rather than vanish with it."""
    out = check_output_name(out)
    resolved, cwd = out.resolve(), Path.cwd().resolve()
    if not parts and (resolved == cwd or resolved in cwd.parents):
        raise LorqError(f"output {out} is the current directory or holds it, and would be replaced; choose a new directory")
    for replaced in [out / p for p in parts] or [out]:
        check_inputs_apart(replaced, reads)
    check_creatable(out)
    if out.exists():
        if not out.is_dir():
            raise LorqError(f"output {out} exists and is not a directory; choose another output")
        if any(out.iterdir()) and not any((out / m).exists() for m in markers):
            raise LorqError(f"output {out} is a non-empty directory that is not a {kind} written by lorq "
                            f"(it has no {markers[0]}); choose a new directory, or remove it yourself")
        if owned and (foreign := foreign_entries(out, owned)):
            raise LorqError(f"output {out} is an earlier {kind}, but also holds what lorq did not write there "
                            f"({', '.join(foreign[:5])}{', ...' if len(foreign) > 5 else ''}), which replacing it would delete; "
                            f"move that out, or choose a new directory")
    return out


def check_output_file(out: str | Path, magic: bytes, kind: str, reads=()) -> Path:
    """Refuse an output file that overlaps an input, is a directory, or exists without `magic`
    (an earlier output of this kind may be replaced, nothing else)."""
    out = check_output_name(out)
    check_inputs_apart(out, reads)
    check_creatable(out)
    if out.is_dir():
        raise LorqError(f"output {out} is a directory; give a file name")
    if out.exists():
        try:
            with out.open("rb") as f:
                head = f.read(len(magic))
        except OSError as e:
            raise LorqError(f"output {out} cannot be read to check what it is ({e.strerror})")
        if head != magic:
            raise LorqError(f"output {out} exists and is not a {kind}; choose another name, or remove it yourself")
    return out


def check_file(path: str | Path | None, what: str) -> None:
    """An input file that exists, checked before any model is loaded."""
    if path is not None and not Path(path).is_file():
        raise LorqError(f"{what} {path} not found" + (" (it is a directory)" if Path(path).is_dir() else ""))


def is_number(v) -> bool:
    """A finite JSON number (Python's json reads NaN and Infinity too); a bool is not one."""
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def is_positive_int(v) -> bool:
    """A JSON integer >= 1; a bool is not one."""
    return isinstance(v, int) and not isinstance(v, bool) and v > 0


def check_finite_tensors(tensors: dict[str, torch.Tensor], where) -> None:
    """A file's floating tensors hold no NaN or infinity (a diverged run's output is refused)."""
    bad = next((k for k, t in tensors.items() if t.is_floating_point() and not bool(torch.isfinite(t).all())), None)
    if bad is not None:
        raise LorqError(f"{where}: {bad} holds NaN or infinite values")


def check_finite(name: str, values) -> None:
    if any(not math.isfinite(v) for v in values):
        raise LorqError(f"{name} must be finite numbers")


def atomic_write_text(path: str | Path, text: str) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = temp_sibling(path)
    tmp.write_text(text)
    os.replace(tmp, path)


def save_safetensors(tensors: dict[str, torch.Tensor], path: str | Path, metadata: dict[str, str] | None = None) -> None:
    """safetensors' save_file, with the file mode any other file gets (it creates 0600 files,
    which other users of a shared machine could not read)."""
    from safetensors.torch import save_file

    try:
        save_file(tensors, str(path), metadata=metadata)
    except Exception as e:  # SafetensorError: "... I/O error: No space left on device (os error 28)"
        if (code := re.search(r"\(os error (\d+)\)", str(e))) is None:
            raise
        raise OSError(int(code.group(1)), os.strerror(int(code.group(1))), str(path)) from e
    usual_mode(path)


def usual_mode(path: str | Path) -> None:
    """Give a file the mode a plain open() would: 0666 less the umask."""
    os.chmod(path, 0o666 & ~current_umask())


def save_figure(fig, path: str | Path, dpi: int = 120) -> Path:
    """Write a matplotlib figure as PNG atomically (a reader never sees half a file) and close it."""
    import matplotlib.pyplot as plt

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = temp_sibling(path, path.suffix)
    fig.savefig(tmp, dpi=dpi, bbox_inches="tight", format="png")
    plt.close(fig)
    os.replace(tmp, path)
    return path


def write_json(path: str | Path, obj) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=False) + "\n")


def read_json(path: str | Path) -> dict:
    path = Path(path)
    if not path.is_file():
        raise LorqError(f"missing file {path}")
    try:
        return json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise LorqError(f"{path} is not valid JSON: {e}")


SAFETENSORS_DTYPES = {
    torch.float64: "F64", torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16",
    torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8", torch.uint8: "U8", torch.bool: "BOOL",
    torch.uint16: "U16", torch.uint32: "U32", torch.uint64: "U64", torch.float8_e4m3fn: "F8_E4M3", torch.float8_e5m2: "F8_E5M2",
}
DTYPE_OF = {v: k for k, v in SAFETENSORS_DTYPES.items()}


@dataclass(frozen=True)
class TensorSpec:
    name: str
    dtype: torch.dtype
    shape: tuple[int, ...]

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * torch.empty((), dtype=self.dtype).element_size()


MAX_HEADER = 100 * 2**20  # safetensors' own limit on the JSON header


class SafetensorsFile:
    """One safetensors file read with plain file reads, one tensor at a time (a safetensors file:
    an 8-byte little-endian header length, a JSON header giving each tensor's dtype, shape and
    byte range, then the tensors' bytes).

    Not through a memory map (safetensors' safe_open): pages of a mapped file that a merge has
    touched stay in the process's resident set until the file is closed, so streaming a
    540 MB checkpoint that way ends with the whole file counted in its peak memory.
    """

    def __init__(self, path: Path):
        self.path = path
        try:
            size = path.stat().st_size
            with open(path, "rb") as f:
                head = f.read(8)
                n = struct.unpack("<Q", head)[0] if len(head) == 8 else -1
                if not 0 < n <= min(MAX_HEADER, size - 8):
                    raise ValueError("header length out of range")
                header = json.loads(f.read(n))
        except (OSError, ValueError, UnicodeDecodeError) as e:
            raise LorqError(f"{path} is not a readable safetensors file ({str(e).splitlines()[0]})")
        if not isinstance(header, dict):
            raise LorqError(f"{path} is not a readable safetensors file (its header is not a JSON object)")
        self.start, self.entries = 8 + n, {}
        for name, e in header.items():
            if name == "__metadata__":
                continue
            try:
                spec = TensorSpec(name, DTYPE_OF[e["dtype"]], tuple(int(d) for d in e["shape"]))
                a, b = (int(x) for x in e["data_offsets"])
            except (KeyError, TypeError, ValueError):
                raise LorqError(f"{path} is not a readable safetensors file (bad header entry for {name})")
            if b - a != spec.nbytes or a < 0 or self.start + b > size:
                raise LorqError(f"{path} is not a readable safetensors file ({name} lies outside the file or has the wrong size)")
            self.entries[name] = (spec, a)

    def get(self, name: str) -> torch.Tensor:
        with self.opened() as f:
            return self.read(f, name)

    def tensors(self) -> dict[str, torch.Tensor]:
        with self.opened() as f:
            return {name: self.read(f, name) for name in self.entries}

    @contextmanager
    def opened(self):
        try:
            with open(self.path, "rb") as f:
                yield f
        except OSError as e:
            raise LorqError(f"cannot read {self.path} ({e})")

    def read(self, f, name: str) -> torch.Tensor:
        spec, offset = self.entries[name]
        if spec.nbytes == 0:
            return torch.empty(spec.shape, dtype=spec.dtype)
        buf = bytearray(spec.nbytes)
        f.seek(self.start + offset)
        if f.readinto(buf) != spec.nbytes:
            raise LorqError(f"cannot read tensor {name} of {self.path} (the file ends early: changed while read?)")
        return torch.frombuffer(buf, dtype=torch.uint8).view(spec.dtype).reshape(spec.shape)


def load_safetensors(path: str | Path) -> dict[str, torch.Tensor]:
    """Load a safetensors file into process memory, turning a missing or corrupt file into a
    one-line error. Read, not memory-mapped as safetensors' load_file does: a mapped file that
    is truncated or replaced while its tensors are in use (an adapter overwritten under a
    running server) kills the process with SIGBUS, or changes its weights underneath it."""
    path = Path(path)
    if not path.is_file():
        raise LorqError(f"missing file {path}")
    return SafetensorsFile(path).tensors()
