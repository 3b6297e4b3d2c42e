"""Direct links (node.net.direct) on loopback, and a real first stage sharing the LM head with a hostile last stage."""

from __future__ import annotations

import asyncio
import uuid
from types import SimpleNamespace

import pytest
import torch
from hivemind.p2p import P2PContext, PeerID
from hivemind.proto import runtime_pb2

from node.client.session import connect
from node.model.checkpoint import resolve_model
from node.model.head import LMHead
from node.model.sampling import SamplingParams
from node.model.stage import Stage
from node.net.direct import DirectLinkError, DirectListener, DirectOffer, dial, maddr_hosts
from node.net.protocol import INFERENCE_HANDLER, PUSH_HANDLER, pack, parse_push_offer, unpack_metadata
from node.serve.node import Node, NodeConfig
from node.serve.server import StageServer

pytestmark = pytest.mark.timeout(120)


def _request(n: int) -> runtime_pb2.ExpertRequest:
    return pack({"position": n}, [torch.full((1, 1, 4), float(n))])


async def _read_all(listener: DirectListener, offer: DirectOffer) -> list[int]:
    reader = await listener.accepted(offer)
    try:
        return [unpack_metadata(m)["position"] async for m in reader.messages()]
    finally:
        reader.close()


def test_a_direct_link_carries_messages_in_order_and_drops_strangers():
    async def main():
        listener = DirectListener()
        await listener.start("127.0.0.1", [])
        try:
            offer = listener.offer()
            with pytest.raises(DirectLinkError, match="no proof of the key"):  # a guessed ticket names no offer
                await dial(DirectOffer(offer.addrs, b"\0" * 16, offer.key), ["127.0.0.1"])
            writer = await dial(offer, ["127.0.0.1"])
            reading = asyncio.create_task(_read_all(listener, offer))
            for n in range(5):
                writer.send(_request(n))
            await writer.drain()
            writer.close()
            assert await reading == [0, 1, 2, 3, 4]
            with pytest.raises(DirectLinkError, match="withdrawn"):  # a ticket binds one connection, once
                await listener.accepted(offer)
        finally:
            await listener.close()

    asyncio.run(main())


@pytest.mark.parametrize("attack", ["flip", "replay", "drop", "oversize"])
def test_a_direct_link_breaks_on_a_forged_replayed_or_dropped_message(attack):
    async def main():
        listener = DirectListener()
        await listener.start("127.0.0.1", [])
        try:
            offer = listener.offer()
            writer = await dial(offer, ["127.0.0.1"])
            frames = []
            raw_write = writer._writer.write
            writer._writer.write = frames.append  # capture the sealed frames, then put them on the wire as told
            for n in range(3):
                writer.send(_request(n))
            writer._writer.write = raw_write
            if attack == "flip":
                frames[1] = frames[1][:-1] + bytes([frames[1][-1] ^ 1])
            elif attack == "replay":
                frames[1] = frames[0]
            elif attack == "drop":
                del frames[1]
            else:
                frames[1] = (1 << 30).to_bytes(4, "little")
            reading = asyncio.create_task(_read_all(listener, offer))
            for frame in frames:
                raw_write(frame)
            await writer.drain()
            with pytest.raises(DirectLinkError):
                await reading
            writer.close()
        finally:
            await listener.close()

    asyncio.run(main())


def test_malformed_direct_offers_are_refused():
    good = {"addrs": [["127.0.0.1", 4000]], "ticket": bytes(16), "key": bytes(32)}
    assert DirectOffer.from_wire(good).addrs == (("127.0.0.1", 4000),)
    for bad in [{**good, "ticket": b"short"}, {**good, "key": "text"}, {**good, "addrs": []},
                {**good, "addrs": [["127.0.0.1", 70000]]}, {**good, "addrs": [["h", True]]}, {**good, "x": 1}, []]:
        with pytest.raises(ValueError):
            DirectOffer.from_wire(bad)
    assert maddr_hosts(["/ip4/10.1.2.3/tcp/1/p2p/Qm", "/ip4/0.0.0.0/tcp/1", "/ip4/5.6.7.8/tcp/1/p2p/Qm/p2p-circuit"]) \
        == ["10.1.2.3"]


def test_first_stage_merges_the_head_and_refuses_bad_head_messages(tiny_checkpoint):
    """This test is the ring's other stages: it pushes head messages to a real first stage, as its last stage."""
    source = resolve_model(str(tiny_checkpoint("llama", num_layers=4)))
    hidden_size, vocab = source.hidden_size, source.config.vocab_size
    split = vocab // 2
    own_rows = LMHead(source, rows=(0, split))
    prompt = [5, 17, 3]

    async def main():
        node = Node(source, NodeConfig(start=0, end=2))
        await node.start()
        try:
            async with connect(node.visible_maddrs, source) as client:
                p2p = await client.p2p()
                me = p2p.peer_id.to_base58()
                pushed: asyncio.Queue = asyncio.Queue()  # what the first stage pushes on to "the next stage"

                async def take_pushes(requests, context: P2PContext):
                    async for request in requests:
                        if "push" not in (metadata := unpack_metadata(request)):  # past the stream's opening
                            pushed.put_nowait(metadata)
                    return
                    yield

                await p2p.add_protobuf_handler(PUSH_HANDLER, take_pushes, runtime_pb2.ExpertRequest,
                                               stream_input=True, stream_output=True)
                session_id = uuid.uuid4().hex
                to_stage: asyncio.Queue = asyncio.Queue()
                to_stage.put_nowait(pack({"open": {
                    "session_id": session_id, "start": 0, "end": 2, "max_length": 16, "prev": me, "next": me,
                    "embed": True, "sampling": SamplingParams(max_new_tokens=4).to_wire()}}))
                to_stage.put_nowait(pack({"position": 0, "tokens": prompt, "sample": True}))
                answers = await p2p.iterate_protobuf_handler(
                    PeerID.from_base58(node.record.peer_id), INFERENCE_HANDLER, _drain(to_stage),
                    runtime_pb2.ExpertResponse)
                assert "opened" in unpack_metadata(await anext(answers))
                assert (await asyncio.wait_for(pushed.get(), 10))["position"] == 0  # the prompt, on its way

                to_first: asyncio.Queue = asyncio.Queue()
                to_first.put_nowait(pack({"push": session_id}))
                offers = await p2p.iterate_protobuf_handler(
                    PeerID.from_base58(node.record.peer_id), PUSH_HANDLER, _drain(to_first),
                    runtime_pb2.ExpertResponse)
                offer = parse_push_offer(unpack_metadata(await anext(offers)))
                assert offer.head_split == split and offer.direct is not None

                position = len(prompt)
                hidden = torch.randn(1, 1, hidden_size)
                bad = [
                    (pack({"position": position, "head": "part", "max": 1.0, "argmax": split}), "bad_step"),
                    (pack({"position": position + 1, "head": "input"}, [hidden]), "bad_step"),
                    (pack({"position": position, "head": "input"}, [torch.randn(1, 2, hidden_size)]), "bad_tensor"),
                    (pack({"position": position, "head": "input"}, [torch.full_like(hidden, float("inf"))]),
                     "bad_tensor"),
                    (pack({"position": position, "head": "guess"}), "bad_request"),
                ]
                for request, code in bad:
                    to_first.put_nowait(request)
                    assert await _error_code(answers) == code
                to_first.put_nowait(pack({"position": position, "head": "input"}, [hidden]))
                for request, code in [
                    (pack({"position": position, "head": "part", "max": float("nan"), "argmax": split}),
                     "bad_request"),
                    (pack({"position": position, "head": "part", "max": 1.0, "argmax": split - 1}), "bad_request"),
                    (pack({"position": position, "head": "part", "max": 1.0, "argmax": vocab}), "bad_request"),
                ]:
                    to_first.put_nowait(request)
                    assert await _error_code(answers) == code
                # The real part, worse than every logit of the stage's own rows: the token is its own argmax.
                to_first.put_nowait(pack({"position": position, "head": "part", "max": -1e30, "argmax": vocab - 1}))
                token = await _next_answer(answers)
                expected = int(own_rows.logits(hidden)[0, -1].argmax())
                assert token == {"token": expected, "position": position}
                assert (await asyncio.wait_for(pushed.get(), 10))["position"] == position  # fed itself, pushed on
                assert (await client.node_info(node.record.peer_id))["head_merges"] == 1
                to_stage.put_nowait(None)
                to_first.put_nowait(None)
        finally:
            await node.stop()

    asyncio.run(main())


async def _drain(queue: asyncio.Queue):
    while (item := await queue.get()) is not None:
        yield item


async def _next_answer(answers) -> dict:
    """The stage's next answer on the client stream, past its receipts' echoes (docs/trust.md)."""
    while "echo" in (metadata := unpack_metadata(await asyncio.wait_for(anext(answers), 10))):
        pass
    return metadata


async def _error_code(answers) -> str:
    return (await _next_answer(answers))["error"]["code"]


def test_a_sampled_head_part_is_shared_only_over_a_link_that_carries_it_within_a_millisecond(tiny_checkpoint):
    source = resolve_model(str(tiny_checkpoint("llama", num_layers=4)))
    last = Stage(source, 2, 4, dtype=torch.float32, device=torch.device("cpu"))
    split = last.head.vocab_size // 2
    part_bits = 32 * (last.head.vocab_size - split)  # the fp32 logits of rows [split, vocab)

    def pays(temperature: float, uplink_bps: float = 0.0, emulated_bps: float = 0.0) -> bool:
        server = StageServer(last, kv_budget_bytes=1 << 20, uplink_bps=uplink_bps, send_bandwidth_bps=emulated_bps)
        try:
            opened = SimpleNamespace(sampling=SamplingParams(temperature=temperature))
            return server._share_pays(SimpleNamespace(opened=opened), split)
        finally:
            server.shutdown()

    fast, slow = part_bits / 0.5e-3, part_bits / 2e-3
    assert pays(0.8, uplink_bps=fast) and pays(0.8)  # measured fast, or not measured (loopback swarms)
    assert not pays(0.8, uplink_bps=slow) and not pays(0.8, uplink_bps=fast, emulated_bps=slow)
    assert pays(0.0, uplink_bps=slow)  # a greedy part is two numbers: always worth it


def test_an_offer_no_one_takes_up_or_no_one_answers_fails_clearly():
    """The two ways a switch to a direct link can fail: the pusher's dial finds no one (it then keeps pushing
    over libp2p), or the receiver waits for a dial that never comes (it reports link_failed to the client)."""

    async def main():
        listener = DirectListener()
        await listener.start("127.0.0.1", [])
        offer = listener.offer()
        await listener.close()  # the port is gone: nothing answers there now
        with pytest.raises(DirectLinkError, match="no address of the offer answered"):
            await dial(offer, ["127.0.0.1"], timeout_s=1.0)

        listener = DirectListener()
        await listener.start("127.0.0.1", [])
        try:
            with pytest.raises(DirectLinkError, match="no direct connection presented the ticket"):
                await listener.accepted(listener.offer(), timeout_s=0.2)
        finally:
            await listener.close()

    asyncio.run(main())
