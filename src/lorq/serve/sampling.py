"""The next token from a row of logits, and the log-probabilities reported with it.

OpenAI's and vLLM's sampling controls are small functions of the logits, applied in vLLM's
order: logit bias, min_tokens (end-of-sequence held back), repetition penalty (prompt and
output tokens, as transformers' RepetitionPenaltyLogitsProcessor), frequency and presence
penalties (output tokens, OpenAI's formula), then temperature, top-k and top-p. Greedy decoding
takes the argmax of the controlled logits. Reported log-probabilities are those of the model's
own distribution, before any control (vLLM's default).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from ..errors import LorqError

MAX_LOGPROBS = 20  # alternatives per token, as vLLM allows (OpenAI: 5 on completions, 20 on chat)


class InvalidParam(LorqError):
    """A request field out of its range; `param` names it (the API error's param)."""

    def __init__(self, message: str, param: str):
        super().__init__(message)
        self.param = param


@dataclass
class SamplingParams:
    max_tokens: int = 16
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0  # 0: every token
    min_tokens: int = 0  # end-of-sequence is not sampled before this many tokens
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0
    min_p: float = 0.0  # tokens below min_p × the most likely one's probability are not sampled
    logit_bias: dict[int, float] = field(default_factory=dict)
    stop: list[str] = field(default_factory=list)
    include_stop_str_in_output: bool = False
    stop_token_ids: list[int] = field(default_factory=list)  # end like EOS (their text only with include_stop_str_in_output)
    seed: int | None = None
    ignore_eos: bool = False  # run to max_tokens (benchmarks: a fixed amount of work per request)
    logprobs: int | None = None  # alternatives reported with each generated token (0: its own only); None: no log-probabilities
    prompt_logprobs: bool = False  # also report each prompt token's (echo)

    def validate(self) -> "SamplingParams":
        checks = [
            (self.max_tokens > 0, "max_tokens", f"max_tokens must be a positive integer, got {self.max_tokens}"),
            (0 <= self.temperature <= 2, "temperature", f"temperature must be in [0, 2], got {self.temperature}"),
            (0 < self.top_p <= 1, "top_p", f"top_p must be in (0, 1], got {self.top_p}"),
            (0 <= self.min_p <= 1, "min_p", f"min_p must be in [0, 1], got {self.min_p}"),
            (self.top_k >= 0, "top_k", f"top_k must be -1 or 0 (every token) or positive, got {self.top_k}"),
            (0 <= self.min_tokens <= self.max_tokens, "min_tokens", f"min_tokens must be in [0, max_tokens], got {self.min_tokens}"),
            (-2 <= self.presence_penalty <= 2, "presence_penalty", f"presence_penalty must be in [-2, 2], got {self.presence_penalty}"),
            (-2 <= self.frequency_penalty <= 2, "frequency_penalty", f"frequency_penalty must be in [-2, 2], got {self.frequency_penalty}"),
            (0 < self.repetition_penalty <= 100, "repetition_penalty", f"repetition_penalty must be in (0, 100], got {self.repetition_penalty}"),
            (all(-100 <= v <= 100 for v in self.logit_bias.values()), "logit_bias", "logit_bias values must be in [-100, 100]"),
            (len(self.stop) <= 4 and all(isinstance(s, str) and s for s in self.stop), "stop", "stop must be at most 4 non-empty strings"),
            (self.logprobs is None or 0 <= self.logprobs <= MAX_LOGPROBS, "logprobs", f"logprobs must be in [0, {MAX_LOGPROBS}], got {self.logprobs}"),
        ]
        for ok, param, message in checks:
            if not ok:
                raise InvalidParam(message, param)
        return self

    @property
    def controls(self) -> bool:
        """Whether anything but temperature and top-p shapes the choice."""
        return bool(self.logit_bias or self.min_tokens or self.presence_penalty or self.frequency_penalty
                    or self.repetition_penalty != 1.0 or self.top_k)


def add_logit_bias(logits: torch.Tensor, bias: dict[int, float]) -> torch.Tensor:
    ids = torch.tensor(list(bias), dtype=torch.long, device=logits.device)
    return logits.index_add(0, ids, torch.tensor(list(bias.values()), dtype=logits.dtype, device=logits.device))


def hold_back(logits: torch.Tensor, ids: set[int]) -> torch.Tensor:
    """These tokens cannot be chosen (end-of-sequence before min_tokens)."""
    out = logits.clone()
    out[torch.tensor(sorted(ids), dtype=torch.long, device=logits.device)] = float("-inf")
    return out


def penalize_repetition(logits: torch.Tensor, seen: list[int], penalty: float) -> torch.Tensor:
    """CTRL's penalty: a seen token's positive logit divided by it, a negative one multiplied."""
    ids = torch.tensor(seen, dtype=torch.long, device=logits.device).unique()
    picked = logits[ids]
    return logits.index_put((ids,), torch.where(picked > 0, picked / penalty, picked * penalty))


def penalize_frequency(logits: torch.Tensor, generated: list[int], frequency: float, presence: float) -> torch.Tensor:
    """OpenAI's penalties: logit − frequency · count − presence · [count > 0] over the output so far."""
    counts = torch.bincount(torch.tensor(generated, dtype=torch.long, device=logits.device), minlength=logits.shape[0])[: logits.shape[0]]
    return logits - frequency * counts - presence * (counts > 0).to(logits.dtype)


def keep_top_k(logits: torch.Tensor, k: int) -> torch.Tensor:
    if k <= 0 or k >= logits.shape[0]:
        return logits
    kth = logits.topk(k).values[-1]
    return logits.masked_fill(logits < kth, float("-inf"))


def controlled(logits: torch.Tensor, p: SamplingParams, prompt: list[int], generated: list[int], eos: set[int]) -> torch.Tensor:
    """The logits after every control but temperature and top-p, in vLLM's order."""
    logits = logits.float()
    if p.logit_bias:
        logits = add_logit_bias(logits, p.logit_bias)
    if len(generated) < p.min_tokens and (held := set(p.stop_token_ids) | (set() if p.ignore_eos else eos)):
        logits = hold_back(logits, held)
    if p.repetition_penalty != 1.0:
        logits = penalize_repetition(logits, prompt + generated, p.repetition_penalty)
    if (p.frequency_penalty or p.presence_penalty) and generated:
        logits = penalize_frequency(logits, generated, p.frequency_penalty, p.presence_penalty)
    return keep_top_k(logits, p.top_k)


def greedy(logits: torch.Tensor) -> int:
    return greedy_rows(logits[None])[0]


def greedy_rows(logits: torch.Tensor) -> list[int]:
    """The argmax of each row (the first maximal index, as torch's). Taken in fp32: the CPU's
    bf16 argmax does not vectorize (180 vs 45 us for a 49k vocabulary), and widening is exact."""
    return logits.float().argmax(-1).tolist()


def nucleus_sample(logits: torch.Tensor, temperature: float, top_p: float, generator: torch.Generator, min_p: float = 0.0) -> int:
    """Sample from softmax(logits / T) restricted to the smallest set of tokens whose mass >= top_p
    and to those at least min_p times as likely as the most likely one."""
    # fp64: a temperature or top_p below ~1e-45 is 0 in fp32 (0/0 logits, an empty nucleus)
    logits = logits.double().cpu()  # the per-request generator lives on the CPU
    probs = torch.softmax((logits - logits.max()) / temperature, dim=-1)  # max first: no inf/inf at tiny T
    if top_p < 1:
        sorted_p, order = probs.sort(descending=True)
        keep = sorted_p.cumsum(0) - sorted_p < top_p  # tokens before which the mass is still short of top_p
        keep[0] = True  # the most likely token, whatever top_p
        probs = torch.zeros_like(probs).scatter_(0, order[keep], sorted_p[keep])
    if min_p > 0:  # against the largest probability: unchanged by top-p, which keeps it
        probs = probs.masked_fill(probs < min_p * probs.max(), 0.0)
    return int(torch.multinomial(probs, 1, generator=generator))


def next_token(logits: torch.Tensor, p: SamplingParams, prompt: list[int], generated: list[int], eos: set[int],
               generator: torch.Generator | None) -> int:
    if p.controls:
        logits = controlled(logits, p, prompt, generated, eos)
    return greedy(logits) if p.temperature == 0 else nucleus_sample(logits, p.temperature, p.top_p, generator, p.min_p)


@dataclass
class TokenLogprob:
    """A token's log-probability under the model and its `k` most likely alternatives."""

    token: int
    logprob: float
    top: list[tuple[int, float]]


LOGPROB_ROWS = 256  # rows of logits normalized at a time: a scored prompt's copies stay small


def token_logprobs(logits: torch.Tensor, tokens: list[int], k: int) -> list[TokenLogprob]:
    """For each row of logits (n, vocab), the log-probability of the token that followed it."""
    out = []
    for start in range(0, len(tokens), LOGPROB_ROWS):
        part = tokens[start : start + LOGPROB_ROWS]
        logp = torch.log_softmax(logits[start : start + len(part)].float(), dim=-1)
        chosen = logp.gather(1, torch.tensor(part, dtype=torch.long, device=logp.device)[:, None])[:, 0].tolist()
        tops = logp.topk(k, dim=-1) if k else None
        for i, (token, lp) in enumerate(zip(part, chosen)):
            top = list(zip(tops.indices[i].tolist(), tops.values[i].tolist())) if tops is not None else []
            out.append(TokenLogprob(token, lp, top))
    return out
