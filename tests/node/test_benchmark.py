"""`layerhive bench`: compute on a tiny real checkpoint, memory and the cap, the cache, and the P2P probes."""

from __future__ import annotations

import asyncio
import contextlib
import json
import math
import threading
from collections.abc import Iterator

import hivemind
import pytest
import torch
from hivemind.proto import runtime_pb2

from node.app.cli import main
from node.model.checkpoint import layer_bytes, resolve_model
from node.net import probe
from node.net.membership import SwarmPeer, open_dht
from node.net.protocol import unpack_metadata
from node.serve.benchmark import (
    BenchError,
    BenchSettings,
    ModelDoesNotFitError,
    run_bench,
    split_step_time,
    usable_memory,
)
from swarm.costmodel import layer_capacity
from swarm.records import ServerRecord
from swarm.types import ModelSpec, NodeSpec

pytestmark = pytest.mark.timeout(120)

# Small enough for a loaded 2-core machine, big enough to exercise every phase.
FAST = BenchSettings(context_tokens=32, decode_warmup=1, decode_steps=6, min_steps=3, prefill_tokens=32,
                     prefill_repeats=2, budget_s=5.0, kv_sessions=2, kv_context_tokens=64, uplink_bytes=1 << 20)
LOOPBACK = ["/ip4/127.0.0.1/tcp/0"]


@pytest.fixture(scope="module")
def home(tmp_path_factory: pytest.TempPathFactory) -> Iterator:
    """A private LAYERHIVE_HOME, shared by this module's tests so later ones reuse the cached compute."""
    path = tmp_path_factory.mktemp("layerhive-home")
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("LAYERHIVE_HOME", str(path))
        yield path


@pytest.fixture(scope="module")
def tiny(tiny_checkpoint) -> str:
    return str(tiny_checkpoint("llama", num_layers=6))


def test_bench_measures_a_real_checkpoint_then_caches_it(home, tiny):
    calls: list[tuple[str, float]] = []
    result = run_bench(tiny, device="cpu", settings=FAST, progress=lambda m, f: calls.append((m, f)))

    assert result.device == "cpu" and result.dtype == "float32" and "threads" in result.device_name
    for value in (result.layer_latency_s, result.prefill_s_per_token_per_layer, result.memory_bytes):
        assert math.isfinite(value) and value > 0
    assert 0 <= result.stage_overhead_s < 1 and result.layer_latency_s < 1  # a 64-wide layer is not slow
    source = resolve_model(tiny)
    assert result.layer_bytes == layer_bytes(source, torch.float32)
    assert result.kv_bytes_per_token_per_layer == 2 * 2 * 16 * 4  # K+V x 2 KV heads x head_dim 16 x fp32
    assert result.max_layers == 6  # the whole tiny model fits in RAM
    assert result.uplink_bps is None and result.rtt_s == {} and any("--initial-peers" in n for n in result.notes)
    assert not result.from_cache and result.versions["torch"] == torch.__version__

    fractions = [f for _, f in calls]
    assert len(calls) >= 10 and fractions == sorted(fractions) and fractions[-1] == 1.0
    assert all(0 <= f <= 1 for f in fractions) and any("decode" in m for m, _ in calls)

    again = run_bench(tiny, device="cpu", settings=FAST)
    assert again.from_cache and again.measured_at == result.measured_at
    assert again.layer_latency_s == result.layer_latency_s
    assert list((home / "bench").glob("*.json"))

    forced = run_bench(tiny, device="cpu", settings=FAST, force=True)
    assert not forced.from_cache and forced.layer_latency_s > 0

    spec = forced.to_node_spec("me", "eu", layers=3)
    assert isinstance(spec, NodeSpec) and spec.memory_bytes == forced.memory_bytes
    assert spec.layer_latency_s == pytest.approx(forced.layer_latency_s + forced.stage_overhead_s / 3)
    assert spec.uplink_bps == NodeSpec("x", "", 0, 0, 0).uplink_bps  # unmeasured: the scheduler's default
    record = ServerRecord(peer_id="me", model=source.name, start=0, end=6, **forced.record_fields())
    record.validate(num_layers=6)
    assert record.layer_latency_s == pytest.approx(forced.layer_latency_s + forced.stage_overhead_s / 6)
    assert hash(forced) and json.loads(json.dumps(forced.to_dict()))["max_layers"] == 6


def test_max_layers_follows_the_memory_cap(home, tiny):
    source = resolve_model(tiny)
    per_layer = layer_bytes(source, torch.float32) + 256 * FAST.kv_sessions * FAST.kv_context_tokens
    cap = 3 * per_layer + per_layer // 2
    result = run_bench(tiny, device="cpu", settings=FAST, max_memory_bytes=cap, quant="none")
    assert result.memory_bytes == cap and result.memory_cap_bytes == cap and result.max_layers == 3
    model = ModelSpec(source.name, 6, 64, result.layer_bytes, result.kv_bytes_per_token_per_layer)
    assert result.max_layers == layer_capacity(model, result.to_node_spec("me", ""), sessions=FAST.kv_sessions,
                                               context_tokens=FAST.kv_context_tokens)


def test_a_model_that_does_not_fit_is_a_clear_error(home, tiny, capsys, monkeypatch):
    monkeypatch.setattr("node.serve.benchmark.DEFAULT_SETTINGS", FAST)
    one_layer = layer_bytes(resolve_model(tiny), torch.float32, "int4")  # the smallest a layer gets
    with pytest.raises(ModelDoesNotFitError, match=r"does not fit: one layer needs .* the cap of"):
        run_bench(tiny, device="cpu", settings=FAST, max_memory_bytes=one_layer // 2)
    with pytest.raises(BenchError, match="positive"):
        run_bench(tiny, device="cpu", settings=FAST, max_memory_bytes=0)
    with pytest.raises(BenchError, match="unknown device"):
        run_bench(tiny, device="tpu-please", settings=FAST)

    assert main(["bench", "--model", tiny, "--device", "cpu", "--max-memory-gb", "0.00001"]) == 2
    assert "does not fit" in capsys.readouterr().err
    assert main(["bench", "--model", tiny, "--max-memory-gb", "-1"]) == 2
    assert "must be positive" in capsys.readouterr().err


def test_cli_prints_json_and_a_summary(home, tiny, capsys, monkeypatch):
    monkeypatch.setattr("node.serve.benchmark.DEFAULT_SETTINGS", FAST)  # and so the compute cached above
    assert main(["bench", "--model", tiny, "--device", "cpu", "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["model"] == resolve_model(tiny).name and data["layer_latency_s"] > 0
    assert data["num_layers"] == 6 and data["max_layers"] == 6
    assert data["from_cache"] and data["uplink_bps"] is None
    assert main(["bench", "--model", tiny, "--device", "cpu"]) == 0
    out = capsys.readouterr().out
    assert "per layer per token" in out and "6 layers fit (the whole model)" in out and "network not measured" in out


def test_step_time_split_and_memory_policy():
    assert split_step_time(3.0, 5.0) == (2.0, 1.0)  # t(k) = 1 + 2k
    assert split_step_time(3.0, 2.9) == (1.45, 0.0)  # noise: blame the layers
    assert split_step_time(1.0, 3.0) == (1.5, 0.0)  # more than linear: no negative overhead
    gib = 1 << 30
    assert usable_memory("cuda", 20 * gib, 24 * gib) == 20 * gib - int(24 * gib * 0.05)
    assert usable_memory("cpu", 8 * gib, 16 * gib) == 6 * gib - (512 << 20)
    assert usable_memory("cpu", 100, 16 * gib) == 0
    assert usable_memory("cpu", 8 * gib, 16 * gib, max_memory_bytes=gib) == gib  # the user's cap
    assert usable_memory("cuda", 20 * gib, 24 * gib, max_memory_bytes=40 * gib) == 20 * gib - int(24 * gib * 0.05)


# --- network probes -------------------------------------------------------------------------------


def test_probes_between_two_dht_peers():
    async def body() -> None:
        server = hivemind.DHT(start=True, host_maddrs=LOOPBACK)
        client = hivemind.DHT(start=True, host_maddrs=LOOPBACK, initial_peers=server.get_visible_maddrs())
        try:
            server_p2p, client_p2p = await server.replicate_p2p(), await client.replicate_p2p()
            await probe.add_probe_handlers(server_p2p)
            rtt = await probe.measure_rtt(client_p2p, server.peer_id, n=5)
            assert 0 < rtt < 0.5
            uplink = await probe.measure_uplink(client_p2p, server.peer_id.to_base58(), 2 << 20, rtt_s=rtt)
            assert 1e6 < uplink < 1e12  # loopback through two p2p daemons: well above 1 Mbit/s

            with pytest.raises(probe.ProbeError, match="layerhive.ping"):  # the client runs no probes
                await probe.measure_rtt(server_p2p, client.peer_id)
            with pytest.raises(ValueError):
                await probe.measure_uplink(client_p2p, server.peer_id, probe.MAX_SINK_BYTES + 1)

            # The sink refuses more than its cap, whatever the sender's own checks say.
            async def flood():
                for _ in range(3):
                    yield runtime_pb2.ExpertRequest(tensors=[runtime_pb2.Tensor(buffer=b"x" * 1000)])

            cap, probe.MAX_SINK_BYTES = probe.MAX_SINK_BYTES, 2000
            try:
                response = await client_p2p.call_protobuf_handler(
                    server.peer_id, probe.SINK_HANDLER, flood(), runtime_pb2.ExpertResponse
                )
            finally:
                probe.MAX_SINK_BYTES = cap
            assert unpack_metadata(response)["error"]["code"] == "too_long"
            big_ping = runtime_pb2.ExpertRequest(metadata=b"x" * (probe.MAX_PING_BYTES + 1))
            response = await client_p2p.call_protobuf_handler(
                server.peer_id, probe.PING_HANDLER, big_ping, runtime_pb2.ExpertResponse
            )
            assert unpack_metadata(response)["error"]["code"] == "bad_request"
        finally:
            client.shutdown()
            server.shutdown()

    asyncio.run(body())


@contextlib.contextmanager
def probe_node(model: str) -> Iterator[SwarmPeer]:
    """A DHT peer that runs the probes and announces itself as a server of `model`, on its own event
    loop in a thread (so that the bench, which runs its own loop, can reach it)."""
    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()
    peer = open_dht([], LOOPBACK)

    async def setup() -> None:
        await probe.add_probe_handlers(await peer.dht.replicate_p2p())
        record = ServerRecord(peer_id=peer.peer_id, model=model, start=0, end=6)
        assert await peer.announce(record, ttl_s=120)

    async def teardown() -> None:
        await (await peer.dht.replicate_p2p()).shutdown()
        tasks = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    try:
        asyncio.run_coroutine_threadsafe(setup(), loop).result(timeout=60)
        yield peer
    finally:
        with contextlib.suppress(Exception):
            asyncio.run_coroutine_threadsafe(teardown(), loop).result(timeout=10)
        peer.shutdown()
        loop.call_soon_threadsafe(loop.stop)
        thread.join(timeout=10)
        loop.close()


def test_bench_measures_rtt_and_uplink_to_swarm_peers(home, tiny):
    source = resolve_model(tiny)
    with probe_node(source.name) as peer:
        result = run_bench(tiny, device="cpu", settings=FAST, initial_peers=peer.visible_maddrs)
    peer_id = peer.peer_id
    assert set(result.rtt_s) == {peer_id} and 0 < result.rtt_s[peer_id] < 0.5
    assert result.uplink_bps is not None and result.uplink_bps > 1e6
    assert result.to_node_spec("me", "eu").uplink_bps == result.uplink_bps
