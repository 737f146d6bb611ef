"""Training data: the embedded CPython documentation or the user's files, tokenized and packed.

Records are plain text (a .txt file is one record; JSONL lines with a `text` field) or chat
(JSONL lines with `messages` of role/content, rendered with the tokenizer's chat template,
loss on assistant tokens only). Tokens are packed into fixed-length blocks; labels of -100
are ignored by the loss. Training keeps the documents of a block apart by default: their
positions restart at each document (transformers then masks attention block-diagonally), as
TRL's padding-free packing does; validation is the plain stream perplexity either way.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from enum import Enum
from pathlib import Path

import torch

from ..errors import LorqError
from ..io import check_file
from ..options import opt

IGNORE = -100


class Packing(str, Enum):
    DOCUMENTS = "documents"  # each document attends to itself only, from position 0
    STREAM = "stream"  # one token stream cut into blocks (HF run_clm): a document sees the ones before it


@dataclass
class DataConfig:
    """Where training and validation text comes from and how it is cut."""

    train_file: str | None = opt(None, "training data: .txt, or .jsonl with `text` or chat `messages` (default: the embedded CPython docs)")
    validation_file: str | None = opt(None, "validation data in the same formats (default: the embedded split, or every 10th block of --train-file)")
    block_size: int = opt(256, "tokens per packed training block")
    packing: Packing = opt(Packing.DOCUMENTS, "training blocks: documents (each document of a block attends to itself only, "
                                              "positions restart at it) or stream (the block is one text, as HF's run_clm packs)")

    def validate(self) -> "DataConfig":
        if self.block_size < 2:
            raise LorqError(f"block size must be at least 2, got {self.block_size}")
        try:
            self.packing = Packing(self.packing)
        except ValueError:
            raise LorqError(f"packing must be one of {', '.join(p.value for p in Packing)}, got {self.packing!r}")
        check_file(self.train_file, "training file")
        check_file(self.validation_file, "validation file")
        return self


@dataclass
class Blocks:
    """Packed examples: input_ids and labels, both (n_blocks, block_size) int64, and the position
    of each token in its document's part of the block (None: one stream, 0..block_size-1)."""

    input_ids: torch.Tensor
    labels: torch.Tensor
    position_ids: torch.Tensor | None = None

    def __len__(self) -> int:
        return self.input_ids.shape[0]

    def __getitem__(self, rows) -> "Blocks":
        pos = self.position_ids[rows] if self.position_ids is not None else None
        return Blocks(self.input_ids[rows], self.labels[rows], pos)

    def take(self, n: int | None) -> "Blocks":
        return self if n is None else self[:n]

    def as_stream(self) -> "Blocks":
        return Blocks(self.input_ids, self.labels)

    def as_documents(self) -> "Blocks":
        """Documents kept apart: the position ids restart at each one, and a document's first
        token is no target (it would be predicted from the previous document)."""
        if self.position_ids is None:
            raise ValueError("these blocks carry no document positions")
        first = self.position_ids == 0
        first[:, 0] = False  # the block's first token is no target anyway
        return Blocks(self.input_ids, self.labels.masked_fill(first, IGNORE), self.position_ids)


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
    check_file(path, "data file")
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


def check_records(*paths: str | Path | None) -> None:
    """Data files that parse, checked before any model is loaded: a bad line is reported at
    once, not after the model has loaded and been quantized (read again when used)."""
    for path in paths:
        if path is not None:
            read_records(path)


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


def tokenize_records(tok, records) -> tuple[list[int], list[int], list[int]]:
    """(ids, labels, index of each record's first token) of the records one after another."""
    ids, labels, starts = [], [], []
    for r in records:
        i, l = tokenize_chat(tok, r) if isinstance(r, list) else tokenize_text(tok, r)
        starts.append(len(ids))
        ids += i
        labels += l
    return ids, labels, starts


def document_positions(length: int, starts: list[int], block_size: int) -> torch.Tensor:
    """Each token's distance from the last document start or block start at or before it."""
    restart = torch.zeros(length, dtype=torch.bool)
    restart[::block_size] = True
    restart[torch.tensor([s for s in starts if s < length], dtype=torch.long)] = True
    index = torch.arange(length)
    last_restart = torch.cummax(torch.where(restart, index, 0), dim=0).values
    return index - last_restart


def pack(ids: list[int], labels: list[int], starts: list[int], block_size: int, what: str, pad_tail: bool = False) -> Blocks:
    """Concatenate and cut into full blocks; the incomplete tail is dropped, or with pad_tail
    completed with unscored padding (a causal model's earlier positions never see it)."""
    if pad_tail and len(ids) % block_size:
        pad = block_size - len(ids) % block_size
        ids, labels = ids + [0] * pad, labels + [IGNORE] * pad
    n = len(ids) // block_size
    if n == 0:
        raise LorqError(f"{what} has {len(ids)} tokens, fewer than one block of {block_size}")
    cut = n * block_size
    x = torch.tensor(ids[:cut], dtype=torch.long).view(n, block_size)
    y = torch.tensor(labels[:cut], dtype=torch.long).view(n, block_size)
    if (y == IGNORE).all():
        raise LorqError(f"{what} has no tokens to learn from (no assistant replies?)")
    return Blocks(x, y, document_positions(cut, starts, block_size).view(n, block_size))


PACKINGS = {Packing.DOCUMENTS: Blocks.as_documents, Packing.STREAM: Blocks.as_stream}


def load_blocks(tok, cfg: DataConfig) -> tuple[Blocks, Blocks]:
    """(train, validation) blocks for a data config: training blocks packed as it says, the
    validation ones as one stream."""
    train, val = stream_blocks(tok, cfg)
    return PACKINGS[cfg.packing](train), val.as_stream()


def stream_blocks(tok, cfg: DataConfig) -> tuple[Blocks, Blocks]:
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
            return train[~held_out], train[held_out]
    if cfg.validation_file is not None:
        val = pack(*tokenize_records(tok, read_records(cfg.validation_file)), cfg.block_size, cfg.validation_file)
    return train, val


def eval_blocks(tok, cfg: DataConfig, data_file: str | None = None) -> Blocks:
    """Validation blocks, or all of `data_file` when one is given (for `lorq eval`): its last
    block padded, so every token but each block's first is scored."""
    if data_file is not None:
        return pack(*tokenize_records(tok, read_records(data_file)), cfg.block_size, data_file, pad_tail=True).as_stream()
    return load_blocks(tok, cfg)[1]
