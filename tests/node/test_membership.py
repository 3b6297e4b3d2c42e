"""Signed membership records on real hivemind DHT peers (127.0.0.1): an honest record round-trips; forged
ones are refused by honest peers at storage time and never reach a reader's list; identities persist."""

from __future__ import annotations

import asyncio
import dataclasses
import functools
import logging
import os
import stat
import time
from types import SimpleNamespace

import keyring
import keyring.backend
import keyring.backends.fail
import pytest
from hivemind import DHT
from hivemind.dht.routing import DHTID
from hivemind.dht.validation import CompositeValidator, DHTRecord
from hivemind.p2p import PeerID
from hivemind.utils import MSGPackSerializer, get_dht_time

from node.net import dhtkeys
from node.net.dhtbounds import MAX_OWNERS_PER_KEY, RECOUNT_S, BoundedStorage
from node.net.identity import IdentityError, NodeIdentity, ephemeral_identity, identity_dir, load_identity
from node.net.membership import open_dht, owner_subkey, record_validators, servers_key
from swarm.records import ServerRecord

pytestmark = pytest.mark.timeout(120)

MODEL, NUM_LAYERS = "membership-test-model", 4
LOOPBACK = ["/ip4/127.0.0.1/tcp/0"]
KEY_ID = DHTID.generate(source=servers_key(MODEL)).to_bytes()


@pytest.fixture(scope="module")
def swarm():
    """A bootstrap peer, an honest node that announced layers 0:2, a raw hivemind peer without validators
    (the attacker: it stores anything and can push raw bytes), and a client-mode reader."""
    boot = open_dht([], LOOPBACK)
    peers = boot.visible_maddrs
    honest_identity = ephemeral_identity()
    honest = open_dht(peers, LOOPBACK, identity=honest_identity)
    attacker = DHT(initial_peers=peers, host_maddrs=LOOPBACK, start=True)
    reader = open_dht(peers, LOOPBACK, client_mode=True)
    record = ServerRecord(peer_id=honest_identity.peer_id, model=MODEL, start=0, end=2, memory_bytes=1e9)
    assert asyncio.run(honest.announce(record, ttl_s=300))
    yield SimpleNamespace(boot=boot, peers=peers, honest=honest, identity=honest_identity, record=record,
                          attacker=attacker, reader=reader)
    for peer in (reader, attacker, honest, boot):
        peer.shutdown()


@pytest.fixture(autouse=True)
def _fresh_rejection_log():
    dhtkeys._last_logged.clear()  # rejections are rate-limited per reason; each test expects its own


def _record_dict(peer_id: str, **changes) -> dict:
    return dataclasses.replace(ServerRecord(peer_id=peer_id, model=MODEL, start=2, end=4), **changes).to_dict()


def _signed(identity: NodeIdentity, subkey: str, value: dict | bytes, expiration: float) -> bytes:
    """`value` signed by `identity` for `subkey`, whoever the subkey names (a forger signs what it likes)."""
    value_bytes = value if isinstance(value, bytes) else MSGPackSerializer.dumps(value)
    record = DHTRecord(KEY_ID, MSGPackSerializer.dumps(subkey), value_bytes, expiration)
    signature = identity.private_key.sign(MSGPackSerializer.dumps(dataclasses.astuple(record)))
    return value_bytes + b"[signature:" + signature + b"]"


async def _push_raw(entries, _dht, node) -> list[dict[str, bool | None]]:
    """Runs inside the attacker's DHT process: keeps each raw (subkey, value bytes, expiration) entry in its
    own storage and asks every peer near the key to store it; returns each peer's answer per entry."""
    key_id = DHTID.from_bytes(KEY_ID)
    nearest = (await node.find_nearest_nodes([key_id], exclude_self=True))[key_id]
    answers = []
    for subkey, value_bytes, expiration in entries:
        node.protocol.storage.store_subkey(key_id, subkey, value_bytes, expiration)
        answers.append({})
        for peer_id in nearest.values():
            ok = await node.protocol.call_store(peer_id, [key_id], [value_bytes], expiration, subkeys=[subkey])
            answers[-1][peer_id.to_base58()] = ok[0] if ok else None
    return answers


async def _holds_subkey(subkey: str, _dht, node) -> bool:
    """Runs inside a DHT process: whether its own storage kept `subkey` under the servers key."""
    stored = node.protocol.storage.get(DHTID.from_bytes(KEY_ID))
    held = getattr(stored.value, "data", {}) if stored is not None else {}
    return subkey in held or MSGPackSerializer.dumps(subkey) in held


async def _ask_peer(peer_id: str, _dht, node) -> bool:
    """Runs inside the reader's DHT process: whether `peer_id`'s answer for the servers key survives validation."""
    found = await node.protocol.call_find(PeerID.from_base58(peer_id), [DHTID.from_bytes(KEY_ID)])
    value, _nearest = found[DHTID.from_bytes(KEY_ID)]
    return value is not None


def test_honest_record_round_trips(swarm):
    assert asyncio.run(swarm.reader.list_servers(MODEL, num_layers=NUM_LAYERS)) == [swarm.record]
    assert swarm.boot.list_servers_blocking(MODEL, num_layers=NUM_LAYERS) == [swarm.record]
    assert swarm.honest.dht.peer_id.to_base58() == swarm.identity.peer_id  # p2pd runs with the signing key
    assert asyncio.run(swarm.reader.list_servers("some-other-model")) == []


def test_forged_records_are_refused_by_honest_peers_and_never_listed(swarm):
    victim = swarm.identity.peer_id
    forger = ephemeral_identity()
    expiration, in_a_year = get_dht_time() + 300, get_dht_time() + 3e7

    def entry(identity: NodeIdentity, subkey: str, value: dict | bytes) -> tuple[str, bytes, float]:
        return subkey, _signed(identity, subkey, value, expiration), expiration

    # (b) the honest node's own signed value, with the layer range changed after signing.
    honest_subkey = owner_subkey(swarm.identity)
    genuine = _signed(swarm.identity, honest_subkey, _record_dict(victim), expiration)
    tampered = genuine.replace(MSGPackSerializer.dumps(_record_dict(victim)),
                               MSGPackSerializer.dumps(_record_dict(victim, start=1)))
    forged = {
        # (a) another peer claims the honest node's peer id, in every place it could.
        "own key, victim's id in the value": entry(forger, owner_subkey(forger), _record_dict(victim)),
        "victim's id in the subkey, own key": entry(forger, f"{victim}[owner:{forger.owner_key.decode()}]",
                                                    _record_dict(victim)),
        "victim's whole subkey, own signature": entry(forger, honest_subkey, _record_dict(victim)),
        "unsigned, Petals-style subkey": (victim, MSGPackSerializer.dumps(_record_dict(victim)), expiration),
        "tampered after signing": (honest_subkey, tampered, expiration),
        # (c) a correctly signed record of the forger itself, with a bad schema.
        "range beyond any model": entry(forger, owner_subkey(forger), _record_dict(forger.peer_id, end=10**6)),
        "wrong type": entry(forger, owner_subkey(forger), {**_record_dict(forger.peer_id), "start": "2"}),
        "impossible memory": entry(forger, owner_subkey(forger), _record_dict(forger.peer_id, memory_bytes=1e18)),
        "not msgpack": entry(forger, owner_subkey(forger), b"\xc1\xc1 not a record"),
        # (d) what is not a record at all, or one key signing many subkeys, or a record built to linger.
        "junk that claims no model": ("junk", MSGPackSerializer.dumps({"hello": "world"}), expiration),
        "signed junk that claims no model": entry(forger, owner_subkey(forger), {"hello": "x" * 1000}),
        "a comment in the owner key": entry(forger, owner_subkey(forger).replace("]", " alias7]"),
                                            _record_dict(forger.peer_id)),
        "9 KB": entry(forger, owner_subkey(forger), {**_record_dict(forger.peer_id), "pad": "x" * 9000}),
        "expires in a year": (owner_subkey(forger), _signed(forger, owner_subkey(forger), _record_dict(forger.peer_id),
                                                            in_a_year), in_a_year),
    }
    # One entry a call: a hivemind DHT (the attacker's) breaks on a call over ~16 KB (see membership._WholeMessagePipe).
    answers = [swarm.attacker.run_coroutine(functools.partial(_push_raw, [entry]))[0] for entry in forged.values()]
    honest_peers = {swarm.boot.peer_id, victim}
    for name, answer in zip(forged, answers, strict=True):
        assert honest_peers <= answer.keys(), f"{name}: not offered to every honest peer"
        assert not any(answer[peer] for peer in honest_peers), f"{name}: an honest peer stored it: {answer}"

    # The attacker itself keeps them all and serves them, but the reader's validators discard its answer...
    assert not swarm.reader.dht.run_coroutine(functools.partial(_ask_peer, swarm.attacker.peer_id.to_base58()))
    assert swarm.reader.dht.run_coroutine(functools.partial(_ask_peer, swarm.boot.peer_id))
    # ...so readers list only the honest record, which honest peers still hold.
    assert asyncio.run(swarm.reader.list_servers(MODEL, num_layers=NUM_LAYERS)) == [swarm.record]
    assert swarm.boot.list_servers_blocking(MODEL, num_layers=NUM_LAYERS) == [swarm.record]


def test_a_validating_peer_cannot_announce_for_another(swarm):
    forger = open_dht(swarm.peers, LOOPBACK)
    try:
        claim = ServerRecord(peer_id=swarm.identity.peer_id, model=MODEL, start=2, end=4)
        with pytest.raises(ValueError, match="cannot be signed"):
            asyncio.run(forger.announce(claim))
        subkey = owner_subkey(forger.identity)
        forger.dht.store(servers_key(MODEL), subkey=subkey, value=claim.to_dict(), expiration_time=get_dht_time() + 60)
        # Refused by its own validators and by every honest peer (the module's validator-less attacker peer
        # may keep it, so the store call's overall answer says nothing; each honest storage is asked instead).
        honest_subkey = owner_subkey(swarm.identity)
        assert any(peer.dht.run_coroutine(functools.partial(_holds_subkey, honest_subkey))  # the probe can say yes
                   for peer in (swarm.boot, swarm.honest))
        for peer in (forger, swarm.boot, swarm.honest):
            assert not peer.dht.run_coroutine(functools.partial(_holds_subkey, subkey))
        assert asyncio.run(swarm.reader.list_servers(MODEL, num_layers=NUM_LAYERS)) == [swarm.record]
    finally:
        forger.shutdown()


def test_announce_publishes_the_record_as_given_and_refuses_another_reachability(swarm):
    """A server peer measured its reachability on joining (with no dial-back answer on loopback: "direct");
    `announce` stores the caller's record unchanged, so one that contradicts the measurement is refused."""
    assert swarm.honest.reachability == "direct"
    assert swarm.reader.reachability is None and swarm.boot.reachability is None  # a client; no peers to ask
    for claimed in ("relayed", "unreachable"):
        with pytest.raises(ValueError, match="measured 'direct'"):
            asyncio.run(swarm.honest.announce(dataclasses.replace(swarm.record, reachability=claimed)))
    assert asyncio.run(swarm.reader.list_servers(MODEL, num_layers=NUM_LAYERS)) == [swarm.record]


def test_readers_refuse_what_peers_cannot_check_and_say_why(swarm, caplog):
    """A range outside this model (peers do not know the model's size) passes storage, so the reader refuses it
    itself, with the reason in the log."""
    forger = ephemeral_identity()
    expiration = get_dht_time() + 300
    out_of_model = _record_dict(forger.peer_id, start=2, end=9)
    entries = [(owner_subkey(forger), _signed(forger, owner_subkey(forger), out_of_model, expiration), expiration)]
    answers = swarm.boot.dht.run_coroutine(functools.partial(_push_raw, entries))  # from an honest peer this time
    assert answers[0][swarm.identity.peer_id]  # accepted: nothing in it is checkable at storage
    with caplog.at_level(logging.WARNING):
        assert asyncio.run(swarm.reader.list_servers(MODEL, num_layers=NUM_LAYERS)) == [swarm.record]
    assert "range 2:9 is outside the model's 4 layers" in caplog.text
    # The swarm still holds them, so later tests see them too; they must keep being refused the same way.
    assert swarm.boot.list_servers_blocking(MODEL, num_layers=NUM_LAYERS) == [swarm.record]


def test_validators_refuse_each_forgery_with_a_reason(caplog):
    owner, forger = ephemeral_identity(), ephemeral_identity()
    validator = CompositeValidator(record_validators(owner.private_key))
    expiration = get_dht_time() + 60

    def record(subkey: str, value: bytes) -> DHTRecord:
        return DHTRecord(KEY_ID, MSGPackSerializer.dumps(subkey), value, expiration)

    good = owner_subkey(owner)
    signed = _signed(owner, good, _record_dict(owner.peer_id), expiration)
    plain = MSGPackSerializer.dumps(_record_dict(owner.peer_id))
    assert validator.validate(record(good, signed))
    assert validator.validate(record(good, validator.sign_value(record(good, plain))))  # what DHT.store does
    tampered = signed.replace(plain, MSGPackSerializer.dumps(_record_dict(owner.peer_id, start=1)))
    cases = {
        "the signature does not match": record(good, tampered),
        "0 signatures": record(good, plain),
        "not an RSA public key": record(f"{owner.peer_id}[owner:ssh-rsa AAAAnotakey]", signed),
        "its owner key is peer": record(f"{owner.peer_id}[owner:{forger.owner_key.decode()}]",
                                        _signed(forger, f"{owner.peer_id}[owner:{forger.owner_key.decode()}]",
                                                _record_dict(owner.peer_id), expiration)),
        "is owned by": record(owner_subkey(forger), _signed(forger, owner_subkey(forger),
                                                            _record_dict(owner.peer_id), expiration)),
        "memory_bytes": record(owner_subkey(forger), _signed(forger, owner_subkey(forger),
                                                             _record_dict(forger.peer_id, memory_bytes=1e18),
                                                             expiration)),
    }
    commented, in_two_hours = good.replace("]", " alias]"), get_dht_time() + 7200
    cases |= {
        "canonical OpenSSH form": record(commented, _signed(owner, commented, _record_dict(owner.peer_id), expiration)),
        "value 20": record(good, _signed(owner, good, {**_record_dict(owner.peer_id), "pad": "x" * 20000}, expiration)),
        "none of Layerhive's key kinds": record(good, _signed(owner, good, {"hello": "world"}, expiration)),
        "a credit value under another key": record(good, _signed(owner, good, {"model": MODEL, "credit": {}},
                                                                 expiration)),
        "expires more than": DHTRecord(KEY_ID, MSGPackSerializer.dumps(good), _signed(
            owner, good, _record_dict(owner.peer_id), in_two_hours), in_two_hours),
    }
    with caplog.at_level(logging.WARNING):
        for reason, bad in cases.items():
            assert not validator.validate(bad), reason
            assert reason in caplog.text, f"{reason!r} not logged: {caplog.text}"
    # A Layerhive DHT holds nothing else: a record of another application (no model, no owner) is refused too.
    assert not validator.validate(DHTRecord(b"k" * 20, MSGPackSerializer.dumps(None), MSGPackSerializer.dumps(1), 0))


# ---------------------------------------------------------------------------------------------- identity


class _MemoryKeyring(keyring.backend.KeyringBackend):
    priority = 1

    def __init__(self, broken: bool = False) -> None:
        super().__init__()
        self.items: dict[tuple[str, str], str] = {}
        self.broken = broken

    def get_password(self, service: str, username: str) -> str | None:
        return self.items.get((service, username))

    def set_password(self, service: str, username: str, password: str) -> None:
        if self.broken:
            raise keyring.errors.PasswordSetError("locked")
        self.items[(service, username)] = password

    def delete_password(self, service: str, username: str) -> None:
        self.items.pop((service, username), None)


@pytest.fixture
def home(tmp_path, monkeypatch):
    monkeypatch.setenv("LAYERHIVE_HOME", str(tmp_path))
    previous = keyring.get_keyring()
    keyring.set_keyring(keyring.backends.fail.Keyring())  # as on a headless server; tests may swap it
    yield tmp_path
    keyring.set_keyring(previous)


def _mode(path) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


def test_file_identity_is_private_and_stable(home):
    first = load_identity("alpha")
    path = identity_dir() / "alpha.key"
    assert first.store == f"file {path}" and first.key_file == path
    assert _mode(path) == 0o600 and _mode(path.parent) == 0o700
    assert PeerID.from_identity(path.read_bytes()).to_base58() == first.peer_id  # p2pd's own format
    assert load_identity("alpha").peer_id == first.peer_id
    assert load_identity("beta").peer_id != first.peer_id

    os.chmod(path, 0o644)
    assert load_identity("alpha").peer_id == first.peer_id and _mode(path) == 0o600
    path.write_bytes(b"garbage")
    with pytest.raises(IdentityError, match="unreadable"):
        load_identity("alpha")
    with pytest.raises(IdentityError, match="name"):
        load_identity("../escape")


def test_keyring_identity_and_its_p2pd_file(home):
    backend = _MemoryKeyring()
    keyring.set_keyring(backend)
    identity = load_identity("gamma")
    assert identity.store.startswith("keyring") and identity.key_file is None
    assert list(backend.items) == [("layerhive", "gamma")]
    assert not (identity_dir() / "gamma.key").exists()
    assert load_identity("gamma").peer_id == identity.peer_id
    with identity.p2pd_identity_file() as path:
        assert _mode(path) == 0o600 and _mode(os.path.dirname(path)) == 0o700
        with open(path, "rb") as f:
            assert PeerID.from_identity(f.read()).to_base58() == identity.peer_id
    assert not os.path.exists(path)  # the key does not linger on disk

    keyring.set_keyring(_MemoryKeyring(broken=True))  # a locked keyring: fall back to a file, still stable
    fallback = load_identity("delta")
    assert fallback.key_file is not None and load_identity("delta").peer_id == fallback.peer_id


def test_same_name_keeps_its_peer_id_across_restarts(swarm, home):
    model = "restart-test-model"
    peer_ids = []
    for _ in range(2):
        identity = load_identity("restarting-node")
        peer = open_dht(swarm.peers, LOOPBACK, identity=identity)
        try:
            peer_ids.append(peer.dht.peer_id.to_base58())
            if len(peer_ids) == 1:  # the same node started twice at once is refused, not given a twin
                with pytest.raises(IdentityError, match="already in use"):
                    open_dht(swarm.peers, LOOPBACK, identity=load_identity("restarting-node")).shutdown()
            record = ServerRecord(peer_id=peer_ids[-1], model=model, start=0, end=1, epoch=len(peer_ids))
            assert asyncio.run(peer.announce(record))
        finally:
            peer.shutdown()
    assert peer_ids[0] == peer_ids[1] == identity.peer_id
    # The second run's record replaced the first under the same signed subkey.
    assert [r.epoch for r in asyncio.run(swarm.reader.list_servers(model))] == [2]


def test_a_storage_bounds_subkeys_per_key_and_its_bytes_but_always_takes_a_refresh():
    storage = BoundedStorage(budget_bytes=100_000)
    owners, proofs = DHTID.generate(source="owners"), DHTID.generate(source="proofs")
    expiration = get_dht_time() + 60
    subkeys = [f"peer{i}[owner:key{i}]" for i in range(MAX_OWNERS_PER_KEY + 1)]
    assert all(storage.store_subkey(owners, subkey, b"v", expiration) for subkey in subkeys[:-1])
    assert not storage.store_subkey(owners, subkeys[-1], b"v", expiration)  # the key is full
    assert storage.store_subkey(owners, subkeys[0], b"refreshed", expiration + 1)  # one it holds may be refreshed
    stored = sum(storage.store_subkey(proofs, f"{i:032x}", b"x" * 9000, expiration) for i in range(50))
    assert 5 <= stored <= 100_000 // 9000 and storage.held_bytes() <= 100_000  # the budget, not the key's cap
    time.sleep(RECOUNT_S)
    assert storage.held_bytes() <= 100_000  # counted again from what it holds
