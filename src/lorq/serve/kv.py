"""Per-sequence KV cache for packed steps, and the attention that reads it.

A step packs the new tokens of every running sequence into one row (batch 1): prompts being
prefilled and one token per decoding sequence. The linear layers see all of them at once; the
attention is done per sequence on that sequence's own keys and values, so no sequence is padded
to another's length and continuous batching needs no cache re-alignment. The attention is
registered with transformers as "lorq_ragged", so its own model classes run unchanged.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface

ATTENTION = "lorq_ragged"


class SequenceKV:
    """Keys and values of one sequence for every layer, in buffers grown by doubling."""

    def __init__(self, layers: int):
        self.k: list[torch.Tensor | None] = [None] * layers
        self.v: list[torch.Tensor | None] = [None] * layers
        self.length = [0] * layers

    def append(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """k, v: (1, heads, new, dim). Returns views of all keys/values so far."""
        n, used = k.shape[2], self.length[layer]
        buf = self.k[layer]
        if buf is None or used + n > buf.shape[2]:
            cap = max(2 * (used + n), 16)
            grown_k = k.new_empty(1, k.shape[1], cap, k.shape[3])
            grown_v = v.new_empty(1, v.shape[1], cap, v.shape[3])
            if buf is not None:
                grown_k[:, :, :used] = buf[:, :, :used]
                grown_v[:, :, :used] = self.v[layer][:, :, :used]
            self.k[layer], self.v[layer] = grown_k, grown_v
        self.k[layer][:, :, used : used + n] = k
        self.v[layer][:, :, used : used + n] = v
        self.length[layer] = used + n
        return self.k[layer][:, :, : used + n], self.v[layer][:, :, : used + n]

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.k + self.v if t is not None)


@dataclass
class PackedStep:
    """The sequences of one packed step, in packing order, and how many new tokens each has."""

    caches: list[SequenceKV]
    lengths: list[int]


def ragged_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, lorq_step: PackedStep | None = None, **kwargs):
    """Attention per sequence over its own cache; (1, tokens, heads, dim) like transformers' sdpa."""
    if lorq_step is None:
        raise RuntimeError("the lorq_ragged attention runs only inside the serving engine")
    outs, start = [], 0
    for cache, n in zip(lorq_step.caches, lorq_step.lengths):
        k, v = cache.append(module.layer_idx, key[:, :, start : start + n], value[:, :, start : start + n])
        # a prompt with no history is causal from position 0, the case sdpa's is_causal covers;
        # one new token attends to everything before it
        o, _ = sdpa_attention_forward(module, query[:, :, start : start + n], k, v, None, scaling=scaling, dropout=0.0)
        outs.append(o)
        start += n
    return torch.cat(outs, dim=1), None


def no_mask(*args, **kwargs):
    return None  # causality is per sequence, inside ragged_attention


AttentionInterface.register(ATTENTION, ragged_attention)
AttentionMaskInterface.register(ATTENTION, no_mask)
