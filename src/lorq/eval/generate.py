"""Prompt -> text with transformers' generate (chat template for instruct models)."""

from __future__ import annotations

import torch

from ..errors import LorqError
from ..models.loading import model_context


def chat_text(tok, messages: list[dict]) -> str:
    """The conversation in the tokenizer's chat template, ready for the assistant's turn."""
    return tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)


def encode_prompt(tok, prompt: str, chat: bool = True) -> list[int]:
    """Token ids of a prompt: as a user turn of the chat template (when the tokenizer has one), or raw."""
    if chat and getattr(tok, "chat_template", None):
        return tok(chat_text(tok, [{"role": "user", "content": prompt}]), add_special_tokens=False)["input_ids"]
    return tok(prompt, add_special_tokens=True)["input_ids"]


def check_new_tokens(config, max_new_tokens: int) -> None:
    """Even a one-token prompt needs max-new-tokens + 1 positions."""
    context = model_context(config)
    if context and max_new_tokens >= context:
        raise LorqError(f"--max-new-tokens {max_new_tokens} leaves no room for a prompt in the model's context of {context} tokens")


def generate_text(model, tok, prompt: str, max_new_tokens: int = 64, temperature: float = 0.0, top_p: float = 1.0, seed: int = 0, chat: bool = True,
                  top_k: int = 0, repetition_penalty: float = 1.0) -> str:
    ids = torch.tensor([encode_prompt(tok, prompt, chat)], device=next(model.parameters()).device)
    if ids.shape[1] == 0:
        raise LorqError("the prompt is empty (give text, or use the chat template)")
    context = model_context(model.config)
    if context and ids.shape[1] + max_new_tokens > context:
        raise LorqError(f"the prompt ({ids.shape[1]} tokens) + max-new-tokens {max_new_tokens} exceed the model's context of {context} tokens")
    torch.manual_seed(seed)
    sample = temperature > 0
    kw = dict(do_sample=True, temperature=temperature, top_p=top_p, top_k=top_k or None) if sample else dict(do_sample=False, temperature=None, top_p=None, top_k=None)
    kw["repetition_penalty"] = repetition_penalty if repetition_penalty != 1.0 else None
    with torch.no_grad():
        out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new_tokens, pad_token_id=tok.pad_token_id, **kw)
    return tok.decode(out[0, ids.shape[1] :], skip_special_tokens=True)
