"""The OpenAI wire format spoken by `node.app.api`: request bodies, response objects, errors.

Requests are pydantic models that accept (and ignore) fields we do not implement, as OpenAI
clients send many optional ones; fields we would have to get wrong (`n` > 1, logprobs, tools)
are refused with a 400 naming the parameter. Responses are plain dicts in OpenAI's shapes.
"""

from __future__ import annotations

import time
import uuid
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from node.model.sampling import MAX_SEED

MAX_STOP_SEQUENCES = 4
MAX_STOP_CHARS = 256

# ---------------------------------------------------------------------------------------------------- errors


class APIError(Exception):
    """An error answered as `{"error": {"message", "type", "param", "code"}}` with `status`."""

    def __init__(self, status: int, message: str, *, type: str = "invalid_request_error",
                 param: str | None = None, code: str | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type, param, code

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


def invalid_request(message: str, param: str | None = None, code: str | None = None) -> APIError:
    return APIError(400, message, param=param, code=code)


# --------------------------------------------------------------------------------------------------- requests


class StreamOptions(BaseModel):
    include_usage: bool = False


class SamplingRequest(BaseModel):
    """Fields shared by /v1/chat/completions and /v1/completions."""

    model_config = ConfigDict(extra="allow")

    model: str
    max_tokens: int | None = Field(default=None, ge=1)
    temperature: float = Field(default=1.0, ge=0, le=2)
    top_p: float = Field(default=1.0, gt=0, le=1)  # 0 would leave no token to sample from
    n: int = Field(default=1, ge=1)
    # As OpenAI: up to 4 stop sequences. Each is matched against the text at every token, so its length is bounded.
    stop: str | list[str] | None = Field(default=None, max_length=MAX_STOP_SEQUENCES)
    seed: int | None = Field(default=None, ge=0, le=MAX_SEED)
    stream: bool = False
    stream_options: StreamOptions | None = None
    logprobs: bool | int | None = None

    # OpenAI's own defaults are temperature 1 and top_p 1; a JSON `null` means "the default" too.
    @field_validator("temperature", "top_p", "n", mode="before")
    @classmethod
    def _null_is_default(cls, value: Any, info) -> Any:
        return cls.model_fields[info.field_name].default if value is None else value

    @field_validator("stop")
    @classmethod
    def _short_stops(cls, value: str | list[str] | None) -> str | list[str] | None:
        for stop in [value] if isinstance(value, str) else value or []:
            if len(stop) > MAX_STOP_CHARS:
                raise ValueError(f"a stop sequence may have at most {MAX_STOP_CHARS} characters")
        return value

    def stop_sequences(self) -> list[str]:
        stops = [self.stop] if isinstance(self.stop, str) else list(self.stop or [])
        return [s for s in stops if s]  # an empty stop string would end every answer before it starts

    def include_usage(self) -> bool:
        return bool(self.stream and self.stream_options and self.stream_options.include_usage)

    def check_supported(self) -> None:
        if self.n != 1:
            raise invalid_request("Only n=1 is supported.", "n")
        if self.logprobs:
            raise invalid_request("logprobs are not supported.", "logprobs")


class ContentPart(BaseModel):
    model_config = ConfigDict(extra="allow")

    type: str
    text: str | None = None


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="allow")

    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[ContentPart] | None = None

    def text(self, index: int) -> str:
        if self.content is None:
            return ""
        if isinstance(self.content, str):
            return self.content
        texts = []
        for part in self.content:
            if part.type != "text" or part.text is None:
                raise invalid_request(f"Only text content is supported, got a {part.type!r} part.",
                                      f"messages.[{index}].content")
            texts.append(part.text)
        return "".join(texts)


class ChatCompletionRequest(SamplingRequest):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(default=None, ge=1)  # newer clients' name for max_tokens
    tools: list[Any] | None = None

    def token_limit(self) -> int | None:
        return self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens

    def check_supported(self) -> None:
        super().check_supported()
        if self.tools:
            raise invalid_request("Tools are not supported.", "tools")


class CompletionRequest(SamplingRequest):
    # A string, or one prompt as a list of token ids; lists of several prompts (a batch) are refused.
    prompt: str | list[str] | list[int]
    max_tokens: int | None = Field(default=16, ge=1)  # OpenAI's default for legacy completions
    echo: bool = False

    def token_limit(self) -> int | None:
        return self.max_tokens

    def check_supported(self) -> None:
        super().check_supported()
        if isinstance(self.prompt, list) and len(self.prompt) > 1 and isinstance(self.prompt[0], str):
            raise invalid_request("Only one prompt per request is supported.", "prompt")
        if self.echo:
            raise invalid_request("echo is not supported.", "echo")


# -------------------------------------------------------------------------------------------------- responses


def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex}"


def now() -> int:
    return int(time.time())


def usage(prompt_tokens: int, completion_tokens: int) -> dict[str, int]:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


def model_object(model_id: str, created: int) -> dict[str, Any]:
    return {"id": model_id, "object": "model", "created": created, "owned_by": "layerhive"}


def chat_completion(response_id: str, created: int, model: str, text: str, finish_reason: str,
                    usage_counts: dict[str, int]) -> dict[str, Any]:
    return {
        "id": response_id, "object": "chat.completion", "created": created, "model": model,
        "choices": [{"index": 0, "message": {"role": "assistant", "content": text, "refusal": None},
                     "logprobs": None, "finish_reason": finish_reason}],
        "usage": usage_counts,
    }


def chat_chunk(response_id: str, created: int, model: str, delta: dict[str, Any] | None,
               finish_reason: str | None = None, *, with_usage_field: bool = False,
               usage_counts: dict[str, int] | None = None) -> dict[str, Any]:
    """One `chat.completion.chunk`; `delta=None` makes the usage-only chunk that has no choices."""
    chunk: dict[str, Any] = {"id": response_id, "object": "chat.completion.chunk", "created": created, "model": model,
                             "choices": [] if delta is None else
                             [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish_reason}]}
    if with_usage_field:  # with include_usage, every chunk carries "usage": null but the last
        chunk["usage"] = usage_counts
    return chunk


def text_completion(response_id: str, created: int, model: str, text: str, finish_reason: str | None,
                    usage_counts: dict[str, int] | None, *, with_usage_field: bool = True) -> dict[str, Any]:
    """A `text_completion` object; the streamed chunks share its shape, as in OpenAI's API."""
    body: dict[str, Any] = {"id": response_id, "object": "text_completion", "created": created, "model": model,
                            "choices": [{"index": 0, "text": text, "logprobs": None, "finish_reason": finish_reason}]}
    if with_usage_field:
        body["usage"] = usage_counts
    return body
