"""KV cache in slots, and the attention of a packed step that reads and writes it.

A step packs into one row (batch 1) one new token for each decoding sequence, then the whole
prompt of each newly admitted one. The linear layers see all of them at once. The keys and
values live in a pool per layer, (slots, kv_heads, capacity, head_dim), one slot per running
sequence; the decoding sequences occupy slots 0..n-1 in packing order (the engine keeps them
compact), so their attention is one batched call over a view of the pool, each sequence masked
to its own length. A prompt attends causally to itself alone, as in a single-sequence run. The
attention is registered with transformers as "lorq_ragged", so its model classes run unchanged.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface

ATTENTION = "lorq_ragged"


class KVPool:
    """Keys and values of the running sequences for every layer, (slots, kv_heads, capacity, dim).

    Sized to the batch, not to the worst case: `fit` grows it to the running sequences and
    their longest length (by half again at least, so decoding regrows it rarely), `shrink`
    gives memory back once the long or many sequences have left."""

    LENGTH_STEP = 64  # capacities round up to this: fewer reallocations as the batch changes

    def __init__(self, layers: int, kv_heads: int, head_dim: int, dtype: torch.dtype, device: torch.device | str = "cpu"):
        self.shape = (0, kv_heads, 0, head_dim)
        self.k = [torch.zeros(self.shape, dtype=dtype, device=device) for _ in range(layers)]
        self.v = [torch.zeros(self.shape, dtype=dtype, device=device) for _ in range(layers)]

    @property
    def capacity(self) -> int:
        return self.shape[2]

    def planned(self, slots: int, length: int) -> tuple[int, int]:
        """The (slots, capacity) a pool for `slots` sequences of up to `length` positions takes."""
        return max(slots, 1), -(-max(length, 1) // self.LENGTH_STEP) * self.LENGTH_STEP

    def bytes_for(self, slots: int, length: int) -> int:
        n, cap = self.planned(slots, length)
        return 2 * len(self.k) * n * self.shape[1] * cap * self.shape[3] * self.k[0].element_size()

    def resize(self, slots: int, capacity: int, keep: int) -> None:
        """Reallocate at (slots, capacity), keeping the first `keep` slots' entries that fit."""
        old = self.shape
        self.shape = (slots, old[1], capacity, old[3])
        rows, cols = min(keep, slots, old[0]), min(capacity, old[2])
        with torch.inference_mode(False):  # called inside a step: still a tensor that clear() may write outside one
            for cache in (self.k, self.v):
                for i, t in enumerate(cache):
                    new = t.new_zeros(self.shape)
                    new[:rows, :, :cols] = t[:rows, :, :cols]
                    cache[i] = new

    def fit(self, slots: int, length: int, budget: int | None = None) -> None:
        """Room for `slots` sequences of up to `length` positions; the first `slots` slots are
        kept. It grows only here, with room to spare (the slots it had, half again the length)
        unless that would take it past `budget` bytes."""
        if slots > self.shape[0] or length > self.capacity:
            longer = max(length, 3 * self.capacity // 2) if length > self.capacity else self.capacity
            roomy = (max(slots, self.shape[0]), longer)
            n, cap = self.planned(*(roomy if budget is None or self.bytes_for(*roomy) <= budget else (slots, length)))
            self.resize(n, cap, keep=slots)

    def shrink(self, slots: int, length: int) -> None:
        """Down to what `slots` sequences of up to `length` positions need, when that is at most
        half of what is held (the first `slots` slots are kept)."""
        if 2 * self.bytes_for(slots, length) <= self.nbytes:
            self.resize(*self.planned(slots, length), keep=slots)

    def move(self, src: int, dst: int, length: int) -> None:
        for cache in (self.k, self.v):
            for t in cache:
                t[dst, :, :length] = t[src, :, :length]

    def clear(self, slot: int, length: int | None = None) -> None:
        """Zero a slot's first `length` positions (all if None). A decoding sequence reads its slot
        up to the batch's longest length, masked past its own; the mask weighs stale entries by 0,
        but 0 x NaN is NaN, so a freed slot must not keep what a diverged request wrote."""
        if slot < self.shape[0]:
            for t in self.k + self.v:
                t[slot, :, :length].zero_()

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.k + self.v)


@dataclass
class PackedStep:
    """Layout of one packed step: `decode` sequences in slots 0..decode-1 with their positions,
    then prompts as (slot, length) in packing order."""

    pool: KVPool
    positions: torch.Tensor  # (decode,) where each decoding sequence's new token goes
    prompts: list[tuple[int, int]]

    def __post_init__(self):
        n, dev = len(self.positions), self.positions.device
        self.decode = n
        self.width = int(self.positions.max()) + 1 if n else 0
        # position j of sequence i is visible when j <= its new token's position
        self.mask = (torch.arange(self.width, device=dev) <= self.positions[:, None])[:, None, None, :] if n else None
        self.rows = torch.arange(n, device=dev)


def ragged_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, lorq_step: PackedStep | None = None, **kwargs):
    """(1, tokens, heads, dim), like transformers' sdpa attention, for a packed step."""
    if lorq_step is None:
        raise RuntimeError("the lorq_ragged attention runs only inside the serving engine")
    step, layer = lorq_step, module.layer_idx
    K, V = step.pool.k[layer], step.pool.v[layer]
    outs = []
    n = step.decode
    if n:
        K[step.rows, :, step.positions] = key[0, :, :n].transpose(0, 1)  # (n, kv_heads, dim)
        V[step.rows, :, step.positions] = value[0, :, :n].transpose(0, 1)
        q = query[0, :, :n].transpose(0, 1)  # (n, heads, dim)
        # the query heads sharing a key/value head (head h reads kv head h // groups) as the rows of
        # one query: each sequence's K and V are read once, not repeated per head (enable_gqa's copy)
        q = q.reshape(n, K.shape[1], q.shape[1] // K.shape[1], q.shape[2])  # (n, kv_heads, groups, dim)
        o = F.scaled_dot_product_attention(q, K[:n, :, : step.width], V[:n, :, : step.width], attn_mask=step.mask, scale=scaling)
        outs.append(o.reshape(1, n, -1, o.shape[-1]))  # (1, n, heads, dim)
    start = n
    for slot, length in step.prompts:
        k, v = key[:, :, start : start + length], value[:, :, start : start + length]
        K[slot, :, :length], V[slot, :, :length] = k[0], v[0]
        o, _ = sdpa_attention_forward(module, query[:, :, start : start + length], k, v, None, scaling=scaling, dropout=0.0)
        outs.append(o)
        start += length
    return torch.cat(outs, dim=1), None


def no_mask(*args, **kwargs):
    return None  # visibility is per sequence, inside ragged_attention


AttentionInterface.register(ATTENTION, ragged_attention)
AttentionMaskInterface.register(ATTENTION, no_mask)
