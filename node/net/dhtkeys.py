"""The names of Layerhive's DHT keys and of the signed subkeys under them (their bounds: `node.net.dhtbounds`).

A value under an `owner_subkey` is signed by the key the subkey names (hivemind's RSASignatureValidator), and the
subkey's peer id must be that key's (`subkey_owner`). The key must be spelled exactly as OpenSSH writes it: the
format allows a trailing comment, so without that rule one key could sign any number of distinct subkeys.
"""

from __future__ import annotations

import logging
import time
from typing import Any

from hivemind.utils.crypto import RSAPublicKey

from node.net.identity import NodeIdentity, peer_id_from_owner_key
from swarm.records import RecordError

logger = logging.getLogger(__name__)

OWNER_PREFIX = "[owner:"
LOG_EVERY_S = 60.0  # the same rejection is logged at most this often: a hostile peer must not flood the log
MAX_RECORD_BYTES = 8192  # a signed server record is ~1 KB; the cap keeps strangers from parking blobs in our key


def servers_key(model: str) -> str:
    return f"layerhive:{model}:servers"


def owner_subkey(identity: NodeIdentity) -> str:
    return f"{identity.peer_id}{OWNER_PREFIX}{identity.owner_key.decode()}]"


def is_owner_subkey(subkey: Any) -> bool:
    """Whether `subkey` has the shape of an `owner_subkey` (not whether it is a valid one: `subkey_owner`)."""
    return isinstance(subkey, str) and OWNER_PREFIX in subkey


def subkey_owner(subkey: Any) -> str:
    """The peer that owns (signed the value under) an `owner_subkey`; RecordError if the subkey names none, names
    a key not spelled as OpenSSH writes it, or a peer id that is not its owner key's. Does not check the signature
    (the DHT's validators did)."""
    if not isinstance(subkey, str):
        raise RecordError(f"subkey: expected str, got {type(subkey).__name__}")
    claimed, prefix, rest = subkey.partition(OWNER_PREFIX)
    if not prefix or not rest.endswith("]"):
        raise RecordError("subkey: unsigned, it names no [owner:<public key>]")
    owner_key = rest[:-1].encode()
    try:
        owner = peer_id_from_owner_key(owner_key)
        canonical = RSAPublicKey.from_bytes(owner_key).to_bytes() == owner_key
    except Exception:
        raise RecordError("subkey: the owner key is not an RSA public key") from None
    if not canonical:
        raise RecordError("subkey: the owner key is not in canonical OpenSSH form (a comment, or other spelling)")
    if claimed != owner:
        raise RecordError(f"subkey: names peer {claimed!r} but its owner key is peer {owner}'s")
    return owner


_last_logged: dict[tuple[str, str], float] = {}


def log_rejection(stage: str, subkey: Any, reason: object) -> None:
    """Logs why a DHT record was refused, each (peer, reason) at most once per LOG_EVERY_S."""
    subkey_text = str(subkey).partition(OWNER_PREFIX)[0][:80]  # the peer id part, not the long public key
    key, now = (subkey_text, str(reason)[:200]), time.monotonic()
    if now - _last_logged.get(key, -LOG_EVERY_S) < LOG_EVERY_S:
        return
    if len(_last_logged) > 1024:
        _last_logged.clear()
    _last_logged[key] = now
    logger.warning("rejected a DHT record %s (subkey %r): %s", stage, subkey_text, key[1])
