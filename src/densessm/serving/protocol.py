"""The OpenAI API's request bodies, as this server accepts them, and its error format.

Every parameter the OpenAI API defines for ``/v1/completions`` and ``/v1/chat/completions`` is either
honoured or refused with a 400 naming it; nothing is silently ignored (``user`` alone is accepted and unused:
it only labels the caller). Unknown parameters are refused the same way, so a typo never goes unnoticed.
Values are what they claim to be: text is Unicode (JSON can escape a lone surrogate, which no tokenizer
reads), token ids are integers and numbers are not booleans (pydantic would read ``true`` as 1).
Limits that depend on the server (``n``, prompt and completion lengths) are checked where the prompt has
been tokenized (:mod:`densessm.serving.app`).
"""

from __future__ import annotations

import json
import math
from typing import Annotated, Any, Literal

from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    Strict,
    ValidationError,
    field_validator,
    model_validator,
)

MAX_STOP = 4  # stop sequences per request, as OpenAI allows
DEFAULT_COMPLETION_TOKENS = 16  # a completion's max_tokens when not given, as in OpenAI's API
MAX_TOKEN_ID_DIGITS = 12  # a logit_bias key longer than this is no token id of any vocabulary


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
        # a message may quote the request, and a lone surrogate there would make the JSON answer unencodable
        message = message.encode("utf-8", "backslashreplace").decode()
        param = None if param is None else param.encode("utf-8", "backslashreplace").decode()
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type, param, code
        self.headers = headers

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


def validation_error(err: ValidationError | list[dict[str, Any]]) -> APIError:
    """One clear 400 for the first problem pydantic found (FastAPI's ``RequestValidationError.errors()``)."""
    errors = err.errors() if isinstance(err, ValidationError) else err
    # a union reports a failure per alternative it tried: a check of ours (a value error) is the one that fits,
    # else the alternative that went deepest into the value (a list of parts missing a field, not "a string")
    first = next((e for e in errors if e.get("type") == "value_error"), None)
    first = first or max(errors, key=lambda e: len(e.get("loc", ())))
    loc = [str(part) for part in first.get("loc", ()) if part != "body"]
    # a union reports each alternative it tried (``str``, ``list[int]``...): keep the path the user wrote
    param = ".".join(part for part in loc if not (part.startswith(("list[", "function-")) or part in ("str", "int")))
    kind = first.get("type", "")
    if kind == "json_invalid":
        return APIError(400, f"the request body is not valid JSON: {first.get('ctx', {}).get('error', first['msg'])}")
    if kind == "model_attributes_type" and not param:
        return APIError(400, "the request body must be a JSON object")
    if kind == "missing" and not param:  # no body at all: FastAPI reports the body itself as a missing field
        return APIError(400, "the request body is empty: send the request's parameters as a JSON object")
    if kind == "string_unicode":  # a key holding a lone surrogate (values are checked by ``Text``)
        where = f"a key in '{param}'" if param else "a parameter name"
        return APIError(400, f"{where} is not valid Unicode text (it holds a lone surrogate)", param=param or None)
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


def _shown(value: Any) -> str:
    """A request value as JSON, cut short: for messages that quote what the client sent."""
    text = json.dumps(value, ensure_ascii=True)
    return text if len(text) <= 40 else text[:37] + "..."


def _unicode(value: str, where: str = "the text ") -> str:
    """``value`` if it is Unicode text. JSON may hold a lone surrogate (``"\\ud800"``), which no tokenizer reads
    and no UTF-8 encodes: refused here, with its place, rather than failing deep in the tokenizer."""
    try:
        value.encode("utf-8")
    except UnicodeEncodeError as err:
        raise ValueError(
            f"{where}holds a lone surrogate \\u{ord(value[err.start]):04x} at character {err.start}: not valid "
            "Unicode text (send the character's UTF-8, or its surrogate pair)"
        ) from None
    return value


def _a_number(value: Any) -> Any:
    """JSON's true/false and strings are not numbers: without this, pydantic would read them as 1 and 0, and "3"
    as 3 (OpenAI's API refuses both). Nor are NaN and Infinity, which Python's parser reads."""
    if isinstance(value, bool | str):
        raise ValueError(f"expected a number, got {_shown(value)}")
    if isinstance(value, float) and not math.isfinite(value):  # JSON's NaN/Infinity: named, not "should be >= 0"
        raise ValueError(f"expected a finite number, got {_shown(value)}")
    return value


def _token_ids(ids: list[Any], where: str) -> None:
    for i, token in enumerate(ids):
        if isinstance(token, bool) or not isinstance(token, int):
            raise ValueError(f"{where}[{i}] is {_shown(token)}: a token id is an integer")


Text = Annotated[str, AfterValidator(_unicode)]
Int = Annotated[int, BeforeValidator(_a_number)]
Float = Annotated[float, BeforeValidator(_a_number)]
Bool = Annotated[bool, Strict()]  # pydantic would read "yes", "on", 1 and 0 as booleans


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class StreamOptions(_Strict):
    include_usage: Bool = False


class _Sampling(_Strict):
    """What both endpoints share."""

    model: Text
    temperature: Annotated[Float, Field(ge=0, le=2)] | None = None
    top_p: Annotated[Float, Field(gt=0, le=1)] | None = None
    n: Annotated[Int, Field(ge=1)] | None = None
    stream: Bool | None = False
    stream_options: StreamOptions | None = None
    stop: Annotated[Text | list[Text] | None, Field(validate_default=True)] = None  # always a list once checked
    presence_penalty: Annotated[Float, Field(ge=-2, le=2)] | None = None
    frequency_penalty: Annotated[Float, Field(ge=-2, le=2)] | None = None
    logit_bias: dict[str, Annotated[Float, Field(ge=-100, le=100)]] | None = None
    # the sampler's generator (torch's CPU Mersenne Twister) keeps 32 bits of a seed: wider ones gave other seeds'
    # samples (2**32 drew as 0), so they are refused, as the CLI refuses them
    seed: Annotated[Int, Field(ge=0, lt=2**32)] | None = None
    user: Text | None = None  # a label of the end user (OpenAI uses it for abuse monitoring): accepted, unused

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
            if key.startswith("-") and key[1:].isascii() and key[1:].isdigit():
                raise ValueError(f"keys must be token ids, which are >= 0, got {_shown(key)}")
            if not (key.isascii() and key.isdigit()):  # str.isdigit alone takes "٣" and "²"
                raise ValueError(f"keys must be token ids (integers as strings), got {_shown(key)}")
            if len(key) > MAX_TOKEN_ID_DIGITS:
                raise ValueError(f"token id {key[:MAX_TOKEN_ID_DIGITS]}... is out of any vocabulary's range")
            if len(key) > 1 and key.startswith("0"):  # "07" and "7" would both bias token 7, the last one winning
                raise ValueError(f"keys must be token ids without leading zeros, got {_shown(key)}")
        return value

    @model_validator(mode="after")
    def _stream_options(self):
        if self.stream_options is not None and not self.stream:
            raise ValueError("stream_options is only allowed with stream=true")
        if self.seed is not None and self.seed + (self.n or 1) > 2**32:  # completion i draws with seed + i
            raise ValueError(f"seed + n must be at most 2**32 (completion i draws with seed + i), got {self.seed}")
        return self


Prompt = str | list[str] | list[int] | list[list[int]]


class CompletionRequest(_Sampling):
    """``POST /v1/completions``."""

    prompt: Prompt
    max_tokens: Annotated[Int, Field(ge=1)] | None = None  # absent or null: DEFAULT_COMPLETION_TOKENS
    logprobs: Annotated[Int, Field(ge=0, le=5)] | None = None
    echo: Bool | None = False
    best_of: Annotated[Int, Field(ge=1)] | None = None
    suffix: Text | None = None

    @field_validator("prompt", mode="before")
    @classmethod
    def _prompt(cls, value: Any) -> Any:
        """Checked by hand, before the union: pydantic would read true as token id 1, and report a wrong
        element as a failure of every alternative ("Input should be a valid string")."""
        if isinstance(value, str):
            return _unicode(value)
        if not isinstance(value, list):
            raise ValueError(
                f"expected a string, a list of strings, a list of token ids or a list of lists of them, got "
                f"{_shown(value)}"
            )
        if not value:
            raise ValueError("the prompt list is empty")
        kinds = ["text" if isinstance(p, str) else "ids" if isinstance(p, list) else "id" for p in value]
        odd = next((i for i, kind in enumerate(kinds) if kind != kinds[0]), None)
        if odd is not None:
            raise ValueError(
                f"prompt[{odd}] is {_shown(value[odd])} but prompt[0] is {_shown(value[0])}: a list holds only "
                "strings, only token ids, or only lists of token ids"
            )
        if kinds[0] == "text":
            for i, text in enumerate(value):
                _unicode(text, f"prompt[{i}] ")
        elif kinds[0] == "ids":
            for i, ids in enumerate(value):
                if not ids:
                    raise ValueError(f"prompt[{i}] is an empty list of token ids")
                _token_ids(ids, f"prompt[{i}]")
        else:
            _token_ids(value, "prompt")
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
    text: Text

    @model_validator(mode="before")
    @classmethod
    def _text_only(cls, data: Any) -> Any:
        kind = data.get("type") if isinstance(data, dict) else None
        if kind is not None and kind != "text":  # an image or audio part: named, not "Input should be a valid string"
            raise ValueError(f"content parts of type {_shown(kind)} are not supported: this model reads text only")
        return data


class Message(_Strict):
    role: Literal["system", "developer", "user", "assistant"]
    content: Text | list[TextPart]
    name: Text | None = None

    def text(self) -> str:
        return self.content if isinstance(self.content, str) else "".join(part.text for part in self.content)


class ResponseFormat(_Strict):
    type: Literal["text"]


class ChatCompletionRequest(_Sampling):
    """``POST /v1/chat/completions``."""

    messages: Annotated[list[Message], Field(min_length=1)]
    max_tokens: Annotated[Int, Field(ge=1)] | None = None
    max_completion_tokens: Annotated[Int, Field(ge=1)] | None = None
    logprobs: Bool | None = False
    top_logprobs: Annotated[Int, Field(ge=0, le=20)] | None = None
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
