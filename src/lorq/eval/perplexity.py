"""Perplexity: exp of the mean next-token negative log-likelihood over labelled tokens."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from ..train.data import IGNORE, Blocks
from ..train.precision import Precision, autocast


def next_token_nll(model, input_ids: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, int]:
    """(sum of -log p(label_{t+1} | tokens_<=t), number of labelled tokens) for one batch."""
    logits = model(input_ids=input_ids).logits[:, :-1]  # (B, T-1, V)
    target = labels[:, 1:]  # (B, T-1)
    nll = F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), target.reshape(-1), ignore_index=IGNORE, reduction="sum")
    return nll, int((target != IGNORE).sum())


@torch.no_grad()
def perplexity(model, blocks: Blocks, batch_size: int = 4, precision: Precision = Precision.FP32, progress: bool = False, desc: str = "eval") -> dict:
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    total, count = 0.0, 0
    starts = range(0, len(blocks), batch_size)
    for i in tqdm(starts, desc=desc, unit="batch", disable=not progress, leave=False):
        x = blocks.input_ids[i : i + batch_size].to(device)
        y = blocks.labels[i : i + batch_size].to(device)
        with autocast(precision, device):
            nll, n = next_token_nll(model, x, y)
        total += nll.item()
        count += n
    model.train(was_training)
    loss = total / max(count, 1)
    return {"loss": loss, "ppl": math.exp(loss), "tokens": count}
