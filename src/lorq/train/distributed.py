"""Data parallelism on PyTorch's own engine: `torchrun --nproc-per-node N -m lorq finetune ...`.

torchrun sets RANK / WORLD_SIZE / LOCAL_RANK; every rank loads the same base and seeds the
same adapter, then DistributedDataParallel (gloo on CPU, nccl on GPU) averages the adapter
gradients. The global batch of each step is the one a single process would use, split
across ranks (each micro-batch of --batch-size blocks gives batch-size / N blocks to each
rank), and the loss is scaled so the averaged gradient equals the single-process gradient.
Only rank 0 writes files; every rank reads the same checkpoint to resume.
"""

from __future__ import annotations

import os
from contextlib import nullcontext
from dataclasses import dataclass

import torch
import torch.nn as nn

from ..errors import LorqError


@dataclass(frozen=True)
class World:
    rank: int = 0
    size: int = 1

    @property
    def main(self) -> bool:
        """The rank that prints and writes files."""
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.size > 1

    def share(self, blocks: torch.Tensor) -> torch.Tensor:
        """This rank's contiguous part of a micro-batch (the micro-batch splits evenly)."""
        return blocks.chunk(self.size)[self.rank] if self.distributed else blocks

    def all_sum(self, value: float) -> float:
        if not self.distributed:
            return value
        t = torch.tensor([float(value)], dtype=torch.float64)
        torch.distributed.all_reduce(t)
        return t.item()


def init_world() -> World:
    """The process group torchrun describes (created once), or a world of one."""
    size = int(os.environ.get("WORLD_SIZE", "1"))
    if size <= 1:
        return World()
    import torch.distributed as dist

    if not dist.is_initialized():
        if torch.cuda.is_available():
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    return World(dist.get_rank(), dist.get_world_size())


def check_divisible(batch_size: int, world: World) -> None:
    if batch_size % world.size:
        raise LorqError(f"--batch-size {batch_size} does not split over {world.size} processes; use a multiple of {world.size}")


def wrap(module: nn.Module, world: World) -> nn.Module:
    """DDP around the module that computes the loss (its forward is where DDP hooks in). The
    ranks built identical models from the same seed, so no initial broadcast is needed."""
    if not world.distributed:
        return module
    from torch.nn.parallel import DistributedDataParallel

    device = next(module.parameters()).device
    ids = [device.index] if device.type == "cuda" else None
    # the frozen (quantized) buffers are identical on every rank and never change: no syncing
    return DistributedDataParallel(module, device_ids=ids, forward_sync_buffers=False, init_sync=False)


def no_sync(module: nn.Module, skip: bool):
    """Accumulate gradients locally (no all-reduce) for all but the last micro-batch of a step."""
    return module.no_sync() if skip and hasattr(module, "no_sync") else nullcontext()


def finish(world: World) -> None:
    """Wait for every rank (rank 0 may still be writing) and tear the process group down."""
    if world.distributed and torch.distributed.is_initialized():
        torch.distributed.barrier()
        torch.distributed.destroy_process_group()
