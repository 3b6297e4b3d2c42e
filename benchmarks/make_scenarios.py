"""Write the benchmark scenarios in benchmarks/scenarios/ (deterministic; rerun after editing).

Hardware and RTT figures come from shared/reference/scenario-format.md; region pairs it does not list
are filled with comparable public estimates. Home nodes sit in "<region>-home" regions that add a
20 ms last mile to each end.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

OUT = Path(__file__).resolve().parent / "scenarios"

LLAMA2_70B = {
    "name": "meta-llama/Llama-2-70b-hf",
    "num_layers": 80,
    "hidden_size": 8192,
    "layer_bytes": 1.71e9,
    "kv_bytes_per_token_per_layer": 4096,
    "head_bytes": 1.05e9,
    "flops_per_token_per_layer": 1.71e9,
}

# memory GB, memory bandwidth GB/s, dense FP16 TFLOPS
GPUS = {
    "h100": (80, 3350, 989),
    "a100": (80, 2039, 312),
    "a100-40": (40, 1555, 312),
    "l40s": (48, 864, 362),
    "a10": (24, 600, 125),
    "l4": (24, 300, 121),
    "v100": (32, 900, 125),
    "t4": (16, 320, 65),
    "4090": (24, 1008, 165),
    "3090": (24, 936, 71),
}

RTT_MS = {
    ("virginia", "oregon"): 65, ("virginia", "london"): 75, ("virginia", "frankfurt"): 90,
    ("london", "frankfurt"): 15, ("frankfurt", "singapore"): 160, ("virginia", "singapore"): 220,
    ("oregon", "tokyo"): 100, ("virginia", "tokyo"): 150, ("singapore", "tokyo"): 70,
    ("virginia", "sao-paulo"): 115, ("frankfurt", "sao-paulo"): 200, ("singapore", "sydney"): 90,
    ("oregon", "sydney"): 140,
    # estimates for pairs the reference does not list
    ("oregon", "london"): 130, ("oregon", "frankfurt"): 145, ("oregon", "singapore"): 165,
    ("oregon", "sao-paulo"): 175, ("london", "singapore"): 170, ("london", "tokyo"): 220,
    ("london", "sydney"): 260, ("london", "sao-paulo"): 190, ("frankfurt", "tokyo"): 230,
    ("frankfurt", "sydney"): 250, ("virginia", "sydney"): 200, ("singapore", "sao-paulo"): 330,
    ("tokyo", "sydney"): 105, ("tokyo", "sao-paulo"): 260, ("sydney", "sao-paulo"): 310,
}
LAST_MILE_MS = 20


def rtt_matrix(regions: list[str], home: bool) -> dict:
    """Upper triangle of the RTT matrix, with optional "-home" twins of each region."""
    names = regions + ([f"{r}-home" for r in regions] if home else [])
    base = {r: r.removesuffix("-home") for r in names}
    out: dict = {}
    for i, a in enumerate(names):
        row = out.setdefault(a, {})
        for b in names[i:]:
            ra, rb = base[a], base[b]
            ms = 4 if ra == rb else RTT_MS.get((ra, rb), RTT_MS.get((rb, ra)))
            ms += LAST_MILE_MS * (a.endswith("-home") + b.endswith("-home"))
            row[b] = ms
    return out


def node(rng: random.Random, nid: str, region: str, gpu: str, *, uplink: float, measured: bool) -> dict:
    mem, bw, tf = GPUS[gpu]
    n = {"id": nid, "region": region, "memory_gb": mem, "uplink_mbps": uplink}
    if measured:
        # A benchmarked node: the roofline decode time with realistic efficiency and some spread.
        n["layer_latency_ms"] = round(LLAMA2_70B["layer_bytes"] / (bw * 1e9 * 0.75) * 1e3 * rng.uniform(0.9, 1.3), 3)
    else:
        n.update(mem_bandwidth_gbps=bw, tflops=tf)
    return n


def swarm(name: str, seed: int, n_nodes: int, regions: list[str], mix: dict[str, float], *, home_share: float,
          churn: float, rate: float, output: int, duration: float, clients: dict[str, float]) -> dict:
    rng = random.Random(seed)
    gpus, weights = zip(*mix.items(), strict=True)
    nodes = []
    for i in range(n_nodes):
        gpu = rng.choices(gpus, weights)[0]
        home = rng.random() < home_share
        region = rng.choice(regions) + ("-home" if home else "")
        uplink = rng.choice([20, 40, 100]) if home else rng.choice([1000, 10000])
        n = node(rng, f"{gpu}-{region}-{i}", region, gpu, uplink=uplink, measured=rng.random() < 0.4)
        if rng.random() < churn:
            if rng.random() < 0.4:
                n["join_s"] = round(rng.uniform(30, duration * 0.8), 1)
            else:
                n["leave_s"] = round(rng.uniform(30, duration * 0.9), 1)
        nodes.append(n)
    return {
        "name": name, "seed": seed, "model": LLAMA2_70B,
        "regions_rtt_ms": rtt_matrix(regions, home_share > 0),
        "nodes": nodes,
        "clients": [{"region": r, "weight": w} for r, w in clients.items()],
        "workload": {"arrival_rate_per_s": rate, "prompt_tokens": 512, "output_tokens": output,
                     "duration_s": duration},
    }


def lab6() -> dict:
    rng = random.Random(6)
    nodes = [
        node(rng, "a100-fra-1", "frankfurt", "a100", uplink=10000, measured=False),
        node(rng, "a100-fra-2", "frankfurt", "a100", uplink=10000, measured=True),
        node(rng, "l40s-fra-1", "frankfurt", "l40s", uplink=1000, measured=False),
        node(rng, "4090-lon-1", "london", "4090", uplink=1000, measured=True),
        node(rng, "4090-lon-2", "london", "4090", uplink=1000, measured=False),
        node(rng, "3090-lon-1", "london", "3090", uplink=1000, measured=False),
    ]
    return {
        "name": "lab-6", "seed": 6, "model": LLAMA2_70B,
        "regions_rtt_ms": rtt_matrix(["frankfurt", "london"], False),
        "nodes": nodes,
        "clients": [{"region": "frankfurt", "weight": 1}, {"region": "london", "weight": 1}],
        "workload": {"arrival_rate_per_s": 2.0, "prompt_tokens": 512, "output_tokens": 128, "duration_s": 300},
    }


def main() -> None:
    OUT.mkdir(parents=True, exist_ok=True)
    scenarios = [
        lab6(),
        swarm("two-continents-12", 12, 12, ["frankfurt", "london", "virginia", "oregon"],
              {"a100": 3, "l40s": 2, "4090": 3, "a10": 1}, home_share=0.0, churn=0.0, rate=3.0, output=128,
              duration=600, clients={"virginia": 2, "frankfurt": 1, "london": 1}),
        swarm("home-mix-60", 60, 60, ["virginia", "frankfurt", "london"],
              {"4090": 4, "3090": 4, "a10": 1, "t4": 1, "l4": 1}, home_share=0.8, churn=0.3, rate=4.0,
              output=256, duration=600, clients={"virginia": 1, "frankfurt": 1, "london": 1}),
        swarm("global-300", 300, 300, ["virginia", "oregon", "london", "frankfurt", "singapore", "tokyo"],
              {"h100": 1, "a100": 3, "l40s": 2, "a10": 2, "l4": 2, "v100": 1, "t4": 2, "4090": 4, "3090": 3},
              home_share=0.5, churn=0.2, rate=10.0, output=128, duration=600,
              clients={"virginia": 3, "london": 2, "frankfurt": 2, "tokyo": 1, "singapore": 1}),
        # The global-300 swarm without churn under a load near its capacity: throughput = capacity.
        swarm("global-300-peak", 300, 300, ["virginia", "oregon", "london", "frankfurt", "singapore", "tokyo"],
              {"h100": 1, "a100": 3, "l40s": 2, "a10": 2, "l4": 2, "v100": 1, "t4": 2, "4090": 4, "3090": 3},
              home_share=0.5, churn=0.0, rate=80.0, output=128, duration=90,
              clients={"virginia": 3, "london": 2, "frankfurt": 2, "tokyo": 1, "singapore": 1}),
        swarm("global-1000", 1000, 1000,
              ["virginia", "oregon", "london", "frankfurt", "singapore", "tokyo", "sydney", "sao-paulo"],
              {"h100": 1, "a100": 3, "l40s": 2, "a10": 2, "l4": 2, "v100": 1, "t4": 2, "4090": 4, "3090": 3},
              home_share=0.5, churn=0.2, rate=20.0, output=128, duration=600,
              clients={"virginia": 3, "oregon": 1, "london": 2, "frankfurt": 2, "tokyo": 1, "singapore": 1,
                       "sydney": 1, "sao-paulo": 1}),
    ]
    for sc in scenarios:
        (OUT / f"{sc['name']}.json").write_text(json.dumps(sc, indent=1) + "\n")
        print(f"wrote {sc['name']}: {len(sc['nodes'])} nodes")


if __name__ == "__main__":
    main()
