"""The runtime: a volunteer's node and a user's client, over hivemind's DHT and P2P.

Rooms, lowest first; each imports only from rooms below it (and from `swarm`, the pure logic):
- `node.model`: a model's weights and the compute over them (checkpoints, stages, the LM head, sampling).
- `node.net`: talking to peers (wire format, message validation, DHT membership, identity, direct links, probes).
- `node.serve`: a serving node (its stream server, batching, the swarm-wide assignment, the benchmark).
- `node.client`: a user's side of a session (chain choice, generation, failover, spot checks, chat).
- `node.app`: the programs built on those (CLI, OpenAI API, the desktop's controller, local swarms).
`serve` and `client` never import each other. See docs/architecture.md.
"""
