"""The serving engine: continuous batching of requests for many adapters over one base model.

Each step packs, into one forward pass, the whole prompt of every newly admitted request and
the last token of every running one (see kv.py); the adapters are applied per token by the
step's plan (see multi_lora.py). New requests join between steps and finished ones leave, so a
long generation never holds a short one back. The engine runs in its own thread; callers
submit requests and receive text deltas through a callback.
"""

from __future__ import annotations

import itertools
import os
import secrets
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Callable

import torch
import torch.nn as nn

from ..adapters.lora import check_patterns
from ..errors import LorqError
from ..models.loading import model_context
from ..options import NON_NEGATIVE, POSITIVE, check_ranges, opt
from ..quant.linear import DECODER_LINEARS
from .detokenize import Detokenizer
from .kv import ATTENTION, KVPool, PackedStep
from .multi_lora import AdapterWeights, GatherCache, StepPlan, wrap_for_serving
from .sampling import InvalidParam, SamplingParams, TokenLogprob, greedy_rows, next_token, token_logprobs


@dataclass
class EngineConfig:
    max_batch: int = opt(32, "most sequences decoding together in one step")
    max_batch_tokens: int = opt(2048, "most prompt tokens prefilled in one step (a longer prompt runs alone)")
    max_scored_tokens: int = opt(1024, "most prompt tokens scored in one step for echo + logprobs (each holds a row of vocabulary-sized logits; a longer prompt runs alone)")
    max_queue: int = opt(256, "most requests waiting for a batch slot; more are refused (HTTP 429)")
    max_model_len: int = opt(0, "longest prompt + max_tokens accepted (0 = the model's context)")
    kv_cache_mb: int = opt(0, "KV cache budget in MiB (0 = a quarter of the machine's memory, of the GPU's on CUDA): a request joins the batch when the running ones leave it room, and the latest admitted go back to the queue when the running ones outgrow it (their keys and values are recomputed when they rejoin); one whose prompt + max_tokens alone needs more is refused")
    targets: list[str] = opt([DECODER_LINEARS], "regexes of the linear layers adapters may target")

    def validate(self) -> "EngineConfig":
        check_ranges(self, {**{k: POSITIVE for k in ("max_batch", "max_batch_tokens", "max_scored_tokens", "max_queue")},
                            "max_model_len": NON_NEGATIVE, "kv_cache_mb": NON_NEGATIVE})
        check_patterns(self.targets)
        return self


def serving_context(config) -> int:
    """The longest sequence the engine runs: the model's positions, or its sliding window, within
    which sliding attention is full attention."""
    context = model_context(config) or 1 << 30
    window = getattr(config, "sliding_window", None) if getattr(config, "use_sliding_window", True) else None
    return min(context, window or context)


def check_max_model_len(config, max_model_len: int) -> int:
    """The engine's longest prompt + max_tokens: --max-model-len, or the context when 0."""
    context = serving_context(config)
    if max_model_len > context:
        raise LorqError(f"--max-model-len {max_model_len} exceeds the model's context of {context} tokens")
    return max_model_len or context


class QueueFull(LorqError):
    """The waiting queue is at its bound; the request is refused, not dropped later."""


class ShuttingDown(LorqError):
    """The engine takes no new requests: it is finishing the ones it has."""


@dataclass
class Sequence:
    """One request in flight. `on_event(delta_text, finish_reason)` is called from the engine
    thread; finish_reason is None until the last call ("stop", "length", or one of UNFINISHED)."""

    prompt: list[int]
    adapter: AdapterWeights | None
    params: SamplingParams
    on_event: Callable[[str, str | None], None]
    id: int = 0
    generated: list[int] = field(default_factory=list)
    text: str = ""
    sent: int = 0
    finish_reason: str | None = None
    arrival: float = field(default_factory=time.perf_counter)
    first_token: float | None = None
    slot: int = -1  # row of the KV pool while running
    generator: torch.Generator | None = None
    aborted: str | None = None  # why it is to end before its answer is complete (one of UNFINISHED)
    logprobs: list[TokenLogprob] = field(default_factory=list)  # one per generated token, when params.logprobs is set
    prompt_logprobs: list[TokenLogprob] | None = None  # prompt tokens 1.. (the first has none), when params.prompt_logprobs
    marks: list[int] = field(default_factory=list)  # per event sent: the generated tokens whose text it has covered
    detokenizer: Detokenizer = field(default_factory=Detokenizer)

    @property
    def cached(self) -> int:
        """Tokens whose keys and values are in the KV cache: all but the last generated one."""
        return len(self.prompt) + len(self.generated) - 1


# finish reasons of a sequence that ends without its answer: its client went away, its step
# failed, the server's shutdown deadline passed
UNFINISHED = ("abort", "error", "shutdown")


def stop_cut(text: str, stops: list[str], include: bool = False) -> int | None:
    """Where text ends at its first stop string: where that starts, or with `include` where it
    ends (vLLM's include_stop_str_in_output); None if there is none."""
    found = [(i, i + len(s)) for s in stops if (i := text.find(s)) >= 0]
    if not found:
        return None
    start, end = min(found)
    return end if include else start


def safe_prefix(text: str, stops: list[str]) -> int:
    """How much of text can be sent: not a trailing partial UTF-8 character, not a tail that may
    still grow into a stop string."""
    end = len(text) - 1 if text.endswith("\ufffd") else len(text)
    for s in stops:
        for k in range(min(len(s) - 1, end), 0, -1):
            if text[end - k : end] == s[:k]:
                end -= k
                break
    return end


def eos_ids(model: nn.Module, tok) -> set[int]:
    ids = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    if ids is None:
        ids = tok.eos_token_id
    return set(ids if isinstance(ids, (list, tuple)) else [ids]) - {None}


def next_length(seq: Sequence) -> int:
    """The KV positions a sequence fills after its next step: its prompt when it is new (and
    what it generated, when it rejoins after a preemption), else one more than it has cached."""
    return len(seq.prompt) + len(seq.generated)


def scores_prompt(seq: Sequence) -> bool:
    """Whether its next step computes the log-probabilities of its prompt (echo + logprobs)."""
    return seq.params.prompt_logprobs and seq.prompt_logprobs is None


def plain_greedy_picks(batch: list[Sequence], logits: torch.Tensor, rows: list[int]) -> dict[int, int]:
    """Sequence id -> next token for the greedy sequences with no other control, their last
    rows' argmax taken in one call."""
    ends = list(itertools.accumulate(rows))
    plain = [i for i, s in enumerate(batch) if s.params.temperature == 0 and not s.params.controls]
    if not plain:
        return {}
    return dict(zip((batch[i].id for i in plain), greedy_rows(logits[[ends[i] - 1 for i in plain]])))


def default_kv_budget(device: torch.device) -> int:
    """A quarter of the memory the KV cache lives in."""
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).total_memory // 4
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") // 4
    except (ValueError, OSError, AttributeError):  # no sysconf (Windows): a fixed 4 GiB
        return 4 * 2**30


class Engine:
    """Continuous-batching generation over a base model with per-token adapters."""

    def __init__(self, model: nn.Module, tok, cfg: EngineConfig | None = None):
        self.cfg = (cfg or EngineConfig()).validate()
        self.model, self.tok = model.eval(), tok
        for p in model.parameters():
            p.requires_grad_(False)
        self.step_ref, self.layers = wrap_for_serving(model, self.cfg.targets)
        self.gather_cache = GatherCache()
        model.config._attn_implementation = ATTENTION
        self.num_layers = model.config.num_hidden_layers
        c = model.config
        if getattr(c, "attn_logit_softcapping", None):
            raise LorqError("lorq serve does not support attention logit soft-capping (Gemma 2 style) yet")
        self.max_length = check_max_model_len(c, self.cfg.max_model_len)
        self.eos = eos_ids(model, tok)
        first = next(model.parameters())
        self.dtype, self.device = first.dtype, first.device
        self.pool = KVPool(self.num_layers, getattr(c, "num_key_value_heads", None) or c.num_attention_heads,
                           getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads, self.dtype, self.device)
        self.kv_budget = self.cfg.kv_cache_mb * 2**20 or default_kv_budget(self.device)
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []
        self.lock = threading.Condition()
        self.ids = itertools.count(1)
        self.thread: threading.Thread | None = None
        self.stopping = False
        self.steps = 0
        self.preemptions = 0
        self.expired = False
        self.on_finish: Callable[[Sequence], None] | None = None

    # -- requests -------------------------------------------------------------------------
    def submit(self, prompt: list[int], adapter: AdapterWeights | None, params: SamplingParams,
               on_event: Callable[[str, str | None], None], bounded: bool = True, arrival: float | None = None) -> Sequence:
        """Queue a request; QueueFull when max_queue requests already wait (unless not bounded)."""
        params.validate()
        if not prompt:
            raise LorqError("the prompt is empty")
        limit = "--max-model-len" if self.cfg.max_model_len else "the model's context"
        if len(prompt) >= self.max_length:  # said apart: a chat request's max_tokens may be the server's default
            raise LorqError(f"prompt ({len(prompt)} tokens) leaves no room to generate within {limit} of {self.max_length} tokens")
        if len(prompt) + params.max_tokens > self.max_length:
            raise LorqError(f"prompt ({len(prompt)} tokens) + max_tokens ({params.max_tokens}) exceeds {limit} of {self.max_length} tokens")
        if adapter is not None and adapter.dtype not in (None, self.dtype):  # an AdapterStore built for another engine
            raise LorqError(f"adapter {adapter.name!r} holds {str(adapter.dtype).removeprefix('torch.')} weights, the engine runs "
                            f"{str(self.dtype).removeprefix('torch.')}: read it with AdapterStore(..., dtype=engine.dtype)")
        vocab = self.model.config.vocab_size
        for name, ids in (("logit_bias", params.logit_bias), ("stop_token_ids", params.stop_token_ids)):
            if any(not 0 <= t < vocab for t in ids):
                raise InvalidParam(f"{name} must hold token IDs in 0..{vocab - 1}", name)
        need = self.pool.bytes_for(1, len(prompt) + params.max_tokens)
        if need > self.kv_budget:
            raise LorqError(f"prompt ({len(prompt)} tokens) + max_tokens ({params.max_tokens}) needs {need / 2**20:.0f} MiB of KV cache, "
                            f"more than the server's budget of {self.kv_budget / 2**20:.0f} MiB (--kv-cache-mb)")
        seq = Sequence(list(prompt), adapter, params, on_event)
        if arrival is not None:  # when the request reached the server, before tokenizing and reading its adapter
            seq.arrival = arrival
        if params.temperature > 0:
            seq.generator = torch.Generator()
            seq.generator.manual_seed(params.seed if params.seed is not None else secrets.randbits(63))
        with self.lock:
            if self.stopping or self.expired:
                raise ShuttingDown("the server is shutting down")
            if bounded and len(self.waiting) >= self.cfg.max_queue:
                raise QueueFull(f"the request queue is full ({self.cfg.max_queue} waiting); retry later")
            seq.id = next(self.ids)
            self.waiting.append(seq)
            self.lock.notify()
        return seq

    def abort(self, seq: Sequence, reason: str = "abort") -> None:
        """Stop a sequence (e.g. its client went away): a waiting one leaves the queue now, a
        running one at the next step."""
        seq.aborted = reason
        with self.lock:
            queued = seq in self.waiting
            if queued:
                self.waiting.remove(seq)
            self.lock.notify()
        if queued:
            self.finish(seq, reason)

    def expire(self) -> None:
        """The shutdown deadline has passed: from the next step on, every request ends
        unfinished (waiting, running, or joining just now), and no new one is taken."""
        with self.lock:
            self.expired = True
            self.lock.notify()

    def end_expired(self) -> None:
        with self.lock:
            left, self.waiting = list(self.waiting), deque()
        for seq in left:
            self.finish(seq, "shutdown")
        for seq in self.running:
            seq.aborted = seq.aborted or "shutdown"

    @property
    def queue_depth(self) -> int:
        return len(self.waiting)

    @property
    def busy(self) -> bool:
        return bool(self.waiting or self.running)

    # -- one step ---------------------------------------------------------------------------
    def preempt(self) -> None:
        """Keep the running sequences' KV cache within its budget at this step: the latest
        admitted go back to the head of the queue, their slots freed (as vLLM's recompute
        preemption: they rejoin with prompt + generated tokens as their prompt). One sequence
        alone always fits (submit checked it)."""
        keep = sorted(self.running, key=lambda s: s.id)
        out = []
        while len(keep) > 1 and self.pool.bytes_for(len(keep), max(next_length(s) for s in keep)) > self.kv_budget:
            out.append(keep.pop())
        if out:
            with self.lock:
                self.waiting.extendleft(out)  # the earliest of them first
            self.leave(out)
            self.preemptions += len(out)

    def admit(self) -> list[Sequence]:
        """Move waiting requests into the batch: up to max_batch sequences and max_batch_tokens
        prompt tokens per step (at least one request, so a long prompt is never stuck), while
        the KV cache of all of them fits its budget (one alone always does)."""
        new, tokens, scored = [], 0, 0
        longest = max((next_length(s) for s in self.running), default=0)
        with self.lock:
            while self.waiting and len(self.running) + len(new) < self.cfg.max_batch:
                seq = self.waiting[0]
                scores = len(seq.prompt) if scores_prompt(seq) else 0
                if new and (tokens + next_length(seq) > self.cfg.max_batch_tokens or scored + scores > self.cfg.max_scored_tokens):
                    break
                longest = max(longest, next_length(seq))
                if self.running + new and self.pool.bytes_for(len(self.running) + len(new) + 1, longest) > self.kv_budget:
                    break
                self.waiting.popleft()
                new.append(seq)
                tokens += next_length(seq)
                scored += scores
        return new

    @torch.inference_mode()
    def step(self) -> int:
        """Run one packed forward pass; returns the number of sequences it advanced."""
        if self.expired:
            self.end_expired()
        aborted = [s for s in self.running if s.aborted]
        for seq in aborted:
            self.finish(seq, seq.aborted)
        self.leave(aborted)
        self.preempt()
        decoding, new = self.running, self.admit()
        for i, seq in enumerate(new):
            seq.slot = len(decoding) + i
        batch = self.running = decoding + new
        if not batch:
            return 0
        ids = [s.generated[-1] for s in decoding]
        positions = [s.cached for s in decoding]  # each new token's position
        decode = [(s.adapter, i) for i, s in enumerate(decoding) if s.adapter is not None]
        prefill, keep = [], list(range(len(decoding)))  # the positions whose logits are needed
        rows, scored = [1] * len(decoding), [False] * len(decoding)  # of them, per sequence; prompts scored
        for seq in new:  # a preempted sequence rejoins with what it generated as part of its prompt
            start = len(ids)
            ids += seq.prompt + seq.generated
            positions += range(len(ids) - start)
            scored.append(scores_prompt(seq))
            keep += range(start, len(ids)) if scored[-1] else [len(ids) - 1]
            rows.append(len(ids) - start if scored[-1] else 1)
            if seq.adapter is not None:
                prefill.append((seq.adapter, start, len(ids)))
        self.pool.fit(len(batch), max(positions) + 1, self.kv_budget)
        dev = self.device
        packed = PackedStep(self.pool, torch.tensor(positions[: len(decoding)], dtype=torch.long, device=dev),
                            [(s.slot, next_length(s)) for s in new])
        self.step_ref.plan = StepPlan(prefill, decode, dev, self.gather_cache) if prefill or decode else None
        try:
            logits = self.model(
                input_ids=torch.tensor([ids], device=dev), position_ids=torch.tensor([positions], device=dev), use_cache=False,
                logits_to_keep=torch.tensor(keep, device=dev), lorq_step=packed,
            ).logits[0]
        finally:
            self.step_ref.plan = None
        picks = plain_greedy_picks(batch, logits, rows)
        for seq, scores, score_prompt in zip(batch, logits.split(rows), scored):
            try:
                if score_prompt:  # a prompt's own log-probabilities: row t scores prompt token t + 1
                    seq.prompt_logprobs = token_logprobs(scores[:-1], seq.prompt[1:], seq.params.logprobs or 0)
                self.advance(seq, scores[-1], picks.get(seq.id))
            except Exception as e:  # one request's failure (e.g. its sampling) is not the batch's
                print(f"lorq: request {seq.id} failed: {type(e).__name__}: {e}", flush=True)
                self.finish(seq, "error")
        self.leave([s for s in batch if s.finish_reason is not None])
        self.steps += 1
        return len(batch)

    def leave(self, gone: list[Sequence], reason: str | None = None) -> None:
        """Take sequences out of the running batch and keep the others in slots 0..n-1, in
        packing order: the last ones move into the holes (one KV copy per hole)."""
        if not gone:
            return
        for seq in gone:
            if reason is not None:
                self.finish(seq, reason)
        ids = {s.id for s in gone}
        alive = [s for s in self.running if s.id not in ids]
        for seq in gone:
            if seq.slot >= 0:  # prompt + generated: also covers a prompt whose first token failed (cached is one short then)
                self.pool.clear(seq.slot, len(seq.prompt) + len(seq.generated))
        holes = sorted(s.slot for s in gone if s.slot < len(alive))
        movers = sorted((s for s in alive if s.slot >= len(alive)), key=lambda s: s.slot)
        for hole, seq in zip(holes, movers):
            self.pool.move(seq.slot, hole, seq.cached)
            self.pool.clear(seq.slot, seq.cached)
            seq.slot = hole
        self.running = sorted(alive, key=lambda s: s.slot)
        for seq in gone:
            seq.slot = -1
        if not self.waiting:  # waiting requests join at the next step: no shrinking to regrow
            self.pool.shrink(len(self.running), max((next_length(s) for s in self.running), default=0))
        if not self.running:  # idle (or all joining anew): hold no stacked adapter weights
            self.gather_cache.reset()

    def advance(self, seq: Sequence, logits: torch.Tensor, token: int | None = None) -> None:
        """Take the sequence's next token (`token` if already chosen) and what follows from it."""
        p = seq.params
        if token is None:
            token = next_token(logits, p, seq.prompt, seq.generated, self.eos, seq.generator)
        if p.logprobs is not None:
            seq.logprobs += token_logprobs(logits[None], [token], p.logprobs)
        if seq.first_token is None:
            seq.first_token = time.perf_counter()
        seq.generated.append(token)
        if token in self.eos and not p.ignore_eos:
            return self.finish(seq, "stop")
        if token in p.stop_token_ids and not p.include_stop_str_in_output:  # its text left out, as EOS's (vLLM)
            return self.finish(seq, "stop")
        text = seq.detokenizer.text(self.tok, seq.generated)
        ready = len(seq.generated) >= p.min_tokens  # no stop string before min_tokens, as vLLM
        cut = stop_cut(text, p.stop, p.include_stop_str_in_output) if p.stop and ready else None
        if cut is not None:
            seq.text = text[:cut]
            return self.finish(seq, "stop")
        seq.text = text
        if token in p.stop_token_ids:  # include_stop_str_in_output: its text kept
            return self.finish(seq, "stop")
        if len(seq.generated) >= p.max_tokens:
            return self.finish(seq, "length")
        end = safe_prefix(text, p.stop)
        if end > seq.sent:
            delta, seq.sent = text[seq.sent : end], end
            self.emit(seq, delta, None, self.covered(seq, len(text), end))

    def covered(self, seq: Sequence, text_len: int, end: int) -> int:
        """The generated tokens whose text the first `end` characters complete. Only a request
        that reports log-probabilities reads it: the others skip the prefix decodes."""
        if end == text_len or seq.params.logprobs is None:
            return len(seq.generated)
        return self.tokens_within(seq.generated, end)

    def tokens_within(self, tokens: list[int], chars: int) -> int:
        """How many of the first tokens decode to at most `chars` characters (the text held back
        at the end, a partial character or a possible stop string, covers the rest)."""
        k = len(tokens)
        while k and len(self.tok.decode(tokens[:k], skip_special_tokens=True)) > chars:
            k -= 1
        return k

    def emit(self, seq: Sequence, delta: str, reason: str | None, covered: int) -> None:
        seq.marks.append(covered)  # before the event: whoever reads it finds its mark
        seq.on_event(delta, reason)

    def finish(self, seq: Sequence, reason: str) -> None:
        seq.finish_reason = reason
        delta = seq.text[seq.sent :] if reason not in UNFINISHED else ""
        seq.sent = len(seq.text)
        if self.on_finish is not None:
            self.on_finish(seq)
        self.emit(seq, delta, reason, len(seq.generated))

    # -- the engine thread --------------------------------------------------------------------
    def start(self) -> "Engine":
        self.thread = threading.Thread(target=self.loop, name="lorq-engine", daemon=True)
        self.thread.start()
        return self

    def loop(self) -> None:
        while True:
            with self.lock:
                while not self.busy and not self.stopping:
                    self.lock.wait()
                if self.stopping and not self.busy:
                    return
            try:
                self.step()
            except Exception as e:  # a failed step must not leave its requests waiting forever
                print(f"lorq: engine step failed: {type(e).__name__}: {e}", flush=True)
                failed, self.running = self.running, []
                for seq in failed:
                    if seq.slot >= 0:
                        self.pool.clear(seq.slot)
                    seq.slot = -1
                    if seq.finish_reason is None:
                        self.finish(seq, "error")
                self.pool.shrink(0, 0)

    def stop(self) -> None:
        """Finish everything admitted or waiting, then end the thread."""
        with self.lock:
            self.stopping = True
            self.lock.notify()
        if self.thread is not None:
            self.thread.join()

    def generate(self, requests: list[tuple[list[int], AdapterWeights | None, SamplingParams]]) -> list[Sequence]:
        """Offline: run the given requests to completion in this thread (no engine thread)."""
        seqs = [self.submit(p, a, s, lambda d, r: None, bounded=False) for p, a, s in requests]
        while self.busy:
            self.step()
        return seqs
