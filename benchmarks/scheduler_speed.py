"""Time the scheduler core on a 1,000-node heterogeneous swarm serving Llama-2-70B (80 layers).

    python benchmarks/scheduler_speed.py [--nodes 1000] [--seed 0]

Prints the median wall and CPU time of `allocate` (target 1 s) and of one `route` decision (target
5 ms), with the CPU/target ratio (CPU time, because other jobs may share the cores). `allocate` is
timed at the default load (16 expected sessions) and at a heavy one (2,000 sessions from 8 client
regions, where it compares several KV reservations); `route` with and without announced loads, as a
plain dict and as the LoadTable the simulator passes, with alternates and with the prompt-aware
objective the simulator uses. Figures, GPU mix and regions come from scenario-format.md.
"""

from __future__ import annotations

import argparse
import os
import random
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from swarm.allocator import allocate, swarm_throughput, uncovered_layers  # noqa: E402
from swarm.costmodel import GPU_DATASHEET, node_from_datasheet  # noqa: E402
from swarm.router import LoadTable, RouteRequest, build_route_index, route  # noqa: E402
from swarm.types import ModelSpec, NodeLoad, NodeSpec, RttFn  # noqa: E402

LLAMA_2_70B = ModelSpec(
    name="meta-llama/Llama-2-70b-hf",
    num_layers=80,
    hidden_size=8192,
    layer_bytes=1.71e9,
    kv_bytes_per_token_per_layer=4096,
    head_bytes=1.05e9,
    flops_per_token_per_layer=1.71e9,
)

# One-way-symmetric RTTs between regions in ms (scenario-format.md); missing pairs are estimated.
REGION_RTT_MS = {
    ("virginia", "oregon"): 65, ("virginia", "london"): 75, ("virginia", "frankfurt"): 90,
    ("london", "frankfurt"): 15, ("frankfurt", "singapore"): 160, ("virginia", "singapore"): 220,
    ("oregon", "tokyo"): 100, ("virginia", "tokyo"): 150, ("singapore", "tokyo"): 70,
    ("virginia", "sao-paulo"): 115, ("frankfurt", "sao-paulo"): 200, ("singapore", "sydney"): 90,
    ("oregon", "sydney"): 140,
}
REGIONS = sorted({r for pair in REGION_RTT_MS for r in pair})
INTRA_REGION_MS = 5.0
UNKNOWN_PAIR_MS = 180.0


def region_rtt_s(a: str, b: str) -> float:
    if a == b:
        return INTRA_REGION_MS / 1000
    return REGION_RTT_MS.get((a, b), REGION_RTT_MS.get((b, a), UNKNOWN_PAIR_MS)) / 1000


def build_swarm(count: int, seed: int) -> tuple[list[NodeSpec], RttFn]:
    rng = random.Random(seed)
    gpus = sorted(GPU_DATASHEET)
    nodes: list[NodeSpec] = []
    for i in range(count):
        gpu = rng.choice(gpus)
        memory, bandwidth, flops = GPU_DATASHEET[gpu]
        nodes.append(node_from_datasheet(
            f"n{i:04d}-{gpu.replace(' ', '')}", rng.choice(REGIONS), LLAMA_2_70B,
            memory_bytes=memory * 0.9, mem_bandwidth_Bps=bandwidth, flops=flops,
            uplink_bps=rng.choice([40e6, 100e6, 300e6, 1e9]), relayed=rng.random() < 0.1,
        ))
    region = {n.node_id: n.region for n in nodes}

    def rtt(a: str, b: str) -> float:
        if a == b:
            return 0.0
        ra = region.get(a, a.removeprefix("client:"))
        rb = region.get(b, b.removeprefix("client:"))
        return region_rtt_s(ra, rb)

    return nodes, rtt


def busy_swarm_load(nodes: list[NodeSpec], seed: int) -> dict[str, NodeLoad]:
    """Announced loads of a busy swarm: most nodes batching a few sessions, some queueing, 5% full."""
    rng = random.Random(seed + 1)
    return {
        n.node_id: NodeLoad(
            queue_len=rng.choice([0, 0, 0, 1, 2]),
            active_sessions=rng.randrange(0, 40),
            free_kv_tokens=0 if rng.random() < 0.05 else rng.randrange(1_000, 100_000),
        )
        for n in nodes
    }


def median_s(fn, runs: int) -> tuple[float, float]:
    """Median wall time and median CPU time of this process (robust when other jobs share the cores)."""
    wall, cpu = [], []
    for _ in range(runs):
        t0, c0 = time.perf_counter(), time.process_time()
        fn()
        wall.append(time.perf_counter() - t0)
        cpu.append(time.process_time() - c0)
    return statistics.median(wall), statistics.median(cpu)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--nodes", type=int, default=1000)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--allocate-runs", type=int, default=5)
    parser.add_argument("--route-runs", type=int, default=200)
    args = parser.parse_args()

    nodes, rtt = build_swarm(args.nodes, args.seed)
    assignment = allocate(LLAMA_2_70B, nodes, rtt, seed=args.seed)
    node_map = {n.node_id: n for n in nodes}
    print(f"{len(nodes)} nodes, {len(assignment.ranges)} assigned, "
          f"uncovered layers: {len(uncovered_layers(LLAMA_2_70B, assignment))}, "
          f"min layer throughput: {swarm_throughput(LLAMA_2_70B, node_map, assignment):.1f} tok/s")

    alloc_s = median_s(lambda: allocate(LLAMA_2_70B, nodes, rtt, seed=args.seed), args.allocate_runs)
    clients = [f"client:{r}" for r in REGIONS]
    weighted = tuple((c, 1.0) for c in clients)
    heavy_s = median_s(lambda: allocate(LLAMA_2_70B, nodes, rtt, seed=args.seed, expected_sessions=2000,
                                        context_tokens=640, clients=weighted), args.allocate_runs)
    shared = build_route_index(LLAMA_2_70B, node_map, assignment, rtt)  # once per plan, as a router keeps it
    counter = iter(range(10**9))

    load = busy_swarm_load(nodes, args.seed)
    table = LoadTable(node_map)
    for node_id, node_load in load.items():
        table.set(node_id, queue_len=node_load.queue_len, active_sessions=node_load.active_sessions,
                  free_kv_tokens=node_load.free_kv_tokens)

    def one_route(alternates: int, with_load: bool = False, loads=None, prompt: int = 0) -> None:
        client = clients[next(counter) % len(clients)]
        request = RouteRequest(client, alternates=alternates, session_tokens=640, prompt_tokens=prompt,
                               output_tokens=128 if prompt else 0, ttft_weight=4.0)
        route(shared, request, (loads if loads is not None else load) if with_load else None)

    for client in clients:  # warm the per-client RTT vectors, as a long-running router would be
        route(shared, RouteRequest(client))
    index = build_route_index(LLAMA_2_70B, node_map, assignment, rtt)
    for client in clients:
        index.rtt_to(client)

    def cold_route() -> None:  # the DP itself: nothing remembered from earlier requests
        index.unloaded_best.clear()
        route(index, RouteRequest(clients[next(counter) % len(clients)], alternates=0, session_tokens=640))

    cold_s = median_s(cold_route, args.route_runs)
    route_s = median_s(lambda: one_route(3), args.route_runs)
    route0_s = median_s(lambda: one_route(0), args.route_runs)
    loaded_s = median_s(lambda: one_route(3, with_load=True), args.route_runs)
    loaded0_s = median_s(lambda: one_route(0, with_load=True), args.route_runs)
    table0_s = median_s(lambda: one_route(0, with_load=True, loads=table, prompt=512), args.route_runs)
    best = route(shared, RouteRequest("client:virginia"))[0]

    index_s = median_s(lambda: build_route_index(LLAMA_2_70B, node_map, assignment, rtt), 5)
    rows = [
        (f"allocate ({len(nodes):,} nodes)", alloc_s, 1.0),
        ("allocate, 2,000 sessions", heavy_s, 1.0),
        ("route index, once per plan", index_s, 1.0),
        ("route, one DP, nothing cached", cold_s, 0.005),
        ("route, best + 3 alternates", route_s, 0.005),
        ("route, best only", route0_s, 0.005),
        ("route + load, best + 3 alt.", loaded_s, 0.005),
        ("route + load, best only", loaded0_s, 0.005),
        ("route + LoadTable + prompt", table0_s, 0.005),
    ]
    print(f"load average: {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores")
    print(f"{'operation':<30}{'wall p50':>11}{'cpu p50':>11}{'target':>9}{'cpu/target':>11}")
    for name, (wall, cpu), target in rows:
        print(f"{name:<30}{wall * 1000:>9.2f}ms{cpu * 1000:>9.2f}ms{target * 1000:>7.0f}ms{cpu / target:>11.3f}")
    print(f"best route from virginia: {len(best.hops)} hops, {best.expected_token_s * 1000:.1f} ms/token")


if __name__ == "__main__":
    main()
