"""Bounds on all that a Layerhive DHT peer stores or reads: every value is of one of our key kinds, under that kind's
key, and bounded in size, lifetime and number per key; a peer's storage as a whole has a byte budget.

The kinds (`KINDS`): a model's server records (`servers_key`), its credit tallies (`credit_key`), and the proofs
against one peer (`proofs_key`). DHT keys travel hashed, so a peer cannot read a record's key name; it tells the kind
from the value (each names its model, a proof also its accused) and checks that the key is that kind's key for those
names. A value of no kind is refused: a Layerhive DHT holds nothing else.

Enforced in the DHT's own process, on what it is asked to store and on every answer it reads:
- `BoundsValidator` runs first, before any regex or signature check: the sizes of the value and the subkey.
- `KindValidator` runs last, on the value without its signature: the kind, its key, and the kind's bounds.
- `BoundedProtocol` (`install`): a key holds at most its kind's number of subkeys and the storage at most
  STORAGE_BUDGET_BYTES; a peer's answer holding more subkeys than any kind allows is refused before any of them is
  checked, so a reader offered 10,000 subkeys checks no signature of them.
"""

from __future__ import annotations

import functools
import logging
import re
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import hivemind.dht.node
from hivemind.dht.protocol import DHTProtocol
from hivemind.dht.routing import DHTID
from hivemind.dht.storage import DHTLocalStorage, DictionaryDHTValue
from hivemind.dht.validation import DHTRecord, RecordValidatorBase
from hivemind.utils import MSGPackSerializer, get_dht_time

from node.net.credit import CREDIT_TTL_S, credit_key, valid_tally
from node.net.dhtkeys import MAX_RECORD_BYTES, is_owner_subkey, log_rejection, servers_key, subkey_owner
from node.net.evidence import MAX_PROOF_BYTES
from node.net.proofbook import MAX_ENTRY_BYTES, PART_BYTES, PROOF_TTL_S, proofs_key
from swarm.records import RecordError

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class KeyKind:
    name: str
    key_name: Callable[[dict], str]  # the key a value of this kind belongs under, from the names it carries
    max_value_bytes: int  # without the signature
    max_subkeys: int  # under one key
    max_ttl_s: float  # how far ahead of now a value may expire (DHT time is wall clock: slack for skewed clocks)
    owner_subkeys: bool  # subkeys are `owner_subkey`s (signed), else content hashes (`proof_subkey`)


CLOCK_SLACK_S = 3600.0
MAX_OWNERS_PER_KEY = 512  # servers or tallies of one model: Petals' largest swarms had a few hundred servers
MAX_PROOFS_KEPT = 8  # per accused peer, as many as a reader assembles (node.net.proofbook.MAX_PROOFS_READ)
SERVERS = KeyKind("servers", lambda v: servers_key(v["model"]), MAX_RECORD_BYTES, MAX_OWNERS_PER_KEY,
                  CLOCK_SLACK_S, owner_subkeys=True)
CREDIT = KeyKind("credit", lambda v: credit_key(v["model"]), 10 << 10, MAX_OWNERS_PER_KEY,
                 CREDIT_TTL_S + CLOCK_SLACK_S, owner_subkeys=True)
PROOFS = KeyKind("proofs", lambda v: proofs_key(v["model"], v["accused"]), MAX_ENTRY_BYTES,
                 MAX_PROOFS_KEPT * (MAX_PROOF_BYTES // PART_BYTES + 1), PROOF_TTL_S + CLOCK_SLACK_S,
                 owner_subkeys=False)
KINDS = (SERVERS, CREDIT, PROOFS)

MAX_VALUE_BYTES = max(kind.max_value_bytes for kind in KINDS) + 1024  # room for an RSA signature
MAX_SUBKEY_BYTES = 1024  # an owner subkey of a 2048-bit key is ~440 bytes
MAX_SUBKEYS = max(kind.max_subkeys for kind in KINDS)
STORAGE_BUDGET_BYTES = 64 << 20  # per storage (a peer's own and its cache): ~50,000 server records
ENTRY_OVERHEAD_BYTES = 64  # a stored value's key or subkey and expiration, roughly
RECOUNT_S = 1.0  # how often a storage's bytes are counted again (stores in between are added up)
_HASH_SUBKEY = re.compile(r"[0-9a-f]{32}")


def kind_of(value: Any) -> KeyKind | None:
    """The kind a value (without its signature, decoded) says it is, if it names what its key is made of."""
    if not isinstance(value, dict) or not isinstance(value.get("model"), str):
        return None
    if "accused" in value:
        return PROOFS if isinstance(value["accused"], str) else None
    if "credit" in value:
        return CREDIT
    return SERVERS if "peer_id" in value else None


@functools.lru_cache(maxsize=1024)
def key_id(key_name: str) -> bytes:
    return DHTID.generate(source=key_name).to_bytes()


def subkey_cap(subkey: Any) -> int:
    """How many subkeys a key may hold, told from the shape of one of them (a kind's subkeys all share a shape)."""
    return MAX_OWNERS_PER_KEY if is_owner_subkey(subkey) else PROOFS.max_subkeys


class BoundsValidator(RecordValidatorBase):
    """Refuses a value or subkey larger than any kind's, before the costlier validators look at it."""

    def validate(self, record: DHTRecord) -> bool:
        if len(record.value) > MAX_VALUE_BYTES or len(record.subkey or b"") > MAX_SUBKEY_BYTES:
            log_rejection("by size", None, f"value {len(record.value)} bytes, subkey {len(record.subkey or b'')}")
            return False
        return True

    @property
    def priority(self) -> int:
        return 100  # validated first (hivemind validates in decreasing priority; the signature check is 10)


class KindValidator(RecordValidatorBase):
    """Refuses a value that is of none of our kinds, under another key than its kind's, or beyond its kind's bounds.
    (The kinds' own validators check the rest: `ServerRecordValidator`, `ProofValidator`.)"""

    def validate(self, record: DHTRecord) -> bool:
        try:
            value, subkey = MSGPackSerializer.loads(record.value), MSGPackSerializer.loads(record.subkey)
        except Exception:
            log_rejection("by kind", None, "not msgpack")
            return False
        try:
            check_kind(record, value, subkey)
        except RecordError as e:
            log_rejection("by kind", subkey, e)
            return False
        return True


def check_kind(record: DHTRecord, value: Any, subkey: Any) -> KeyKind:
    """The kind of `record` (its value and subkey decoded); RecordError if it is of none or breaks its bounds."""
    kind = kind_of(value)
    if kind is None:
        raise RecordError("the value is of none of Layerhive's key kinds")
    if record.key != key_id(kind.key_name(value)):
        raise RecordError(f"a {kind.name} value under another key")
    if len(record.value) > kind.max_value_bytes:
        raise RecordError(f"{len(record.value)} bytes, more than {kind.max_value_bytes} for {kind.name}")
    if record.expiration_time > get_dht_time() + kind.max_ttl_s:
        raise RecordError(f"expires more than {kind.max_ttl_s:.0f} s ahead")
    if kind.owner_subkeys:
        subkey_owner(subkey)
    elif not (isinstance(subkey, str) and _HASH_SUBKEY.fullmatch(subkey)):
        raise RecordError(f"a {kind.name} entry's subkey must be its hash")
    if kind is CREDIT and not valid_tally(value["credit"]):
        raise RecordError("not a tally of checked tokens")
    return kind


class BoundedStorage(DHTLocalStorage):
    """A DHT peer's storage (or cache) that keeps at most a kind's number of subkeys under a key and at most
    `budget_bytes` in all. A subkey already held may always be refreshed; new ones wait for room."""

    def __init__(self, maxsize: int | None = None, budget_bytes: int = STORAGE_BUDGET_BYTES) -> None:
        super().__init__(maxsize)
        self.budget_bytes = budget_bytes
        self._held_bytes, self._counted_at = 0, float("-inf")
        self.refused = 0

    def store(self, key: DHTID, value: bytes, expiration_time: float, subkey: Any = None) -> bool:
        if subkey is None and not self._room_for(value):
            return False
        return super().store(key, value, expiration_time, subkey)

    def store_subkey(self, key: DHTID, subkey: Any, value: bytes, expiration_time: float) -> bool:
        held = self.get(key)
        subkeys = held.value if held is not None and isinstance(held.value, DictionaryDHTValue) else None
        if subkeys is None or subkey not in subkeys:
            if subkeys is not None and len(subkeys) >= subkey_cap(subkey):
                self.refused += 1
                log_rejection("for room", subkey, f"the key holds {len(subkeys)} subkeys already")
                return False
            if not self._room_for(value):
                return False
        return super().store_subkey(key, subkey, value, expiration_time)

    def _room_for(self, value: Any) -> bool:
        size = value_bytes(value) + ENTRY_OVERHEAD_BYTES
        if self.held_bytes() + size > self.budget_bytes:
            self.refused += 1
            log_rejection("for room", None, f"the storage holds {self._held_bytes} bytes of {self.budget_bytes}")
            return False
        self._held_bytes += size  # counted until the next recount
        return True

    def held_bytes(self) -> int:
        now = time.monotonic()
        if now - self._counted_at >= RECOUNT_S:
            held = sum(value_bytes(item.value) + ENTRY_OVERHEAD_BYTES for item in self.data.values())
            self._held_bytes, self._counted_at = held, now
        return self._held_bytes


def value_bytes(value: Any) -> int:
    if isinstance(value, DictionaryDHTValue):
        return sum(len(item.value) + ENTRY_OVERHEAD_BYTES for item in value.data.values())
    return len(value)


class BoundedProtocol(DHTProtocol):
    """hivemind's DHT protocol with `BoundedStorage`s, refusing a peer's answer (or a whole dictionary to store)
    that holds more subkeys than any kind allows before checking any of them."""

    @classmethod
    async def create(cls, *args: Any, **kwargs: Any) -> BoundedProtocol:
        protocol = await super().create(*args, **kwargs)
        protocol.storage, protocol.cache = BoundedStorage(), BoundedStorage(maxsize=protocol.cache.maxsize)
        return protocol

    def _validate_dictionary(self, key_bytes: bytes, dictionary: DictionaryDHTValue) -> bool:
        if len(dictionary) > MAX_SUBKEYS:
            log_rejection("read", None, f"a peer's answer holds {len(dictionary)} subkeys, more than {MAX_SUBKEYS}")
            return False
        return super()._validate_dictionary(key_bytes, dictionary)


# Peers call a protocol's handlers by its class name ("DHTProtocol.rpc_store"): keep hivemind's.
BoundedProtocol.__name__ = BoundedProtocol.__qualname__ = DHTProtocol.__name__


def install() -> None:
    """Makes this process's DHT nodes use `BoundedProtocol` (call it in the DHT's process, before its node starts)."""
    hivemind.dht.node.DHTProtocol = BoundedProtocol
