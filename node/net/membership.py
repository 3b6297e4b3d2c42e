"""Who serves what: announcing this node's signed record on the DHT and reading everyone else's.

All servers of a model share one DHT key; each writes its own subkey with an expiry, refreshed by a
heartbeat, so a node that dies silently drops out after `ttl_s`. The subkey is
`<peer id>[owner:<ssh-rsa public key>]`: hivemind's RSASignatureValidator makes every honest peer refuse
a value under it that the key's owner did not sign, and since a peer id is the hash of that same key
(see node.net.identity), `ServerRecordValidator` also refuses a record whose peer id is not the signer's.
Both run on every peer of a Layerhive DHT (`open_dht`, which returns a `SwarmPeer`): at storage time and on
every value read back from another peer, with the bounds of node.net.dhtbounds (what kinds of value, how large,
how many under a key; a value of no kind is refused). `SwarmPeer.list_servers` checks everything but the
signature again and logs why it drops a record.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import functools
import logging
import os
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import filelock
from hivemind import DHT
from hivemind.dht.crypto import RSASignatureValidator
from hivemind.dht.validation import DHTRecord, RecordValidatorBase
from hivemind.utils import MSGPackSerializer, get_dht_time
from hivemind.utils.crypto import RSAPrivateKey, RSAPublicKey

from node.net import dhtbounds
from node.net.config import load_config
from node.net.credit import CREDIT_TTL_S, CheckedCredit, credit_key, credit_value, sum_tallies
from node.net.dhtbounds import BoundsValidator, KindValidator, key_id
from node.net.dhtkeys import log_rejection, owner_subkey, servers_key, subkey_owner
from node.net.identity import IdentityError, NodeIdentity, claim, ephemeral_identity
from node.net.lifeline import GRACE_S, default_signals, die_with_spawner, kill_descendants, watch_parent
from node.net.proofbook import ProofBook, ProofValidator
from node.net.reachability import measure_in_dht, peer_ids_of, relay_p2p_options
from swarm.records import RecordError, ServerRecord

logger = logging.getLogger(__name__)

DEFAULT_TTL_S = 30.0


class _ParentBoundDHT(DHT):
    """A DHT whose process ends with the process that opened it (see `node.net.lifeline`)."""

    bounded = True  # with node.net.dhtbounds' bounds on storage and answers (a test's raw attacker goes without)

    def run(self) -> None:
        """The DHT process: it shuts down when its parent is gone (even killed), and its p2p daemon dies
        with it (the daemon is spawned and awaited by this process's main thread)."""
        default_signals()
        watch_parent(self._shutdown_orphan)
        if self.bounded:
            dhtbounds.install()  # bounded subkeys per key, storage and answers read (this is the DHT's process)
        self._inner_pipe = _WholeMessagePipe(self._inner_pipe)
        spawn = asyncio.subprocess.create_subprocess_exec  # hivemind's way to start p2pd; this process is ours
        asyncio.subprocess.create_subprocess_exec = functools.partial(spawn, preexec_fn=die_with_spawner)
        super().run()

    def _shutdown_orphan(self) -> None:
        """The graceful shutdown the parent would have asked for (it stops p2pd), then the hard way."""
        with contextlib.suppress(Exception):
            self._outer_pipe.send(("_shutdown", [], {}))
        time.sleep(GRACE_S)
        kill_descendants()
        os._exit(1)


class _WholeMessagePipe:
    """The DHT process's end of its call pipe, read whole. hivemind watches the pipe on its event loop, which makes
    it non-blocking, so a call larger than what the pipe holds at once (seen from 20 KB on a loaded machine) was read
    in part, raised BlockingIOError and left the rest to be read as a broken call: the DHT process died."""

    def __init__(self, connection: Any) -> None:
        self._connection = connection

    def recv(self) -> Any:
        os.set_blocking(self._connection.fileno(), True)  # poll() said a call has begun: wait for all of it
        try:
            return self._connection.recv()
        finally:
            os.set_blocking(self._connection.fileno(), False)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._connection, name)


@dataclass(eq=False)
class SwarmPeer:
    """One running peer of a Layerhive DHT, as `open_dht` returns it: the hivemind DHT, the identity the
    records it announces are signed with, and how peers reach it (measured when a server joins)."""

    dht: DHT
    identity: NodeIdentity
    reachability: str | None = None  # "direct", "relayed" or "unreachable"; None: not measured (see open_dht)
    claimed: filelock.BaseFileLock | None = None  # a named identity's claim, given back on shutdown
    proof_books: dict[str, ProofBook] = dataclasses.field(default_factory=dict)  # by model

    @property
    def peer_id(self) -> str:
        return self.identity.peer_id

    @property
    def visible_maddrs(self) -> list[str]:
        return [str(m) for m in self.dht.get_visible_maddrs()]

    async def announce(self, record: ServerRecord, *, ttl_s: float = DEFAULT_TTL_S) -> bool:
        """Stores `record`, signed, exactly as given. It must be this peer's and say the reachability measured
        here: a record claiming another would mislead every planner and router."""
        if record.peer_id != self.peer_id:
            raise ValueError(f"record for {record.peer_id} cannot be signed by {self.peer_id}")
        if self.reachability is not None and record.reachability != self.reachability:
            raise ValueError(f"the record says reachability {record.reachability!r}, measured {self.reachability!r}")
        return await self.dht.store(
            servers_key(record.model), subkey=owner_subkey(self.identity), value=record.to_dict(),
            expiration_time=get_dht_time() + ttl_s, return_future=True,
        )

    async def list_servers(self, model: str, *, num_layers: int | None = None) -> list[ServerRecord]:
        """Live, valid records of `model`'s servers; bad ones are logged with the reason and skipped."""
        found = await self.dht.get(servers_key(model), latest=True, return_future=True)
        return _valid_records(found, model, num_layers)

    async def publish_credit(self, model: str, tally: Mapping[str, int]) -> bool:
        """Stores this client's tally of checked tokens (node.net.credit), signed by its identity, replacing its
        previous one."""
        return await self.dht.store(credit_key(model), subkey=owner_subkey(self.identity),
                                    value=credit_value(model, tally), expiration_time=get_dht_time() + CREDIT_TTL_S,
                                    return_future=True)

    async def read_credit(self, model: str) -> dict[str, CheckedCredit]:
        """Every node's checked credit, summed over the clients' tallies (node.net.credit)."""
        return sum_tallies(await self.dht.get(credit_key(model), latest=True, return_future=True))

    def proof_book(self, model: str) -> ProofBook:
        """The proven liars of `model`'s swarm as this peer reads them (node.net.evidence), shared by its users."""
        if model not in self.proof_books:
            self.proof_books[model] = ProofBook(self.dht, model)
        return self.proof_books[model]

    def list_servers_blocking(self, model: str, *, num_layers: int | None = None) -> list[ServerRecord]:
        """`list_servers` for synchronous callers (outside an event loop)."""
        return _valid_records(self.dht.get(servers_key(model), latest=True), model, num_layers)

    def shutdown(self) -> None:
        try:
            self.dht.shutdown()
        finally:
            if self.claimed is not None:
                self.claimed.release()
                self.claimed = None


def open_dht(initial_peers: Sequence[str], host_maddrs: Sequence[str], *, client_mode: bool = False,
             identity: NodeIdentity | None = None, announce_maddrs: Sequence[str] = (),
             relays: Sequence[str] | None = None, relay_service: bool = False) -> SwarmPeer:
    """A running DHT peer that signs its own records and validates everyone's. p2pd runs with the
    identity's key, so the DHT's peer id is the one its records are signed for; without an identity,
    an ephemeral key (fine for clients, bootstrap peers and throwaway nodes).

    `announce_maddrs`: the addresses peers are told to dial (e.g. a public address behind port forwarding).
    `relays`: relay peers' multiaddrs to serve through when peers cannot dial us (see node.net.reachability);
    None: a server DHT takes them from the user's configuration (node.net.config), a client or relay none.
    `relay_service`: this peer is publicly reachable and relays for others (a bootstrap peer).
    A server DHT with peers to ask measures its reachability once it has joined (`SwarmPeer.reachability`)."""
    persistent = identity is not None and identity.name is not None
    identity = identity or ephemeral_identity()
    if relays is None:
        relays = () if client_mode or relay_service else load_config().relays
    network = _network_options(announce_maddrs, relays, relay_service)
    claimed = claim(identity) if persistent else None
    try:
        with identity.p2pd_identity_file() as identity_path:  # p2pd has read the key once the DHT is ready
            dht = _ParentBoundDHT(
                initial_peers=list(initial_peers) or None, host_maddrs=list(host_maddrs), start=True,
                client_mode=client_mode, record_validators=record_validators(identity.private_key),
                identity_path=identity_path,
                # A fresh key cannot be in use elsewhere; a persistent one may be (a copied key elsewhere).
                check_if_identity_free=persistent, **network,
            )
    except BaseException:
        if claimed is not None:
            claimed.release()
        raise
    peer = SwarmPeer(dht, identity, claimed=claimed)
    if dht.peer_id.to_base58() != identity.peer_id:
        peer.shutdown()
        raise IdentityError(f"p2pd runs as {dht.peer_id} instead of the identity's {identity.peer_id}")
    if not client_mode and not relay_service and initial_peers:
        probers = peer_ids_of([*relays, *initial_peers])
        peer.reachability = dht.run_coroutine(functools.partial(measure_in_dht, probers=probers,
                                                                relayed=bool(relays)))
        logger.info("reachability: %s", peer.reachability)
    return peer


def _network_options(announce_maddrs: Sequence[str], relays: Sequence[str], relay_service: bool) -> dict[str, Any]:
    if relays and relay_service:
        raise ValueError("a relay peer must be publicly reachable: it cannot itself serve through relays")
    if relays:
        return relay_p2p_options(relays, announce_maddrs)
    options: dict[str, Any] = {"announce_maddrs": list(announce_maddrs)} if announce_maddrs else {}
    if relay_service:  # go-libp2p runs the relay service only while it believes it is publicly reachable
        options.update(use_relay=True, force_reachability="public")
    return options


def record_validators(private_key: RSAPrivateKey) -> list[RecordValidatorBase]:
    return [BoundsValidator(), SignatureValidator(private_key), ServerRecordValidator(), ProofValidator(),
            KindValidator()]


def _valid_records(found: Any, model: str, num_layers: int | None) -> list[ServerRecord]:
    if found is None or not isinstance(found.value, dict):
        return []
    records = []
    for subkey, item in found.value.items():
        try:
            records.append(check_entry(subkey, item.value, model=model, num_layers=num_layers))
        except RecordError as e:
            log_rejection("read", subkey, e)
    return sorted(records, key=lambda r: (r.start, r.end, r.peer_id))


def check_entry(subkey: Any, value: Any, *, model: str | None = None, num_layers: int | None = None
                ) -> ServerRecord:
    """The record under `subkey` if the subkey's owner key is the claimed peer's and the value is a valid
    record of that peer (and of `model`); else RecordError saying why. Does not check the signature."""
    owner = subkey_owner(subkey)
    record = ServerRecord.from_dict(value, num_layers=num_layers)
    if record.peer_id != owner:
        raise RecordError(f"peer_id: the record claims {record.peer_id} but is owned by {owner}")
    if model is not None and record.model != model:
        raise RecordError(f"model: a record of {record.model!r} under the key of {model!r}")
    return record


class SignatureValidator(RSASignatureValidator):
    """hivemind's owner-signature check, also refusing malformed owner keys (hivemind raises on them)
    and logging why a record fails (hivemind logs at debug level only)."""

    def validate(self, record: DHTRecord) -> bool:
        problem = self._problem(record)
        if problem is not None:
            log_rejection("by signature", _subkey_text(record.subkey), problem)
        return problem is None

    def _problem(self, record: DHTRecord) -> str | None:
        owners = set(self._PUBLIC_KEY_RE.findall(record.key))
        if record.subkey is not None:
            owners.update(self._PUBLIC_KEY_RE.findall(record.subkey))
        if not owners:
            return None  # not a protected record: the schema validator decides whether that is allowed
        if len(owners) > 1:
            return "key and subkey name different owners"
        try:
            public_key = RSAPublicKey.from_bytes(owners.pop())
        except Exception:
            return "the owner key is not an RSA public key"
        signatures = self._SIGNATURE_RE.findall(record.value)
        if len(signatures) != 1:
            return f"{len(signatures)} signatures, need exactly 1"
        unsigned = dataclasses.replace(record, value=self.strip_value(record))
        if not public_key.verify(self._serialize_record(unsigned), signatures[0]):
            return "the signature does not match the owner key"
        return None


class ServerRecordValidator(RecordValidatorBase):
    """Refuses a value under a servers key that is not a valid record of its owner. Runs after the
    signature check, on the value with the signature stripped.

    A peer cannot invert the hashed DHT key, so a value counts as a servers record when it names a
    model whose servers key hashes to the record's key; anything else is `KindValidator`'s to refuse
    (node.net.dhtbounds: a value of none of our kinds, or beyond its kind's bounds)."""

    def validate(self, record: DHTRecord) -> bool:
        try:
            value = MSGPackSerializer.loads(record.value)
        except Exception:
            log_rejection("by schema", _subkey_text(record.subkey), "the value is not msgpack")
            return False
        model = value.get("model") if isinstance(value, dict) else None
        if not isinstance(model, str) or record.key != key_id(servers_key(model)):
            return True  # not a servers record
        try:
            check_entry(MSGPackSerializer.loads(record.subkey), value, model=model)
        except Exception as e:  # RecordError, or a subkey that is not msgpack
            log_rejection("by schema", _subkey_text(record.subkey), e)
            return False
        return True


def _subkey_text(subkey_bytes: bytes | None) -> str:
    try:
        return str(MSGPackSerializer.loads(subkey_bytes))
    except Exception:
        return repr(subkey_bytes)
