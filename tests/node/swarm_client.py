"""Generating through a live swarm from a test: a client DHT peer, the router's chain, one session."""

from __future__ import annotations

from collections.abc import Sequence

from node.client.generate import generate
from node.client.session import connect
from node.model.checkpoint import ModelSource
from node.model.head import ClientHead
from node.model.sampling import SamplingParams


async def generate_through(initial_peers: Sequence[str], source: ModelSource, prompt_ids: list[int],
                           params: SamplingParams, *, expect_ranges: list[tuple[int, int]], host: str = "127.0.0.1",
                           relay: bool = False, wire: str = "none", ring: bool = False,
                           share_head: bool = True) -> list[int]:
    """The tokens a fresh client generates (the client embedding and sampling, or with `ring` the chain
    sampling: its last stage, sharing the LM head with the first unless `share_head` is false); asserts
    that the router chose a chain of `expect_ranges`."""
    async with connect(initial_peers, source, host_maddrs=[f"/ip4/{host}/tcp/0"]) as client:
        chain = await client.choose_chain()
        assert [(hop.start, hop.end) for hop in chain] == expect_ranges
        session = await client.open_session(chain, max_length=len(prompt_ids) + params.max_new_tokens, relay=relay,
                                            wire=wire, sampling=params if ring else None,
                                            share_head=share_head)
        try:
            if ring:
                return [token async for token in session.tokens(prompt_ids, 0)]
            return [token async for token in generate(session, ClientHead(source), prompt_ids, params)]
        finally:
            await session.close()
