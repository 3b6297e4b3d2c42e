"""Talking to peers: the stream protocol and its validation, the tensor wire codecs, direct TCP links,
RTT/uplink probes, reachability and relays, the node's identity key, DHT membership (signed records),
the user's network config, and processes that end with their parent (lifeline).

May import `node.model` (sampling parameters, the home directory) and `swarm`; never `serve`, `client`
or `app`.
"""
