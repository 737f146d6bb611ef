"""Prompt -> text with transformers' generate (chat template for instruct models)."""

from __future__ import annotations

import torch


def generate_text(model, tok, prompt: str, max_new_tokens: int = 64, temperature: float = 0.0, top_p: float = 1.0, seed: int = 0, chat: bool = True) -> str:
    if chat and getattr(tok, "chat_template", None):
        text = tok.apply_chat_template([{"role": "user", "content": prompt}], tokenize=False, add_generation_prompt=True)
    else:
        text = prompt
    enc = tok(text, return_tensors="pt", add_special_tokens=not chat)
    torch.manual_seed(seed)
    sample = temperature > 0
    kw = dict(do_sample=True, temperature=temperature, top_p=top_p) if sample else dict(do_sample=False, temperature=None, top_p=None, top_k=None)
    with torch.no_grad():
        out = model.generate(**enc, max_new_tokens=max_new_tokens, pad_token_id=tok.pad_token_id, **kw)
    return tok.decode(out[0, enc["input_ids"].shape[1] :], skip_special_tokens=True)
