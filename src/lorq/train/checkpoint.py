"""Training checkpoints: written atomically, resumable bit for bit.

<output>/checkpoints/step-000020/ holds the trainable tensors (safetensors) and the optimizer
and RNG state; <output>/checkpoints/latest names the newest complete one. A run killed while
writing leaves the previous checkpoint as `latest`.
"""

from __future__ import annotations

import re
import shutil
import zipfile
from pathlib import Path

import torch

from ..errors import LorqError
from ..io import SafetensorsFile, atomic_dir, atomic_write_text, load_safetensors, read_json, save_safetensors, write_json
from .distributed import place, place_optimizer_state

TRAINABLE = "trainable.safetensors"
STATE = "state.pt"
OPTIONS = "options.json"  # the options that shape the result, compared on --resume


def checkpoint_root(out_dir: str | Path) -> Path:
    return Path(out_dir) / "checkpoints"


def save_checkpoint(out_dir, step: int, params: dict[str, torch.Tensor], optimizer_state: dict, keep: int = 1, kind: str = "",
                    options: dict | None = None) -> Path:
    """params: the tensors the optimizer updates, by name (whole, not sharded); optimizer_state:
    its state_dict(); kind: the optimizer's name; options: the run's options (JSON), if known."""
    root = checkpoint_root(out_dir)
    name = f"step-{step:06d}"
    with atomic_dir(root / name) as tmp:
        tensors = {n: p.detach().contiguous() for n, p in params.items()}
        save_safetensors(tensors, tmp / TRAINABLE)
        rng = {"rng": torch.get_rng_state()}
        if torch.cuda.is_available() and torch.cuda.is_initialized():  # dropout masks drawn on a GPU come from its generator
            rng["cuda_rng"] = torch.cuda.get_rng_state()
        torch.save({"step": step, "optimizer": optimizer_state, **rng, "optimizer_kind": kind}, tmp / STATE)
        if options is not None:
            write_json(tmp / OPTIONS, options)
    atomic_write_text(root / "latest", name + "\n")
    old = sorted(p for p in root.glob("step-*") if p.is_dir() and p.name != name)
    for p in old[: max(0, len(old) - (keep - 1))]:
        shutil.rmtree(p, ignore_errors=True)
    return root / name


def check_same_options(ckpt: Path, options: dict, normalize=lambda saved: saved) -> None:
    """--resume continues the run only with the options that shaped it (a checkpoint from
    before this check was recorded has no options file and is taken as it is). normalize: the
    recorded options as the current lorq records them."""
    if not (ckpt / OPTIONS).is_file():
        return
    saved = read_json(ckpt / OPTIONS)
    if not isinstance(saved, dict):
        raise LorqError(f"{ckpt / OPTIONS} is damaged (not a JSON object); use a new --output")
    saved = normalize(saved)
    changed = [k for k in sorted(set(saved) | set(options)) if saved.get(k) != options.get(k)]
    if changed:
        k = changed[0]
        raise LorqError(f"--resume: the run in {ckpt.parent.parent} was made with --{k.replace('_', '-')} {saved.get(k)}, "
                        f"this command gives {options.get(k)}" + (f" (and {len(changed) - 1} more differ)" if len(changed) > 1 else "")
                        + "; resume with the same options, or use a new --output")


def latest_checkpoint(out_dir) -> Path | None:
    pointer = checkpoint_root(out_dir) / "latest"
    if not pointer.is_file():
        return None
    name = pointer.read_bytes().decode("ascii", errors="replace").strip()
    if not re.fullmatch(r"step-\d+", name):
        raise LorqError(f"{pointer} is damaged (it should name a step-NNNNNN checkpoint); use a new --output")
    path = checkpoint_root(out_dir) / name
    return path if path.is_dir() else None


def check_readable(path: Path) -> None:
    """The checkpoint's files are whole (the tensors' header and sizes, the state's zip
    directory), checked before the model is loaded; their contents are checked on load."""
    SafetensorsFile(path / TRAINABLE)
    if not zipfile.is_zipfile(path / STATE):
        raise LorqError(f"checkpoint {path / STATE} is missing or unreadable; use a new --output")


def load_checkpoint(path: Path, params: dict[str, torch.Tensor], optimizer, at_step=lambda step: None, kind: str = "") -> int:
    """Restore the trained tensors, optimizer and RNG; returns the step it was taken after.
    at_step(step) runs after the optimizer state is loaded (LISA selects that step's layers and
    frees the state of the others). kind: the optimizer's name, checked against the saved one.
    Sharded (FSDP) parameters and their optimizer state take this rank's part of the saved ones."""
    tensors = load_safetensors(path / TRAINABLE)
    if set(tensors) != set(params):
        raise LorqError(f"checkpoint {path} was written for different adapters than this run's; use a new --output")
    with torch.no_grad():
        for n, p in params.items():
            if p.shape != tensors[n].shape:
                raise LorqError(f"checkpoint {path}: {n} has shape {tuple(tensors[n].shape)}, this run has {tuple(p.shape)}")
            p.copy_(place(tensors[n], p))
    try:
        state = torch.load(path / STATE, weights_only=True, map_location="cpu")  # load_state_dict moves it to each parameter's device
    except Exception as e:  # a truncated or foreign file; torch raises many kinds
        raise LorqError(f"checkpoint {path / STATE} is unreadable ({type(e).__name__})")
    if state.get("optimizer_kind", kind) != kind:
        raise LorqError(f"checkpoint {path} was written by --optimizer {state['optimizer_kind']}, this run uses {kind}; use a new --output")
    try:
        optimizer.load_state_dict(place_optimizer_state(state["optimizer"], optimizer))
    except (ValueError, KeyError) as e:
        raise LorqError(f"checkpoint {path} holds optimizer state for other parameter groups ({str(e).splitlines()[0][:120]}); use a new --output")
    at_step(int(state["step"]))
    torch.set_rng_state(state["rng"])
    if "cuda_rng" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda_rng"])
    return int(state["step"])
