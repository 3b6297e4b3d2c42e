"""Who serves what: announcing this node's record on the DHT and reading everyone else's.

All servers of a model share one DHT key; each writes its own subkey (its peer id)
with an expiry, refreshed by a heartbeat, so a node that dies silently drops out
after `ttl_s`.
"""

from __future__ import annotations

import logging

from hivemind import DHT
from hivemind.utils import get_dht_time

from swarm.records import RecordError, ServerRecord

logger = logging.getLogger(__name__)

DEFAULT_TTL_S = 30.0


def servers_key(model: str) -> str:
    return f"layerhive:{model}:servers"


async def announce(dht: DHT, record: ServerRecord, *, ttl_s: float = DEFAULT_TTL_S) -> bool:
    return await dht.store(
        servers_key(record.model), subkey=record.peer_id, value=record.to_dict(),
        expiration_time=get_dht_time() + ttl_s, return_future=True,
    )


async def list_servers(dht: DHT, model: str, *, num_layers: int | None = None) -> list[ServerRecord]:
    """Live, valid records of `model`'s servers; malformed ones are logged and skipped."""
    found = await dht.get(servers_key(model), latest=True, return_future=True)
    if found is None or not isinstance(found.value, dict):
        return []
    records = []
    for subkey, item in found.value.items():
        try:
            record = ServerRecord.from_dict(item.value, num_layers=num_layers)
            if record.peer_id != subkey or record.model != model:
                raise RecordError(f"peer_id/model: record for {record.peer_id}/{record.model} under {subkey}")
        except RecordError as e:
            logger.warning("ignoring a record under %s: %s", subkey, e)
            continue
        records.append(record)
    return sorted(records, key=lambda r: (r.start, r.end, r.peer_id))
