"""Who may hold a stage's KV memory: fair shares per peer, a bounded pool for peers new here.

Every session reserves its worst-case KV cache when it opens (`max_length` tokens), so a full node says "no"
instead of running out of memory. Without shares, two fresh peer ids opening 64 idle sessions each could
reserve the whole budget while using a few MB, and every honest open would get `no_capacity`. So:

- no peer holds more than `peer_share` of the budget (at least four peers are always served);
- a peer with no history here (no step served to it in the last `history_s`) holds at most `newcomer_share`
  (which bounds the `max_length` it can open), and all such newcomers together at most `newcomers_share`:
  fresh peer ids cost nothing, so they share one pool and never crowd out peers that have been doing work;
- when an open does not fit, sessions idle for `reclaim_idle_s` (no step; pings do not count) are reclaimed
  first, so memory parked by idle sessions goes to someone who computes.
An honest newcomer is therefore admitted while an attacker holds its full share, unless newcomers have taken
their whole pool with sessions that keep stepping (real, rate-limited work).
"""

from __future__ import annotations

import time
from collections import OrderedDict

PEER_SHARE = 1 / 4
NEWCOMER_SHARE = 1 / 16
NEWCOMERS_SHARE = 1 / 2
HISTORY_S = 3600.0
RECLAIM_IDLE_S = 10.0
MAX_REMEMBERED_PEERS = 4096


class CapacityError(Exception):
    """No room for a session: `own_share` says whether it is the asking peer's own share that is full (then
    reclaiming others' idle sessions would not help it)."""

    def __init__(self, message: str, *, own_share: bool = False) -> None:
        super().__init__(message)
        self.own_share = own_share


class FairBudget:
    """A stage's KV memory budget, reserved per session up front within each peer's share."""

    def __init__(self, budget_bytes: int, *, peer_share: float = PEER_SHARE, newcomer_share: float = NEWCOMER_SHARE,
                 newcomers_share: float = NEWCOMERS_SHARE, history_s: float = HISTORY_S) -> None:
        self.budget_bytes = budget_bytes
        self.peer_share, self.newcomer_share, self.newcomers_share = peer_share, newcomer_share, newcomers_share
        self.history_s = history_s
        self.reserved_bytes = 0
        self.held: dict[str, int] = {}  # peer -> bytes its sessions reserve
        self.newcomer_bytes = 0  # of which reserved by peers that were newcomers when they reserved it
        self._newcomer_held: dict[str, int] = {}
        self._served_at: OrderedDict[str, float] = OrderedDict()  # peer -> when a step last ran for it

    @property
    def free_bytes(self) -> int:
        return self.budget_bytes - self.reserved_bytes

    def is_newcomer(self, peer: str) -> bool:
        served = self._served_at.get(peer)
        return served is None or time.monotonic() - served > self.history_s

    def served(self, peer: str) -> None:
        """A step ran for `peer`: it has history here from now on."""
        self._served_at[peer] = time.monotonic()
        self._served_at.move_to_end(peer)
        if len(self._served_at) > MAX_REMEMBERED_PEERS:
            self._served_at.popitem(last=False)

    def most_for(self, peer: str) -> int:
        """The most bytes one more session of `peer` could reserve now, by its shares (not by what is free)."""
        cap = self.peer_share * self.budget_bytes - self.held.get(peer, 0)
        if self.is_newcomer(peer):
            cap = min(cap, self.newcomer_share * self.budget_bytes - self._newcomer_held.get(peer, 0))
        return max(0, int(cap))

    def reserve(self, nbytes: int, peer: str) -> bool:
        """Reserves `nbytes` for a session of `peer`; returns whether it counts in the newcomers' pool (pass it to
        `release`). Raises CapacityError saying which limit it hit."""
        newcomer = self.is_newcomer(peer)
        if nbytes > self.most_for(peer):
            who = "a peer new to this node (no step served here yet)" if newcomer else "one peer"
            share = self.newcomer_share if newcomer else self.peer_share
            raise CapacityError(f"no capacity: the session needs {nbytes} bytes of KV cache, and {who} may hold at "
                                f"most {share:.3g} of this node's {self.budget_bytes} (it holds "
                                f"{self.held.get(peer, 0)})", own_share=True)
        if newcomer and self.newcomer_bytes + nbytes > self.newcomers_share * self.budget_bytes:
            raise CapacityError(f"no capacity: peers new to this node hold their pool of "
                                f"{self.newcomers_share:.3g} of its KV memory")
        if nbytes > self.free_bytes:
            raise CapacityError(f"no capacity: the session needs {nbytes} bytes of KV cache, {self.free_bytes} are "
                                "free")
        self.reserved_bytes += nbytes
        self.held[peer] = self.held.get(peer, 0) + nbytes
        if newcomer:
            self.newcomer_bytes += nbytes
            self._newcomer_held[peer] = self._newcomer_held.get(peer, 0) + nbytes
        return newcomer

    def release(self, nbytes: int, peer: str, newcomer: bool) -> None:
        self.reserved_bytes -= nbytes
        _take(self.held, peer, nbytes)
        if newcomer:
            self.newcomer_bytes -= nbytes
            _take(self._newcomer_held, peer, nbytes)


def _take(counts: dict[str, int], peer: str, nbytes: int) -> None:
    left = counts.get(peer, 0) - nbytes
    if left > 0:
        counts[peer] = left
    else:
        counts.pop(peer, None)
