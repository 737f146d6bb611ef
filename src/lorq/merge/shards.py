"""Checkpoints read and written one tensor at a time.

Reading parses the safetensors header and reads each tensor's bytes when asked for. Writing
streams too: a safetensors file is an 8-byte little-endian header length, a
JSON header (dtype, shape and byte range of every tensor, padded with spaces to 8 bytes), then
the raw tensors back to back; the header needs only names, dtypes and shapes, so it is
written first and each tensor is computed, written and dropped in turn. Shards past
`max_bytes` follow transformers' naming (model-00001-of-00003.safetensors + an index).
"""

from __future__ import annotations

import json
import struct
from pathlib import Path
from typing import Callable

import torch

from ..errors import LorqError
from ..io import SAFETENSORS_DTYPES, SafetensorsFile, TensorSpec, read_json, write_json

SINGLE = "model.safetensors"
INDEX = "model.safetensors.index.json"


class CheckpointReader:
    """The tensors of a checkpoint directory (model.safetensors, or shards + index), lazily."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        index = self.path / INDEX
        if index.is_file():
            weight_map = read_json(index).get("weight_map")
            if not isinstance(weight_map, dict) or not weight_map:
                raise LorqError(f"{index} has no weight_map")
            files = sorted(set(weight_map.values()))
        elif (self.path / SINGLE).is_file():
            files = [SINGLE]
        else:
            raise LorqError(f"{self.path} has no {SINGLE} or {INDEX}")
        self._files = {f: SafetensorsFile(self.path / f) for f in files}
        self._where = {name: f for f, st in self._files.items() for name in st.entries}

    def names(self) -> list[str]:
        return list(self._where)

    def __contains__(self, name: str) -> bool:
        return name in self._where

    def spec(self, name: str) -> TensorSpec:
        return self._files[self._where[name]].entries[name][0]

    def get(self, name: str) -> torch.Tensor:
        return self._files[self._where[name]].get(name)

    def prefixed(self, prefix: str) -> dict[str, torch.Tensor]:
        """Every tensor named `prefix...`, keyed by the rest of its name."""
        return {n[len(prefix):]: self.get(n) for n in self._where if n.startswith(prefix)}


def safetensors_header(specs: list[TensorSpec], metadata: dict[str, str] | None = None) -> bytes:
    header, offset = {"__metadata__": metadata or {"format": "pt"}}, 0
    for s in specs:
        header[s.name] = {"dtype": SAFETENSORS_DTYPES[s.dtype], "shape": list(s.shape), "data_offsets": [offset, offset + s.nbytes]}
        offset += s.nbytes
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)  # the data starts 8-byte aligned
    return struct.pack("<Q", len(raw)) + raw


def write_safetensors(path: Path, specs: list[TensorSpec], produce: Callable[[TensorSpec], torch.Tensor],
                      metadata: dict[str, str] | None = None) -> None:
    """Write the tensors `produce(spec)` returns, in spec order, holding one at a time."""
    with open(path, "wb") as f:
        f.write(safetensors_header(specs, metadata))
        for s in specs:
            t = produce(s)
            if t.dtype != s.dtype or tuple(t.shape) != s.shape:
                raise RuntimeError(f"{s.name}: produced {t.dtype} {tuple(t.shape)}, planned {s.dtype} {s.shape}")
            f.write(memoryview(t.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy()))


def plan_shards(specs: list[TensorSpec], max_bytes: int) -> list[list[TensorSpec]]:
    """Consecutive groups of at most max_bytes (a larger tensor gets a shard of its own)."""
    shards, size = [[]], 0
    for s in specs:
        if shards[-1] and size + s.nbytes > max_bytes:
            shards.append([])
            size = 0
        shards[-1].append(s)
        size += s.nbytes
    return shards


def shard_names(n: int) -> list[str]:
    return [SINGLE] if n == 1 else [f"model-{i:05d}-of-{n:05d}.safetensors" for i in range(1, n + 1)]


def write_sharded(out: Path, specs: list[TensorSpec], produce: Callable[[TensorSpec], torch.Tensor],
                  max_bytes: int) -> list[str]:
    """Shards (+ index when more than one) in directory `out`; returns the file names."""
    shards = plan_shards(specs, max_bytes)
    names = shard_names(len(shards))
    for name, group in zip(names, shards):
        write_safetensors(out / name, group, produce)
    if len(shards) > 1:
        weight_map = {s.name: name for name, group in zip(names, shards) for s in group}
        write_json(out / INDEX, {"metadata": {"total_size": sum(s.nbytes for s in specs)}, "weight_map": weight_map})
    return names
