"""Perplexity: exp of the mean next-token negative log-likelihood over labelled tokens."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint
from tqdm.auto import tqdm

from ..errors import LorqError
from ..train.cross_entropy import TiedGradient, fusable, linear_cross_entropy, sharable_embedding, tied_lookup
from ..train.data import IGNORE, Blocks
from ..train.precision import Precision, autocast


LOSS_CHUNK = 256  # tokens per output-layer chunk: 256 x 49k vocab x 4 B = 50 MB of logits at most (faster than 1024 on CPU)


def next_token_nll(model, input_ids: torch.Tensor, labels: torch.Tensor, chunk: int = LOSS_CHUNK,
                   position_ids: torch.Tensor | None = None) -> tuple[torch.Tensor, int]:
    """(sum of -log p(label_{t+1} | tokens_<=t), number of labelled tokens) for one batch.

    position_ids that restart inside a row make transformers keep its documents apart
    (block-diagonal causal attention); None is one stream per row.

    With chunk > 0 the full (B, T, vocab) logits are never formed: the decoder's hidden states
    of the labelled positions go through the output layer and the cross-entropy `chunk` tokens
    at a time; with gradients on, a plain linear output layer takes the fused loss (its
    gradient computed chunk by chunk in forward), any other head recomputes each chunk in
    backward (activation checkpointing) instead of storing it. A trained output layer tied to
    the input embedding then has one (V, H) gradient, not two (cross_entropy.TiedGradient).
    """
    decoder, head = chunkable(model) if chunk > 0 else (None, None)
    if decoder is None:
        logits = model(input_ids=input_ids, position_ids=position_ids, use_cache=False).logits[:, :-1]  # (B, T-1, V)
        target = labels[:, 1:]  # (B, T-1)
        nll = F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), target.reshape(-1), ignore_index=IGNORE, reduction="sum")
        return nll, int((target != IGNORE).sum())
    fused = torch.is_grad_enabled() and fusable(head)
    embedding = sharable_embedding(decoder, head) if fused else None
    tied = TiedGradient() if embedding is not None else None
    inputs = dict(inputs_embeds=tied_lookup(input_ids, embedding, tied)) if tied else dict(input_ids=input_ids)
    hidden = decoder(**inputs, position_ids=position_ids, use_cache=False).last_hidden_state[:, :-1]  # (B, T-1, H)
    target = labels[:, 1:].reshape(-1)
    keep = target != IGNORE  # only labelled positions need logits
    hidden, target = hidden.reshape(-1, hidden.shape[-1])[keep], target[keep]  # (N, H), (N,)
    if fused:
        return linear_cross_entropy(hidden, head, target, chunk, tied), len(target)
    nll = hidden.new_zeros((), dtype=torch.float32)
    for i in range(0, len(target), chunk):
        h, t = hidden[i : i + chunk], target[i : i + chunk]
        nll = nll + (checkpoint(chunk_nll, head, h, t, use_reentrant=False) if torch.is_grad_enabled() else chunk_nll(head, h, t))
    return nll, len(target)


def chunk_nll(head, h: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(head(h).float(), t, reduction="sum")


def chunkable(model):
    """(decoder, output layer) of a causal LM whose logits are exactly head(decoder(x)), or
    (None, None): models that scale or soft-cap their logits keep the full-logits path."""
    config = getattr(model, "config", None)
    if config is None or any(getattr(config, k, None) for k in ("final_logit_softcapping", "logit_scale", "output_multiplier")):
        return None, None
    try:
        decoder, head = model.get_decoder(), model.get_output_embeddings()
    except (AttributeError, NotImplementedError):
        return None, None
    return (decoder, head) if decoder is not None and head is not None else (None, None)


@torch.no_grad()
def perplexity(model, blocks: Blocks, batch_size: int = 4, precision: Precision = Precision.FP32, progress: bool = False,
               desc: str = "eval", nll=None) -> dict:
    """nll(input_ids, labels) -> (sum, count): how the model is run (next_token_nll on it if
    None; a sharded model runs through its FSDP root)."""
    if nll is None:
        def nll(x, y):
            return next_token_nll(model, x, y)
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    total, count = 0.0, 0
    starts = range(0, len(blocks), batch_size)
    for i in tqdm(starts, desc=desc, unit="batch", disable=not progress, leave=False):
        x = blocks.input_ids[i : i + batch_size].to(device)
        y = blocks.labels[i : i + batch_size].to(device)
        with autocast(precision, device):
            loss, n = nll(x, y)
        total += loss.item()
        count += n
    model.train(was_training)
    if count == 0:  # exp(0) = 1 would read as a perfect model
        raise LorqError("no tokens to evaluate: the evaluation data is empty (or each block is a single token)")
    loss = total / count
    return {"loss": loss, "ppl": math.exp(loss), "tokens": count}
