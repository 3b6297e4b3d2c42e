"""Which swarm the app joins: the public one (from the user's network config), one the user was invited
to (initial peers, or an invite link `layerhive://join?peers=<multiaddr>,<multiaddr>` that carries them),
or the demo swarm, which runs on this computer only and says so wherever the swarm is named.

An invite link comes from someone else (a chat message, a web page), so it is read strictly: bounded in
length and number of peers, every peer a multiaddr that names its peer id.
"""

from __future__ import annotations

from dataclasses import dataclass
from urllib.parse import parse_qs, urlsplit

from hivemind.utils.multiaddr import Multiaddr

from node.net.config import ConfigError, default_initial_peers

KINDS = ("public", "invite", "demo")
DEMO_LABEL = "Demo swarm (this computer only)"
INVITE_SCHEME = "layerhive"
MAX_INVITE_CHARS = 4096
MAX_INVITE_PEERS = 16


class InviteError(ValueError):
    """An invite link or peer list that cannot be used; the message says why, for the user."""


@dataclass(frozen=True)
class SwarmChoice:
    kind: str = "demo"
    peers: tuple[str, ...] = ()  # for "invite"; "public" reads the config when joining, "demo" starts its own

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"swarm kind {self.kind!r} is not one of {KINDS}")

    @property
    def label(self) -> str:
        """How the app names this swarm everywhere (tray, chat, map)."""
        if self.kind == "demo":
            return DEMO_LABEL
        if self.kind == "public":
            return "Public swarm"
        return f"Invited swarm ({len(self.peers)} peer{'s' if len(self.peers) != 1 else ''})"

    @property
    def is_demo(self) -> bool:
        return self.kind == "demo"

    def initial_peers(self) -> list[str]:
        """The peers to join through; empty for the demo swarm (it is started first). Raises ConfigError
        for a broken network config, InviteError when the public swarm has no peers configured."""
        if self.kind == "invite":
            return list(self.peers)
        if self.kind == "public":
            peers = public_peers()
            if not peers:
                raise InviteError("no public swarm is configured yet: choose an invitation or the demo swarm")
            return peers
        return []


def public_peers() -> list[str]:
    """The public swarm's bootstrap peers from the user's config (empty when none is known, as today)."""
    try:
        return default_initial_peers()
    except ConfigError:
        return []


def parse_invite(text: str) -> tuple[str, ...]:
    """The peers of an invite link, or of multiaddrs pasted as they are (separated by spaces, commas or lines)."""
    text = text.strip()
    if not text:
        raise InviteError("paste an invite link (layerhive://join?peers=…) or the peers' multiaddrs")
    if len(text) > MAX_INVITE_CHARS:
        raise InviteError(f"the invitation is longer than {MAX_INVITE_CHARS} characters")
    if text.lower().startswith(f"{INVITE_SCHEME}:"):
        parts = urlsplit(text)
        if parts.netloc.lower() != "join" or parts.path not in ("", "/"):
            raise InviteError("an invite link looks like layerhive://join?peers=<multiaddr>,<multiaddr>")
        values = parse_qs(parts.query).get("peers")
        if not values:
            raise InviteError("the invite link names no peers (it needs ?peers=…)")
        text = ",".join(values)
    peers = tuple(dict.fromkeys(p for p in text.replace(",", " ").split() if p))
    if len(peers) > MAX_INVITE_PEERS:
        raise InviteError(f"the invitation names {len(peers)} peers; at most {MAX_INVITE_PEERS} are accepted")
    for peer in peers:
        _check_peer(peer)
    return peers


def invite_link(peers: tuple[str, ...] | list[str]) -> str:
    """The link that invites someone to the swarm reachable through `peers`."""
    return f"{INVITE_SCHEME}://join?peers=" + ",".join(peers)


def _check_peer(peer: str) -> None:
    shown = peer if len(peer) <= 60 else peer[:57] + "…"
    if not peer.startswith("/"):
        raise InviteError(f"{shown!r} is not a multiaddr (it should start with /ip4/, /ip6/ or /dns…)")
    if "/p2p/" not in peer:
        raise InviteError(f"{shown!r} does not name the peer (it needs a /p2p/<peer id> part)")
    try:
        Multiaddr(peer).value_for_protocol("p2p")
    except Exception as e:
        raise InviteError(f"{shown!r} is not a valid peer address: {e}") from None
