"""The OpenAI API's request bodies, as this server accepts them, and its error format.

Every parameter the OpenAI API defines for ``/v1/completions`` and ``/v1/chat/completions`` is either
honoured or refused with a 400 naming it; nothing is silently ignored (``user`` alone is accepted and unused:
it only labels the caller). Unknown parameters are refused the same way, so a typo never goes unnoticed.
Limits that depend on the server (``n``, prompt and completion lengths) are checked where the prompt has
been tokenized (:mod:`densessm.serving.app`).
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

MAX_STOP = 4  # stop sequences per request, as OpenAI allows


class APIError(Exception):
    """An error answered as ``{"error": {"message", "type", "param", "code"}}`` with HTTP ``status``."""

    def __init__(
        self,
        status: int,
        message: str,
        type: str = "invalid_request_error",
        param: str | None = None,
        code: str | None = None,
        headers: dict[str, str] | None = None,
    ):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type, param, code
        self.headers = headers

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


def validation_error(err: ValidationError | list[dict[str, Any]]) -> APIError:
    """One clear 400 for the first problem pydantic found (FastAPI's ``RequestValidationError.errors()``)."""
    errors = err.errors() if isinstance(err, ValidationError) else err
    first = errors[0]
    loc = [str(part) for part in first.get("loc", ()) if part != "body"]
    # a union reports each alternative it tried (``str``, ``list[int]``...): keep the path the user wrote
    param = ".".join(part for part in loc if not (part.startswith(("list[", "function-")) or part in ("str", "int")))
    kind = first.get("type", "")
    if kind == "json_invalid":
        return APIError(400, f"the request body is not valid JSON: {first.get('ctx', {}).get('error', first['msg'])}")
    if kind == "model_attributes_type" and not param:
        return APIError(400, "the request body must be a JSON object")
    if kind == "missing" and param:
        return APIError(400, f"missing required parameter '{param}'", param=param, code="missing_required_parameter")
    if kind == "extra_forbidden":
        return APIError(
            400,
            f"unsupported parameter '{param}': this server does not implement it",
            param=param,
            code="unsupported_parameter",
        )
    message = first["msg"].removeprefix("Value error, ")
    return APIError(
        400, f"invalid '{param}': {message}" if param else message, param=param or None, code="invalid_value"
    )


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class StreamOptions(_Strict):
    include_usage: bool = False


class _Sampling(_Strict):
    """What both endpoints share."""

    model: str
    temperature: Annotated[float, Field(ge=0, le=2)] | None = None
    top_p: Annotated[float, Field(gt=0, le=1)] | None = None
    n: Annotated[int, Field(ge=1)] | None = None
    stream: bool | None = False
    stream_options: StreamOptions | None = None
    stop: Annotated[str | list[str] | None, Field(validate_default=True)] = None  # always a list once checked
    presence_penalty: Annotated[float, Field(ge=-2, le=2)] | None = None
    frequency_penalty: Annotated[float, Field(ge=-2, le=2)] | None = None
    logit_bias: dict[str, Annotated[float, Field(ge=-100, le=100)]] | None = None
    seed: Annotated[int, Field(ge=-(2**63), lt=2**63)] | None = None  # a signed 64-bit integer, as OpenAI's
    user: str | None = None  # a label of the end user (OpenAI uses it for abuse monitoring): accepted, unused

    @field_validator("stop")
    @classmethod
    def _stop(cls, value: str | list[str] | None) -> list[str]:
        stops = [] if value is None else [value] if isinstance(value, str) else value
        if len(stops) > MAX_STOP:
            raise ValueError(f"at most {MAX_STOP} stop sequences, got {len(stops)}")
        if any(not s for s in stops):
            raise ValueError("a stop sequence must not be empty")
        return stops

    @field_validator("logit_bias")
    @classmethod
    def _bias(cls, value: dict[str, float] | None) -> dict[str, float] | None:
        for key in value or {}:
            if not key.isdigit():
                raise ValueError(f"keys must be token ids (integers as strings), got {key!r}")
        return value

    @model_validator(mode="after")
    def _stream_options(self):
        if self.stream_options is not None and not self.stream:
            raise ValueError("stream_options is only allowed with stream=true")
        return self


Prompt = str | list[str] | list[int] | list[list[int]]


class CompletionRequest(_Sampling):
    """``POST /v1/completions``."""

    prompt: Prompt
    max_tokens: Annotated[int, Field(ge=1)] | None = 16
    logprobs: Annotated[int, Field(ge=0, le=5)] | None = None
    echo: bool | None = False
    best_of: Annotated[int, Field(ge=1)] | None = None
    suffix: str | None = None

    @field_validator("prompt")
    @classmethod
    def _prompt(cls, value: Prompt) -> Prompt:
        if isinstance(value, list):
            if not value:
                raise ValueError("the prompt list is empty")
            if any(isinstance(p, list) and not p for p in value):
                raise ValueError("a prompt of token ids is empty")
        return value

    @model_validator(mode="after")
    def _checks(self):
        if self.suffix is not None:
            raise ValueError("suffix (text after the insertion) is not supported: the model reads left to right")
        if self.best_of is not None and self.best_of != (self.n or 1):
            raise ValueError("best_of other than n is not supported (no server-side ranking of candidates)")
        if self.echo and self.logprobs is not None:
            raise ValueError("echo with logprobs is not supported (log-probabilities of prompt tokens)")
        return self


class TextPart(_Strict):
    type: Literal["text"]
    text: str


class Message(_Strict):
    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[TextPart]
    name: str | None = None

    def text(self) -> str:
        return self.content if isinstance(self.content, str) else "".join(part.text for part in self.content)


class ResponseFormat(_Strict):
    type: Literal["text"]


class ChatCompletionRequest(_Sampling):
    """``POST /v1/chat/completions``."""

    messages: Annotated[list[Message], Field(min_length=1)]
    max_tokens: Annotated[int, Field(ge=1)] | None = None
    max_completion_tokens: Annotated[int, Field(ge=1)] | None = None
    logprobs: bool | None = False
    top_logprobs: Annotated[int, Field(ge=0, le=20)] | None = None
    response_format: ResponseFormat | None = None

    @model_validator(mode="after")
    def _checks(self):
        if self.top_logprobs is not None and not self.logprobs:
            raise ValueError("top_logprobs needs logprobs=true")
        if self.max_tokens is not None and self.max_completion_tokens is not None:
            raise ValueError("give max_completion_tokens or max_tokens (its older name), not both")
        return self


__all__ = [
    "APIError",
    "ChatCompletionRequest",
    "CompletionRequest",
    "Message",
    "validation_error",
]
