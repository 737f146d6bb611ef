"""Data parallelism on PyTorch's own engine: `torchrun --nproc-per-node N -m lorq finetune ...`.

torchrun sets RANK / WORLD_SIZE / LOCAL_RANK; every rank loads the same base and seeds the
same adapter, then DistributedDataParallel (gloo on CPU, nccl on GPU) averages the adapter
gradients. The global batch of each step is the one a single process would use, split
across ranks (each micro-batch of --batch-size blocks gives batch-size / N blocks to each
rank), and the loss is scaled so the averaged gradient equals the single-process gradient.
Only rank 0 writes files; every rank reads the same checkpoint to resume.

`--fsdp` (full-parameter AdamW, GaLore, LISA) shards instead of replicating: FSDP2
(`fully_shard`) makes each decoder layer a unit whose weights are all-gathered just before its
forward and backward and freed after, and the rest (embeddings, final norm, output layer) the
root unit; gradients are reduce-scattered and each rank keeps the optimizer state of its shard
only. Checkpoints and the final model are gathered and written unsharded, the files of a
single-process run: any number of processes resumes them.
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
        nccl = torch.distributed.get_backend() == "nccl"  # it reduces CUDA tensors only
        t = torch.tensor([float(value)], dtype=torch.float64, device="cuda" if nccl else "cpu")
        torch.distributed.all_reduce(t)
        return t.item()


def init_world(device: torch.device = torch.device("cpu")) -> World:
    """The process group torchrun describes (created once), or a world of one: nccl for a model
    on a GPU, gloo on the CPU."""
    size = int(os.environ.get("WORLD_SIZE", "1"))
    if size <= 1:
        return World()
    import torch.distributed as dist

    if not dist.is_initialized():
        if device.type == "cuda":
            torch.cuda.set_device(device)
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return World(dist.get_rank(), dist.get_world_size())


def check_divisible(batch_size: int, world: World) -> None:
    if batch_size % world.size:
        raise LorqError(f"--batch-size {batch_size} does not split over {world.size} processes; use a multiple of {world.size}")


def is_sharded(module: nn.Module) -> bool:
    try:
        from torch.distributed.fsdp import FSDPModule
    except ImportError:  # a torch built without distributed
        return False
    return isinstance(module, FSDPModule)


def shard(loss: nn.Module, layers: list[nn.Module]) -> nn.Module:
    """FSDP2 over the loss module (in place): a unit per decoder layer, the root unit holding
    the rest. The root is the loss module, not the model, because the loss calls the decoder
    and the output layer itself: the root's forward must be the one that gathers them."""
    from torch.distributed.fsdp import fully_shard

    for layer in layers:
        fully_shard(layer)
    return fully_shard(loss)


def full(t):
    """The whole tensor of a sharded one (a collective: every rank calls it); others as they are."""
    return t.full_tensor() if hasattr(t, "full_tensor") else t


@torch.no_grad()
def gathered(tensors: dict) -> dict:
    """Every sharded tensor of the dict made whole, as one process holds them (a collective).
    A tensor under two names (tied embeddings) stays one tensor, so writers see the tie."""
    whole: dict[int, torch.Tensor] = {}
    for v in tensors.values():
        if id(v) not in whole:
            whole[id(v)] = full(v)
    return {k: whole[id(v)] for k, v in tensors.items()}


def full_state(params: dict[str, torch.Tensor], optimizer_state: dict) -> tuple[dict, dict]:
    """Parameters and optimizer state with every shard gathered."""
    state = {i: gathered(st) for i, st in optimizer_state["state"].items()}
    return gathered(params), {**optimizer_state, "state": state}


def place(whole: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """`whole` laid out as `like`: this rank's shard if `like` is sharded. Every rank holds the
    same whole tensor, so each takes its part without communicating."""
    if not hasattr(like, "device_mesh"):
        return whole
    from torch.distributed.tensor import distribute_tensor

    return distribute_tensor(whole.to(like.dtype), like.device_mesh, like.placements, src_data_rank=None)


def place_optimizer_state(saved: dict, optimizer) -> dict:
    """A whole (unsharded) optimizer state dict laid out as the optimizer's parameters are: a
    state tensor of its parameter's shape is sharded like it, unless the parameter's group
    keeps whole states (`whole_state`: GaLore's projected moments, whatever their shape)."""
    params = [(p, g.get("whole_state", False)) for g in optimizer.param_groups for p in g["params"]]
    state = {}
    for i, st in saved["state"].items():
        p, whole = params[int(i)] if int(i) < len(params) else (None, True)
        state[i] = {k: place(v, p) if not whole and torch.is_tensor(v) and v.shape == p.shape else v for k, v in st.items()}
    return {**saved, "state": state}


def wrap(module: nn.Module, world: World) -> nn.Module:
    """DDP around the module that computes the loss (its forward is where DDP hooks in). The
    ranks built identical models from the same seed, so no initial broadcast is needed."""
    if not world.distributed or is_sharded(module):
        return module
    from torch.nn.parallel import DistributedDataParallel

    device = next(module.parameters()).device
    ids = [device.index] if device.type == "cuda" else None
    # the frozen (quantized) buffers are identical on every rank and never change: no syncing
    return DistributedDataParallel(module, device_ids=ids, forward_sync_buffers=False, init_sync=False)


def no_sync(module: nn.Module, skip: bool):
    """Accumulate gradients locally (no all-reduce) for all but the last micro-batch of a step."""
    if is_sharded(module):
        module.set_requires_gradient_sync(not skip)
        return nullcontext()
    return module.no_sync() if skip and hasattr(module, "no_sync") else nullcontext()


def finish(world: World) -> None:
    """Wait for every rank (rank 0 may still be writing) and tear the process group down."""
    if world.distributed and torch.distributed.is_initialized():
        torch.distributed.barrier()
        torch.distributed.destroy_process_group()
