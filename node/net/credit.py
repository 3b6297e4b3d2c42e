"""Credit for checked work: the tokens a node served that clients' checks vouch for (docs/trust.md, "Credit").

A client's auditor credits a stage, in each session, with the tokens it ran up to the last step of it that a check
passed (`node.client.verify.Auditor`); unchecked work earns nothing, as BOINC grants credit only after validation.
Each client publishes its running tally under one DHT key per model, in a subkey signed by its own identity
(`owner_subkey`: no one can write another client's tally), and a reader sums the tallies per node
(`SwarmPeer.read_credit`), counting how many clients vouch for each. A tally about the publisher's own node is
not counted.

Limits, said plainly: a tally is a client's word. A node's operator can run clients that vouch for it (a Sybil
client is free), so credit ranks honest work only among honest clients; the number of distinct clients vouching is
shown beside it for that reason. A tally lives as long as its client publishes it (CREDIT_TTL_S after the last).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from node.net.dhtkeys import subkey_owner
from swarm.records import RecordError

CREDIT_TTL_S = 24 * 3600.0
MAX_CREDIT_PEERS = 128  # a tally names at most this many nodes (its largest): a DHT call stays under 16 KB
MAX_CREDIT_TOKENS = 1 << 40


@dataclass(frozen=True)
class CheckedCredit:
    tokens: int  # summed over the clients vouching
    clients: int  # how many distinct clients vouch for it


def credit_key(model: str) -> str:
    return f"layerhive:{model}:credit"


def credit_value(model: str, tally: Mapping[str, int]) -> dict:
    """What a client stores as its tally (node -> checked tokens; its largest MAX_CREDIT_PEERS), under its own
    subkey of `credit_key(model)` (`SwarmPeer.publish_credit`). The value names its model, so that DHT peers can
    tell it belongs under the model's credit key (node.net.dhtbounds)."""
    return {"model": model, "credit": dict(sorted(tally.items(), key=lambda item: -item[1])[:MAX_CREDIT_PEERS])}


def sum_tallies(found: Any) -> dict[str, CheckedCredit]:
    """Every node's checked credit in the tallies `found` under a credit key; malformed tallies are skipped whole,
    and a publisher's tally of its own node is not counted."""
    tokens: dict[str, int] = {}
    clients: dict[str, int] = {}
    entries = found.value.items() if found is not None and isinstance(found.value, dict) else ()
    for subkey, item in entries:
        try:
            publisher = subkey_owner(subkey)
        except RecordError:
            continue
        tally = item.value.get("credit") if isinstance(item.value, dict) else None
        if not valid_tally(tally):
            continue
        for node, count in tally.items():
            if node != publisher and count > 0:
                tokens[node] = tokens.get(node, 0) + count
                clients[node] = clients.get(node, 0) + 1
    return {node: CheckedCredit(tokens[node], clients[node]) for node in tokens}


def valid_tally(tally: Any) -> bool:
    return (isinstance(tally, dict) and len(tally) <= MAX_CREDIT_PEERS
            and all(isinstance(node, str) and len(node) <= 128 and isinstance(count, int)
                    and not isinstance(count, bool) and 0 <= count <= MAX_CREDIT_TOKENS
                    for node, count in tally.items()))
