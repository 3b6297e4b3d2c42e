"""The `layerhive` command line."""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import signal
import sys
import threading
from typing import TYPE_CHECKING

from node.app.cli_simulate import add_simulate_parser
from node.model.checkpoint import DEFAULT_MODEL
from node.model.speculative import MAX_DRAFT_TOKENS
from node.net.config import ConfigError, default_initial_peers
from node.serve.adversary import KINDS as ADVERSARY_KINDS
from swarm.records import QUANTIZATIONS

QUANT_HELP = ("hold the layers' weights as int8 (per channel) or int4 (per group of 32) instead of the compute "
              "dtype (default: the least lossy at which the whole model, or --layers, fits in memory)")

SPECULATE_HELP = (f"draft up to K tokens (at most {MAX_DRAFT_TOKENS}) per trip round the ring, verified in one pass: "
                  "the same answer, often several tokens per round trip (default 0: one token per trip)")

if TYPE_CHECKING:
    from node.serve.assignment import SwarmStatus
    from swarm.types import LayerRange


def draft_length(text: str) -> int:
    if not text.isdigit() or int(text) > MAX_DRAFT_TOKENS:
        raise argparse.ArgumentTypeError(f"a draft length is 0 to {MAX_DRAFT_TOKENS}, got {text!r}")
    return int(text)


def parse_layers(text: str) -> tuple[int, int]:
    try:
        start, end = (int(part) for part in text.split(":"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"layers must look like START:END, got {text!r}") from None
    if not 0 <= start < end:
        raise argparse.ArgumentTypeError(f"layers {text!r}: need 0 <= START < END")
    return start, end


def _quiet_logs(verbose: bool) -> None:
    logging.basicConfig(level=logging.INFO if verbose else logging.WARNING,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if not verbose:
        os.environ.setdefault("HIVEMIND_LOGLEVEL", "ERROR")
        logging.getLogger("hivemind").setLevel(logging.ERROR)


def node_config(args: argparse.Namespace):
    """The NodeConfig of `layerhive node` arguments (also used by the tray app's controller)."""
    from node.net.membership import DEFAULT_TTL_S
    from node.serve.node import NodeConfig

    start, end = args.layers if args.layers else (None, None)
    return NodeConfig(
        start=start, end=end, initial_peers=args.initial_peers, host_maddrs=args.host_maddrs,
        device=args.device, max_length=args.max_length, send_delay_s=args.emulate_delay_ms / 1000,
        kv_budget_bytes=int(args.kv_budget_mb * (1 << 20)) if args.kv_budget_mb else None,
        identity=args.identity, test_perturb_scale=args.test_perturb,
        test_adversary=args.test_adversary, dtype=args.dtype, region=args.region,
        test_slowdown_s=args.test_slowdown_ms / 1000, send_bandwidth_bps=args.emulate_bandwidth_mbps * 1e6,
        max_memory_bytes=None if args.max_memory_gb is None else int(args.max_memory_gb * 1e9),
        ttl_s=args.ttl or DEFAULT_TTL_S, bench=not args.quick_measure,
        announce_maddrs=args.announce_maddrs, relays=args.relay or None, direct_links=not args.no_direct_links,
        quant=args.quant, draft_model=args.draft_model, draft_quant=args.draft_quant,
    )


async def _run_node(args: argparse.Namespace) -> int:
    from node.model.checkpoint import resolve_model
    from node.serve.node import Node

    source = resolve_model(args.model)
    node = Node(source, node_config(args))
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    try:
        starting = asyncio.create_task(node.start())
        await asyncio.wait([starting, asyncio.create_task(stop.wait())], return_when=asyncio.FIRST_COMPLETED)
        if not starting.done():  # stopped while still joining
            starting.cancel()
            return 0
        starting.result()
        record = node.record
        print(f"serving {source.name} layers {record.start}:{record.end}; peer addresses: "
              f"{' '.join(node.visible_maddrs)}", flush=True)
        await stop.wait()
    finally:
        await node.stop()
    return 0


def cmd_node(args: argparse.Namespace) -> int:
    from node.app.memtrace import install_from_env

    install_from_env()  # $LAYERHIVE_TRACEMALLOC: a diagnostic of memory growth, off by default
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    return asyncio.run(_run_node(args))


def cmd_status(args: argparse.Namespace) -> int:
    import json

    from node.model.checkpoint import resolve_model
    from node.net.membership import open_dht
    from node.serve.assignment import model_spec, swarm_status

    if not args.initial_peers:
        print("layerhive status: error: give --initial-peers of the swarm", file=sys.stderr)
        return 2
    source = resolve_model(args.model)
    peer = open_dht(args.initial_peers, ["/ip4/127.0.0.1/tcp/0"], client_mode=True)

    async def read() -> SwarmStatus:
        records = await peer.list_servers(source.name, num_layers=source.num_layers)
        liars = await peer.proof_book(source.name).liars(r.peer_id for r in records)
        return swarm_status(model_spec(source), records, credit=await peer.read_credit(source.name), liars=liars)

    try:
        status = asyncio.run(read())
    finally:
        peer.shutdown()
    print(json.dumps(status_json(status), indent=2) if args.json else format_status(status))
    return 0


# What `layerhive status --json` shows of each node's record, under the record's own names (SI units).
STATUS_RECORD_FIELDS = ("epoch", "sessions", "queue_len", "free_kv_tokens", "layer_latency_s",
                        "prefill_s_per_token_per_layer", "memory_bytes", "uplink_bps", "reachability", "region",
                        "quant")


def status_json(status: SwarmStatus) -> dict:
    """`layerhive status --json`: numbers only; a range is {"start", "end"} (layers start..end-1), or null."""
    def layers(rng: LayerRange | None) -> dict | None:
        return None if rng is None else {"start": rng.start, "end": rng.end}

    nodes = [{"peer_id": p.record.peer_id, "state": p.record.state, "range": layers(p.serving),
              "planned": layers(p.planned), **{name: getattr(p.record, name) for name in STATUS_RECORD_FIELDS},
              **_credit_json(status, p.record.peer_id)}
             for p in status.nodes]
    return {"model": status.model, "num_layers": status.num_layers, "epoch": status.epoch, "nodes": nodes,
            "replicas_per_layer": list(status.replicas_per_layer), "min_replicas": status.min_replicas,
            "max_replicas": status.max_replicas, "uncovered_layers": status.uncovered_layers,
            "proven_liars": sorted(status.proven_liars)}


def _credit_json(status: SwarmStatus, peer: str) -> dict:
    """A node's checked credit (node.net.credit): tokens clients' checks vouch for, and how many clients vouch."""
    credit = status.credit.get(peer)
    return {"checked_tokens": credit.tokens if credit else 0, "checked_by": credit.clients if credit else 0}


def format_status(status: SwarmStatus) -> str:
    """`layerhive status`: a summary line, a row per node, the online replicas of each layer."""
    lines = [f"{status.model}: {len(status.nodes)} nodes, epoch {status.epoch}, "
             f"replicas per layer min {status.min_replicas} max {status.max_replicas}"]
    if status.uncovered_layers:
        lines.append(f"  UNCOVERED layers: {status.uncovered_layers}")
    if status.proven_liars:
        lines.append(f"  PROVEN LIARS, not used: {', '.join(sorted(status.proven_liars))}")
    lines.append(f"  {'peer':18} {'state':8} {'range':>7} {'planned':>7} {'epoch':>5} {'sess':>4} {'queue':>5} "
                 f"{'ms/layer':>8} {'mem GB':>7} {'quant':5} {'checked tokens':>17} region")
    for peer in status.nodes:
        r = peer.record
        serving, planned = ("-" if rng is None else str(rng) for rng in (peer.serving, peer.planned))
        credit = _credit_json(status, r.peer_id)
        checked = f"{credit['checked_tokens']} ({credit['checked_by']} cl)"
        lines.append(f"  {r.peer_id[:18]:18} {r.state:8} {serving:>7} {planned:>7} "
                     f"{r.epoch:>5} {r.sessions:>4} {r.queue_len:>5} {r.layer_latency_s * 1e3:>8.3f} "
                     f"{r.memory_bytes / 1e9:>7.3f} {r.quant:5} {checked:>17} {r.region}")
    lines.append("  checked tokens: served tokens that clients' checks vouch for (cl: how many clients vouch; "
                 "see docs/trust.md)")
    lines.append("  replicas per layer: " + " ".join(str(n) for n in status.replicas_per_layer))
    return "\n".join(lines)


def cmd_bootstrap(args: argparse.Namespace) -> int:
    from node.app.bootstrap import run_bootstrap

    asyncio.run(run_bootstrap(args.host_maddrs, announce_maddrs=args.announce_maddrs,
                              initial_peers=args.initial_peers, identity=args.identity))
    return 0


def cmd_swarm_local(args: argparse.Namespace) -> int:
    from node.app.local_swarm import LocalSwarm

    # Handlers rather than a blocked mask and sigwait: a mask would be inherited by the nodes we spawn.
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    with LocalSwarm(args.model, num_nodes=args.nodes, threads_per_node=args.threads) as swarm:
        print("local swarm online:")
        for layers, process in zip(swarm.ranges, swarm.processes, strict=True):
            print(f"  node pid {process.pid}: layers {layers[0]}:{layers[1]}")
        print("initial peers:", " ".join(swarm.initial_peers), flush=True)
        print("join with: layerhive chat --initial-peers", swarm.initial_peers[0], '"Hello!"', flush=True)
        while not stop.wait(1.0):  # a timeout keeps the main thread where Python runs signal handlers
            pass
        print("stopping the local swarm...", flush=True)
    return 0


async def _chat(args: argparse.Namespace, initial_peers: list[str]) -> int:
    from node.client.chat import REVISED_NOTICE, ChatEngine, Message, TextRevision
    from node.client.session import connect
    from node.model.checkpoint import resolve_model
    from node.model.sampling import SamplingParams

    source = resolve_model(args.model)
    async with connect(initial_peers, source) as client:
        params = SamplingParams(max_new_tokens=args.max_new_tokens, temperature=args.temperature,
                                top_p=args.top_p, seed=args.seed)
        answer = ""
        engine = ChatEngine(client, source, speculate=args.speculate)
        async for delta in engine.stream_chat([Message("user", args.prompt)], params):
            if isinstance(delta, TextRevision):  # a lying node was caught: say so, and restart from what stands
                answer = answer[:delta.keep_chars]
                delta = f"\n[{REVISED_NOTICE}]\n{answer}"
            else:
                answer += delta
            print(delta, end="", flush=True)
        print()
    return 0


def cmd_chat(args: argparse.Namespace) -> int:
    if args.initial_peers:
        return asyncio.run(_chat(args, args.initial_peers))
    from node.app.local_swarm import LocalSwarm

    print("no --initial-peers given: starting a local swarm of 3 nodes...", file=sys.stderr, flush=True)
    with LocalSwarm(args.model, num_nodes=3) as swarm:
        return asyncio.run(_chat(args, swarm.initial_peers))


def cmd_api(args: argparse.Namespace) -> int:
    from node.app.api import API_KEY_ENV, api_key_for, serve

    api_key, generated = api_key_for(args.host, args.api_key)
    if generated:
        print(f"the API listens beyond this machine ({args.host}): clients must send this key as a bearer token "
              f"(OpenAI clients: api_key=...); set --api-key or ${API_KEY_ENV} to choose it:\n  {api_key}",
              file=sys.stderr, flush=True)
    if args.initial_peers:
        return serve(args.model, args.initial_peers, host=args.host, port=args.port, api_key=api_key,
                     speculate=args.speculate)
    from node.app.local_swarm import LocalSwarm

    print("no --initial-peers given: starting a local swarm of 3 nodes...", file=sys.stderr, flush=True)
    with LocalSwarm(args.model, num_nodes=3) as swarm:
        print(f"OpenAI-compatible API on http://{args.host}:{args.port}/v1", file=sys.stderr, flush=True)
        return serve(args.model, swarm.initial_peers, host=args.host, port=args.port, api_key=api_key,
                     speculate=args.speculate)


def cmd_bench(args: argparse.Namespace) -> int:
    import json

    from node.model.checkpoint import CheckpointError, ModelNotFoundError, UnsupportedModelError, tqdm_progress
    from node.serve.benchmark import BenchError, format_result, run_bench

    if args.max_memory_gb is not None and args.max_memory_gb <= 0:
        print("layerhive bench: error: --max-memory-gb must be positive", file=sys.stderr)
        return 2
    cap = None if args.max_memory_gb is None else int(args.max_memory_gb * 1e9)
    if args.threads:  # measure with the threads the node will serve with (part of the cache key)
        import torch

        torch.set_num_threads(args.threads)
    try:
        with tqdm_progress("bench") as progress:
            result = run_bench(args.model, device=args.device, initial_peers=args.initial_peers,
                               max_memory_bytes=cap, force=args.force, progress=progress, quant=args.quant)
    except (BenchError, ModelNotFoundError, UnsupportedModelError, CheckpointError) as e:
        print(f"layerhive bench: error: {e}", file=sys.stderr)
        return 2
    print(json.dumps(result.to_dict(), indent=2) if args.json else format_result(result))
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="layerhive", description=__doc__)
    parser.add_argument("-v", "--verbose", action="store_true", help="log what the node does")
    commands = parser.add_subparsers(dest="command", required=True)

    node = commands.add_parser("node", help="serve a range of layers in a swarm")
    node.add_argument("--model", default=DEFAULT_MODEL)
    node.add_argument("--layers", type=parse_layers, default=None,
                      help="START:END, end exclusive (a manual override; default: the range the swarm assigns)")
    node.add_argument("--initial-peers", nargs="*", default=[])
    node.add_argument("--host-maddrs", nargs="*", default=["/ip4/127.0.0.1/tcp/0"])
    node.add_argument("--device", default=None, help="cpu, cuda, cuda:1, mps (default: the best available)")
    node.add_argument("--max-length", type=int, default=8192, help="longest session, in tokens")
    node.add_argument("--kv-budget-mb", type=float, default=None,
                      help="memory for sessions' KV caches (default: a quarter of the memory free after loading)")
    node.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    node.add_argument("--identity", default=None,
                      help="name of a persistent identity (keeps the peer id across restarts); default: a new one")
    node.add_argument("--announce-maddrs", nargs="*", default=[],
                      help="addresses peers should dial (e.g. your public address behind port forwarding)")
    node.add_argument("--relay", nargs="*", default=[], metavar="MADDR",
                      help="serve through these relay peers (e.g. a bootstrap peer) when peers cannot dial you")
    node.add_argument("--no-direct-links", action="store_true",
                      help="push to other stages only over libp2p, never over a direct TCP link with its own port")
    node.add_argument("--emulate-bandwidth-mbps", type=float, default=0.0,
                      help="testing aid: limit what this node sends to this many Mbit/s (a WAN uplink)")
    node.add_argument("--emulate-delay-ms", type=float, default=0.0,
                      help="testing aid: delay everything this node sends by this many ms (a WAN link)")
    # Testing aid, hidden from --help: add noise of SCALE × RMS to outputs, i.e. make this node lie (in the way
    # --test-adversary says, node.serve.adversary), so the client's checks can be exercised. Never useful to a
    # real volunteer.
    node.add_argument("--test-perturb", type=float, default=0.0, metavar="SCALE", help=argparse.SUPPRESS)
    node.add_argument("--test-adversary", default="liar", choices=ADVERSARY_KINDS, help=argparse.SUPPRESS)
    node.add_argument("--dtype", choices=("float32", "bfloat16", "float16"), default=None,
                      help="compute in this dtype (default: bfloat16 on a GPU, float32 on a CPU); announced to "
                      "clients, whose checks allow for it")
    node.add_argument("--test-slowdown-ms", type=float, default=0.0, help=argparse.SUPPRESS)  # a slower GPU
    node.add_argument("--max-memory-gb", type=float, default=None, help="offer at most this much memory (GB)")
    node.add_argument("--quant", choices=QUANTIZATIONS, default=None, help=QUANT_HELP)
    node.add_argument("--draft-model", default=None, metavar="MODEL",
                      help="a small model with the served model's tokenizer, held when this node starts the chain: "
                      "it drafts tokens for speculating rings (default: drafts by prompt lookup only)")
    node.add_argument("--draft-quant", choices=QUANTIZATIONS, default="none", help="how the draft model is held")
    node.add_argument("--region", default="", help="where this machine is (e.g. eu-west); nearby nodes pipeline")
    node.add_argument("--quick-measure", action="store_true",
                      help="estimate memory only instead of running (or reading the cached) `layerhive bench`")
    node.add_argument("--ttl", type=float, default=None,
                      help="seconds a record lives without heartbeat (default 30); re-planning runs every ttl/3")
    node.set_defaults(func=cmd_node)

    status = commands.add_parser("status", help="the swarm as seen from the DHT: nodes, ranges, coverage")
    status.add_argument("--model", default=DEFAULT_MODEL)
    status.add_argument("--initial-peers", nargs="*", default=[])
    status.add_argument("--json", action="store_true", help="print the status as JSON")
    status.set_defaults(func=cmd_status)

    bootstrap = commands.add_parser("bootstrap", help="host a long-lived bootstrap and relay peer")
    bootstrap.add_argument("--host-maddrs", nargs="*", default=["/ip4/0.0.0.0/tcp/31337"])
    bootstrap.add_argument("--announce-maddrs", nargs="*", default=[], help="public addresses to announce")
    bootstrap.add_argument("--initial-peers", nargs="*", default=[], help="other bootstrap peers to join")
    bootstrap.add_argument("--identity", default="bootstrap",
                           help="name of the persistent identity that keeps this peer's id across restarts")
    bootstrap.set_defaults(func=cmd_bootstrap)

    swarm = commands.add_parser("swarm", help="run a whole swarm").add_subparsers(dest="where", required=True)
    local = swarm.add_parser("local", help="a bootstrap peer and N nodes on 127.0.0.1")
    local.add_argument("--model", default=DEFAULT_MODEL)
    local.add_argument("--nodes", type=int, default=3)
    local.add_argument("--threads", type=int, default=None, help="torch CPU threads per node")
    local.set_defaults(func=cmd_swarm_local)

    chat = commands.add_parser("chat", help="stream an answer from the swarm")
    chat.add_argument("prompt")
    chat.add_argument("--model", default=DEFAULT_MODEL)
    chat.add_argument("--initial-peers", nargs="*", default=[])
    chat.add_argument("--max-new-tokens", type=int, default=256)
    chat.add_argument("--temperature", type=float, default=0.0)
    chat.add_argument("--top-p", type=float, default=1.0)
    chat.add_argument("--seed", type=int, default=None)
    chat.add_argument("--speculate", type=draft_length, default=0, metavar="K", help=SPECULATE_HELP)
    chat.set_defaults(func=cmd_chat)

    api = commands.add_parser("api", help="serve an OpenAI-compatible HTTP API through the swarm")
    api.add_argument("--host", default="127.0.0.1")
    api.add_argument("--port", type=int, default=8000)
    api.add_argument("--model", default=DEFAULT_MODEL)
    api.add_argument("--initial-peers", nargs="*", default=[])
    api.add_argument("--api-key", default=None,
                     help="require this bearer token (default: $LAYERHIVE_API_KEY; beyond loopback, a generated one); "
                     "several, comma-separated, are several callers with a fair share each")
    api.add_argument("--speculate", type=draft_length, default=0, metavar="K", help=SPECULATE_HELP)
    api.set_defaults(func=cmd_api)

    bench = commands.add_parser("bench", help="measure this machine's compute, memory and network for a model")
    bench.add_argument("--model", default=DEFAULT_MODEL)
    bench.add_argument("--device", default=None, help="cpu, cuda, cuda:1, mps (default: the best available)")
    bench.add_argument("--initial-peers", nargs="*", default=[], help="measure RTT and uplink to this swarm")
    bench.add_argument("--max-memory-gb", type=float, default=None, help="offer at most this much memory (GB)")
    bench.add_argument("--quant", choices=QUANTIZATIONS, default=None, help=QUANT_HELP)
    bench.add_argument("--json", action="store_true", help="print the result as JSON")
    bench.add_argument("--force", action="store_true", help="re-measure compute even if cached")
    bench.add_argument("--threads", type=int, default=None, help="torch CPU threads, as for `layerhive node`")
    bench.set_defaults(func=cmd_bench)

    add_simulate_parser(commands)
    return parser


def main(argv: list[str] | None = None) -> int:
    from node.net.lifeline import default_signals, follow_parent_from_env

    default_signals()  # whatever our parent blocked or ignored, SIGINT/SIGTERM stop us
    follow_parent_from_env()  # started by a local swarm: stop when it is gone
    args = build_parser().parse_args(argv)
    _quiet_logs(args.verbose)
    if getattr(args, "initial_peers", None) == [] and args.func is not cmd_bootstrap:
        try:
            args.initial_peers = default_initial_peers()  # the user's config, then the built-in list
        except ConfigError as e:
            print(f"layerhive: error: {e}", file=sys.stderr)
            return 2
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
