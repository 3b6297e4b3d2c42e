"""Publishing and reading proofs of misbehaviour on the DHT (the proofs themselves: `node.net.evidence`).

Publishing (`ProofBook`): a proof of at most `MAX_PROOF_BYTES` is stored on the DHT under a key per accused peer
(`proofs_key`), for `PROOF_TTL_S`, in parts of `PART_BYTES` and a list of the parts' hashes (`proof_entries`), each
under a subkey that is its own hash. Honest DHT peers refuse an entry over `MAX_ENTRY_BYTES` or under a subkey that
is not its hash (`ProofValidator`: no one can overwrite a published proof with junk); a reader assembles at most
`MAX_PROOFS_READ` listed proofs of a key, picked at random, so a flood of junk under a peer's key costs it bounded
work. Only a proof that verifies changes anything; one is enough.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import random
import time
from collections.abc import Iterable
from typing import Any

from hivemind.dht.routing import DHTID
from hivemind.dht.validation import DHTRecord, RecordValidatorBase
from hivemind.utils import MSGPackSerializer, get_dht_time

from node.net.evidence import MAX_PROOF_BYTES, EvidenceError, verify_proof

logger = logging.getLogger(__name__)

PART_BYTES = 8 << 10  # a proof is stored in parts: a hivemind DHT call must stay under 16 KB (see proof_entries)
MAX_ENTRY_BYTES = PART_BYTES + 1024
MAX_PROOFS_READ = 8  # listed proofs assembled per accused peer and read
PROOF_TTL_S = 24 * 3600.0
REREAD_S = 30.0  # a peer's proofs are read again at most this often
READ_TIMEOUT_S = 10.0



def proofs_key(model: str, accused: str) -> str:
    return f"layerhive:{model}:proofs:{accused}"


def proof_subkey(value_bytes: bytes) -> str:
    return hashlib.blake2b(value_bytes, digest_size=16).hexdigest()


class ProofValidator(RecordValidatorBase):
    """Refuses an entry of a published proof (a part, or the list of parts) stored under another key than its
    accused's, over MAX_ENTRY_BYTES, or under a subkey that is not its hash: no one can overwrite a published
    proof's entries. (As with server records, a value that does not say it is a proof's is left to its readers.)"""

    def validate(self, record: DHTRecord) -> bool:
        try:
            value = MSGPackSerializer.loads(record.value)
        except Exception:
            return False
        if not isinstance(value, dict) or value.get("v") != 1 or "accused" not in value:
            return True  # not a proof's
        model, accused = value.get("model"), value.get("accused")
        try:
            subkey = MSGPackSerializer.loads(record.subkey) if record.subkey is not None else None
        except Exception:
            return False
        return (isinstance(model, str) and isinstance(accused, str) and len(record.value) <= MAX_ENTRY_BYTES
                and record.key == DHTID.generate(source=proofs_key(model, accused)).to_bytes()
                and subkey == proof_subkey(record.value))


def proof_entries(proof: dict[str, Any]) -> list[dict[str, Any]]:
    """A proof as DHT entries of at most MAX_ENTRY_BYTES: its serialized bytes in parts of PART_BYTES, then the
    list of the parts' hashes. (A hivemind DHT call carrying more than 16 KB breaks the DHT's process: it reads its
    pipe without blocking, so a message written in two pieces is cut.)"""
    data = MSGPackSerializer.dumps(proof)
    head = {"v": 1, "model": proof["model"], "accused": proof["accused"]}
    parts = [data[i:i + PART_BYTES] for i in range(0, len(data), PART_BYTES)]
    return [*({**head, "part": part} for part in parts), {**head, "parts": [proof_subkey(p) for p in parts]}]


def assemble_proofs(entries: list[Any], limit: int = MAX_PROOFS_READ) -> list[Any]:
    """The proofs that `entries` (the values under an accused's key) hold whole, at most `limit` of them, picked
    at random among those listed (each decoded, not yet verified)."""
    parts = {proof_subkey(e["part"]): e["part"] for e in entries
             if isinstance(e, dict) and isinstance(e.get("part"), bytes) and len(e["part"]) <= PART_BYTES}
    lists = [e["parts"] for e in entries if isinstance(e, dict) and isinstance(e.get("parts"), list)
             and 0 < len(e["parts"]) <= MAX_PROOF_BYTES // PART_BYTES]
    random.shuffle(lists)
    proofs = []
    for hashes in lists[:limit]:
        if all(isinstance(h, str) and h in parts for h in hashes):
            try:
                proofs.append(MSGPackSerializer.loads(b"".join(parts[h] for h in hashes)))
            except Exception:
                proofs.append(None)
    return proofs


class ProofBook:
    """The proven liars of one model's swarm, as published proofs show them; every proof is verified before it
    counts, and a verified one is remembered (a lie once proven stays proven)."""

    def __init__(self, dht: Any, model: str, *, reread_s: float = REREAD_S) -> None:
        self.dht, self.model, self.reread_s = dht, model, reread_s
        self.proven: dict[str, dict[str, Any]] = {}  # accused -> a proof that verified
        self._read_at: dict[str, float] = {}
        self.refused = 0  # proofs read that did not verify (forged, stale or junk)
        self.stored: set[str] = set()  # peers a proof against which this book stored whole
        self._background: set[asyncio.Future] = set()  # reads left running (`liars(wait=False)`)

    async def liars(self, peers: Iterable[str], *, wait: bool = True) -> frozenset[str]:
        """Those of `peers` proven to have lied, reading the proofs of those not read lately: at once, or
        (`wait=False`, a node's heartbeat, which a slow DHT read must not hold up) in the background, for later."""
        peers, now = set(peers), time.monotonic()
        if len(self._read_at) > 4096:
            self._read_at.clear()
        due = [p for p in peers if p not in self.proven and now - self._read_at.get(p, -self.reread_s) >= self.reread_s]
        for peer in due:
            self._read_at[peer] = now
        reads = asyncio.gather(*(self._read(peer) for peer in due), return_exceptions=True)
        if wait:
            await reads
        else:
            self._background.add(reads)
            reads.add_done_callback(self._background.discard)
        return frozenset(peers & self.proven.keys())

    async def drop_liars(self, records: list, *, wait: bool = True) -> list:
        """`records` (ServerRecords) without those of proven liars (see `liars`)."""
        liars = await self.liars((r.peer_id for r in records), wait=wait)
        return [r for r in records if r.peer_id not in liars]

    async def _read(self, accused: str) -> None:
        found = await asyncio.wait_for(self.dht.get(proofs_key(self.model, accused), latest=True, return_future=True),
                                       READ_TIMEOUT_S)
        if found is None or not isinstance(found.value, dict):
            return
        for proof in assemble_proofs([item.value for item in found.value.values()]):
            try:
                verify_proof(proof, model=self.model, accused=accused)
            except EvidenceError as e:
                self.refused += 1
                logger.info("ignored a proof against %s: %s", accused[:16], e)
                continue
            logger.warning("%s is a proven liar (a published proof checks out): not using it", accused)
            self.proven[accused] = proof
            return

    async def publish(self, proof: dict[str, Any]) -> bool:
        """Checks `proof` as any reader will, remembers it, and stores it in parts under its accused's key (the
        list of parts last, so that a reader finds a list only once its parts are there). One proof a peer is
        enough: once this book stored one against the accused, others against it are not stored (a liar caught
        on every check of every answer would otherwise grow its key by a proof each time: in the benchmark's token
        sampler series, ~40 proofs under one key, after which that client's DHT reads came back empty; that the
        growth caused it is likely, not proven)."""
        accused = verify_proof(proof, model=self.model)
        self.proven[accused] = proof
        if accused in self.stored:
            return True
        *parts, listing = proof_entries(proof)
        stored = await asyncio.gather(*(self._store(accused, entry) for entry in parts))
        if all(stored) and await self._store(accused, listing):
            self.stored.add(accused)
            return True
        return False

    async def _store(self, accused: str, entry: dict[str, Any]) -> bool:
        subkey = proof_subkey(MSGPackSerializer.dumps(entry))
        return await self.dht.store(proofs_key(self.model, accused), subkey=subkey, value=entry,
                                    expiration_time=get_dht_time() + PROOF_TTL_S, return_future=True)
