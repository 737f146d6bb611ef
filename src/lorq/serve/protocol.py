"""The OpenAI API's request bodies (what lorq honours) and response objects."""

from __future__ import annotations

import time
import uuid
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from ..errors import LorqError
from .logprobs import Scored
from .sampling import MAX_LOGPROBS, SamplingParams


class APIError(LorqError):
    """An error answered as OpenAI's error object with an HTTP status."""

    def __init__(self, status: int, message: str, kind: str = "invalid_request_error", param: str | None = None):
        super().__init__(message)
        self.status, self.message, self.kind, self.param = status, message, kind, param

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.kind, "param": self.param, "code": self.status}}


def bad_request(e: LorqError) -> APIError:
    """A request's LorqError as its 400, naming the field where the error knows it."""
    return e if isinstance(e, APIError) else APIError(400, str(e), param=getattr(e, "param", None))


SEED_RANGE = (-(2**63), 2**64 - 1)  # what torch.Generator.manual_seed takes


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="ignore", strict=True)

    include_usage: bool | None = False


def given(value, default):
    """A field's value; null means its default, as in OpenAI's API."""
    return default if value is None else value


# vLLM's request fields this server does not implement, with vLLM's defaults: a field set to
# anything else is refused, not silently ignored (its default is what this server does anyway)
VLLM_UNSUPPORTED = {
    **dict.fromkeys(("guided_json", "guided_regex", "guided_choice", "guided_grammar", "guided_decoding_backend",
                     "guided_whitespace_pattern", "structured_outputs", "allowed_token_ids", "prompt_logprobs", "truncate_prompt_tokens",
                     "logits_processors", "chat_template", "chat_template_kwargs", "documents")),
    "use_beam_search": False, "length_penalty": 1.0, "bad_words": [], "priority": 0, "continue_final_message": False,
    "return_tokens_as_token_ids": False, "add_generation_prompt": True, "skip_special_tokens": True, "spaces_between_special_tokens": True,
}


def unsupported_vllm_fields(extra: dict) -> dict[str, bool]:
    """Which of VLLM_UNSUPPORTED a request sets to something but null or vLLM's default."""
    return {name: extra[name] not in (None, VLLM_UNSUPPORTED[name]) for name in VLLM_UNSUPPORTED if name in extra}


class SamplingFields(BaseModel):
    """Fields shared by completions and chat; unknown fields are ignored, as OpenAI's servers do,
    but known sampling fields this server does not implement are refused, not ignored. Types are
    strict (no "5" for 5, no true for 1); null means the field's default, as in OpenAI's API."""

    model_config = ConfigDict(extra="allow", strict=True)  # extras kept only to refuse VLLM_UNSUPPORTED

    model: str
    temperature: float | None = None
    top_p: float | None = None
    stop: str | list[str] | None = None
    seed: int | None = Field(None, ge=SEED_RANGE[0], le=SEED_RANGE[1])
    stream: bool | None = False
    stream_options: StreamOptions | None = None
    n: int | None = Field(1, ge=1, le=128)  # choices per prompt, each sampled on its own
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    logit_bias: dict[str, float] | None = None
    top_k: int | None = None  # vLLM's extensions from here on
    min_p: float | None = None
    min_tokens: int | None = None
    repetition_penalty: float | None = None
    stop_token_ids: list[int] | None = None
    include_stop_str_in_output: bool | None = False
    response_format: dict | None = None
    tools: list | None = None
    tool_choice: str | dict | None = None
    functions: list | None = None  # OpenAI's older names for tools
    function_call: str | dict | None = None
    ignore_eos: bool | None = False  # vLLM's extension: generate max_tokens even past end-of-sequence

    def check_supported(self) -> None:
        unsupported = {"response_format": (self.response_format or {"type": "text"}).get("type") != "text", "tools": bool(self.tools),
                       "functions": bool(self.functions), **self.unsupported_extras(), **unsupported_vllm_fields(self.model_extra or {}),
                       **{name: getattr(self, name) not in (None, "none", "auto") for name in ("tool_choice", "function_call")}}
        for name, used in unsupported.items():
            if used:
                raise APIError(400, f"{name} is not supported by this server", param=name)

    def logprob_count(self) -> int | None:
        """Alternatives reported with each token (None: no log-probabilities)."""
        return None

    def unsupported_extras(self) -> dict[str, bool]:
        """This endpoint's own fields that are set but not implemented."""
        return {}

    def sampling(self, max_tokens: int, prompt_logprobs: bool = False) -> SamplingParams:
        if self.stream_options is not None and not self.stream:  # as OpenAI answers
            raise APIError(400, "stream_options is only allowed when stream is true", param="stream_options")
        self.check_supported()
        if self.top_k is not None and self.top_k < -1:
            raise APIError(400, f"top_k must be -1 or 0 (every token) or positive, got {self.top_k}", param="top_k")
        try:
            bias = {int(k): v for k, v in (self.logit_bias or {}).items()}
        except ValueError:
            raise APIError(400, "logit_bias keys must be token IDs", param="logit_bias")
        stop = [self.stop] if isinstance(self.stop, str) else list(self.stop or [])
        params = SamplingParams(
            max_tokens=max_tokens, temperature=given(self.temperature, 1.0), top_p=given(self.top_p, 1.0),
            top_k=max(given(self.top_k, 0), 0), min_p=given(self.min_p, 0.0), min_tokens=given(self.min_tokens, 0),
            presence_penalty=given(self.presence_penalty, 0.0), frequency_penalty=given(self.frequency_penalty, 0.0),
            repetition_penalty=given(self.repetition_penalty, 1.0), logit_bias=bias, stop=stop,
            include_stop_str_in_output=bool(self.include_stop_str_in_output), stop_token_ids=list(self.stop_token_ids or []),
            seed=self.seed, ignore_eos=bool(self.ignore_eos), logprobs=self.logprob_count(),
            prompt_logprobs=prompt_logprobs and self.logprob_count() is not None,
        )
        try:
            return params.validate()
        except LorqError as e:
            raise bad_request(e)

    @property
    def include_usage(self) -> bool:
        return bool(self.stream_options and self.stream_options.include_usage)


Prompt = str | list[int]  # text, or token IDs as OpenAI's API allows


class CompletionRequest(SamplingFields):
    prompt: str | list[str] | list[int] | list[list[int]]
    max_tokens: int | None = 16
    echo: bool | None = False  # the prompt comes back before the completion (with its log-probabilities when asked)
    logprobs: int | None = Field(None, ge=0, le=MAX_LOGPROBS)
    best_of: int | None = Field(None, ge=1)
    suffix: str | None = None

    def logprob_count(self) -> int | None:
        return self.logprobs

    def prompts(self) -> list[Prompt]:
        """One prompt or a list: text, or token IDs (one list of ints, or a list of them)."""
        prompts = [self.prompt] if isinstance(self.prompt, str) or (self.prompt and isinstance(self.prompt[0], int)) else self.prompt
        if not prompts:
            raise APIError(400, "prompt must not be empty", param="prompt")
        if (self.best_of or 1) > 1 or self.suffix:
            raise APIError(400, "best_of and suffix are not supported by this server")
        return prompts


class TextPart(BaseModel):
    type: Literal["text"]
    text: str


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="ignore")

    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[TextPart] | None = None

    @model_validator(mode="after")
    def has_content(self) -> "ChatMessage":
        if self.content is None and self.role != "assistant":  # only an assistant turn (a tool call) may come without
            raise ValueError(f"a {self.role} message needs content")
        return self

    def as_template(self) -> dict:
        content = self.content if isinstance(self.content, str) else "".join(p.text for p in self.content or [])
        return {"role": "system" if self.role == "developer" else self.role, "content": content}


class ChatRequest(SamplingFields):
    messages: list[ChatMessage] = Field(min_length=1)
    max_tokens: int | None = Field(None, ge=1)  # both checked: one must not hide the other's bad value
    max_completion_tokens: int | None = Field(None, ge=1)
    logprobs: bool | None = False
    top_logprobs: int | None = Field(None, ge=0, le=MAX_LOGPROBS)
    echo: bool | None = False  # vLLM's: the last message repeated before the reply (not implemented)

    def unsupported_extras(self) -> dict[str, bool]:
        return {"echo": bool(self.echo)}

    def logprob_count(self) -> int | None:
        if self.top_logprobs is not None and not self.logprobs:
            raise APIError(400, "top_logprobs needs logprobs: true", param="top_logprobs")
        return (self.top_logprobs or 0) if self.logprobs else None


class LoadAdapterRequest(BaseModel):
    lora_name: str
    lora_path: str | None = None


class UnloadAdapterRequest(BaseModel):
    lora_name: str


def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:24]}"


def usage(prompt_tokens: int, completion_tokens: int) -> dict:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens, "total_tokens": prompt_tokens + completion_tokens}


def completion_object(rid: str, model: str, choices: list[dict], use: dict | None, chunk: bool = False) -> dict:
    body = {"id": rid, "object": "text_completion", "created": int(time.time()), "model": model, "choices": choices}
    if use is not None or not chunk:
        body["usage"] = use
    return body


def completion_choice(index: int, text: str, finish_reason: str | None, logprobs: dict | None = None) -> dict:
    return {"index": index, "text": text, "logprobs": logprobs, "finish_reason": finish_reason}


def completion_logprobs(scored: list[Scored], offsets: list[int]) -> dict:
    """The completions API's logprobs object: text_offset is where each token's text starts in
    the choice's text; each token's alternatives include the token itself, as OpenAI's do."""
    def alternatives(s: Scored) -> dict | None:
        if s.top is None:
            return None
        top = {t.text: t.logprob for t in s.top}
        return top if s.logprob is None else {**top, s.text: s.logprob}

    return {"tokens": [s.text for s in scored], "token_logprobs": [s.logprob for s in scored],
            "top_logprobs": [alternatives(s) for s in scored], "text_offset": offsets}


def chat_logprobs(scored: list[Scored]) -> dict:
    """The chat API's logprobs object: each token with its UTF-8 bytes (part of a character's,
    for a token that splits one) and its top alternatives."""
    def entry(s: Scored) -> dict:
        return {"token": s.text, "logprob": s.logprob, "bytes": list(s.raw)}

    return {"content": [{**entry(s), "top_logprobs": [entry(t) for t in s.top or []]} for s in scored], "refusal": None}


def chat_object(rid: str, model: str, results: list[tuple[str, str]], use: dict, logprobs: list[dict | None] | None = None) -> dict:
    logprobs = logprobs or [None] * len(results)
    return {
        "id": rid, "object": "chat.completion", "created": int(time.time()), "model": model,
        "choices": [{"index": i, "message": {"role": "assistant", "content": text}, "finish_reason": reason, "logprobs": lp}
                    for i, ((text, reason), lp) in enumerate(zip(results, logprobs))],
        "usage": use,
    }


def chat_chunk(rid: str, model: str, delta: dict | None, finish_reason: str | None = None, use: dict | None = None,
               index: int = 0, logprobs: dict | None = None) -> dict:
    choices = [] if delta is None else [{"index": index, "delta": delta, "finish_reason": finish_reason, "logprobs": logprobs}]
    body = {"id": rid, "object": "chat.completion.chunk", "created": int(time.time()), "model": model, "choices": choices}
    if use is not None:
        body["usage"] = use
    return body
