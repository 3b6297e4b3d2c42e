"""A user's side of the swarm: joining as a client, choosing chains from live records and RTTs, running
a session through a chain (ring, push or relay), generation with explicit positions, failover to a
new chain, spot checks of stages' outputs, and chat templates with streamed text.

May import `node.model`, `node.net` and `swarm`; never `node.serve` or `node.app`.
"""
