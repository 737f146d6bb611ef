"""The OpenAI API's request bodies (what lorq honours) and response objects."""

from __future__ import annotations

import time
import uuid
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from ..errors import LorqError
from .engine import SamplingParams


class APIError(LorqError):
    """An error answered as OpenAI's error object with an HTTP status."""

    def __init__(self, status: int, message: str, kind: str = "invalid_request_error", param: str | None = None):
        super().__init__(message)
        self.status, self.message, self.kind, self.param = status, message, kind, param

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.kind, "param": self.param, "code": self.status}}


SEED_RANGE = (-(2**63), 2**64 - 1)  # what torch.Generator.manual_seed takes


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="ignore", strict=True)

    include_usage: bool | None = False


class SamplingFields(BaseModel):
    """Fields shared by completions and chat; unknown fields are ignored, as OpenAI's servers do,
    but known sampling fields this server does not implement are refused, not ignored. Types are
    strict (no "5" for 5, no true for 1); null means the field's default, as in OpenAI's API."""

    model_config = ConfigDict(extra="ignore", strict=True)

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
    logit_bias: dict | None = None
    logprobs: bool | int | None = None
    top_logprobs: int | None = None
    top_k: int | None = None  # vLLM's extensions from here on
    min_tokens: int | None = None
    repetition_penalty: float | None = None
    response_format: dict | None = None
    tools: list | None = None
    ignore_eos: bool | None = False  # vLLM's extension: generate max_tokens even past end-of-sequence

    def check_supported(self) -> None:
        unsupported = {
            "presence_penalty": bool(self.presence_penalty),
            "frequency_penalty": bool(self.frequency_penalty), "logit_bias": bool(self.logit_bias),
            "logprobs": self.logprobs is not None and self.logprobs is not False, "top_logprobs": bool(self.top_logprobs),
            "top_k": self.top_k not in (None, 0, -1), "min_tokens": bool(self.min_tokens),
            "repetition_penalty": self.repetition_penalty not in (None, 1.0),
            "response_format": (self.response_format or {"type": "text"}).get("type") != "text", "tools": bool(self.tools),
        }
        for name, used in unsupported.items():
            if used:
                raise APIError(400, f"{name} is not supported by this server", param=name)

    def sampling(self, max_tokens: int) -> SamplingParams:
        if self.stream_options is not None and not self.stream:  # as OpenAI answers
            raise APIError(400, "stream_options is only allowed when stream is true", param="stream_options")
        self.check_supported()
        stop = [self.stop] if isinstance(self.stop, str) else list(self.stop or [])
        params = SamplingParams(
            max_tokens=max_tokens, temperature=1.0 if self.temperature is None else self.temperature,
            top_p=1.0 if self.top_p is None else self.top_p, stop=stop, seed=self.seed, ignore_eos=bool(self.ignore_eos),
        )
        try:
            return params.validate()
        except LorqError as e:
            raise APIError(400, str(e))

    @property
    def include_usage(self) -> bool:
        return bool(self.stream_options and self.stream_options.include_usage)


Prompt = str | list[int]  # text, or token IDs as OpenAI's API allows


class CompletionRequest(SamplingFields):
    prompt: str | list[str] | list[int] | list[list[int]]
    max_tokens: int | None = 16
    echo: bool | None = False
    best_of: int | None = Field(None, ge=1)
    suffix: str | None = None

    def prompts(self) -> list[Prompt]:
        """One prompt or a list: text, or token IDs (one list of ints, or a list of them)."""
        prompts = [self.prompt] if isinstance(self.prompt, str) or (self.prompt and isinstance(self.prompt[0], int)) else self.prompt
        if not prompts:
            raise APIError(400, "prompt must not be empty", param="prompt")
        if self.echo or (self.best_of or 1) > 1 or self.suffix:
            raise APIError(400, "echo, best_of and suffix are not supported by this server")
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


def completion_choice(index: int, text: str, finish_reason: str | None) -> dict:
    return {"index": index, "text": text, "logprobs": None, "finish_reason": finish_reason}


def chat_object(rid: str, model: str, results: list[tuple[str, str]], use: dict) -> dict:
    return {
        "id": rid, "object": "chat.completion", "created": int(time.time()), "model": model,
        "choices": [{"index": i, "message": {"role": "assistant", "content": text}, "finish_reason": reason, "logprobs": None}
                    for i, (text, reason) in enumerate(results)],
        "usage": use,
    }


def chat_chunk(rid: str, model: str, delta: dict | None, finish_reason: str | None = None, use: dict | None = None,
               index: int = 0) -> dict:
    choices = [] if delta is None else [{"index": index, "delta": delta, "finish_reason": finish_reason, "logprobs": None}]
    body = {"id": rid, "object": "chat.completion.chunk", "created": int(time.time()), "model": model, "choices": choices}
    if use is not None:
        body["usage"] = use
    return body
