"""Programs built on the runtime: the `layerhive` CLI, the OpenAI-compatible API, the controller the
desktop app drives, local swarms of node processes, the bootstrap peer and chaos runs.

May import every other room of `node` and `swarm`; nothing in `node` imports it (only `desktop` does).
"""
