"""The HTTP layer: OpenAI-compatible routes over the engine, errors in OpenAI's format, streaming by SSE.

Routes: ``POST /v1/completions``, ``POST /v1/chat/completions``, ``GET /v1/models`` (and
``/v1/models/{id}``), ``GET /health``, ``GET /metrics``. With an API key, the ``/v1`` routes want
``Authorization: Bearer KEY``; ``/health`` and ``/metrics`` stay open (they tell nothing about requests).

Every refusal is a JSON ``{"error": {...}}`` with the status that fits: 400 for a bad or unsupported
parameter, 401 for a missing or wrong key, 404 for an unknown model or route, 413 for a body over the size
limit, 415 for a body not sent as JSON, 429 when the queue is full, 503 while shutting down, 500 when the
engine failed the request. A client that goes away is noticed (at the next token when streaming, within a
quarter second otherwise) and its request leaves the batch.
"""

from __future__ import annotations

import asyncio
import contextlib
import email.message
import hmac
import json
import logging
import sys
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any

from fastapi import Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from starlette.exceptions import HTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send
from transformers import PreTrainedTokenizerBase

from densessm.files import RepeatedKeyError, unique_object
from densessm.serving.chat import ChatPrompt
from densessm.serving.engine import (
    Delta,
    Done,
    Engine,
    EngineClosed,
    Event,
    Failed,
    Finished,
    GenerationRequest,
    QueueFull,
)
from densessm.serving.metrics import ServerMetrics
from densessm.serving.protocol import (
    DEFAULT_COMPLETION_TOKENS,
    APIError,
    ChatCompletionRequest,
    CompletionRequest,
    validation_error,
)
from densessm.serving.sampling import SamplingParams, TokenLogprob

log = logging.getLogger("densessm.serve")

MAX_PROMPTS = 256  # prompts in one /v1/completions request
_POLL = 0.25  # seconds between checks that a waiting (non-streaming) client is still there
_LOGPROB_FLOOR = -9999.0  # JSON has no -inf: OpenAI's clients get a large negative number instead


@dataclass
class ServerSettings:
    """What the server promises its clients: its name, key and limits (the ``densessm serve`` flags)."""

    model_name: str
    api_key: str | None = None
    max_model_len: int = 2048
    max_prompt_tokens: int = 2047
    max_tokens: int = 1024
    max_n: int = 8
    max_request_bytes: int = 4 * 2**20
    created: int = field(default_factory=lambda: int(time.time()))


class _BodyLimit:
    """Refuse request bodies over ``max_bytes`` before they are buffered (413), by header or as they stream."""

    def __init__(self, app: ASGIApp, max_bytes: int):
        self.app, self.max_bytes = app, max_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        too_large = f"the request body is larger than the server's limit of {self.max_bytes} bytes"
        declared = dict(scope["headers"]).get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.max_bytes:
            await JSONResponse(APIError(413, too_large).body(), status_code=413)(scope, receive, send)
            return
        received = 0

        async def limited() -> Message:
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.max_bytes:
                    raise HTTPException(413, too_large)
            return message

        await self.app(scope, limited, send)


class _CountRequests:
    """Count answered requests by route and status (a plain ASGI wrapper: streams pass through untouched)."""

    def __init__(self, app: ASGIApp, metrics: ServerMetrics):
        self.app, self.metrics = app, metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        status = 500

        async def watch(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, watch)
        finally:
            endpoint = getattr(scope.get("route"), "path", "other")
            self.metrics.requests.labels(endpoint, str(status)).inc()


def _error_response(err: APIError) -> JSONResponse:
    return JSONResponse(err.body(), status_code=err.status, headers=err.headers)


def _logprob(value: float) -> float:
    return max(value, _LOGPROB_FLOOR)


class _Choices:
    """Accumulates a non-streamed response: text, finish reason and log-probabilities per choice."""

    def __init__(self, count: int, prefixes: list[str]):
        self.text = list(prefixes)
        self.reason: list[str | None] = [None] * count
        self.logprobs: list[list[TokenLogprob]] = [[] for _ in range(count)]

    def add(self, event: Event) -> None:
        if isinstance(event, Delta):
            self.text[event.choice] += event.text
            self.logprobs[event.choice] += event.logprobs or []
        elif isinstance(event, Finished):
            self.text[event.choice] += event.text
            self.reason[event.choice] = event.reason


class _Server:
    """The routes' shared state and helpers."""

    def __init__(
        self, engine: Engine, tokenizer: PreTrainedTokenizerBase, settings: ServerSettings, metrics: ServerMetrics
    ):
        self.engine, self.tokenizer, self.settings, self.metrics = engine, tokenizer, settings, metrics
        self.chat = ChatPrompt(tokenizer)
        self.vocab_size = engine.model.config.vocab_size

    # --- checks --------------------------------------------------------------------------------------------

    def check_key(self, request: Request) -> None:
        key = self.settings.api_key
        if key is None:
            return
        given = request.headers.get("authorization", "")
        scheme, _, token = given.partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip().encode(), key.encode()):
            raise APIError(
                401,
                "missing or incorrect API key: send the header 'Authorization: Bearer <key>'",
                code="invalid_api_key",
            )

    async def check_json(self, request: Request) -> None:
        """FastAPI parses a body only under a JSON content type (as its own rule, mirrored here: a form post or
        text/plain from a browser page must not reach the model); any other body would fail as "not a JSON
        object", blaming the body for the header. A key given twice in one object is refused: Python's parser
        keeps the last value without a word, where another client library or proxy may read the first."""
        encoded = _encoded(request)
        if encoded is not None:
            raise encoded
        given = request.headers.get("content-type")
        header = email.message.Message()
        header["content-type"] = given or ""
        subtype = header.get_content_subtype()
        if given and header.get_content_maintype() == "application" and subtype.split("+")[-1] == "json":
            repeated = _repeated_key(await request.body())
            if repeated is not None:
                raise APIError(
                    400,
                    f"the request body gives the key {repeated!r} twice in one object: send each parameter once",
                    param=repeated,
                )
            return
        raise APIError(
            415,
            "the request body must be JSON, sent with the header 'Content-Type: application/json' (this one came "
            f"with {f'Content-Type: {given[:80]}' if given else 'no Content-Type'})",
            code="unsupported_media_type",
        )

    def check_model(self, name: str) -> None:
        if name != self.settings.model_name:
            raise APIError(
                404,
                f"the model '{name}' does not exist: this server serves '{self.settings.model_name}'",
                param="model",
                code="model_not_found",
            )

    def check_prompt(self, tokens: list[int], what: str = "the prompt", param: str = "prompt") -> None:
        limit = self.settings.max_prompt_tokens
        if not tokens:
            raise APIError(400, f"{what} is empty", param=param)
        if len(tokens) > limit:
            raise APIError(
                400,
                f"{what} has {len(tokens)} tokens; this server accepts at most {limit} (--max-prompt-tokens)",
                param=param,
                code="context_length_exceeded",
            )
        bad = next((t for t in tokens if not 0 <= t < self.vocab_size), None)
        if bad is not None:
            raise APIError(
                400, f"token id {bad} is out of range for the model's vocabulary of {self.vocab_size}", param=param
            )

    def completion_budget(
        self, prompts: list[list[int]], asked: int | None, param: str = "max_tokens", default: int | None = None
    ) -> int:
        """``max_tokens`` as asked (checked against the limits), or when not asked ``default`` (a completion's 16,
        as OpenAI's) within the most the server and the context allow; ``param`` is the name the client gave it
        (chat's ``max_completion_tokens``)."""
        settings = self.settings
        room = settings.max_model_len - max(len(p) for p in prompts)
        if asked is None:
            if room < 1:
                raise APIError(
                    400,
                    f"the prompt fills the model's context of {settings.max_model_len} tokens: no room to answer",
                    param="messages",
                    code="context_length_exceeded",
                )
            return min(settings.max_tokens, room, default or settings.max_tokens)
        if asked > settings.max_tokens:
            raise APIError(
                400,
                f"{param} is {asked}; this server allows at most {settings.max_tokens} (--max-tokens)",
                param=param,
            )
        if asked > room:
            raise APIError(
                400,
                f"this model's context is {settings.max_model_len} tokens, but {max(len(p) for p in prompts)} "
                f"prompt tokens and {param} {asked} make {max(len(p) for p in prompts) + asked}; shorten the "
                f"prompt or lower {param}",
                param=param,
                code="context_length_exceeded",
            )
        return asked

    def sampling(self, body: CompletionRequest | ChatCompletionRequest, max_tokens: int, logprobs: int | None):
        n = body.n or 1
        if n > self.settings.max_n:
            raise APIError(400, f"n is {n}; this server allows at most {self.settings.max_n} (--max-n)", param="n")
        bias = {int(k): v for k, v in (body.logit_bias or {}).items()}
        bad = next((t for t in bias if t >= self.vocab_size), None)
        if bad is not None:
            raise APIError(
                400, f"logit_bias names token id {bad}, outside the vocabulary of {self.vocab_size}", param="logit_bias"
            )
        return n, SamplingParams(
            max_tokens=max_tokens,
            temperature=1.0 if body.temperature is None else body.temperature,
            top_p=1.0 if body.top_p is None else body.top_p,
            seed=body.seed,
            stop=tuple(body.stop),
            presence_penalty=body.presence_penalty or 0.0,
            frequency_penalty=body.frequency_penalty or 0.0,
            logit_bias=bias,
            logprobs=logprobs,
        )

    def check_tokenizer(self, tokens: list[int]) -> list[int]:
        """Tokens the server's tokenizer made: one beyond the model's vocabulary is the server's fault, not the
        client's (a tokenizer that does not fit the model)."""
        bad = next((t for t in tokens if t >= self.vocab_size), None)
        if bad is not None:
            raise APIError(
                500,
                f"the server's tokenizer gives token id {bad}, beyond the model's vocabulary of {self.vocab_size}: "
                "the server runs with a tokenizer that does not fit its model (densessm serve --tokenizer DIR)",
                type="server_error",
            )
        return tokens

    def completion_prompts(self, prompt: Any) -> list[list[int]]:
        if isinstance(prompt, str):
            prompts = [self.check_tokenizer(self.tokenizer(prompt)["input_ids"])]
        elif all(isinstance(p, int) for p in prompt):
            prompts = [list(prompt)]
        elif all(isinstance(p, str) for p in prompt):
            prompts = [self.check_tokenizer(self.tokenizer(p)["input_ids"]) for p in prompt]
        else:
            prompts = [list(p) for p in prompt]
        if len(prompts) > MAX_PROMPTS:
            raise APIError(400, f"{len(prompts)} prompts in one request; at most {MAX_PROMPTS}", param="prompt")
        for i, tokens in enumerate(prompts):
            self.check_prompt(tokens, "the prompt" if len(prompts) == 1 else f"prompt {i}")
        return prompts

    # --- running a request ---------------------------------------------------------------------------------

    def submit(self, prompts, params, n, boundaries=None) -> tuple[GenerationRequest, asyncio.Queue]:
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue[list[Event]] = asyncio.Queue()

        def emit(events: list[Event]) -> None:  # called in the engine's thread
            with contextlib.suppress(RuntimeError):  # the event loop has closed: nobody is listening any more
                loop.call_soon_threadsafe(queue.put_nowait, events)

        request = GenerationRequest(prompts, params, emit=emit, n=n, boundaries=boundaries)
        try:
            self.engine.submit(request)
        except QueueFull as err:
            raise APIError(
                429, str(err), type="rate_limit_exceeded", code="queue_full", headers={"Retry-After": "1"}
            ) from None
        except EngineClosed as err:
            raise APIError(503, str(err), type="service_unavailable") from None
        return request, queue

    async def events(
        self, request: GenerationRequest, queue: asyncio.Queue, http: Request | None
    ) -> AsyncIterator[Event]:
        """The request's events until it is done. ``http`` is polled for a disconnect every ``_POLL`` seconds,
        whether events come or not (a request waiting for its whole answer; a stream notices when it writes):
        then the events just end."""
        loop = asyncio.get_running_loop()
        polled = loop.time()
        while True:
            try:
                batch = await asyncio.wait_for(queue.get(), _POLL) if http is not None else await queue.get()
            except TimeoutError:
                batch = []
            if http is not None and loop.time() - polled >= _POLL:
                polled = loop.time()
                if await http.is_disconnected():
                    return
            for event in batch:
                if isinstance(event, Failed):
                    status_type = "service_unavailable" if event.status == 503 else "server_error"
                    raise APIError(event.status, event.message, type=status_type)
                yield event
                if isinstance(event, Done):
                    return

    async def collect(self, request: GenerationRequest, queue: asyncio.Queue, http: Request, choices: _Choices):
        """A whole answer: the final :class:`Done`, or None when the client left (the request is cancelled)."""
        try:
            async with contextlib.aclosing(self.events(request, queue, http)) as events:
                async for event in events:
                    choices.add(event)
                    if isinstance(event, Done):
                        return event
            return None
        finally:
            self.engine.cancel(request.id)  # a no-op for a request that is done

    def logprob_entry(self, lp: TokenLogprob) -> tuple[str, float, list[tuple[str, float]]]:
        top = [(self.tokenizer.decode([t]), _logprob(v)) for t, v in lp.top]
        return self.tokenizer.decode([lp.token]), _logprob(lp.logprob), top


def _usage(done: Done) -> dict[str, Any]:
    return {
        "prompt_tokens": done.prompt_tokens,
        "completion_tokens": done.completion_tokens,
        "total_tokens": done.prompt_tokens + done.completion_tokens,
        "prompt_tokens_details": {"cached_tokens": done.cached_tokens},
    }


def _sse(payload: dict[str, Any] | str) -> str:
    return f"data: {payload if isinstance(payload, str) else json.dumps(payload, ensure_ascii=False)}\n\n"


def _usage_head(body: Any, rid: str, kind: str, created: int, model: str) -> dict[str, Any] | None:
    """The fields of the last chunk that carries the usage, when the client asked for it."""
    if not (body.stream_options and body.stream_options.include_usage):
        return None
    return {"id": rid, "object": kind, "created": created, "model": model}


async def _event_stream(
    server: _Server,
    request: Any,
    queue: Any,
    head: list[dict[str, Any]],
    delta: Callable[[Delta], dict[str, Any]],
    finished: Callable[[Finished], dict[str, Any]],
    usage: dict[str, Any] | None,
) -> AsyncIterator[str]:
    """One streamed request as server-sent events: the ``head`` chunks, a chunk per delta and per finished
    choice, the usage chunk when asked, then ``[DONE]``. An error mid-stream becomes an error event; a client
    that leaves cancels the request (a no-op once it is done)."""
    try:
        for payload in head:
            yield _sse(payload)
        async with contextlib.aclosing(server.events(request, queue, None)) as events:
            async for event in events:
                if isinstance(event, Delta):
                    yield _sse(delta(event))
                elif isinstance(event, Finished):
                    yield _sse(finished(event))
                elif isinstance(event, Done) and usage is not None:
                    yield _sse({**usage, "choices": [], "usage": _usage(event)})
        yield _sse("[DONE]")
    except APIError as err:
        yield _sse(err.body())
        yield _sse("[DONE]")
    finally:
        server.engine.cancel(request.id)


def _encoded(request: Request) -> APIError | None:
    """A 415 for a body sent compressed (``Content-Encoding``), which this server does not decode: read as JSON
    as it is, it would be blamed for its bytes."""
    encoding = request.headers.get("content-encoding", "identity").strip().lower()
    if encoding in ("", "identity"):
        return None
    return APIError(
        415,
        f"the request body is sent with 'Content-Encoding: {encoding[:40]}', which this server does not decode: "
        "send it uncompressed",
        code="unsupported_media_type",
    )


def _repeated_key(body: bytes) -> str | None:
    """The first key that a JSON object of ``body`` gives twice (None also when the body is not JSON at all:
    FastAPI's own parse names that)."""
    try:
        json.loads(body, object_pairs_hook=unique_object)
    except RepeatedKeyError as err:
        return err.key
    except (ValueError, RecursionError):
        return None
    return None


def _unparsable_body(cause: BaseException) -> str:
    """Why the JSON decoder gave up on a body, in the client's terms (FastAPI says only that parsing failed)."""
    if isinstance(cause, UnicodeDecodeError):
        return (
            f"the request body is not valid UTF-8 JSON: byte 0x{cause.object[cause.start]:02x} at offset "
            f"{cause.start} ({cause.reason}); send JSON encoded as UTF-8"
        )
    if isinstance(cause, RecursionError):
        return "the request body nests arrays or objects too deeply to parse; no field of this API needs that depth"
    if isinstance(cause, ValueError) and "integer string conversion" in str(cause):
        return (
            f"the request body holds an integer of more than {sys.get_int_max_str_digits()} digits; "
            "no field of this API takes one"
        )
    return f"the request body cannot be parsed as JSON ({type(cause).__name__}: {cause})"


def create_app(
    engine: Engine,
    tokenizer: PreTrainedTokenizerBase,
    settings: ServerSettings,
    metrics: ServerMetrics,
    on_ready: Callable[[], None] | None = None,
) -> FastAPI:
    """The FastAPI application over ``engine``, whose loop the caller runs (:meth:`Engine.run` or
    :meth:`Engine.start`); it is stopped at shutdown, after uvicorn has drained the open requests."""
    server = _Server(engine, tokenizer, settings, metrics)

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        if on_ready is not None:
            on_ready()
        yield
        await asyncio.to_thread(engine.stop)

    app = FastAPI(title="densessm", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)
    app.add_middleware(_BodyLimit, max_bytes=settings.max_request_bytes)
    app.add_middleware(_CountRequests, metrics=metrics)

    @app.exception_handler(APIError)
    async def api_error(request: Request, err: APIError):
        return _error_response(err)

    @app.exception_handler(RequestValidationError)
    async def invalid(request: Request, err: RequestValidationError):
        return _error_response(validation_error(list(err.errors())))

    @app.exception_handler(HTTPException)
    async def http_error(request: Request, err: HTTPException):
        if err.__cause__ is not None and err.status_code == 400:  # FastAPI's "There was an error parsing the body"
            return _error_response(_encoded(request) or APIError(400, _unparsable_body(err.__cause__)))
        message = f"no route {request.method} {request.url.path}" if err.status_code == 404 else str(err.detail)
        return _error_response(APIError(err.status_code, message, code="not_found" if err.status_code == 404 else None))

    @app.exception_handler(Exception)
    async def internal(request: Request, err: Exception):
        log.exception("request failed")
        return _error_response(APIError(500, f"internal error ({type(err).__name__}): {err}", type="server_error"))

    authorized = [Depends(server.check_key)]
    json_body = [*authorized, Depends(server.check_json)]

    @app.get("/health")
    async def health():
        if not engine.alive:
            return JSONResponse({"status": "unavailable"}, status_code=503)
        return {"status": "ok", **engine.stats()}

    @app.get("/metrics")
    async def prometheus():
        return Response(metrics.render(), media_type=metrics.content_type)

    def model_card() -> dict[str, Any]:
        return {"id": settings.model_name, "object": "model", "created": settings.created, "owned_by": "densessm"}

    @app.get("/v1/models", dependencies=authorized)
    async def models():
        return {"object": "list", "data": [model_card()]}

    @app.get("/v1/models/{model_id:path}", dependencies=authorized)
    async def model(model_id: str):
        server.check_model(model_id)
        return model_card()

    @app.post("/v1/completions", dependencies=json_body)
    async def completions(body: CompletionRequest, http: Request):
        server.check_model(body.model)
        prompts = server.completion_prompts(body.prompt)
        max_tokens = server.completion_budget(prompts, body.max_tokens, default=DEFAULT_COMPLETION_TOKENS)
        n, params = server.sampling(body, max_tokens, body.logprobs)
        request, queue = server.submit(prompts, params, n)
        rid, created = f"cmpl-{request.id}", int(time.time())
        echoes = [tokenizer.decode(p) if body.echo else "" for p in prompts for _ in range(n)]

        def logprobs(entries: list[TokenLogprob], offset: int) -> dict[str, Any] | None:
            if body.logprobs is None or not entries:  # a stream's last chunk carries no token
                return None
            tokens, values, tops, offsets = [], [], [], []
            for entry in entries:
                token, value, top = server.logprob_entry(entry)
                tokens.append(token)
                values.append(value)
                tops.append(dict(top))
                offsets.append(offset)
                offset += len(token)
            return {"tokens": tokens, "token_logprobs": values, "top_logprobs": tops, "text_offset": offsets}

        def chunk(choice: int, text: str, reason: str | None, entries=None, offset=0) -> dict[str, Any]:
            return {
                "id": rid,
                "object": "text_completion",
                "created": created,
                "model": settings.model_name,
                "choices": [
                    {
                        "index": choice,
                        "text": text,
                        "logprobs": logprobs(entries or [], offset),
                        "finish_reason": reason,
                    }
                ],
            }

        if body.stream:
            sent = [0] * len(echoes)

            def delta(event: Delta) -> dict[str, Any]:
                payload = chunk(event.choice, event.text, None, event.logprobs, sent[event.choice])
                sent[event.choice] += sum(len(server.logprob_entry(e)[0]) for e in event.logprobs or [])
                return payload

            stream = _event_stream(
                server,
                request,
                queue,
                head=[chunk(choice, echo, None) for choice, echo in enumerate(echoes) if echo],
                delta=delta,
                finished=lambda event: chunk(event.choice, event.text, event.reason),
                usage=_usage_head(body, rid, "text_completion", created, settings.model_name),
            )
            return StreamingResponse(stream, media_type="text/event-stream")

        collected = _Choices(len(echoes), echoes)
        done = await server.collect(request, queue, http, collected)
        if done is None:  # the client left
            return Response(status_code=499)
        return {
            "id": rid,
            "object": "text_completion",
            "created": created,
            "model": settings.model_name,
            "choices": [
                {"index": i, "text": text, "logprobs": logprobs(collected.logprobs[i], 0), "finish_reason": reason}
                for i, (text, reason) in enumerate(zip(collected.text, collected.reason, strict=True))
            ],
            "usage": _usage(done),
        }

    @app.post("/v1/chat/completions", dependencies=json_body)
    async def chat_completions(body: ChatCompletionRequest, http: Request):
        server.check_model(body.model)
        tokens, boundaries = server.chat.encode(body.messages)
        server.check_tokenizer(tokens)
        server.check_prompt(tokens, "the rendered conversation", param="messages")
        asked = "max_tokens" if body.max_completion_tokens is None else "max_completion_tokens"
        max_tokens = server.completion_budget([tokens], getattr(body, asked), asked)
        logprobs = (body.top_logprobs or 0) if body.logprobs else None
        n, params = server.sampling(body, max_tokens, logprobs)
        request, queue = server.submit([tokens], params, n, [boundaries])
        rid, created = f"chatcmpl-{request.id}", int(time.time())

        def content_logprobs(entries: list[TokenLogprob]) -> dict[str, Any] | None:
            if not body.logprobs or not entries:  # a stream's first and last chunks carry no token
                return None
            content = []
            for entry in entries:
                token, value, top = server.logprob_entry(entry)
                content.append(
                    {
                        "token": token,
                        "logprob": value,
                        "bytes": list(token.encode()),
                        "top_logprobs": [{"token": t, "logprob": v, "bytes": list(t.encode())} for t, v in top],
                    }
                )
            return {"content": content}

        def chunk(choice: int, delta: dict[str, Any], reason: str | None, entries=None) -> dict[str, Any]:
            return {
                "id": rid,
                "object": "chat.completion.chunk",
                "created": created,
                "model": settings.model_name,
                "choices": [
                    {
                        "index": choice,
                        "delta": delta,
                        "logprobs": content_logprobs(entries or []),
                        "finish_reason": reason,
                    }
                ],
            }

        if body.stream:
            stream = _event_stream(
                server,
                request,
                queue,
                head=[chunk(choice, {"role": "assistant", "content": ""}, None) for choice in range(n)],
                delta=lambda event: chunk(event.choice, {"content": event.text}, None, event.logprobs),
                finished=lambda event: chunk(event.choice, {"content": event.text} if event.text else {}, event.reason),
                usage=_usage_head(body, rid, "chat.completion.chunk", created, settings.model_name),
            )
            return StreamingResponse(stream, media_type="text/event-stream")

        collected = _Choices(n, [""] * n)
        done = await server.collect(request, queue, http, collected)
        if done is None:  # the client left
            return Response(status_code=499)
        return {
            "id": rid,
            "object": "chat.completion",
            "created": created,
            "model": settings.model_name,
            "choices": [
                {
                    "index": i,
                    "message": {"role": "assistant", "content": text},
                    "logprobs": content_logprobs(collected.logprobs[i]),
                    "finish_reason": reason,
                }
                for i, (text, reason) in enumerate(zip(collected.text, collected.reason, strict=True))
            ],
            "usage": _usage(done),
        }

    return app


__all__ = ["MAX_PROMPTS", "ServerSettings", "create_app"]
