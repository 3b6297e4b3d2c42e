"""A serving node: the stage server (sessions, KV budget, pushes) and the role it gives each session,
batching concurrent sessions' steps, the node's lifecycle (join, plan, load, serve, drain), the
swarm-wide assignment computed from DHT records, and the benchmark that measures what the machine can offer.

May import `node.model`, `node.net` and `swarm`; never `node.client` or `node.app`.
"""
