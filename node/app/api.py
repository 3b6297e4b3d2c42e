"""An OpenAI-compatible HTTP API over the swarm: /v1/chat/completions, /v1/completions, /v1/models.

Any OpenAI client can use the swarm through it. Every request runs on its own chain session
through the same `ChatEngine` the CLI and the chat window use; requests are served concurrently
(nothing here serialises them). Wire shapes live in `node.app.api_schema`.

Bounds before work: at accept, before any HTTP is parsed, `node.app.api_gate.ConnectionGate` bounds the
connections served and parked per source address and in all (`serve`). `node.app.api_guard.Guard`, in front of
every route, checks the API key (required when the API listens beyond loopback), the body's size from its headers
and each caller's fair share before a byte of the body is read. A prompt longer than the context could hold at
`MAX_CHARS_PER_TOKEN` is refused before tokenizing, and tokenizing runs on a worker thread, so one caller's prompt
never stalls the others. `max_tokens` is bounded by the context and by the longest session the swarm's nodes
announce room for.

    app = create_app(DEFAULT_MODEL, initial_peers)   # or: layerhive api --initial-peers ADDR
"""

from __future__ import annotations

import asyncio
import ipaddress
import json
import logging
import os
import secrets
from collections.abc import AsyncIterator, Callable, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse
from hivemind.p2p import P2PDaemonError, P2PHandlerError
from starlette.exceptions import HTTPException as StarletteHTTPException

from node.app.api_gate import ConnectionGate, gated_protocol, uvicorn_protocol
from node.app.api_guard import MAX_BODY_BYTES, FairShare, Guard
from node.app.api_schema import (
    APIError,
    ChatCompletionRequest,
    CompletionRequest,
    SamplingRequest,
    chat_chunk,
    chat_completion,
    invalid_request,
    model_object,
    new_id,
    now,
    text_completion,
    usage,
)
from node.client.chat import ChatEngine, Message, TextRevision, TextStreamer
from node.client.failover import Revision
from node.client.session import NoChainError, connect
from node.model.checkpoint import MODEL_ALIASES, resolve_model
from node.model.sampling import SamplingParams
from node.net.protocol import RemoteError

logger = logging.getLogger(__name__)

# When a request gives no max_tokens: OpenAI would allow the rest of the context, but every node of the
# chain reserves KV cache for the whole session up front, so an unbounded default would crowd a shared swarm.
DEFAULT_MAX_TOKENS = 512
# Refused before tokenizing: a prompt of more characters than the context holds at this many per token (text
# averages about 4; 16 leaves room for long tokens such as runs of spaces, and bounds the tokenizer's work).
MAX_CHARS_PER_TOKEN = 16
# A body's limit comes from the served model's context: its prompt at MAX_CHARS_PER_TOKEN, each character at most
# this many bytes in JSON (4 covers UTF-8; honest text runs ~4 characters a token, so even \uXXXX escapes fit), and
# room for the rest of the request. Larger bodies are refused by their Content-Length, before a byte is read.
MAX_BODY_BYTES_PER_CHAR = 4
BODY_OVERHEAD_BYTES = 64 << 10
API_KEY_ENV = "LAYERHIVE_API_KEY"

# Failures of the swarm itself (not of the request): answered 503 / 502 so clients may retry.
SWARM_ERRORS: tuple[type[Exception], ...] = (
    NoChainError, RemoteError, ConnectionError, P2PDaemonError, P2PHandlerError, asyncio.TimeoutError,
)


# ----------------------------------------------------------------------------------------- text generation


class StopSequences:
    """Cuts streamed text before the first stop sequence, holding back any tail that may start one."""

    def __init__(self, stops: Sequence[str]) -> None:
        self.stops = [s for s in stops if s]
        self.pending = ""

    def push(self, text: str) -> tuple[str, bool]:
        """Adds text; returns (text safe to emit, whether a stop sequence was hit)."""
        self.pending += text
        hits = [i for i in (self.pending.find(s) for s in self.stops) if i >= 0]
        if hits:
            emit, self.pending = self.pending[: min(hits)], ""
            return emit, True
        hold = max((k for s in self.stops for k in range(1, len(s)) if self.pending.endswith(s[:k])), default=0)
        cut = len(self.pending) - hold
        emit, self.pending = self.pending[:cut], self.pending[cut:]
        return emit, False

    def flush(self) -> str:
        """The held-back tail, once the text is known to end without a stop sequence."""
        emit, self.pending = self.pending, ""
        return emit


class Generation:
    """One request's run through the swarm: token ids to text deltas, stop sequences applied, tokens counted."""

    def __init__(self, engine: ChatEngine, prompt_ids: list[int], params: SamplingParams,
                 stops: Sequence[str]) -> None:
        self.prompt_tokens = len(prompt_ids)
        self.completion_tokens = 0
        self.finish_reason: str | None = None
        self._tokens = engine.stream_tokens(prompt_ids, params)
        self._stop_token_ids = set(params.stop_token_ids)
        self._text = TextStreamer(engine.tokenizer)
        self._stops = StopSequences(stops)
        self._first: int | None = None
        self._emitted = 0  # characters of text streamed to the caller so far

    async def start(self) -> None:
        """Chooses a chain, opens the session and decides the first token, so that a swarm failure
        raises here, before any response byte is sent, and still gets its HTTP status."""
        try:
            self._first = await anext(self._tokens)  # stream_tokens yields at least one token
        except BaseException:
            await self.aclose()
            raise

    async def deltas(self) -> AsyncIterator[str | TextRevision]:
        """Text deltas; a `TextRevision` when a lying node was caught after text it made was streamed."""
        assert self._first is not None, "start() first"
        try:
            token: int | Revision | None = self._first
            while token is not None:
                if isinstance(token, Revision):
                    if revision := self._revise(token):
                        yield revision
                    token = await anext(self._tokens, None)
                    continue
                self.completion_tokens += 1
                # generation only ends after a stop token or at max_new_tokens
                self.finish_reason = "stop" if token in self._stop_token_ids else "length"
                text, hit_stop = self._stops.push(self._text.push(token))
                if text:
                    self._emitted += len(text)
                    yield text
                if hit_stop:
                    self.finish_reason = "stop"
                    return
                token = await anext(self._tokens, None)
            if tail := self._stops.flush():
                yield tail
        finally:
            await self.aclose()  # frees the session on every node now, not when the generator is collected

    async def text(self) -> str:
        """The whole answer, revisions applied."""
        text = ""
        async for delta in self.deltas():
            text = text[:delta.keep_chars] if isinstance(delta, TextRevision) else text + delta
        return text

    def _revise(self, revision: Revision) -> TextRevision | None:
        """Rewinds to the tokens that stand; a TextRevision if text already streamed does not."""
        self.completion_tokens = revision.keep
        keep = self._text.revise(revision.keep)
        if keep >= self._emitted:  # only held-back text changed: the caller need not know
            self._stops.pending = self._text.emitted[self._emitted:]
            return None
        self._stops.pending, self._emitted = "", keep
        return TextRevision(keep)

    async def aclose(self) -> None:
        await self._tokens.aclose()

    def usage(self) -> dict[str, int]:
        return usage(self.prompt_tokens, self.completion_tokens)


# -------------------------------------------------------------------------------------------- the served model


@dataclass
class ServedModel:
    engine: ChatEngine
    names: frozenset[str]  # the canonical name and its aliases, as a request's `model` may give them
    created: int
    default_max_tokens: int

    @property
    def id(self) -> str:
        return self.engine.source.name

    def check_model(self, requested: str) -> None:
        if requested not in self.names:
            raise APIError(404, f"The model `{requested}` does not exist or is not served here; "
                           f"this server serves `{self.id}`.", param="model", code="model_not_found")

    @property
    def max_body_bytes(self) -> int:
        """The largest request body a prompt that may fit the context can need (see MAX_BODY_BYTES_PER_CHAR)."""
        return self.engine.max_context * MAX_CHARS_PER_TOKEN * MAX_BODY_BYTES_PER_CHAR + BODY_OVERHEAD_BYTES

    def check_prompt_chars(self, chars: int, prompt_param: str) -> None:
        """Refuses, before any tokenizing, a prompt too long to fit the context whatever its tokens."""
        most = self.engine.max_context * MAX_CHARS_PER_TOKEN
        if chars > most:
            raise invalid_request(
                f"This model's maximum context length is {self.engine.max_context} tokens, and your prompt has "
                f"{chars} characters (more than {most}, which no text of that many tokens reaches). "
                "Please reduce the length of the prompt.", prompt_param, "context_length_exceeded")

    def sampling_params(self, request: SamplingRequest, limit: int | None, prompt_tokens: int,
                        prompt_param: str, swarm_room: int | None = None) -> SamplingParams:
        """`swarm_room`: the longest session (prompt and completion) the swarm's nodes announce room for now."""
        context = self.engine.max_context
        room = context - prompt_tokens
        if room < 1 or (limit is not None and limit > room):
            wanted = limit if limit is not None else 1
            raise invalid_request(
                f"This model's maximum context length is {context} tokens. However, you requested "
                f"{prompt_tokens + wanted} tokens ({prompt_tokens} in the prompt, {wanted} for the completion). "
                "Please reduce the length of the prompt or of the completion.",
                prompt_param, "context_length_exceeded",
            )
        if swarm_room is not None:
            room = min(room, swarm_room - prompt_tokens)
            if room < 1:
                raise APIError(503, f"The swarm has no room for a session of {prompt_tokens + 1} tokens right now "
                               f"(at most {swarm_room}); try again later or with a shorter prompt.",
                               type="service_unavailable", code="no_capacity")
            if limit is not None and limit > room:
                raise invalid_request(
                    f"The swarm can hold sessions of at most {swarm_room} tokens right now. However, you requested "
                    f"{prompt_tokens + limit} tokens ({prompt_tokens} in the prompt, {limit} for the completion). "
                    "Please reduce max_tokens.", "max_tokens", "context_length_exceeded")
        return SamplingParams(
            max_new_tokens=limit if limit is not None else min(self.default_max_tokens, room),
            temperature=request.temperature, top_p=request.top_p, seed=request.seed,
            stop_token_ids=self.engine.stop_token_ids(),
        )


def served(request: Request) -> ServedModel:
    return request.app.state.served


# ------------------------------------------------------------------------------------------------------ errors


def error_for(e: Exception) -> APIError:
    if isinstance(e, APIError):
        return e
    if isinstance(e, NoChainError):
        return APIError(503, f"The swarm cannot serve this model right now: {e}", type="service_unavailable",
                        code="no_chain")
    if isinstance(e, SWARM_ERRORS) and getattr(e, "code", None) == "no_capacity":  # a stage refused the session
        return APIError(503, f"The swarm is full right now: {e}", type="service_unavailable", code="no_capacity")
    if isinstance(e, SWARM_ERRORS):
        return APIError(502, f"A node of the chain failed: {type(e).__name__}: {e}", type="server_error",
                        code="swarm_error")
    return APIError(500, f"Internal error: {type(e).__name__}: {e}", type="server_error")


def _param_from_loc(loc: Sequence[Any]) -> str | None:
    """('body', 'messages', 0, 'role') -> 'messages.[0].role', OpenAI's spelling; stops at pydantic's
    union-branch labels such as 'list[int]'."""
    parts: list[str] = []
    for segment in loc[1:] if loc and loc[0] == "body" else loc:
        if isinstance(segment, int):
            parts.append(f"[{segment}]")
        elif segment.isidentifier() and segment not in {"str", "int", "float", "bool", "list", "dict"}:
            parts.append(segment)
        else:
            break
    return ".".join(parts) or None


def validation_error(exc: RequestValidationError) -> APIError:
    errors = exc.errors()
    for error in errors:
        if error.get("type") == "json_invalid":
            detail = error.get("ctx", {}).get("error", error.get("msg"))
            return invalid_request(f"We could not parse the JSON body of your request: {detail}. "
                                   "The API expects a JSON object.")
    if not errors:
        return invalid_request("Invalid request body.")
    error = errors[0]
    param = _param_from_loc(error.get("loc", ()))
    value = error.get("input")
    got = f" (got {value!r})" if isinstance(value, int | float | str | bool) and error["type"] != "missing" else ""
    where = f"'{param}'" if param else "request body"
    return invalid_request(f"Invalid {where}: {error.get('msg')}{got}.", param)


def _install_error_handlers(app: FastAPI) -> None:
    def respond(error: APIError) -> JSONResponse:
        return JSONResponse(error.body(), status_code=error.status)

    async def on_api_error(request: Request, exc: Exception) -> JSONResponse:
        error = error_for(exc)
        if error.status >= 500:
            logger.warning("%s %s failed: %s", request.method, request.url.path, error.message)
        return respond(error)

    async def on_validation_error(request: Request, exc: Exception) -> JSONResponse:
        assert isinstance(exc, RequestValidationError)
        if request.method == "POST" and "json" not in request.headers.get("content-type", ""):
            # FastAPI reads only JSON-typed bodies; say why the body looked empty rather than "not an object"
            return respond(invalid_request("Send the request body as JSON, with Content-Type: application/json."))
        return respond(validation_error(exc))

    async def on_http_error(request: Request, exc: Exception) -> JSONResponse:
        assert isinstance(exc, StarletteHTTPException)
        code = "not_found" if exc.status_code == 404 else None
        return respond(APIError(exc.status_code, str(exc.detail), code=code))

    app.add_exception_handler(RequestValidationError, on_validation_error)
    app.add_exception_handler(StarletteHTTPException, on_http_error)
    for cls in (APIError, *SWARM_ERRORS, Exception):
        app.add_exception_handler(cls, on_api_error)


# ------------------------------------------------------------------------------------------------------- routes


def _sse(payload: dict[str, Any] | str) -> str:
    data = payload if isinstance(payload, str) else json.dumps(payload, ensure_ascii=False)
    return f"data: {data}\n\n"


async def _events(generation: Generation, *, first: dict[str, Any] | None, delta: Callable[[str], dict],
                  last: Callable[[], dict], usage_chunk: Callable[[], dict] | None) -> AsyncIterator[str]:
    """Server-sent events: `first` (if any), one chunk per text delta, the finish chunk, the usage chunk (if
    asked), then `[DONE]`. Once streaming, errors can only travel in the stream, as an `error` event."""
    try:
        if first is not None:
            yield _sse(first)
        async for text in generation.deltas():
            # A revision is an event of its own, which OpenAI clients ignore (see the README: Trust).
            yield _sse({"object": "layerhive.revision", "keep_chars": text.keep_chars}
                       if isinstance(text, TextRevision) else delta(text))
        yield _sse(last())
        if usage_chunk is not None:
            yield _sse(usage_chunk())
        yield _sse("[DONE]")
    except Exception as e:
        logger.warning("stream failed: %s", e)
        yield _sse(error_for(e).body())
    finally:
        await generation.aclose()  # also when the client went away before the first delta


async def _run(model: ServedModel, request: SamplingRequest, prompt_ids: list[int], limit: int | None,
               prompt_param: str) -> Generation:
    if not prompt_ids:
        raise invalid_request("The prompt is empty.", prompt_param)
    swarm_room = await model.engine.client.session_room()
    params = model.sampling_params(request, limit, len(prompt_ids), prompt_param, swarm_room)
    generation = Generation(model.engine, prompt_ids, params, request.stop_sequences())
    await generation.start()
    return generation


_STREAM_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}


def _add_routes(app: FastAPI) -> None:
    @app.get("/v1/models")
    async def list_models(request: Request) -> dict[str, Any]:
        model = served(request)
        return {"object": "list", "data": [model_object(model.id, model.created)]}

    @app.get("/v1/models/{model_id:path}")
    async def retrieve_model(model_id: str, request: Request) -> dict[str, Any]:
        model = served(request)
        model.check_model(model_id)
        return model_object(model.id, model.created)

    @app.post("/v1/chat/completions")
    async def chat_completions(body: ChatCompletionRequest, request: Request) -> Any:
        model = served(request)
        body.check_supported()
        model.check_model(body.model)
        messages = [Message("system" if m.role == "developer" else m.role, m.text(i))
                    for i, m in enumerate(body.messages)]
        model.check_prompt_chars(sum(len(m.content) for m in messages), "messages")
        prompt_ids = await asyncio.to_thread(model.engine.chat_prompt_ids, messages)
        generation = await _run(model, body, prompt_ids, body.token_limit(), "messages")
        response_id, created = new_id("chatcmpl"), now()
        if not body.stream:
            text = await generation.text()
            assert generation.finish_reason is not None
            return chat_completion(response_id, created, model.id, text, generation.finish_reason, generation.usage())

        with_usage = body.include_usage()

        def chunk(delta: dict[str, Any] | None, finish: str | None = None) -> dict[str, Any]:
            return chat_chunk(response_id, created, model.id, delta, finish, with_usage_field=with_usage)

        events = _events(
            generation,
            first=chunk({"role": "assistant", "content": ""}),
            delta=lambda text: chunk({"content": text}),
            last=lambda: chunk({}, generation.finish_reason),
            usage_chunk=(lambda: chat_chunk(response_id, created, model.id, None, with_usage_field=True,
                                            usage_counts=generation.usage())) if with_usage else None,
        )
        return StreamingResponse(events, media_type="text/event-stream", headers=_STREAM_HEADERS)

    @app.post("/v1/completions")
    async def completions(body: CompletionRequest, request: Request) -> Any:
        model = served(request)
        body.check_supported()
        model.check_model(body.model)
        prompt = body.prompt
        if isinstance(prompt, list) and all(isinstance(t, int) for t in prompt):
            prompt_ids = [int(t) for t in prompt]  # too many for the context: refused by sampling_params
            vocab = model.engine.vocab_size
            if any(not 0 <= t < vocab for t in prompt_ids):
                raise invalid_request(f"Token ids in the prompt must be in [0, {vocab}).", "prompt")
        else:
            text = prompt if isinstance(prompt, str) else prompt[0] if prompt else ""
            model.check_prompt_chars(len(text), "prompt")
            prompt_ids = await asyncio.to_thread(model.engine.completion_prompt_ids, text)
        generation = await _run(model, body, prompt_ids, body.token_limit(), "prompt")
        response_id, created = new_id("cmpl"), now()
        if not body.stream:
            text = await generation.text()
            return text_completion(response_id, created, model.id, text, generation.finish_reason, generation.usage())

        with_usage = body.include_usage()

        def chunk(text: str, finish: str | None = None) -> dict[str, Any]:
            return text_completion(response_id, created, model.id, text, finish, None, with_usage_field=with_usage)

        def usage_chunk() -> dict[str, Any]:
            return {**text_completion(response_id, created, model.id, "", None, generation.usage()), "choices": []}

        events = _events(generation, first=None, delta=chunk,
                         last=lambda: chunk("", generation.finish_reason),
                         usage_chunk=usage_chunk if with_usage else None)
        return StreamingResponse(events, media_type="text/event-stream", headers=_STREAM_HEADERS)


# ---------------------------------------------------------------------------------------------------------- app


def create_app(model: str, initial_peers: Sequence[str], *, default_max_tokens: int = DEFAULT_MAX_TOKENS,
               host_maddrs: Sequence[str] = ("/ip4/127.0.0.1/tcp/0",), api_key: str | None = None,
               max_body_bytes: int = MAX_BODY_BYTES, speculate: int = 0, fair_share: FairShare | None = None
               ) -> FastAPI:
    """The API for `model` in the swarm reached through `initial_peers`. The DHT client starts in the
    lifespan, so its p2p replica belongs to the event loop that serves the requests. With `api_key`, every
    request must carry it as a bearer token; several keys, comma-separated, are several callers, each with its
    own fair share (`fair_share`, by default `api_guard.FairShare()`). `speculate`: drafts per ring round
    (`ChatEngine`)."""

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        source = await asyncio.to_thread(resolve_model, model)
        async with connect(initial_peers, source, host_maddrs=host_maddrs) as client:
            engine = await asyncio.to_thread(lambda: ChatEngine(client, source, speculate=speculate))
            names = {source.name, *(alias for alias, name in MODEL_ALIASES.items() if name == source.name)}
            app.state.served = ServedModel(engine, frozenset(names), now(), default_max_tokens)
            logger.info("serving %s through the swarm", source.name)
            yield

    app = FastAPI(title="Layerhive OpenAI-compatible API", lifespan=lifespan)
    _install_error_handlers(app)
    _add_routes(app)
    app.add_middleware(Guard, api_keys=api_keys(api_key), max_body_bytes=max_body_bytes, body_limit=_served_body_limit,
                       fair_share=fair_share)
    return app


def _served_body_limit(scope) -> int | None:
    """What a body may need for the served model's context (None until the model is served)."""
    served_model = getattr(getattr(scope.get("app"), "state", None), "served", None)
    return served_model.max_body_bytes if served_model else None


def api_keys(api_key: str | None) -> list[str]:
    """The keys in `api_key` (comma-separated), none if it is None or empty."""
    return [key.strip() for key in (api_key or "").split(",") if key.strip()]


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:  # a host name: it may resolve beyond this machine
        return False


def api_key_for(host: str, given: str | None) -> tuple[str | None, bool]:
    """The key the API requires: `given`, else $LAYERHIVE_API_KEY, else (listening beyond loopback) a fresh one;
    None on loopback without one. The flag says whether the key was generated here (to be shown to the user)."""
    key = given or os.environ.get(API_KEY_ENV) or None
    if key is None and not is_loopback(host):
        return secrets.token_urlsafe(24), True
    return key, False


def serve(model: str, initial_peers: Sequence[str], *, host: str = "127.0.0.1", port: int = 8000,
          log_level: str = "info", api_key: str | None = None, speculate: int = 0, connection_gate: bool = True
          ) -> int:
    """Serves the API with uvicorn. Every connection passes a `ConnectionGate` at accept, before its HTTP is parsed
    (`connection_gate=False` only to measure what the gate saves: benchmarks/hostile.py)."""
    import uvicorn

    http = gated_protocol(uvicorn_protocol(http_parser()), ConnectionGate()) if connection_gate else http_parser()
    # asyncio's loop, not uvloop: uvloop starts reading a connection after connection_made whatever the protocol
    # asked, so each parked connection would cost a read and its bytes held (up to 256 kB); asyncio reads none
    # (benchmarks/api_gate.py: 0.06 ms of CPU per parked connection against uvloop's 0.12 ms).
    uvicorn.run(create_app(model, initial_peers, api_key=api_key, speculate=speculate), host=host, port=port,
                log_level=log_level, http=http, loop="asyncio")
    return 0


def http_parser() -> str:
    """httptools (a C parser) where it is installed, else h11 (pure Python): under a flood of refused requests,
    parsing is much of what each costs (benchmarks/hostile.py)."""
    try:
        import httptools  # noqa: F401
    except ImportError:
        logger.warning("httptools is not installed: HTTP is parsed in pure Python (h11), which costs more CPU")
        return "h11"
    return "httptools"
