"""The `layerhive` command line."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import os
import signal
import sys

from node.checkpoint import DEFAULT_MODEL


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


async def _run_node(args: argparse.Namespace) -> int:
    from node.checkpoint import resolve_model
    from node.node import Node, NodeConfig

    source = resolve_model(args.model)
    start, end = args.layers
    node = Node(source, NodeConfig(
        start=start, end=end, initial_peers=args.initial_peers, host_maddrs=args.host_maddrs,
        device=args.device, max_length=args.max_length,
    ))
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    try:
        await node.start()
        print(f"serving {source.name} layers {start}:{end}; peer addresses: {' '.join(node.visible_maddrs)}",
              flush=True)
        await stop.wait()
    finally:
        await node.stop()
    return 0


def cmd_node(args: argparse.Namespace) -> int:
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    return asyncio.run(_run_node(args))


def cmd_swarm_local(args: argparse.Namespace) -> int:
    from node.local_swarm import LocalSwarm

    with LocalSwarm(args.model, num_nodes=args.nodes, threads_per_node=args.threads) as swarm:
        print("local swarm online:")
        for (start, end), process in zip(swarm.ranges, swarm.processes, strict=True):
            print(f"  node pid {process.pid}: layers {start}:{end}")
        print("initial peers:", " ".join(swarm.initial_peers), flush=True)
        print("join with: layerhive chat --initial-peers", swarm.initial_peers[0], '"Hello!"', flush=True)
        with contextlib.suppress(KeyboardInterrupt):
            signal.sigwait({signal.SIGINT, signal.SIGTERM})
    return 0


async def _chat(args: argparse.Namespace, initial_peers: list[str]) -> int:
    from node.chat import ChatEngine, Message
    from node.checkpoint import resolve_model
    from node.client import SwarmClient
    from node.generate import SamplingParams
    from node.node import start_dht

    source = resolve_model(args.model)
    dht = start_dht(initial_peers, ["/ip4/127.0.0.1/tcp/0"], client_mode=True)
    try:
        engine = ChatEngine(SwarmClient(dht, source.name, source.num_layers), source)
        params = SamplingParams(max_new_tokens=args.max_new_tokens, temperature=args.temperature,
                                top_p=args.top_p, seed=args.seed)
        messages = [Message("user", args.prompt)]
        async for delta in engine.stream_chat(messages, params):
            print(delta, end="", flush=True)
        print()
    finally:
        dht.shutdown()
    return 0


def cmd_chat(args: argparse.Namespace) -> int:
    if args.initial_peers:
        return asyncio.run(_chat(args, args.initial_peers))
    from node.local_swarm import LocalSwarm

    print("no --initial-peers given: starting a local swarm of 3 nodes...", file=sys.stderr, flush=True)
    with LocalSwarm(args.model, num_nodes=3) as swarm:
        return asyncio.run(_chat(args, swarm.initial_peers))


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="layerhive", description=__doc__)
    parser.add_argument("-v", "--verbose", action="store_true", help="log what the node does")
    commands = parser.add_subparsers(dest="command", required=True)

    node = commands.add_parser("node", help="serve a range of layers in a swarm")
    node.add_argument("--model", default=DEFAULT_MODEL)
    node.add_argument("--layers", type=parse_layers, required=True, help="START:END, end exclusive")
    node.add_argument("--initial-peers", nargs="*", default=[])
    node.add_argument("--host-maddrs", nargs="*", default=["/ip4/127.0.0.1/tcp/0"])
    node.add_argument("--device", default=None, help="cpu, cuda, cuda:1, mps (default: the best available)")
    node.add_argument("--max-length", type=int, default=8192, help="longest session, in tokens")
    node.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    node.set_defaults(func=cmd_node)

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
    chat.set_defaults(func=cmd_chat)

    try:
        from node.cli_simulate import add_simulate_parser
    except ImportError:  # the simulator is optional at import time only while it is being written
        pass
    else:
        add_simulate_parser(commands)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    _quiet_logs(args.verbose)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
