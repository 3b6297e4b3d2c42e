"""A model's weights and the compute over them: finding and loading a checkpoint (only a node's own
layers), the embedded default model, projections, stages of decoder layers with their KV caches, the
chain's ends (embedding, LM head) and the sampler.

Owns no network and no sessions. Imports nothing of `node` outside this room.
"""
