"""The OpenAI API's request bodies (what lorq honours) and response objects."""

from __future__ import annotations

import time
import uuid
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from ..errors import LorqError
from .engine import SamplingParams


class APIError(LorqError):
    """An error answered as OpenAI's error object with an HTTP status."""

    def __init__(self, status: int, message: str, kind: str = "invalid_request_error", param: str | None = None):
        super().__init__(message)
        self.status, self.message, self.kind, self.param = status, message, kind, param

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.kind, "param": self.param, "code": self.status}}


class SamplingFields(BaseModel):
    """Fields shared by completions and chat; unknown fields are ignored, as OpenAI's servers do."""

    model_config = ConfigDict(extra="ignore")

    model: str
    temperature: float | None = None
    top_p: float | None = None
    stop: str | list[str] | None = None
    seed: int | None = None
    stream: bool = False
    stream_options: dict | None = None
    n: int = 1
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    logit_bias: dict | None = None
    logprobs: bool | int | None = None
    ignore_eos: bool = False  # vLLM's extension: generate max_tokens even past end-of-sequence

    def check_supported(self) -> None:
        unsupported = {
            "n": self.n != 1, "presence_penalty": bool(self.presence_penalty), "frequency_penalty": bool(self.frequency_penalty),
            "logit_bias": bool(self.logit_bias), "logprobs": bool(self.logprobs),
        }
        for name, used in unsupported.items():
            if used:
                raise APIError(400, f"{name} is not supported by this server", param=name)

    def sampling(self, max_tokens: int) -> SamplingParams:
        self.check_supported()
        stop = [self.stop] if isinstance(self.stop, str) else list(self.stop or [])
        params = SamplingParams(
            max_tokens=max_tokens, temperature=1.0 if self.temperature is None else self.temperature,
            top_p=1.0 if self.top_p is None else self.top_p, stop=stop, seed=self.seed, ignore_eos=self.ignore_eos,
        )
        try:
            return params.validate()
        except LorqError as e:
            raise APIError(400, str(e))

    @property
    def include_usage(self) -> bool:
        return bool((self.stream_options or {}).get("include_usage"))


class CompletionRequest(SamplingFields):
    prompt: str | list[str]
    max_tokens: int | None = 16
    echo: bool = False
    best_of: int | None = None
    suffix: str | None = None

    def prompts(self) -> list[str]:
        prompts = [self.prompt] if isinstance(self.prompt, str) else self.prompt
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

    def as_template(self) -> dict:
        content = self.content if isinstance(self.content, str) else "".join(p.text for p in self.content or [])
        return {"role": "system" if self.role == "developer" else self.role, "content": content}


class ChatRequest(SamplingFields):
    messages: list[ChatMessage] = Field(min_length=1)
    max_tokens: int | None = None
    max_completion_tokens: int | None = None


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


def chat_object(rid: str, model: str, text: str, finish_reason: str, use: dict) -> dict:
    return {
        "id": rid, "object": "chat.completion", "created": int(time.time()), "model": model,
        "choices": [{"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": finish_reason, "logprobs": None}],
        "usage": use,
    }


def chat_chunk(rid: str, model: str, delta: dict | None, finish_reason: str | None = None, use: dict | None = None) -> dict:
    choices = [] if delta is None else [{"index": 0, "delta": delta, "finish_reason": finish_reason, "logprobs": None}]
    body = {"id": rid, "object": "chat.completion.chunk", "created": int(time.time()), "model": model, "choices": choices}
    if use is not None:
        body["usage"] = use
    return body
