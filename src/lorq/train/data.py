"""Training data: the embedded CPython documentation or the user's files, tokenized and packed.

Records are plain text (a .txt file is one record; JSONL lines with a `text` field) or chat
(JSONL lines with `messages` of role/content, rendered with the tokenizer's chat template,
loss on assistant tokens only). Tokens are packed into fixed-length blocks; labels of -100
are ignored by the loss.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

import torch

from ..errors import LorqError
from ..io import check_file
from ..options import opt

IGNORE = -100


@dataclass
class DataConfig:
    """Where training and validation text comes from and how it is cut."""

    train_file: str | None = opt(None, "training data: .txt, or .jsonl with `text` or chat `messages` (default: the embedded CPython docs)")
    validation_file: str | None = opt(None, "validation data in the same formats (default: the embedded split, or every 10th block of --train-file)")
    block_size: int = opt(256, "tokens per packed training block")

    def validate(self) -> "DataConfig":
        if self.block_size < 2:
            raise LorqError(f"block size must be at least 2, got {self.block_size}")
        check_file(self.train_file, "training file")
        check_file(self.validation_file, "validation file")
        return self


@dataclass
class Blocks:
    """Packed examples: input_ids and labels, both (n_blocks, block_size) int64."""

    input_ids: torch.Tensor
    labels: torch.Tensor

    def __len__(self) -> int:
        return self.input_ids.shape[0]

    def take(self, n: int | None) -> "Blocks":
        return self if n is None else Blocks(self.input_ids[:n], self.labels[:n])


def pydoc_split(val_fraction: float = 0.1) -> tuple[list[str], list[str]]:
    """CPython's pydoc topics split by topic name: the names whose sha256 sorts first are validation."""
    from pydoc_data.topics import topics

    names = sorted(topics, key=lambda n: hashlib.sha256(n.encode()).hexdigest())
    n_val = max(1, round(val_fraction * len(names)))
    val = sorted(names[:n_val])
    train = sorted(names[n_val:])
    return [topics[n] for n in train], [topics[n] for n in val]


def read_records(path: str | Path) -> list[str | list[dict]]:
    """A file -> records: strings (text) or message lists (chat)."""
    path = Path(path)
    if not path.is_file():
        raise LorqError(f"data file {path} not found")
    try:
        raw = path.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise LorqError(f"data file {path} is not UTF-8 text")
    if not raw.strip():
        raise LorqError(f"data file {path} is empty")
    if path.suffix != ".jsonl":
        return [raw]
    records: list[str | list[dict]] = []
    for i, line in enumerate(raw.splitlines(), 1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as e:
            raise LorqError(f"{path}:{i}: not valid JSON ({e.msg})")
        records.append(_record(obj, f"{path}:{i}"))
    return records


def _record(obj, where: str) -> str | list[dict]:
    if isinstance(obj, dict) and isinstance(obj.get("text"), str):
        return obj["text"]
    if isinstance(obj, dict) and isinstance(obj.get("messages"), list):
        msgs = obj["messages"]
        ok = all(isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str) for m in msgs)
        if ok and msgs:
            return msgs
        raise LorqError(f"{where}: every message needs string `role` and `content`")
    raise LorqError(f"{where}: expected an object with a `text` string or a `messages` list")


def tokenize_text(tok, text: str) -> tuple[list[int], list[int]]:
    ids = tok(text, add_special_tokens=False)["input_ids"]
    if tok.eos_token_id is not None:  # documents are separated by EOS when packed
        ids.append(tok.eos_token_id)
    return ids, list(ids)


def tokenize_chat(tok, messages: list[dict]) -> tuple[list[int], list[int]]:
    """Render with the chat template; only tokens inside assistant replies carry labels."""
    if not getattr(tok, "chat_template", None):
        raise LorqError("chat records need a tokenizer with a chat template")
    full = tok.apply_chat_template(messages, tokenize=False)
    spans = []  # character spans of assistant turns, template tokens after the reply included
    for i, m in enumerate(messages):
        if m["role"] != "assistant":
            continue
        before = tok.apply_chat_template(messages[:i], tokenize=False, add_generation_prompt=True) if i else ""
        upto = tok.apply_chat_template(messages[: i + 1], tokenize=False)
        if not (full.startswith(upto) and upto.startswith(before)):
            raise LorqError("the chat template does not render conversations prefix by prefix; cannot mask the loss")
        spans.append((len(before), len(upto)))
    enc = tok(full, add_special_tokens=False, return_offsets_mapping=True)
    ids = enc["input_ids"]
    labels = [
        t if any(a <= start < b for a, b in spans) else IGNORE
        for t, (start, _) in zip(ids, enc["offset_mapping"])
    ]
    return ids, labels


def tokenize_records(tok, records) -> tuple[list[int], list[int]]:
    ids, labels = [], []
    for r in records:
        i, l = tokenize_chat(tok, r) if isinstance(r, list) else tokenize_text(tok, r)
        ids += i
        labels += l
    return ids, labels


def pack(ids: list[int], labels: list[int], block_size: int, what: str) -> Blocks:
    """Concatenate and cut into full blocks (the incomplete tail is dropped)."""
    n = len(ids) // block_size
    if n == 0:
        raise LorqError(f"{what} has {len(ids)} tokens, fewer than one block of {block_size}")
    cut = n * block_size
    x = torch.tensor(ids[:cut], dtype=torch.long).view(n, block_size)
    y = torch.tensor(labels[:cut], dtype=torch.long).view(n, block_size)
    if (y == IGNORE).all():
        raise LorqError(f"{what} has no tokens to learn from (no assistant replies?)")
    return Blocks(x, y)


def load_blocks(tok, cfg: DataConfig) -> tuple[Blocks, Blocks]:
    """(train, validation) blocks for a data config."""
    cfg.validate()
    if cfg.train_file is None:
        train_texts, val_texts = pydoc_split()
        train = pack(*tokenize_records(tok, train_texts), cfg.block_size, "the embedded training split")
        val = pack(*tokenize_records(tok, val_texts), cfg.block_size, "the embedded validation split")
    else:
        train = pack(*tokenize_records(tok, read_records(cfg.train_file)), cfg.block_size, cfg.train_file)
        if cfg.validation_file is None:
            held_out = torch.arange(len(train)) % 10 == 9
            if held_out.sum() == 0:
                raise LorqError(f"{cfg.train_file} gives {len(train)} blocks; need 10 to hold out validation, or pass --validation-file")
            val = Blocks(train.input_ids[held_out], train.labels[held_out])
            train = Blocks(train.input_ids[~held_out], train.labels[~held_out])
            return train, val
    if cfg.validation_file is not None:
        val = pack(*tokenize_records(tok, read_records(cfg.validation_file)), cfg.block_size, cfg.validation_file)
    return train, val


def eval_blocks(tok, cfg: DataConfig, data_file: str | None = None) -> Blocks:
    """Validation blocks, or all blocks of `data_file` when one is given (for `lorq eval`)."""
    if data_file is not None:
        return pack(*tokenize_records(tok, read_records(data_file)), cfg.block_size, data_file)
    return load_blocks(tok, cfg)[1]
