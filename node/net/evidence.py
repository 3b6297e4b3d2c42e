"""Evidence that travels: signed receipts, and proofs of a lie that anyone can check without trusting the accuser.

Signing (`ReceiptSigner`): a stage signs every step's receipt with an Ed25519 key made for the session, endorsed
once, when the session opens, by the node's RSA identity (`node.net.identity`: the key that is its peer id). Signing
each step with the RSA key itself would cost 0.8 ms a step; Ed25519 costs 0.1 ms (measured on this VM: RSA-2048
sign 800 us, verify 65 us; Ed25519 sign 96 us, verify 330 us, a key 112 us). A receipt signs (position, tokens,
digest of the input, digest of the output as it goes on the wire, and `chain`: a hash over every step's
(position, tokens, input digest) in the session so far), so one signature commits to all the inputs that led to
an output: the KV cache the step ran on.

A proof of a lie (`build_proof`, `verify_proof`) holds the inputs of a stage's session up to a step, and three
witnesses of that step: the accused stage's and two other nodes' (the auditor's re-runs), each with its endorsement,
the steps it ran, its signed receipt of the last one and that step's output. A reader recomputes every digest and
chain from the inputs, checks every signature, and calls the accused a liar only if the two others agree within the
tolerance of the dtypes, wire codecs and quantizations all three endorsed and the accused differs from both. So an
accuser cannot forge a proof against an honest node: it would need that node's signature on a wrong output. It
could bring two hostile verifiers of its own (a Sybil majority of replicas): out of scope, as in docs/trust.md.

Publishing and reading proofs on the DHT: `node.net.proofbook`.
"""

from __future__ import annotations

import hashlib
import logging
from dataclasses import dataclass
from typing import Any

import msgpack
import torch
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
from hivemind.proto import runtime_pb2
from hivemind.utils import MSGPackSerializer
from hivemind.utils.crypto import RSAPrivateKey, RSAPublicKey

from node.net.identity import peer_id_from_owner_key
from node.net.protocol import digest, is_receipt, is_token_receipt, token_digest
from node.net.tolerance import announced_dtype, relative_error, tolerance_for
from node.net.wire import decode as wire_decode
from node.net.wire import encode as wire_encode

logger = logging.getLogger(__name__)

MAX_PROOF_BYTES = 512 << 10  # ~200 positions of a 576-wide fp32 stage's inputs; later lies stay with their client
MAX_PROOF_STEPS = 4096
_ENDORSEMENT = b"layerhive-session-key-v1"
_RECEIPT = b"layerhive-receipt-v1"
_TOKEN = b"layerhive-token-v1"
_ENDORSED_FIELDS = ("owner", "key", "session", "client", "start", "end", "dtype", "quant", "wire")


class EvidenceError(ValueError):
    """A receipt or proof that does not check out; the message says why."""


# --- signing, at a stage -------------------------------------------------------------------------------


class ReceiptSigner:
    """One session's signing key at a stage, endorsed by the node's identity, and the chain of its inputs so far."""

    def __init__(self, identity_key: RSAPrivateKey, *, session: str, client: str, start: int, end: int, dtype: str,
                 quant: str, wire: str) -> None:
        self._key = Ed25519PrivateKey.generate()
        public = self._key.public_key().public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
        fields = {"owner": identity_key.get_public_key().to_bytes(), "key": public, "session": session,
                  "client": client, "start": start, "end": end, "dtype": dtype, "quant": quant, "wire": wire}
        self.endorsement = {**fields, "sig": identity_key.sign(_endorsement_bytes(fields))}
        self.chain = b""
        self._step: tuple[int, int, str] = (0, 0, "")
        self._signed: dict[str, dict[str, Any]] = {}  # the current step's receipts, by output digest

    def step(self, position: int, tokens: int, input_digest: str) -> None:
        """A new step ran on these inputs: it extends the chain."""
        self.chain = chain_link(self.chain, position, tokens, input_digest)
        self._step, self._signed = (position, tokens, input_digest), {}

    def receipt(self, output_digest: str) -> dict[str, Any]:
        """The current step's signed receipt, {"in", "out", "chain", "sig"}, for an output with this digest (an honest
        stage signs one output a step, for its neighbour and its client alike)."""
        if output_digest not in self._signed:
            position, tokens, input_digest = self._step
            signature = self._key.sign(_receipt_bytes(position, tokens, input_digest, output_digest, self.chain))
            self._signed[output_digest] = {"in": input_digest, "out": output_digest, "chain": self.chain,
                                           "sig": signature}
        return self._signed[output_digest]

    def token(self, output_digest: str, position: int, token: int, sampling: bytes) -> dict[str, Any]:
        """A ring's last stage's signed token receipt {"token", "out", "chain", "sig"}: the token it sampled at
        `position` from the current step's output (of digest `output_digest`) with the sampling parameters
        `sampling` (`sampling_bytes`). It rides the token to the first stage and to the client alike."""
        signature = self._key.sign(_token_bytes(position, token, output_digest, self.chain, sampling))
        return {"token": token, "out": output_digest, "chain": self.chain, "sig": signature}


def sampling_bytes(temperature: float, top_p: float, seed: int | None) -> bytes:
    """What a token's signature commits to of the sampling parameters: those that pick it (node.model.sampling)."""
    return msgpack.packb([float(temperature), float(top_p), seed])


def chain_link(chain: bytes, position: int, tokens: int, input_digest: str) -> bytes:
    return hashlib.blake2b(chain + msgpack.packb([position, tokens, input_digest]), digest_size=16).digest()


def wire_digest(tensor: torch.Tensor, wire: str) -> str:
    """The digest of `tensor` as its receiver decodes it from the `wire` codec (lossy codecs round it)."""
    return digest(tensor if wire == "none" else wire_decode(wire_encode(tensor, wire)))


def _endorsement_bytes(fields: dict[str, Any]) -> bytes:
    return msgpack.packb([_ENDORSEMENT, *(fields[name] for name in _ENDORSED_FIELDS)])


def _receipt_bytes(position: int, tokens: int, input_digest: str, output_digest: str, chain: bytes) -> bytes:
    return msgpack.packb([_RECEIPT, position, tokens, input_digest, output_digest, chain])


def _token_bytes(position: int, token: int, output_digest: str, chain: bytes, sampling: bytes) -> bytes:
    return msgpack.packb([_TOKEN, position, token, output_digest, chain, sampling])


def check_token(key: Ed25519PublicKey, position: int, receipt: Any, sampling: bytes) -> None:
    """EvidenceError unless `receipt` is a well-formed token receipt for `position`, signed with `key` for these
    sampling parameters (a ring's first stage checks the token pushed to it before it runs it)."""
    if not is_token_receipt(receipt):
        raise EvidenceError("the token is not signed: a token receipt is {'token', 'out', 'chain', 'sig'}")
    try:
        key.verify(receipt["sig"], _token_bytes(position, receipt["token"], receipt["out"], receipt["chain"],
                                                sampling))
    except InvalidSignature:
        raise EvidenceError("the token is not signed by the sampling stage's session key") from None


def check_receipt(key: Ed25519PublicKey, position: int, tokens: int, receipt: Any, output_digest: str) -> None:
    """EvidenceError unless `receipt` is a well-formed receipt for an output of `output_digest` at (`position`,
    `tokens`), signed with `key` (a pushed step's, checked by its receiver before it runs the step)."""
    if not is_receipt(receipt) or receipt["out"] != output_digest:
        raise EvidenceError("the receipt does not name what was sent")
    try:
        key.verify(receipt["sig"], _receipt_bytes(position, tokens, receipt["in"], receipt["out"], receipt["chain"]))
    except InvalidSignature:
        raise EvidenceError("the receipt is not signed by the sender's session key") from None


def session_key(endorsement: Any, *, peer: str, session: str, client: str | None) -> Ed25519PublicKey:
    """The session key `peer` endorsed for `client`'s session `session`; EvidenceError if it endorsed none."""
    if endorsed_peer(endorsement) != peer or endorsement["session"] != session or (
            client is not None and endorsement["client"] != client):
        raise EvidenceError(f"the endorsement is not {peer}'s for this session")
    return _endorsed_key(endorsement)


def endorsed_peer(endorsement: Any) -> str:
    """The peer id whose identity signed `endorsement`; EvidenceError if it is malformed or the signature fails."""
    if not isinstance(endorsement, dict) or set(endorsement) != {*_ENDORSED_FIELDS, "sig"}:
        raise EvidenceError("an endorsement names exactly the fields " + ", ".join(_ENDORSED_FIELDS))
    types = {"owner": bytes, "key": bytes, "session": str, "client": str, "start": int, "end": int, "dtype": str,
             "quant": str, "wire": str, "sig": bytes}
    if not all(isinstance(endorsement[name], kind) for name, kind in types.items()) or len(endorsement["owner"]) > 1024:
        raise EvidenceError("an endorsement's fields have the wrong types or sizes")
    try:
        peer = peer_id_from_owner_key(endorsement["owner"])
        valid = RSAPublicKey.from_bytes(endorsement["owner"]).verify(_endorsement_bytes(endorsement),
                                                                     endorsement["sig"])
    except Exception:
        raise EvidenceError("an endorsement's owner is not an RSA public key") from None
    if not valid:
        raise EvidenceError(f"the endorsement is not signed by {peer}")
    return peer


# --- proofs of a lie -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Witness:
    """One node's signed account of a step: its session's endorsement, the (position, tokens) of every step it ran
    there in order (the last is the step in question), its signed receipt of that step, and the step's output."""

    endorsement: dict[str, Any]
    steps: list[tuple[int, int]]
    receipt: dict[str, Any]  # {"out", "chain", "sig"}
    output: torch.Tensor
    token: dict[str, Any] | None = None  # a ring's last stage: its token receipt for the token sampled right after

    def to_wire(self) -> dict[str, Any]:
        return {"endorsement": self.endorsement, "steps": [list(s) for s in self.steps], "receipt": self.receipt,
                "output": _tensor_bytes(self.output), **({"token": self.token} if self.token is not None else {})}


def build_proof(model: str, accused: str, start: int, end: int, inputs: torch.Tensor | list[int],
                witnesses: list[Witness]) -> dict[str, Any]:
    """A proof that `witnesses[0]` (the accused's) is a lie; check it with `verify_proof` before using it."""
    encoded = {"tokens": list(inputs)} if isinstance(inputs, list) else {"hidden": _tensor_bytes(inputs)}
    return {"v": 1, "model": model, "accused": accused, "start": start, "end": end, "inputs": encoded,
            "witnesses": [w.to_wire() for w in witnesses]}


def build_token_proof(model: str, accused: str, start: int, end: int, inputs: torch.Tensor | list[int],
                      witnesses: list[Witness], sampling: dict[str, Any]) -> dict[str, Any]:
    """A proof that `witnesses[0]` (a ring's last stage) sampled another token than its step's output gives: the
    two others, re-running the step, sampled a token of their own from it with the same `sampling`
    ({"temperature", "top_p", "seed"}), and each signed it; check it with `verify_proof`."""
    return {**build_proof(model, accused, start, end, inputs, witnesses), "kind": "token", "sampling": sampling}


def verify_proof(proof: Any, *, model: str, accused: str | None = None) -> str:
    """The accused peer if `proof` proves it lied; else EvidenceError saying what does not check out."""
    if not isinstance(proof, dict) or proof.get("v") != 1 or proof.get("model") != model:
        raise EvidenceError(f"not a version-1 proof about model {model!r}")
    if len(MSGPackSerializer.dumps(proof)) > MAX_PROOF_BYTES:
        raise EvidenceError(f"a proof is at most {MAX_PROOF_BYTES} bytes")
    if accused is not None and proof.get("accused") != accused:
        raise EvidenceError(f"the proof accuses {str(proof.get('accused'))[:64]!r}, not {accused}")
    if proof.get("kind") == "equivocation":
        return _verify_equivocation(proof)
    if proof.get("kind") == "token_equivocation":
        return _verify_token_equivocation(proof)
    if proof.get("kind") not in (None, "token"):
        raise EvidenceError("a proof's kind is a lie (none given), 'token', 'equivocation' or 'token_equivocation'")
    peers, witnesses, outputs, tolerance = _witnessed_step(proof)
    claimed, first, second = outputs
    agreement, difference = relative_error(first, second), min(relative_error(claimed, first),
                                                               relative_error(claimed, second))
    if proof.get("kind") == "token":
        tokens = _signed_tokens(proof, witnesses, inputs_length=_length(_inputs(proof["inputs"])))
        if not (agreement <= tolerance and tokens[1] == tokens[2] != tokens[0]):
            raise EvidenceError(f"the witnesses do not convict: the two others sampled {tokens[1]} and {tokens[2]} "
                                f"from outputs {agreement:.2e} apart (tolerance {tolerance:.1e}), the accused "
                                f"{tokens[0]}")
        return peers[0]
    if not agreement <= tolerance < difference:
        raise EvidenceError(f"the witnesses do not convict: the two others differ by {agreement:.2e}, the accused "
                            f"from them by {difference:.2e} (tolerance {tolerance:.1e})")
    return peers[0]


def _witnessed_step(proof: dict[str, Any]) -> tuple[list[str], list[dict], list[torch.Tensor], float]:
    """A proof's three witnesses' peers, the witnesses, their outputs of the step once every digest, chain and
    signature checks out, and the tolerance between those outputs (from what all three endorsed)."""
    witnesses = proof.get("witnesses")
    if not isinstance(witnesses, list) or len(witnesses) != 3 or not all(isinstance(w, dict) for w in witnesses):
        raise EvidenceError("a proof has exactly three witnesses: the accused's and two others'")
    peers = [endorsed_peer(w.get("endorsement")) for w in witnesses]
    if peers[0] != proof["accused"] or len(set(peers)) != 3:
        raise EvidenceError("the first witness must be the accused's, and the three must be different nodes")
    if any((w["endorsement"]["start"], w["endorsement"]["end"]) != (proof.get("start"), proof.get("end"))
           for w in witnesses):
        raise EvidenceError("every witness must have run the proof's layers")
    inputs = _inputs(proof.get("inputs"))
    outputs, last_steps = zip(*(_checked_output(w, inputs) for w in witnesses), strict=True)
    if len(set(last_steps)) != 1:
        raise EvidenceError("the witnesses ran different steps")
    endorsements = [w["endorsement"] for w in witnesses]
    quants = tuple(e["quant"] for e in endorsements)
    try:
        tolerance = max(tolerance_for(announced_dtype(e["dtype"]), e["wire"], quants) for e in endorsements)
    except KeyError:
        raise EvidenceError("a witness endorsed an unknown wire codec or quantization") from None
    return peers, witnesses, list(outputs), tolerance


def _signed_tokens(proof: dict[str, Any], witnesses: list[dict], *, inputs_length: int) -> list[int]:
    """The token each witness signed it sampled right after the step (at the position that ends the inputs), with
    the proof's sampling parameters, from the output it signed. Tokens count only between fp32 nodes of unquantized
    layers and a plain wire (node.client.verify.Auditor._exact: elsewhere honest noise flips near-tied tokens), and
    only for parameters that pick one token (greedy, or seeded)."""
    sampling = proof.get("sampling")
    if not isinstance(sampling, dict) or set(sampling) != {"temperature", "top_p", "seed"}:
        raise EvidenceError("a token proof names its sampling parameters: temperature, top_p, seed")
    temperature, top_p, seed = sampling["temperature"], sampling["top_p"], sampling["seed"]
    if not all(isinstance(v, float) for v in (temperature, top_p)) or not (seed is None or _is_int(seed)):
        raise EvidenceError("a token proof's temperature and top_p are floats, its seed an integer or none")
    if temperature != 0 and seed is None:
        raise EvidenceError("an unseeded draw cannot be re-derived: no token proof")
    signed = sampling_bytes(temperature, top_p, seed)
    tokens = []
    for witness in witnesses:
        endorsement, token = witness["endorsement"], witness.get("token")
        if (endorsement["dtype"], endorsement["quant"], endorsement["wire"]) != ("float32", "none", "none"):
            raise EvidenceError("tokens are compared only between fp32 nodes of unquantized layers on a plain wire")
        receipt = witness["receipt"]
        if not is_token_receipt(token) or (token["out"], token["chain"]) != (receipt["out"], receipt["chain"]):
            raise EvidenceError("every witness of a token proof signs the token it sampled from its step's output")
        check_token(_endorsed_key(endorsement), inputs_length, token, signed)
        tokens.append(token["token"])
    return tokens


def _length(inputs: torch.Tensor | list[int]) -> int:
    return len(inputs) if isinstance(inputs, list) else inputs.shape[1]


def equivocation_proof(model: str, accused: str, endorsement: dict[str, Any], position: int, tokens: int,
                       receipts: list[dict[str, Any]]) -> dict[str, Any]:
    """A proof that `accused` signed two receipts for one step of one session (same inputs, same chain) naming
    different outputs: what it pushed to its neighbour, and what it told the client it sent."""
    return {"v": 1, "kind": "equivocation", "model": model, "accused": accused, "endorsement": endorsement,
            "position": position, "tokens": tokens, "receipts": receipts}


def token_equivocation_proof(model: str, accused: str, endorsement: dict[str, Any], position: int, sampling: bytes,
                             receipts: list[dict[str, Any]]) -> dict[str, Any]:
    """A proof that a ring's last stage `accused` signed two different tokens at one position from one output of
    one step (same output digest, same chain): the one it fed the first stage, and the one it told the client."""
    return {"v": 1, "kind": "token_equivocation", "model": model, "accused": accused, "endorsement": endorsement,
            "position": position, "sampling": sampling, "receipts": receipts}


def _verify_token_equivocation(proof: dict[str, Any]) -> str:
    peer = endorsed_peer(proof.get("endorsement"))
    position, sampling, receipts = proof.get("position"), proof.get("sampling"), proof.get("receipts")
    if peer != proof["accused"] or not _is_int(position) or not isinstance(sampling, bytes) or len(sampling) > 64:
        raise EvidenceError("a token equivocation proof names the accused's endorsement, a position and sampling")
    if not isinstance(receipts, list) or len(receipts) != 2 or not all(is_token_receipt(r) for r in receipts):
        raise EvidenceError("a token equivocation proof holds two token receipts")
    first, second = receipts
    if (first["out"], first["chain"]) != (second["out"], second["chain"]) or first["token"] == second["token"]:
        raise EvidenceError("the two token receipts are not of one output with different tokens")
    key = _endorsed_key(proof["endorsement"])
    for receipt in receipts:
        check_token(key, position, receipt, sampling)
    return peer


def _endorsed_key(endorsement: dict[str, Any]) -> Ed25519PublicKey:
    """The session key of an endorsement already checked (`endorsed_peer`)."""
    try:
        return Ed25519PublicKey.from_public_bytes(endorsement["key"])
    except ValueError:
        raise EvidenceError("the endorsed key is not an Ed25519 key") from None


def _verify_equivocation(proof: dict[str, Any]) -> str:
    peer = endorsed_peer(proof.get("endorsement"))
    position, tokens, receipts = proof.get("position"), proof.get("tokens"), proof.get("receipts")
    if peer != proof["accused"] or not _is_int(position) or not _is_int(tokens):
        raise EvidenceError("an equivocation proof names the accused's endorsement, a position and its tokens")
    if not isinstance(receipts, list) or len(receipts) != 2 or not all(is_receipt(r) for r in receipts):
        raise EvidenceError("an equivocation proof holds two receipts")
    first, second = receipts
    if first["in"] != second["in"] or first["chain"] != second["chain"] or first["out"] == second["out"]:
        raise EvidenceError("the two receipts are not of one step with different outputs")
    key = _endorsed_key(proof["endorsement"])
    for receipt in receipts:
        check_receipt(key, position, tokens, receipt, receipt["out"])
    return peer


def _checked_output(witness: dict[str, Any], inputs: torch.Tensor | list[int]) -> tuple[torch.Tensor, tuple[int, int]]:
    """A witness's output, once its steps' chain over `inputs` and its signed receipt check out."""
    steps, receipt = witness.get("steps"), witness.get("receipt")
    if (not isinstance(steps, list) or not 0 < len(steps) <= MAX_PROOF_STEPS or not isinstance(receipt, dict)
            or not all(isinstance(s, list) and len(s) == 2 and all(_is_int(n) for n in s) for s in steps)):
        raise EvidenceError("a witness lists its steps as [position, tokens] pairs and one receipt")
    length = _length(inputs)
    chain, expected, in_digest = b"", 0, ""
    for position, tokens in steps:
        if position != expected or tokens < 1 or position + tokens > length:
            raise EvidenceError("a witness's steps must follow each other from position 0, within the inputs")
        in_digest = (token_digest(inputs[position:position + tokens]) if isinstance(inputs, list)
                     else digest(inputs[:, position:position + tokens]))
        chain, expected = chain_link(chain, position, tokens, in_digest), position + tokens
    output = _tensor(witness.get("output"))
    position, tokens = steps[-1]
    if output.dim() != 3 or output.shape[:2] != (1, tokens) or expected != length:
        raise EvidenceError("a witness's output must be its last step's, and that step must end the inputs")
    out_digest = digest(output)
    if receipt.get("out") != out_digest or receipt.get("chain") != chain:
        raise EvidenceError("a witness's receipt does not match its inputs and output")
    try:
        key = Ed25519PublicKey.from_public_bytes(witness["endorsement"]["key"])
        key.verify(receipt.get("sig") if isinstance(receipt.get("sig"), bytes) else b"",
                   _receipt_bytes(position, tokens, in_digest, out_digest, chain))
    except (InvalidSignature, ValueError):
        raise EvidenceError("a witness's receipt is not signed by its session's key") from None
    return output, (position, tokens)


def _inputs(encoded: Any) -> torch.Tensor | list[int]:
    if isinstance(encoded, dict) and set(encoded) == {"tokens"} and isinstance(encoded["tokens"], list):
        tokens = encoded["tokens"]
        if tokens and all(_is_int(t) and t >= 0 for t in tokens):
            return tokens
    elif isinstance(encoded, dict) and set(encoded) == {"hidden"}:
        hidden = _tensor(encoded["hidden"])
        if hidden.dim() == 3 and hidden.shape[0] == 1:
            return hidden
    raise EvidenceError("a proof's inputs are {'tokens': [ids]} or {'hidden': a [1, n, hidden] tensor}")


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _tensor_bytes(tensor: torch.Tensor) -> bytes:
    return wire_encode(tensor, "none").SerializeToString()


def _tensor(data: Any) -> torch.Tensor:
    """A tensor of a proof, bounded and finite (the proof's size already bounds its bytes)."""
    try:
        proto = runtime_pb2.Tensor.FromString(data if isinstance(data, bytes) else b"")
        if proto.dtype not in ("float32", "float16", "bfloat16") or not 1 <= len(proto.size) <= 3:
            raise ValueError(f"a {proto.dtype} tensor of {len(proto.size)} dimensions")
        tensor = wire_decode(proto)
    except Exception as e:
        raise EvidenceError(f"a proof's tensor is unreadable: {str(e)[:120]}") from None
    if not torch.isfinite(tensor).all():
        raise EvidenceError("a proof's tensor holds NaN or infinity")
    return tensor
