"""Bounds before work for the OpenAI-compatible API (`node.app.api`): `Guard`, an ASGI middleware in front of
every route, and the fair share of each caller it keeps.

Checked from the headers, before a byte of the body is read:
- with API keys (required when the API listens beyond loopback), `Authorization: Bearer <key>`;
- the body's size: larger than a prompt the model's context can hold needs (`ServedModel.max_body_bytes`, at most
  `MAX_BODY_BYTES`) is refused by its Content-Length, or once the bytes read pass it; a chunked body (no
  Content-Length) is refused; a body that trickles in for longer than `BODY_TIMEOUT_S` is dropped;
- the caller's requests in flight (`MAX_IN_FLIGHT_PER_CALLER`).
Every refusal before the body closes the connection, so the server reads no more of what the client goes on sending.

A caller is its API key when it sends a valid one, else its source address. Refusing is cheap but not free (about
0.2-0.7 ms of CPU each, accept to close), so a caller refused again and again waits for its refusals: past
`FREE_REFUSALS` recent ones, each 4xx it gets is held back for a delay that grows with its recent refusals, up to
`TARPIT_MAX_S` (an asyncio sleep: no CPU). A client that waits for its answers (any HTTP client) then sends a few
requests a second instead of a thousand. Only refusals wait: a caller's requests that pass are never held, so an
honest caller sharing an address with a flooder (both on loopback) loses nothing. Held refusals are bounded per
caller and in all (each holds a connection); beyond, refusals go out at once. An address's connections beyond what
can be held are parked at accept, before any parsing, by `node.app.api_gate.ConnectionGate` (in `api.serve`).
"""

from __future__ import annotations

import asyncio
import hmac
import json
import time
from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from node.app.api_schema import APIError

MAX_BODY_BYTES = 4 << 20  # a whole context of text, even JSON-escaped at 6 bytes a character, fits in 1 MB
BODY_TIMEOUT_S = 30.0  # a body must arrive within this (a client trickling bytes would hold its buffer forever)
MAX_IN_FLIGHT_PER_CALLER = 16  # requests of one caller being read or answered at once (streams last seconds)
FREE_REFUSALS = 8.0  # recent refusals a caller gets at once (honest mistakes, a client's retries)
TARPIT_STEP_S = 0.1  # each recent refusal beyond those delays the next one by this much more ...
TARPIT_MAX_S = 2.0  # ... up to this
REFUSAL_HALF_LIFE_S = 10.0  # a caller's count of recent refusals halves every this many seconds
MAX_HELD_PER_CALLER = 32  # refusals of one caller held back at once; beyond, answered at once
MAX_HELD = 256  # refusals held back at once in all (each holds a connection and its socket buffers)
MAX_CALLERS = 4096  # callers remembered (least recently seen idle ones are forgotten first)


@dataclass
class Caller:
    recent_refusals: float = 0.0  # decays with REFUSAL_HALF_LIFE_S
    counted_at: float = 0.0
    in_flight: int = 0
    held: int = 0


class FairShare:
    """Each caller's requests in flight and recent refusals; holds back the refusals of a caller refused often."""

    def __init__(self, *, max_in_flight: int = MAX_IN_FLIGHT_PER_CALLER, free_refusals: float = FREE_REFUSALS,
                 tarpit_step_s: float = TARPIT_STEP_S, tarpit_max_s: float = TARPIT_MAX_S,
                 max_held_per_caller: int = MAX_HELD_PER_CALLER, max_held: int = MAX_HELD,
                 max_callers: int = MAX_CALLERS, clock: Callable[[], float] = time.monotonic) -> None:
        self.max_in_flight, self.free_refusals = max_in_flight, free_refusals
        self.tarpit_step_s, self.tarpit_max_s = tarpit_step_s, tarpit_max_s
        self.max_held_per_caller, self.max_held, self.max_callers = max_held_per_caller, max_held, max_callers
        self.clock = clock
        self.callers: OrderedDict[str, Caller] = OrderedDict()
        self.held = 0

    def caller(self, identity: str) -> Caller:
        caller = self.callers.get(identity)
        if caller is None:
            caller = self.callers[identity] = Caller(counted_at=self.clock())
            self._forget_idle()
        self.callers.move_to_end(identity)
        return caller

    def enter(self, identity: str) -> bool:
        """Counts a request in flight, unless the caller has its share in flight already."""
        caller = self.caller(identity)
        if caller.in_flight >= self.max_in_flight:
            return False
        caller.in_flight += 1
        return True

    def leave(self, identity: str) -> None:
        self.caller(identity).in_flight -= 1

    def refusal_delay_s(self, identity: str) -> float:
        """Counts one more refusal for the caller; how long to hold it back."""
        caller, now = self.caller(identity), self.clock()
        caller.recent_refusals = 1 + caller.recent_refusals * 0.5 ** ((now - caller.counted_at) / REFUSAL_HALF_LIFE_S)
        caller.counted_at = now
        excess = caller.recent_refusals - self.free_refusals
        return min(self.tarpit_max_s, excess * self.tarpit_step_s) if excess > 0 else 0.0

    async def hold_refusal(self, identity: str) -> None:
        """Waits before a refusal goes out, as long as the caller's recent refusals ask and a slot is free."""
        delay, caller = self.refusal_delay_s(identity), self.caller(identity)
        if delay <= 0 or caller.held >= self.max_held_per_caller or self.held >= self.max_held:
            return
        caller.held += 1
        self.held += 1
        try:
            await asyncio.sleep(delay)
        finally:
            caller.held -= 1
            self.held -= 1

    def _forget_idle(self) -> None:
        """Keeps at most `max_callers`, forgetting the least recently seen with nothing in flight or held."""
        if len(self.callers) <= self.max_callers:
            return
        for identity, caller in self.callers.items():
            if caller.in_flight == 0 and caller.held == 0:
                del self.callers[identity]
                return


class _BodyTooLarge(Exception):
    pass


class Guard:
    """ASGI middleware: the API key, the body's size and arrival time, and the caller's fair share, checked before
    any route runs. A request that passes reaches the app with its body already read (at most `max_body_bytes`).
    `api_keys`: the keys accepted (each its own caller); none on loopback. `body_limit(scope)`: a lower limit for
    this request (the served model's), or None."""

    def __init__(self, app, *, api_keys: Sequence[str] = (), max_body_bytes: int = MAX_BODY_BYTES,
                 body_limit: Callable[[dict], int | None] = lambda scope: None,
                 body_timeout_s: float = BODY_TIMEOUT_S, fair_share: FairShare | None = None) -> None:
        self.app, self.max_body_bytes, self.body_limit, self.body_timeout_s = app, max_body_bytes, body_limit, \
            body_timeout_s
        self.api_keys = [key.encode() for key in api_keys]
        self.fair_share = fair_share or FairShare()

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = dict(scope.get("headers") or [])
        caller = self._caller(scope, headers.get(b"authorization", b""))
        if caller is None:
            await self._refuse(self._source(scope), send, APIError(
                401, "Incorrect or missing API key: send it as 'Authorization: Bearer <key>' (the key `layerhive "
                "api` printed, or its --api-key).", code="invalid_api_key"))
            return
        if (refusal := self._refusal_by_headers(scope, headers)) is not None:
            await self._refuse(caller, send, refusal)
            return
        if not self.fair_share.enter(caller):
            await self._refuse(caller, send, APIError(
                429, f"Too many requests in flight: at most {self.fair_share.max_in_flight} at once per caller.",
                type="requests", code="rate_limit_exceeded"))
            return
        try:
            await self._serve(scope, receive, send, caller)
        finally:
            self.fair_share.leave(caller)

    async def _serve(self, scope, receive, send, caller: str) -> None:
        limit = self._limit(scope)
        try:
            body = await self._read_body(receive, limit)
        except _BodyTooLarge:
            await self._refuse(caller, send, self._too_large(limit))
            return
        except asyncio.TimeoutError:
            await self._refuse(caller, send, APIError(
                408, f"The request body did not arrive within {self.body_timeout_s:.0f} s."))
            return

        async def send_holding_refusals(message) -> None:  # a route's 4xx waits like the Guard's own
            if message["type"] == "http.response.start" and 400 <= message["status"] < 500:
                await self.fair_share.hold_refusal(caller)
            await send(message)

        await self.app(scope, _replay(body, receive), send_holding_refusals)

    def _caller(self, scope, authorization: bytes) -> str | None:
        """Who the request counts against: its key (None if keys are required and it has no valid one), or, with
        no keys, its source address."""
        if not self.api_keys:
            return self._source(scope)
        scheme, _, token = authorization.partition(b" ")
        if scheme.lower() != b"bearer":
            return None
        token = token.strip()
        valid = [i for i, key in enumerate(self.api_keys) if hmac.compare_digest(token, key)]  # all compared
        return f"key {valid[0]}" if valid else None

    @staticmethod
    def _source(scope) -> str:
        client = scope.get("client")
        return f"address {client[0]}" if client else "address unknown"

    def _refusal_by_headers(self, scope, headers: dict[bytes, bytes]) -> APIError | None:
        length = headers.get(b"content-length")
        if length is None and b"chunked" in headers.get(b"transfer-encoding", b"").lower():
            # Every OpenAI client sends a Content-Length; a chunked body would have to be read up to the limit
            # before it could be refused, which a flood of them turns into work (benchmarks/hostile.py).
            return APIError(411, "Send the request body with a Content-Length: chunked bodies are not accepted.",
                            code="length_required")
        limit = self._limit(scope)
        if length is not None and (not length.isdigit() or int(length) > limit):
            return self._too_large(limit)
        return None

    def _limit(self, scope) -> int:
        lower = self.body_limit(scope)
        return self.max_body_bytes if lower is None else min(self.max_body_bytes, lower)

    @staticmethod
    def _too_large(limit: int) -> APIError:
        return APIError(413, f"The request body is larger than {limit} bytes, more than a prompt this model's "
                        "context can hold needs.", code="request_too_large")

    async def _refuse(self, caller: str, send, error: APIError) -> None:
        await self.fair_share.hold_refusal(caller)
        await _respond(send, error)

    async def _read_body(self, receive, limit: int) -> bytes:
        chunks, size = [], 0
        deadline = time.monotonic() + self.body_timeout_s
        while True:
            message = await asyncio.wait_for(receive(), max(0.0, deadline - time.monotonic()))
            if message["type"] == "http.disconnect":
                raise asyncio.TimeoutError  # nobody to answer; end the request
            size += len(message.get("body", b""))
            if size > limit:
                raise _BodyTooLarge
            chunks.append(message.get("body", b""))
            if not message.get("more_body", False):
                return b"".join(chunks)


def _replay(body: bytes, receive):
    """A `receive` that hands the app the body read already, then passes on what the server sends (disconnect)."""
    delivered = False

    async def replay():
        nonlocal delivered
        if delivered:
            return await receive()
        delivered = True
        return {"type": "http.request", "body": body, "more_body": False}

    return replay


async def _respond(send, error: APIError) -> None:
    """Answers a request refused before its body was read, and closes its connection: kept open, the server would
    read (and throw away) the whole body the client goes on sending, 100 MB if it announced 100 MB."""
    body = json.dumps(error.body()).encode()
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
               (b"connection", b"close")]
    if error.status == 401:
        headers.append((b"www-authenticate", b"Bearer"))
    elif error.status == 429:
        headers.append((b"retry-after", b"1"))
    await send({"type": "http.response.start", "status": error.status, "headers": headers})
    await send({"type": "http.response.body", "body": body})
