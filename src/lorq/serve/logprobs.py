"""Tokens as the API shows them with their log-probabilities: the exact bytes each one stands
for (a token may hold part of a UTF-8 character), its text, and where that text starts in the
choice's text."""

from __future__ import annotations

import codecs
import re
from dataclasses import dataclass
from functools import lru_cache

from .sampling import TokenLogprob


@lru_cache(maxsize=1)
def byte_level_alphabet() -> dict[str, int]:
    """GPT-2's byte-level BPE alphabet, character -> byte: the printable bytes stand for
    themselves, every other byte for the next unused code point from 256 on."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    chars = {b: chr(b) for b in printable}
    for k, b in enumerate(b for b in range(256) if b not in chars):
        chars[b] = chr(256 + k)
    return {c: b for b, c in chars.items()}


BYTE_PIECE = re.compile(r"<0x([0-9A-Fa-f]{2})>")  # SentencePiece's byte fallback


@dataclass
class Scored:
    """A token as reported: its bytes, its log-probability (None for a prompt's first token)
    and its alternatives (None where there are none to report)."""

    raw: bytes
    logprob: float | None
    top: list["Scored"] | None = None

    @property
    def text(self) -> str:
        """The token's text; a token that is not whole UTF-8 characters is spelled as its bytes
        ("bytes:\\xce", OpenAI's convention), so that such tokens stay apart as alternatives."""
        try:
            return self.raw.decode("utf-8")
        except UnicodeDecodeError:
            return "bytes:" + "".join(f"\\x{b:02x}" for b in self.raw)


class TokenText:
    """The bytes of a tokenizer's tokens: byte-level BPE pieces mapped back to bytes,
    SentencePiece pieces with their word marks and byte fallbacks, special tokens as text."""

    def __init__(self, tok):
        self.tok = tok
        self.special = set(tok.all_special_ids)
        self.cache: dict[int, bytes] = {}

    def raw(self, token: int) -> bytes:
        if token not in self.cache:
            self.cache[token] = self.piece_bytes(token)
        return self.cache[token]

    def piece_bytes(self, token: int) -> bytes:
        piece = self.tok.convert_ids_to_tokens(token)
        if token in self.special or not isinstance(piece, str):
            return self.tok.decode([token]).encode()
        alphabet = byte_level_alphabet()
        if all(c in alphabet for c in piece):
            return bytes(alphabet[c] for c in piece)
        if m := BYTE_PIECE.fullmatch(piece):
            return bytes([int(m.group(1), 16)])
        return piece.replace("▁", " ").encode()

    def scored(self, entries: list[TokenLogprob]) -> list[Scored]:
        return [Scored(self.raw(e.token), e.logprob, [Scored(self.raw(t), lp) for t, lp in e.top]) for e in entries]

    def prompt(self, seq) -> list[Scored]:
        """A prompt's tokens with their log-probabilities (the first has none: nothing precedes it)."""
        return [Scored(self.raw(seq.prompt[0]), None, None)] + self.scored(seq.prompt_logprobs or [])


class LogprobCursor:
    """Per choice of a request: the log-probabilities not yet sent, and the character offset
    where the next token's text starts (a token that ends inside a character moves it only
    once the character is complete)."""

    def __init__(self, text: TokenText, seqs: list):
        self.text, self.seqs = text, seqs
        self.sent = [0] * len(seqs)
        self.events = [0] * len(seqs)  # events of each choice read so far
        self.chars = [0] * len(seqs)
        self.decoders = [codecs.getincrementaldecoder("utf-8")("replace") for _ in seqs]

    def take(self, i: int, prompt: bool = False, upto: int | None = None) -> list[Scored]:
        """Choice i's tokens since the last call, up to token `upto` (all so far if None); its
        prompt's first, when asked."""
        seq = self.seqs[i]
        new = seq.logprobs[self.sent[i] : upto]  # the engine thread appends; a slice is one consistent read
        self.sent[i] += len(new)
        return (self.text.prompt(seq) if prompt else []) + self.text.scored(new)

    def take_event(self, i: int, prompt: bool = False) -> list[Scored]:
        """The tokens whose text choice i's next event carries (events are read in order)."""
        seq, k = self.seqs[i], self.events[i]
        self.events[i] += 1
        return self.take(i, prompt, seq.marks[k] if k < len(seq.marks) else None)

    def offsets(self, i: int, scored: list[Scored]) -> list[int]:
        out = []
        for s in scored:
            out.append(self.chars[i])
            self.chars[i] += len(self.decoders[i].decode(s.raw))
        return out
