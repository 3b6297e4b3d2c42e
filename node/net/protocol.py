"""The wire format of a stage's inference stream, and its validation.

A client opens one bidirectional stream per stage of its chain; that stream is the
session there, and closing it frees the session's KV cache. The first request opens
it (`{"open": {...}}`), naming the stage's neighbours in the chain. A step carries
hidden states [1, tokens, hidden] whose first token sits at `position`.

Three ways to move a step along the chain:
- ring (what chat uses): the first stage is opened with `embed` and takes token ids
  (`{"position", "tokens": [...]}`, no tensor); the last stage is opened with
  `sampling` and `next` naming the first stage. Hidden states are pushed stage to
  stage; after a step flagged `sample` the last stage computes the logits, samples
  the token, pushes it back to the first stage as the next step and tells the client
  `{"token", "position"}`. The client only feeds the prompt and listens: stages
  one-way legs per token, and the client is off the per-token path.
- push: the client embeds and samples itself; it sends each step's hidden states to
  the first stage, each stage pushes its output to the next over a stage-to-stage
  stream (`PUSH_HANDLER`, accepted only from the peer the client named as `prev`), and
  the last stage answers on its client stream: stages + 1 legs per token.
- relay: every stage answers its client stream and the client forwards (2 legs per
  stage); the fallback when stages cannot reach each other.
Errors come back as `{"error": {"code", "message"}}` on the stage's client stream.
A client waiting a while for an answer sends `{"ping": true}` on each stage's stream,
which the stage ignores: a connection to a crashed peer is only found broken when
something is written to it, and a ring whose stage died mid-token would otherwise go
silent, with no one left writing.
A stage answers a push stream at once with what it offers the pusher (`PushOffer`), if anything:
a direct link (`node.net.direct`), and head sharing.
Head sharing (a ring whose first stage holds the LM head's rows [0, split), `Stage.head_share`):
the first stage offers `"head_rows": [0, split]` to the last stage. From then on,
after a step flagged `sample` the last stage pushes `{"position", "head": "input"}` + its output at
the last position to the first stage at once, computes the logits of rows [split, vocab) meanwhile,
and pushes `{"position", "head": "part"}` with `"max"` and `"argmax"` (greedy) or + those logits
(sampling). The first stage computes its rows, merges, samples, feeds itself the token and tells the
client: the head's time on the critical path halves and no leg is added. A sampled part is half the
vocabulary's logits, so the last stage shares those only over a link that carries them within a
millisecond, and otherwise samples from the whole head itself as without an offer. A client opens
the first stage with `share_head: false` to keep the head whole at the last stage.
Receipts (always, every session kind; see docs/trust.md): for every step, a stage tells its client a digest of
the input it ran (`"in"`, `digest` of the hidden states or token ids as received) and its output: in its answer
when it answers the client, else in an echo `{"echo": position, "in"}` + the output tensor (the hidden states it
pushed on, or at a ring's sampling stage the hidden states it sampled from). The client holds every stage to what
its neighbour says it received, and re-runs a sample of steps elsewhere (`node.client.verify`). Nothing in a
session's messages tells a stage which steps are checked. The open's `audit` flag is accepted and ignored.
Receipts are signed (`node.net.evidence`): the open's answer carries the stage's `endorsement` (a session key its
identity endorses), and every receipt adds `"out"` (the output's digest), `"chain"` and `"sig"`. A push stream's
opening carries the pusher's endorsement too, and each pushed step of hidden states its signed `"receipt"`,
which the receiver checks before running the step and names as `"prev"` in its own receipt. A ring's last stage
signs each token it samples: a token receipt `{"token", "out", "chain", "sig"}` (the output it sampled from, the
session's chain, and the sampling parameters, `node.net.evidence.ReceiptSigner.token`) rides the token to the client
(`{"token", "position", "receipt"}`) and the token it pushes to the first stage (`"receipt"`), which checks it
before running the token and names it as `"prev"` in its own receipt.
Speculation (a ring opened with `speculate: k`, k <= 16, at every stage): the first stage appends to a
sampled step a draft of up to k token ids (`node.model.speculative`), which every stage passes on with the
step's output (`"draft": [...]`); the last stage computes the logits of the draft's positions and the one
before, keeps the draft's tokens the model agrees with, sends each kept token and the model's next one to the
client, and feeds that next one back to the first stage at its position, up to k positions before where the
stages' caches end: each stage drops the rejected positions from its cache when that step arrives.
Speculating rings do not share the LM head. The first stage's receipt names the token it was fed, and its echo
carries the draft it appended (`"draft"`), so the client can re-run the step.
Everything a peer sends is checked before any compute runs: each field here, and an open's flags
together where the session opens (`node.serve.role`).
"""

from __future__ import annotations

import hashlib
import math
import reprlib
from dataclasses import dataclass
from typing import Any

import msgpack
import numpy as np
import torch
from hivemind.proto import runtime_pb2

from node.model.sampling import SamplingParams
from node.model.speculative import MAX_DRAFT_TOKENS
from node.net.direct import DirectOffer
from node.net.wire import ACCEPTED_COMPRESSIONS, NUMPY_DTYPES
from node.net.wire import CODECS as WIRE_CODECS
from node.net.wire import decode as wire_decode
from node.net.wire import encode as wire_encode

INFERENCE_HANDLER = "layerhive.inference"
PUSH_HANDLER = "layerhive.push"
INFO_HANDLER = "layerhive.info"
WIRE_DTYPES = {torch.float32, torch.float16, torch.bfloat16}
_WIRE_DTYPE_NAMES = frozenset(str(d).removeprefix("torch.") for d in WIRE_DTYPES)
MAX_PEER_ID_LEN = 128
MAX_SESSION_ID_LEN = 64
# Long prompts (and failover replays) are sent in steps of at most this many tokens, so one message
# stays small and the stages start on a prompt sooner; a stage refuses a longer step.
PREFILL_CHUNK_TOKENS = 512
# The largest message a stream's opening may be (an opening is a few hundred bytes; sampling names at most
# 64 stop tokens), and what any message may add to its tensor (metadata, framing).
MAX_OPENING_BYTES = 16 << 10
MESSAGE_OVERHEAD_BYTES = 16 << 10


def max_message_bytes(hidden_size: int, vocab_size: int) -> int:
    """The largest message a session's stream could legitimately carry for this model: a step of
    PREFILL_CHUNK_TOKENS hidden states in fp32 (the widest wire dtype), or a head part of up to the vocabulary's
    logits in fp32, plus metadata (a chunk of token ids is 512 small integers)."""
    return max(PREFILL_CHUNK_TOKENS * hidden_size, vocab_size) * 4 + MESSAGE_OVERHEAD_BYTES


MAX_ERROR_CHARS = 512  # error texts never echo a peer's input at length (a 48 MB field must not become a 190 MB text)


def _short(value: Any) -> str:
    """A peer's value, for an error text: its repr cut to a few dozen characters (built without the whole repr)."""
    return reprlib.repr(value)


class ProtocolError(Exception):
    """A request that breaks the protocol; `code` is machine-readable, the message is for people (and bounded)."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message[:MAX_ERROR_CHARS])
        self.code = code


class RemoteError(Exception):
    """An error answer received from a peer; `peer` is the stage at fault."""

    def __init__(self, peer: str, code: str, message: str, reporter: str | None = None) -> None:
        super().__init__(f"{peer}: {code}: {message}")
        self.peer, self.code, self.message = peer, code, message
        self.reporter = reporter or peer  # the peer that sent the error (it may name another as at fault)


@dataclass(frozen=True)
class OpenSession:
    session_id: str
    start: int
    end: int
    max_length: int  # positions the session may use: prompt plus generated tokens
    prev_peer: str | None = None  # the stage that pushes steps here (None: the client sends them)
    next_peer: str | None = None  # the stage this one pushes its output to (None: answer the client)
    relay: bool = False  # answer every step on the client stream instead of pushing
    wire: str = "none"
    audit: bool = False  # accepted and ignored: every session is checked the same way (see node.client.verify)
    embed: bool = False  # a ring's first stage: steps carry token ids, which this stage embeds
    # A ring's last stage: after a step flagged `sample`, sample the next token with these parameters and
    # feed it to `next_peer` (the first stage), or to itself when it is the whole chain.
    sampling: SamplingParams | None = None
    share_head: bool = True  # a ring's first stage: offer the last stage to share the LM head's work
    speculate: int = 0  # a ring's stages: drafts of up to this many tokens ride the sampled steps (see below)


@dataclass(frozen=True)
class Step:
    hidden: torch.Tensor | None  # None when the step carries token ids
    position: int
    token_ids: torch.Tensor | None = None  # [1, tokens] int64, for a session opened with `embed`
    sample: bool = False  # a ring's last stage samples a token after this step
    draft: tuple[int, ...] = ()  # speculation: the step's last len(draft) tokens are a draft to verify
    receipt: dict[str, Any] | None = None  # a pushed step: its sender's signed receipt (of hidden states, or a token)

    @property
    def tokens(self) -> int:
        return (self.hidden if self.hidden is not None else self.token_ids).shape[1]


def digest(tensor: torch.Tensor) -> str:
    """A commitment to a step's input or output as one side of a link holds it: 16 bytes of BLAKE2b over the
    tensor's dtype, shape and bytes (both ends decode the same wire encoding, so honest ends agree bit for bit)."""
    data = tensor.detach().cpu().contiguous()
    if data.dtype == torch.bfloat16:
        data = data.view(torch.int16)
    h = hashlib.blake2b(f"{tensor.dtype}{list(tensor.shape)}".encode(), digest_size=16)
    h.update(data.numpy().tobytes())
    return h.hexdigest()


def token_digest(token_ids: list[int]) -> str:
    """The digest of a step of token ids, as the stage that embeds them computes it."""
    return digest(torch.tensor([token_ids], dtype=torch.long))


_PING_METADATA = msgpack.packb({"ping": True})


def ping() -> runtime_pb2.ExpertRequest:
    return runtime_pb2.ExpertRequest(metadata=_PING_METADATA)


def is_ping(message: runtime_pb2.ExpertRequest) -> bool:
    return message.metadata == _PING_METADATA and not message.tensors


def pack(metadata: dict[str, Any], tensors: list[torch.Tensor] = (), wire: str = "none") -> runtime_pb2.ExpertRequest:
    return runtime_pb2.ExpertRequest(
        metadata=msgpack.packb(metadata), tensors=[wire_encode(t, wire) for t in tensors]
    )


def pack_response(
    metadata: dict[str, Any], tensors: list[torch.Tensor] = (), wire: str = "none"
) -> runtime_pb2.ExpertResponse:
    return runtime_pb2.ExpertResponse(
        metadata=msgpack.packb(metadata), tensors=[wire_encode(t, wire) for t in tensors]
    )


def error_response(code: str, message: str, peer: str | None = None) -> runtime_pb2.ExpertResponse:
    """`peer` names the stage at fault when it is not the one answering (e.g. an unreachable next stage)."""
    error = {"code": code, "message": message}
    if peer is not None:
        error["peer"] = peer
    return pack_response({"error": error})


def unpack_metadata(message: runtime_pb2.ExpertRequest | runtime_pb2.ExpertResponse) -> dict[str, Any]:
    try:
        metadata = msgpack.unpackb(message.metadata, raw=False, strict_map_key=True) if message.metadata else {}
    except Exception as e:
        raise ProtocolError("bad_request", f"metadata is not valid msgpack: {e}") from None
    if not isinstance(metadata, dict):
        raise ProtocolError("bad_request", "metadata must be a map")
    return metadata


def _int_field(metadata: dict[str, Any], key: str, *, low: int, high: int) -> int:
    value = metadata.get(key)
    if not isinstance(value, int) or isinstance(value, bool) or not low <= value <= high:
        raise ProtocolError("bad_request", f"{key!r} must be an integer in [{low}, {high}], got {_short(value)}")
    return value


def parse_open(message: runtime_pb2.ExpertRequest, *, max_length_limit: int) -> OpenSession:
    """Checks each field of an open on its own; what its flags mean together, the session's role at a stage, is
    decided (or refused) where the session opens (`node.serve.role`)."""
    metadata = unpack_metadata(message)
    opened = metadata.get("open")
    if not isinstance(opened, dict):
        raise ProtocolError("bad_request", "the first message of a session must be {'open': {...}}")
    session_id = opened.get("session_id")
    if not isinstance(session_id, str) or not 0 < len(session_id) <= MAX_SESSION_ID_LEN:
        raise ProtocolError("bad_request", f"'session_id' must be a string of 1..{MAX_SESSION_ID_LEN} chars")
    start = _int_field(opened, "start", low=0, high=1 << 20)
    end = _int_field(opened, "end", low=start + 1, high=1 << 20)
    max_length = _int_field(opened, "max_length", low=1, high=max_length_limit)
    prev_peer, next_peer = _peer_field(opened, "prev"), _peer_field(opened, "next")
    relay = opened.get("relay", False)
    if not isinstance(relay, bool):
        raise ProtocolError("bad_request", f"'relay' must be a boolean, got {_short(relay)}")
    wire = opened.get("wire", "none")
    if not isinstance(wire, str) or wire not in WIRE_CODECS:
        raise ProtocolError("bad_request", f"'wire' must be one of {WIRE_CODECS}, got {_short(wire)}")
    audit, embed, share_head = (opened.get(key, default) for key, default in
                                (("audit", False), ("embed", False), ("share_head", True)))
    if not all(isinstance(flag, bool) for flag in (audit, embed, share_head)):
        raise ProtocolError("bad_request", f"'audit', 'embed' and 'share_head' must be booleans, "
                            f"got {_short(audit)}, {_short(embed)}, {_short(share_head)}")
    sampling = None
    speculate = _int_field(opened, "speculate", low=0, high=MAX_DRAFT_TOKENS) if "speculate" in opened else 0
    if opened.get("sampling") is not None:
        try:
            sampling = SamplingParams.from_wire(opened["sampling"])
        except ValueError as e:
            raise ProtocolError("bad_request", f"bad 'sampling': {e}") from None
    return OpenSession(session_id, start, end, max_length, prev_peer, next_peer, relay, wire, audit, embed, sampling,
                       share_head, speculate)


def _peer_field(metadata: dict[str, Any], key: str) -> str | None:
    value = metadata.get(key)
    if value is not None and (not isinstance(value, str) or not 0 < len(value) <= MAX_PEER_ID_LEN):
        raise ProtocolError("bad_request", f"{key!r} must be a peer id string or null, got {_short(value)}")
    return value


def push_open(session_id: str, client: str, endorsement: dict[str, Any] | None = None) -> runtime_pb2.ExpertRequest:
    """`endorsement`: the pusher's session key, endorsed by its identity (node.net.evidence), which signs the
    receipt riding each pushed step of hidden states (a pusher without one can push only tokens and head parts)."""
    return pack({"push": session_id, "client": client, **({"endorsement": endorsement} if endorsement else {})})


def push_endorsement(message: runtime_pb2.ExpertRequest) -> Any:
    """The endorsement in a push stream's first message (checked by `node.net.evidence.session_key`)."""
    return unpack_metadata(message).get("endorsement")


def is_receipt(receipt: Any) -> bool:
    """A signed receipt's shape (node.net.evidence): two digests, the chain, an Ed25519 signature."""
    return (isinstance(receipt, dict) and set(receipt) == {"in", "out", "chain", "sig"}
            and all(isinstance(receipt[k], str) and len(receipt[k]) <= 64 for k in ("in", "out"))
            and isinstance(receipt["chain"], bytes) and len(receipt["chain"]) <= 64
            and isinstance(receipt["sig"], bytes) and len(receipt["sig"]) == 64)


def is_token_receipt(receipt: Any) -> bool:
    """A signed token receipt's shape (node.net.evidence): the token, its output's digest, the chain, a signature."""
    return (isinstance(receipt, dict) and set(receipt) == {"token", "out", "chain", "sig"}
            and isinstance(receipt["token"], int) and not isinstance(receipt["token"], bool) and receipt["token"] >= 0
            and isinstance(receipt["out"], str) and len(receipt["out"]) <= 64
            and isinstance(receipt["chain"], bytes) and len(receipt["chain"]) <= 64
            and isinstance(receipt["sig"], bytes) and len(receipt["sig"]) == 64)


def parse_push_open(message: runtime_pb2.ExpertRequest) -> tuple[str, str | None]:
    """The first message of a stage-to-stage push stream names the session it feeds: its id and the client that
    opened it (session ids are the client's own, so another peer may use the same id). `client` is None from a
    pusher that does not name it."""
    metadata = unpack_metadata(message)
    session_id = metadata.get("push")
    if not isinstance(session_id, str) or not 0 < len(session_id) <= MAX_SESSION_ID_LEN:
        raise ProtocolError("bad_request", "the first message of a push stream must be {'push': session_id, "
                            "'client': peer_id}")
    return session_id, _peer_field(metadata, "client")


def parse_step(
    message: runtime_pb2.ExpertRequest, *, hidden_size: int, expected_position: int, max_length: int,
    vocab_size: int | None = None, speculate: int = 0, model_vocab_size: int = 0,
) -> Step:
    """A step of hidden states, or with `vocab_size` (a session opened with `embed`) a step of token ids.

    `speculate` (a pushed step of a session opened with it): the step may start up to that many positions before
    `expected_position` (after a rejected draft), and may carry a draft of up to that many token ids below
    `model_vocab_size`, no longer than the step minus one token."""
    metadata = unpack_metadata(message)
    position = _int_field(metadata, "position", low=0, high=max_length - 1)
    if not expected_position - speculate <= position <= expected_position:
        raise ProtocolError("bad_step", f"step at position {position}, but the session is at {expected_position}")
    sample = metadata.get("sample", False)
    if not isinstance(sample, bool):
        raise ProtocolError("bad_request", f"'sample' must be a boolean, got {_short(sample)}")
    draft = _draft(metadata, speculate, model_vocab_size)
    if vocab_size is not None:
        token_ids = _token_ids(metadata, message, vocab_size, position, max_length)
        receipt = metadata.get("receipt")  # a ring's last stage signs the token it pushes
        if receipt is not None and not (is_token_receipt(receipt) and token_ids.shape[1] == 1
                                        and receipt["token"] == int(token_ids[0, -1])):
            raise ProtocolError("bad_request", "'receipt' of a token must be {'token': the token, 'out': digest, "
                                "'chain': bytes, 'sig': 64 bytes}")
        step = Step(None, position, token_ids, sample, draft, receipt)
    else:
        size = _tensor_header(message, "hidden states", [1, None, hidden_size])
        _check_chunk(size[1])
        if position + size[1] > max_length:
            raise ProtocolError(
                "too_long", f"positions {position}..{position + size[1]} exceed the session's max_length {max_length}"
            )
        receipt = metadata.get("receipt")
        if receipt is not None and not is_receipt(receipt):
            raise ProtocolError("bad_request", "'receipt' must be {'in', 'out': digests, 'chain': bytes, "
                                "'sig': 64 bytes}")
        step = Step(_tensor(message, "hidden states", size), position, sample=sample, draft=draft, receipt=receipt)
    if draft and (not sample or len(draft) >= step.tokens):
        raise ProtocolError("bad_request", f"a draft of {len(draft)} tokens rides a sampled step of more tokens")
    return step


def _draft(metadata: dict[str, Any], speculate: int, vocab_size: int) -> tuple[int, ...]:
    draft = metadata.get("draft", [])
    if not isinstance(draft, list) or len(draft) > speculate or not all(
            isinstance(t, int) and not isinstance(t, bool) and 0 <= t < vocab_size for t in draft):
        raise ProtocolError("bad_request", f"'draft' must be a list of at most {speculate} token ids below "
                            f"{vocab_size} (the session's 'speculate' at open)")
    return tuple(draft)


def _check_chunk(tokens: int) -> None:
    if tokens > PREFILL_CHUNK_TOKENS:
        raise ProtocolError("too_long", f"a step of {tokens} tokens; send at most {PREFILL_CHUNK_TOKENS} per step")


def _tensor_header(message: runtime_pb2.ExpertRequest, what: str, shape: list[int | None]) -> list[int]:
    """The size of the message's one tensor, checked against `shape` (None: any size >= 1) before decoding."""
    if len(message.tensors) != 1:
        raise ProtocolError("bad_request", f"this message carries exactly one tensor, got {len(message.tensors)}")
    proto = message.tensors[0]
    if proto.compression not in ACCEPTED_COMPRESSIONS:
        raise ProtocolError("bad_tensor", f"unsupported tensor compression {proto.compression}")
    if proto.dtype not in _WIRE_DTYPE_NAMES:
        raise ProtocolError("bad_tensor", f"{what} must be float32/float16/bfloat16, got {_short(proto.dtype)}")
    size = list(proto.size)
    if len(size) != len(shape) or not all(n >= 1 and want in (None, n) for n, want in zip(size, shape, strict=True)):
        wanted = ", ".join("n" if n is None else str(n) for n in shape)
        raise ProtocolError("bad_tensor", f"{what} must have shape [{wanted}], got {_short(size)}")
    return size


def _tensor(message: runtime_pb2.ExpertRequest, what: str, size: list[int]) -> torch.Tensor:
    try:
        tensor = wire_decode(message.tensors[0])
    except Exception as e:
        raise ProtocolError("bad_tensor", f"cannot decode {what}: {e}") from None
    if list(tensor.shape) != size:
        raise ProtocolError("bad_tensor", f"tensor buffer holds shape {list(tensor.shape)}, header says {size}")
    # numpy where it has the dtype: on an idling stage's cold caches, one numpy call costs about half of torch's two
    finite = np.isfinite(tensor.numpy()).all() if tensor.dtype in NUMPY_DTYPES else torch.isfinite(tensor).all()
    if not finite:
        raise ProtocolError("bad_tensor", f"{what} contain NaN or infinity")
    return tensor


@dataclass(frozen=True)
class HeadInput:
    """Head sharing: the last stage's output [1, 1, hidden] at the last position before `position`."""

    hidden: torch.Tensor
    position: int  # of the token to sample


@dataclass(frozen=True)
class HeadPart:
    """Head sharing: the last stage's part of the logits for the token at `position`, rows [split, vocab)."""

    position: int
    best: tuple[float, int] | None = None  # greedy: (the highest logit, its token id)
    logits: torch.Tensor | None = None  # sampling: [vocab - split] fp32


@dataclass(frozen=True)
class PushOffer:
    """What a stage offers the stage that pushes to it, in its first answer on the push stream."""

    head_split: int | None = None  # a ring's first stage holds the LM head's rows [0, head_split)
    direct: DirectOffer | None = None  # push over a direct link instead (`node.net.direct`)


def push_offer(offer: PushOffer) -> runtime_pb2.ExpertResponse:
    fields: dict[str, Any] = {}
    if offer.head_split is not None:
        fields["head_rows"] = [0, offer.head_split]
    if offer.direct is not None:
        fields["direct"] = offer.direct.to_wire()
    return pack_response({"offer": fields})


def parse_push_offer(metadata: dict[str, Any]) -> PushOffer | None:
    """The offer in an answer on a push stream (`push_offer`); None if the answer is not an offer."""
    fields = metadata.get("offer")
    if fields is None:
        return None
    if not isinstance(fields, dict) or not set(fields) <= {"head_rows", "direct"}:
        raise ProtocolError("bad_response", f"'offer' must be a map of head_rows and direct, got {_short(fields)}")
    split = None
    if "head_rows" in fields:
        rows = fields["head_rows"]
        if not (isinstance(rows, list) and len(rows) == 2 and rows[0] == 0 and isinstance(rows[1], int)
                and not isinstance(rows[1], bool) and rows[1] > 0):
            raise ProtocolError("bad_response", f"'head_rows' must be [0, split], got {_short(rows)}")
        split = rows[1]
    try:
        direct = DirectOffer.from_wire(fields["direct"]) if "direct" in fields else None
    except ValueError as e:
        raise ProtocolError("bad_response", f"bad direct offer: {e}") from None
    return PushOffer(split, direct)


_DIRECT_SWITCH = msgpack.packb({"direct": True})


def direct_switch() -> runtime_pb2.ExpertRequest:
    """A pusher's last message on the libp2p push stream: the rest comes over the direct link."""
    return runtime_pb2.ExpertRequest(metadata=_DIRECT_SWITCH)


def is_direct_switch(message: runtime_pb2.ExpertRequest) -> bool:
    return message.metadata == _DIRECT_SWITCH and not message.tensors


def is_head_message(message: runtime_pb2.ExpertRequest) -> bool:
    return "head" in unpack_metadata(message)


def parse_head_message(message: runtime_pb2.ExpertRequest, *, hidden_size: int, expected_position: int,
                       split: int, vocab_size: int, greedy: bool) -> HeadInput | HeadPart:
    metadata = unpack_metadata(message)
    position = _int_field(metadata, "position", low=0, high=1 << 30)
    if position != expected_position:
        raise ProtocolError("bad_step", f"head message for position {position}, but the session is at "
                            f"{expected_position}")
    kind = metadata.get("head")
    if kind == "input":
        return HeadInput(_tensor(message, "hidden states", _tensor_header(message, "hidden states",
                                                                          [1, 1, hidden_size])), position)
    if kind != "part":
        raise ProtocolError("bad_request", f"'head' must be 'input' or 'part', got {_short(kind)}")
    if not greedy:
        size = _tensor_header(message, "logits", [vocab_size - split])
        return HeadPart(position, logits=_tensor(message, "logits", size).float())
    best = metadata.get("max")
    if message.tensors or not isinstance(best, float) or not math.isfinite(best):
        raise ProtocolError("bad_request", f"a greedy head part carries a finite float 'max' and no tensor, "
                            f"got {_short(best)}")
    return HeadPart(position, best=(best, _int_field(metadata, "argmax", low=split, high=vocab_size - 1)))


def _token_ids(metadata: dict[str, Any], message: runtime_pb2.ExpertRequest, vocab_size: int, position: int,
               max_length: int) -> torch.Tensor:
    ids = metadata.get("tokens")
    if message.tensors or not isinstance(ids, list) or not ids:
        raise ProtocolError("bad_request", "a step of this session carries token ids, {'tokens': [...]}, "
                            "and no tensor")
    _check_chunk(len(ids))
    if not all(isinstance(t, int) and not isinstance(t, bool) and 0 <= t < vocab_size for t in ids):
        raise ProtocolError("bad_request", f"token ids must be integers in [0, {vocab_size})")
    if position + len(ids) > max_length:
        raise ProtocolError(
            "too_long", f"positions {position}..{position + len(ids)} exceed the session's max_length {max_length}"
        )
    return torch.tensor([ids], dtype=torch.long)


def raise_if_error(peer: str, response: runtime_pb2.ExpertResponse) -> dict[str, Any]:
    metadata = unpack_metadata(response)
    error = metadata.get("error")
    if error is not None:
        if not isinstance(error, dict):
            raise RemoteError(peer, "bad_response", f"malformed error: {_short(error)}")
        at_fault = error.get("peer") if isinstance(error.get("peer"), str) else peer
        raise RemoteError(at_fault, str(error.get("code", "unknown")), str(error.get("message", "")), reporter=peer)
    return metadata
