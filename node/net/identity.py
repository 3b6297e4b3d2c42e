"""A node's persistent identity: one RSA key that is both its libp2p peer id and its record-signing key.

hivemind's p2pd identities are RSA-2048 keys (`P2P.generate_identity`), and a libp2p peer id is the
multihash of the public key, so the same key can back hivemind's `RSASignatureValidator`. A record's
subkey carries the owner's public key; anyone can derive the peer id from it (`peer_id_from_owner_key`)
and compare it with the peer id the record claims. No challenge round-trip is needed: only the holder
of the private key can sign for that peer id, and p2pd's secure channel proves the same key on connect.

The key lives in the OS keyring (service "layerhive", one entry per node name) when a usable backend
exists, else in `layerhive_home()/identity/<name>.key` (mode 0600, dir 0700). Both hold the key in
p2pd's own format (a libp2p PrivateKey protobuf; base64 in the keyring). p2pd only reads keys from a
file, so a keyring-held or ephemeral key is written to a private temp file for as long as p2pd starts.
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import logging
import os
import re
import shutil
import stat
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import filelock
import keyring
import keyring.backends.fail
import keyring.backends.null
import multihash
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from hivemind.p2p import PeerID
from hivemind.proto import crypto_pb2
from hivemind.utils.crypto import RSAPrivateKey, RSAPublicKey

from node.model.checkpoint import layerhive_home

logger = logging.getLogger(__name__)

KEYRING_SERVICE = "layerhive"
_NAME_RE = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]{0,63}")
_MIN_KEY_BITS = 2048


class IdentityError(RuntimeError):
    pass


class _LoadedRSAKey(RSAPrivateKey):
    """hivemind's RSAPrivateKey always generates a fresh key in __init__; this one wraps an existing key."""

    def __init__(self, key: rsa.RSAPrivateKey) -> None:  # no super().__init__(): it would generate a key
        self._private_key = key


@dataclass(frozen=True)
class NodeIdentity:
    private_key: RSAPrivateKey
    name: str | None = None  # None: an ephemeral identity, new on every run
    store: str = "ephemeral"  # where the key is kept, for logs: "keyring (<backend>)", "file <path>", "ephemeral"
    key_file: Path | None = None  # set when the key already sits in a private file p2pd can read

    @property
    def public_key(self) -> RSAPublicKey:
        return self.private_key.get_public_key()

    @property
    def owner_key(self) -> bytes:
        """The public key as it appears in `[owner:...]` DHT subkeys (OpenSSH format)."""
        return self.public_key.to_bytes()

    @property
    def peer_id(self) -> str:
        return peer_id_from_owner_key(self.owner_key)

    def p2pd_key_bytes(self) -> bytes:
        return crypto_pb2.PrivateKey(key_type=crypto_pb2.RSA, data=self.private_key.to_bytes()).SerializeToString()

    @contextlib.contextmanager
    def p2pd_identity_file(self) -> Iterator[str]:
        """A path p2pd can read the key from; a temp copy (0600 in a 0700 dir) unless the key is file-held."""
        if self.key_file is not None:
            yield str(self.key_file)
            return
        directory = tempfile.mkdtemp(prefix="layerhive-id-")  # mkdtemp makes it 0700
        try:
            path = os.path.join(directory, "p2pd.key")
            _write_private(Path(path), self.p2pd_key_bytes())
            yield path
        finally:
            shutil.rmtree(directory, ignore_errors=True)


def claim(identity: NodeIdentity) -> filelock.BaseFileLock:
    """Holds a named identity for this process until the returned lock is released: the same node started
    twice on one machine is refused at once, with a clear error. (hivemind's `check_if_identity_free` asks
    the swarm instead, which catches a copied key on another machine but races a peer that has just joined.)"""
    if identity.name is None:
        raise ValueError("an ephemeral identity cannot be in use elsewhere; there is nothing to claim")
    identity_dir().mkdir(mode=0o700, parents=True, exist_ok=True)
    lock = filelock.FileLock(identity_dir() / f"{identity.name}.lock", blocking=False, thread_local=False)
    try:
        lock.acquire()
    except filelock.Timeout:
        raise IdentityError(f"node identity {identity.name!r} is already in use by another Layerhive process "
                            f"on this machine; stop it first or start this one under another name") from None
    return lock


def peer_id_from_owner_key(owner_key: bytes) -> str:
    """The libp2p peer id of an OpenSSH-format RSA public key (as p2pd derives it from the same key)."""
    public_key = serialization.load_ssh_public_key(owner_key)
    if not isinstance(public_key, rsa.RSAPublicKey):
        raise ValueError("not an RSA public key")
    spki = public_key.public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
    encoded = crypto_pb2.PublicKey(key_type=crypto_pb2.RSA, data=spki).SerializeToString()
    # libp2p inlines keys of <= 42 bytes as an identity multihash; RSA keys are always longer, so sha2-256.
    return PeerID(multihash.encode(hashlib.sha256(encoded).digest(), multihash.coerce_code("sha2-256"))).to_base58()


def ephemeral_identity() -> NodeIdentity:
    return NodeIdentity(RSAPrivateKey())


def load_identity(name: str, *, use_keyring: bool = True) -> NodeIdentity:
    """The identity called `name`, created on first use. Looks in the keyring, then in the fallback file;
    creates the key in the keyring if it is usable, else in the file."""
    if not _NAME_RE.fullmatch(name):
        raise IdentityError(f"identity name {name!r}: use 1-64 letters, digits, '_', '.', '-'")
    path = identity_dir() / f"{name}.key"
    backend = _usable_keyring() if use_keyring else None
    if backend is not None:
        try:
            stored = keyring.get_password(KEYRING_SERVICE, name)
        except Exception as e:  # a locked or broken keyring: the node must still start, with a stable identity
            logger.warning("keyring %s is not usable (%s); using the identity file instead", backend, e)
            backend, stored = None, None
        if stored is not None:  # an unreadable stored key raises: silently making a new identity would be worse
            return _logged(NodeIdentity(_decode(_b64(stored)), name, f"keyring ({backend})"), "loaded")
    if path.exists() or backend is None:
        return _load_or_create_file(name, path)
    identity = NodeIdentity(RSAPrivateKey(), name, f"keyring ({backend})")
    encoded = base64.b64encode(identity.p2pd_key_bytes()).decode()
    try:
        keyring.set_password(KEYRING_SERVICE, name, encoded)
        if keyring.get_password(KEYRING_SERVICE, name) != encoded:
            raise IdentityError("it did not keep the key")
    except Exception as e:
        logger.warning("could not store the identity in keyring %s (%s); using a file instead", backend, e)
        return _load_or_create_file(name, path)
    return _logged(identity, "created")


def identity_dir() -> Path:
    return layerhive_home() / "identity"


def _usable_keyring() -> str | None:
    try:
        backend = keyring.get_keyring()
    except Exception as e:
        logger.info("no keyring (%s)", e)
        return None
    name = f"{type(backend).__module__}.{type(backend).__name__}"
    unusable = isinstance(backend, (keyring.backends.fail.Keyring, keyring.backends.null.Keyring))
    if unusable or getattr(backend, "backends", None) == []:  # [] : a ChainerBackend with nothing to chain
        logger.info("no usable keyring backend (%s): node identities are kept in %s", name, identity_dir())
        return None
    return name


def _load_or_create_file(name: str, path: Path) -> NodeIdentity:
    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    os.chmod(path.parent, 0o700)  # mkdir's mode is masked by the umask and ignored for an existing dir
    verb = "loaded"
    if not path.exists():
        try:
            _write_private(path, NodeIdentity(RSAPrivateKey()).p2pd_key_bytes(), exclusive=True)
            verb = "created"
        except FileExistsError:
            pass  # another process with the same name won the race: use its key
    mode = stat.S_IMODE(path.stat().st_mode)
    if os.name == "posix" and mode & 0o077:  # elsewhere (Windows) the mode bits mean little; ACLs do that job
        logger.warning("identity file %s had mode %o; restricting it to 0600", path, mode)
        os.chmod(path, 0o600)
    return _logged(NodeIdentity(_decode(path.read_bytes()), name, f"file {path}", key_file=path), verb)


def _write_private(path: Path, data: bytes, *, exclusive: bool = False) -> None:
    """Writes `data` to a file created with mode 0600 (never world-readable, not even briefly)."""
    if exclusive:  # write aside then link into place, so a reader never sees a half-written key
        partial = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        partial.unlink(missing_ok=True)  # a leftover of a crash would keep its old mode through O_TRUNC
        _write_private(partial, data)
        try:
            os.link(partial, path)  # fails with FileExistsError if someone else created it
        finally:
            partial.unlink()
        return
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(data)


def _b64(text: str) -> bytes:
    try:
        return base64.b64decode(text, validate=True)
    except ValueError as e:
        raise IdentityError(f"the identity in the keyring is not base64: {e}") from e


def _decode(data: bytes) -> RSAPrivateKey:
    try:
        message = crypto_pb2.PrivateKey.FromString(data)
        key = serialization.load_der_private_key(message.data, password=None)
    except Exception as e:
        raise IdentityError(f"the stored identity key is unreadable: {e}") from e
    if message.key_type != crypto_pb2.RSA or not isinstance(key, rsa.RSAPrivateKey):
        raise IdentityError("the stored identity key is not an RSA key")
    if key.key_size < _MIN_KEY_BITS:
        raise IdentityError(f"the stored identity key has {key.key_size} bits; need >= {_MIN_KEY_BITS}")
    return _LoadedRSAKey(key)


def _logged(identity: NodeIdentity, verb: str) -> NodeIdentity:
    logger.info("%s identity %r (peer id %s) from %s", verb, identity.name, identity.peer_id, identity.store)
    return identity
