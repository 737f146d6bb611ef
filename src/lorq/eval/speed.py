"""Inference speed on the current device: prefill and batch-1 greedy decode, in tokens/s.

Both take the median of `repeats` timed runs after one warm-up, so a cold cache or a
one-off stall does not decide the number.
"""

from __future__ import annotations

import statistics
import time

import torch


def _median_seconds(fn, repeats: int, warmup: bool = True) -> float:
    if warmup:
        fn()  # kernel preparation, allocator, caches
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


@torch.inference_mode()
def prefill_tokens_per_s(model, tokens: int = 256, batch: int = 1, repeats: int = 3, vocab: int = 1000) -> float:
    """One forward pass over batch × tokens prompt tokens (no cache kept)."""
    ids = torch.randint(0, vocab, (batch, tokens), generator=torch.Generator().manual_seed(0)).to(model.device)
    return batch * tokens / _median_seconds(lambda: model(input_ids=ids, use_cache=False), repeats)


@torch.inference_mode()
def decode_tokens_per_s(model, new_tokens: int = 32, prompt_tokens: int = 16, repeats: int = 2, vocab: int = 1000) -> float:
    """Batch-1 greedy generation with the KV cache: new tokens / (generate time - prefill time)."""
    ids = torch.randint(0, vocab, (1, prompt_tokens), generator=torch.Generator().manual_seed(0)).to(model.device)
    mask = torch.ones_like(ids)

    def gen(n):
        return lambda: model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=n, min_new_tokens=n, do_sample=False,
                                      temperature=None, top_p=None, top_k=None, pad_token_id=0)

    gen(2)()  # warm-up of both the prefill and the decode step
    first = _median_seconds(gen(1), repeats, warmup=False)  # prompt + first token
    total = _median_seconds(gen(new_tokens + 1), repeats, warmup=False)
    if total <= first:  # timing noise larger than the decode itself: no meaningful rate
        return float("nan")
    return new_tokens / (total - first)
