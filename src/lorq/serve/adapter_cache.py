"""The served adapters: names under one root directory, weights in an LRU cache with a byte budget.

Registering an adapter is cheap (a name and a directory); its weights are read on first use
and kept until the cache needs room. Adapters in use by running requests are never evicted;
a request for an evicted adapter reads it again (a miss).
"""

from __future__ import annotations

import re
import threading
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn as nn

from ..adapters.peft_format import CONFIG_FILE, WEIGHTS_FILE
from ..errors import LorqError
from .multi_lora import AdapterWeights, read_adapter

NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")  # used with fullmatch: "$" would let a final newline in
NAME_RULE = "1 to 128 letters, digits, '.', '_' and '-', the first a letter or digit"


class AdapterNotFound(LorqError):
    """The name is not served, or its directory does not exist (HTTP 404)."""


class InvalidAdapterPath(LorqError):
    """A requested adapter path that is not allowed (HTTP 400; the message quotes the client's own path)."""


def resolve_under(root: Path, relative: str) -> Path:
    """root / relative, refused unless it stays under root: no absolute paths, no `..`, and no
    symlink that leads out of it."""
    if not relative or "\x00" in relative or Path(relative).is_absolute() or ".." in Path(relative).parts or "\\" in relative:
        raise InvalidAdapterPath(f"adapter path {relative!r} must be a relative path under the adapter root, without '..'")
    path = (root / relative).resolve()
    if not path.is_relative_to(root.resolve()):
        raise InvalidAdapterPath(f"adapter path {relative!r} leads outside the adapter root")
    if not (path / CONFIG_FILE).is_file():
        raise AdapterNotFound(f"no adapter at {relative!r} under the adapter root (no {CONFIG_FILE})")
    for file in (CONFIG_FILE, WEIGHTS_FILE):
        if not (path / file).resolve().is_relative_to(root.resolve()):
            raise InvalidAdapterPath(f"adapter path {relative!r}: {file} is a link leading outside the adapter root")
    return path


@dataclass
class CacheStats:
    hits: int = 0
    misses: int = 0
    evictions: int = 0


class AdapterStore:
    """Registry (name -> directory) plus the LRU weight cache; thread-safe."""

    def __init__(self, root: str | Path | None, layers: dict[str, nn.Module], budget_bytes: int, dtype: torch.dtype = torch.float32,
                 device: torch.device | str = "cpu"):
        if budget_bytes <= 0:
            raise LorqError("the adapter cache budget must be positive")
        self.root = Path(root).resolve() if root else None
        if self.root is not None and not self.root.is_dir():
            raise LorqError(f"adapter root {root} is not a directory")
        self.layers, self.budget, self.dtype, self.device = layers, budget_bytes, dtype, device
        self.paths: dict[str, Path] = {}
        self.cache: OrderedDict[str, AdapterWeights] = OrderedDict()
        self.in_use: dict[str, int] = {}
        self.reading: dict[str, threading.Event] = {}
        self.stats = CacheStats()
        self.lock = threading.RLock()

    def discover(self) -> list[str]:
        """Register every subdirectory of the root that holds an adapter, under its name."""
        if self.root is None:
            return []
        names = []
        for sub in sorted(self.root.iterdir()):
            if NAME.fullmatch(sub.name):
                try:
                    path = resolve_under(self.root, sub.name)
                except LorqError:
                    continue  # not an adapter, or a link out of the root: not served
                with self.lock:
                    self.paths[sub.name] = path
                names.append(sub.name)
        return names

    @property
    def names(self) -> list[str]:
        with self.lock:
            return list(self.paths)

    @property
    def nbytes(self) -> int:
        with self.lock:
            return sum(a.nbytes for a in self.cache.values())

    def register(self, name: str, relative: str | None = None) -> AdapterWeights:
        """Serve the adapter at root/relative (default root/name) as `name`; reads and checks it now."""
        if self.root is None:
            raise LorqError("no adapter root is configured (start the server with --adapters DIR)")
        if not NAME.fullmatch(name):
            raise LorqError(f"invalid adapter name {name!r}: {NAME_RULE}")
        path = resolve_under(self.root, relative or name)
        with self.lock:
            if name in self.paths:
                raise LorqError(f"adapter {name!r} is already loaded")
        weights = self.read(name, path)
        with self.lock:
            if name in self.paths:  # registered meanwhile by a concurrent call
                raise LorqError(f"adapter {name!r} is already loaded")
            self.paths[name] = path
            self.insert(weights)
        return weights

    def unregister(self, name: str) -> None:
        with self.lock:
            if name not in self.paths:
                raise AdapterNotFound(f"adapter {name!r} is not loaded")
            del self.paths[name]
            self.cache.pop(name, None)

    def read(self, name: str, path: Path) -> AdapterWeights:
        weights = read_adapter(name, path, self.layers, self.dtype, self.device)
        if weights.nbytes > self.budget:
            raise LorqError(f"adapter {name!r} needs {weights.nbytes / 2**20:.1f} MiB, more than the whole adapter cache ({self.budget / 2**20:.1f} MiB)")
        return weights

    def insert(self, weights: AdapterWeights) -> None:
        self.cache[weights.name] = weights
        self.cache.move_to_end(weights.name)
        used = sum(a.nbytes for a in self.cache.values())
        for name in list(self.cache):
            if used <= self.budget:
                break
            if name == weights.name or self.in_use.get(name):
                continue
            used -= self.cache.pop(name).nbytes
            self.stats.evictions += 1

    def acquire(self, name: str) -> AdapterWeights:
        """The adapter's weights, marked in use until release(name). On a miss one caller reads
        them (outside the lock, so the engine's releases do not wait for the disk) while the
        other callers for the same adapter wait for that read."""
        while True:
            with self.lock:
                path = self.paths.get(name)
                if path is None:
                    raise AdapterNotFound(f"the model {name!r} does not exist")
                weights = self.cache.get(name)
                if weights is not None:
                    self.stats.hits += 1
                    self.cache.move_to_end(name)
                    self.in_use[name] = self.in_use.get(name, 0) + 1
                    return weights
                reading = self.reading.get(name)
                if reading is None:
                    reading = self.reading[name] = threading.Event()
                    self.stats.misses += 1
                    break
            reading.wait()  # then look again: the reader has inserted it (or failed, and we try)
        try:
            weights = self.read(name, path)
            with self.lock:
                if self.paths.get(name) != path:
                    raise AdapterNotFound(f"the model {name!r} was unloaded")
                self.in_use[name] = self.in_use.get(name, 0) + 1
                self.insert(weights)
                return weights
        finally:
            with self.lock:
                self.reading.pop(name).set()

    def release(self, name: str) -> None:
        with self.lock:
            left = self.in_use.get(name, 0) - 1
            if left > 0:
                self.in_use[name] = left
            else:
                self.in_use.pop(name, None)
