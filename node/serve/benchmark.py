"""`layerhive bench`: measure what this machine can offer a swarm for one model.

Compute is measured, not looked up (Parallax's table guesses every unknown GPU; exo shows "0 TFLOPS"):
we build a stage of the model's first one or two real layers with their real weights on the serving
device and time decode (one token, batch 1, against a KV cache of realistic length) and prefill (a
chunk of prompt tokens). Timing a 1-layer and a 2-layer span separates the cost of a layer from the
stage's fixed per-step cost (rotary embedding, gathering the batch), so neither is blamed on the other.

Memory is what the device has free now, minus headroom for everything else on the machine, capped by
the user; with the model's bytes per layer and a KV-cache policy it gives how many layers fit.
Network (RTT, uplink) is measured against swarm peers through libp2p (`node.net.probe`).

Compute results are cached per hardware, model, dtype and software versions in
`layerhive_home()/bench/`; memory and network are cheap and change, so they are measured every run.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import gc
import hashlib
import importlib.metadata
import json
import logging
import os
import platform
import random
import re
import statistics
import subprocess
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import psutil
import torch

from node.model.checkpoint import ModelSource, Progress, layer_bytes, layerhive_home, resolve_model
from node.model.quant import check_quant, supported_quants
from node.model.stage import Stage, default_device, default_dtype, kv_bytes_per_token
from swarm.costmodel import layer_capacity
from swarm.types import ModelSpec, NodeSpec

log = logging.getLogger(__name__)

BENCH_FORMAT = 2  # bump when what is measured changes, so old cache files are ignored


class BenchError(RuntimeError):
    """The benchmark cannot run as asked (bad device, bad cap); the message is for the user."""


class ModelDoesNotFitError(BenchError):
    """Not even one layer (with its KV budget) fits in the memory offered."""


@dataclass(frozen=True)
class BenchSettings:
    """How hard to measure. The defaults take ~10-30 s for a small model on a CPU."""

    context_tokens: int = 128  # KV cache length during the decode steps, as in a short chat
    decode_warmup: int = 3
    decode_steps: int = 32  # at most; fewer (but at least min_steps) if the phase runs over budget_s
    prefill_tokens: int = 256  # one prompt chunk
    prefill_repeats: int = 3  # at most, after one warm-up; likewise bounded by budget_s
    min_steps: int = 5
    budget_s: float = 15.0  # per phase (decode, prefill), so a big model on a CPU still ends
    # KV budget policy: room for this many concurrent sessions of this many tokens on every layer
    # served. 8 x 2048 = 16k tokens, the cache Petals reserves per block by default.
    kv_sessions: int = 8
    kv_context_tokens: int = 2048
    max_peers: int = 3  # peers to measure RTT to
    uplink_bytes: int = 4 << 20

    def __post_init__(self) -> None:
        for name in ("context_tokens", "decode_steps", "prefill_tokens", "prefill_repeats", "min_steps",
                     "kv_sessions", "kv_context_tokens", "max_peers", "uplink_bytes"):
            if getattr(self, name) < 1:
                raise ValueError(f"BenchSettings.{name} must be >= 1, got {getattr(self, name)}")


DEFAULT_SETTINGS = BenchSettings()  # what run_bench (and so the CLI) uses unless told otherwise


@dataclass(frozen=True)
class BenchResult:
    model: str
    device: str  # torch device the layers ran on: "cpu", "cuda:0", "mps"
    device_name: str  # the hardware the compute numbers belong to (part of the cache key)
    dtype: str  # "float32", "bfloat16", ...
    layer_latency_s: float  # decode: one token through one more layer (the part of a step that grows with layers)
    stage_overhead_s: float  # decode: fixed cost of one stage step whatever its size
    prefill_s_per_token_per_layer: float
    decode_context_tokens: int  # KV cache length the decode latency was measured at
    prefill_tokens: int  # chunk size the prefill time was measured on
    memory_available_bytes: int  # free on the device when measured
    memory_bytes: int  # offered for weights + KV: free minus headroom, capped by the user
    memory_cap_bytes: int | None
    layer_bytes: int  # one layer's weights at `dtype`
    kv_bytes_per_token_per_layer: int
    kv_sessions: int  # the KV budget policy max_layers assumes
    kv_context_tokens: int
    max_layers: int  # layers that fit in memory_bytes with that KV budget (at most the whole model)
    uplink_bps: float | None  # None: not measured (no peers)
    rtt_s: dict[str, float] = field(hash=False)  # peer id -> median RTT
    measured_at: str  # when the compute numbers were measured (UTC, ISO 8601)
    versions: dict[str, str] = field(hash=False)
    notes: tuple[str, ...] = ()
    from_cache: bool = False  # compute numbers came from an earlier run
    num_layers: int = 0  # the model's layers, for context
    quant: str = "none"  # how the layers were held (node.model.quant); layer_bytes and the timings are at it

    def stage_layer_latency_s(self, layers: int | None = None) -> float:
        """Per-layer decode latency of a stage of `layers` layers (default max_layers): the layer's
        own time plus its share of the stage's fixed cost, which is what the scheduler multiplies."""
        n = max(1, layers if layers is not None else self.max_layers)
        return self.layer_latency_s + self.stage_overhead_s / n

    def to_node_spec(self, node_id: str, region: str, *, layers: int | None = None) -> NodeSpec:
        extra = {} if self.uplink_bps is None else {"uplink_bps": self.uplink_bps}  # else the default guess
        return NodeSpec(
            node_id=node_id,
            region=region,
            memory_bytes=float(self.memory_bytes),
            layer_latency_s=self.stage_layer_latency_s(layers),
            prefill_s_per_token_per_layer=self.prefill_s_per_token_per_layer,
            **extra,
        )

    def record_fields(self) -> dict[str, Any]:
        """The measured fields of this node's `swarm.records.ServerRecord` (0 = unknown, as there)."""
        return {
            "layer_latency_s": self.stage_layer_latency_s(),
            "prefill_s_per_token_per_layer": self.prefill_s_per_token_per_layer,
            "uplink_bps": self.uplink_bps or 0.0,
            "memory_bytes": float(self.memory_bytes),
            "quant": self.quant,
        }

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


class _Progress:
    """Maps sub-tasks' 0..1 progress into spans of the whole, and never lets the fraction go back."""

    def __init__(self, report: Progress | None) -> None:
        self.report, self.last = report, 0.0

    def __call__(self, message: str, fraction: float) -> None:
        self.last = max(self.last, min(fraction, 1.0))
        if self.report is not None:
            self.report(message, self.last)

    def span(self, low: float, high: float) -> Progress:
        return lambda message, fraction: self(message, low + (high - low) * min(max(fraction, 0.0), 1.0))


# --- hardware and memory ----------------------------------------------------------------------------


def _cpu_name() -> str:
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    if platform.system() == "Darwin":
        with contextlib.suppress(OSError, subprocess.SubprocessError):
            out = subprocess.run(["sysctl", "-n", "machdep.cpu.brand_string"], capture_output=True, text=True,
                                 timeout=5)
            if out.stdout.strip():
                return out.stdout.strip()
    return platform.processor() or platform.machine() or "unknown CPU"


def device_name(device: torch.device) -> str:
    """The hardware that runs the layers; the compute cache is keyed by it."""
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    if device.type == "mps":
        return f"{_cpu_name()} (MPS)"
    return f"{_cpu_name()} ({torch.get_num_threads()} threads)"  # CPU speed scales with torch's threads


def resolve_device(name: str | None) -> torch.device:
    if name is None:
        device = default_device()
    else:
        try:
            device = torch.device(name)
        except RuntimeError as e:
            raise BenchError(f"unknown device {name!r} (use cpu, cuda, cuda:N or mps): {e}") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise BenchError(f"device {name!r}: no CUDA device is available to torch {torch.__version__}")
        index = torch.cuda.current_device() if device.index is None else device.index
        if index >= torch.cuda.device_count():
            raise BenchError(f"device {name!r}: there are only {torch.cuda.device_count()} CUDA devices")
        return torch.device("cuda", index)
    if device.type == "mps" and not torch.backends.mps.is_available():
        raise BenchError(f"device {name!r}: Apple MPS is not available here")
    if device.type not in ("cpu", "cuda", "mps"):
        raise BenchError(f"device {name!r}: only cpu, cuda and mps are supported")
    return device


def free_memory(device: torch.device) -> tuple[int, int]:
    """(free, total) bytes of the memory the layers would live in."""
    if device.type == "cuda":
        try:
            free, total = torch.cuda.mem_get_info(device)
            return int(free), int(total)
        except RuntimeError as cuda_error:  # no usable CUDA context; NVML may still see the card
            return _nvml_memory(device.index or 0, cuda_error)
    memory = psutil.virtual_memory()
    free = int(memory.available)
    if device.type == "mps":  # unified memory: Metal lets the GPU use only part of it
        with contextlib.suppress(AttributeError, RuntimeError):
            free = min(free, int(torch.mps.recommended_max_memory()) - int(torch.mps.driver_allocated_memory()))
    return free, int(memory.total)


def _nvml_memory(index: int, cuda_error: Exception) -> tuple[int, int]:
    """(free, total) from NVML. Its indices ignore CUDA_VISIBLE_DEVICES, so with that set they may name
    another card; this is only the fallback for when torch cannot answer."""
    try:
        import pynvml

        pynvml.nvmlInit()
        try:
            info = pynvml.nvmlDeviceGetMemoryInfo(pynvml.nvmlDeviceGetHandleByIndex(index))
            return int(info.free), int(info.total)
        finally:
            pynvml.nvmlShutdown()
    except Exception as e:
        raise BenchError(f"cannot read the memory of cuda:{index}: torch says {cuda_error}; NVML says {e}") from e


def usable_memory(device_type: str, free: int, total: int, max_memory_bytes: int | None = None) -> int:
    """Memory a node offers for weights + KV out of `free`, leaving headroom for the rest, at most the user's
    `max_memory_bytes`. The one memory policy: the bench and a node's quick estimate offer this, and the
    plan's KV share of it is what the node's server enforces (node.serve.assignment.planned_kv_budget).

    A GPU needs headroom for activations, the allocator's fragmentation and other CUDA contexts; a
    CPU or Apple machine is someone's computer, so we leave a quarter of its free RAM to its owner,
    and half a GiB more for this process itself (Python, torch, hivemind)."""
    if device_type == "cuda":
        usable = max(0, free - max(512 << 20, total // 20))
    else:
        usable = max(0, int(free * 0.75) - (512 << 20))
    return usable if max_memory_bytes is None else min(usable, int(max_memory_bytes))


# --- compute ----------------------------------------------------------------------------------------


def _synchronizer(device: torch.device) -> Callable[[], None]:
    """Accelerators run asynchronously: a timestamp means something only after a sync."""
    if device.type == "cuda":
        return lambda: torch.cuda.synchronize(device)
    if device.type == "mps":
        return torch.mps.synchronize
    return lambda: None


@dataclass(frozen=True)
class ComputeResult:
    layer_latency_s: float
    stage_overhead_s: float
    prefill_s_per_token_per_layer: float
    decode_context_tokens: int
    prefill_tokens: int
    measured_at: str
    other_cpu_share: float = 0.0  # of all CPU time, what other programs used during the decode phase
    measured_layers: int = 2  # 1 when memory (or the model) allowed only one: no overhead split then


class _OtherLoad:
    """How busy other programs kept the CPUs while we measured: the machine's busy CPU time minus this
    process's own, as a share of all its CPU time. A load average would lag by minutes."""

    def __init__(self) -> None:
        self._start = self._sample()

    @staticmethod
    def _sample() -> tuple[float, float, float]:
        machine, own = psutil.cpu_times(), psutil.Process().cpu_times()
        busy = sum(machine) - machine.idle - getattr(machine, "iowait", 0.0)
        return time.monotonic(), busy, own.user + own.system

    def share(self) -> float:
        with contextlib.suppress(Exception):  # best effort: a hint, never a reason to fail the bench
            (t0, busy0, own0), (t1, busy1, own1) = self._start, self._sample()
            capacity = (t1 - t0) * (psutil.cpu_count() or 1)
            return min(1.0, max(0.0, ((busy1 - busy0) - (own1 - own0)) / capacity)) if capacity > 0 else 0.0
        return 0.0


BUSY_SHARE = 0.25  # other programs used more than this share of the CPUs: timings get a warning note


def _timed(stage: Stage, sync: Callable[[], None], hidden: torch.Tensor, position: int, cache: Any) -> float:
    sync()
    started = time.perf_counter()
    stage.forward(hidden, position, cache)
    sync()
    return time.perf_counter() - started


def split_step_time(one_layer_s: float, two_layers_s: float) -> tuple[float, float]:
    """(per layer, fixed per step) from step times of 1- and 2-layer spans, as t(k) = fixed + k * per_layer.

    On a busy machine noise can make the difference meaningless (negative, or more than half of t(2));
    then the whole step is blamed on the layers, which errs on the slow side."""
    per_layer = two_layers_s - one_layer_s
    if not 0 < per_layer <= two_layers_s / 2:
        return two_layers_s / 2, 0.0
    return per_layer, one_layer_s - per_layer


def measure_compute(
    source: ModelSource, device: torch.device, dtype: torch.dtype, settings: BenchSettings, *,
    num_layers: int = 2, progress: Progress | None = None, quant: str = "none",
) -> ComputeResult:
    """Time decode and prefill on the model's first one or two real layers.

    Decode steps alternate between a cache spanning layer 0 and one spanning layers 0-1 (a stage runs
    the span its cache holds), so load spikes hit both alike; their difference is the cost of a layer,
    the rest is the stage's fixed cost per step. Prefill is compute-bound and its fixed cost is small,
    so it is timed on the whole stage and divided by its layers."""
    report = _Progress(progress)
    n = 2 if num_layers >= 2 and source.num_layers >= 2 else 1
    report(f"loading {n} layer{'s' if n > 1 else ''} of {source.name} to {device}", 0.0)
    stage = Stage(source, 0, n, dtype=dtype, device=device, with_ends=False, quant=quant)
    sync = _synchronizer(device)
    max_positions = int(getattr(source.config, "max_position_embeddings", 0) or 1 << 20)
    steps = settings.decode_warmup + settings.decode_steps
    context = max(1, min(settings.context_tokens, max_positions - steps))
    chunk = max(1, min(settings.prefill_tokens, max_positions))
    generator = torch.Generator().manual_seed(0)

    def hidden(tokens: int) -> torch.Tensor:  # stand-in hidden states: timing does not depend on values
        return torch.randn(1, tokens, source.hidden_size, generator=generator).to(device=device, dtype=dtype)

    try:
        report(f"decode: filling KV caches of {context} tokens", 0.1)
        spans = [(0, k) for k in range(1, n + 1)]
        caches = {span: stage.new_cache(context + steps, layers=span) for span in spans}
        for cache in caches.values():
            _timed(stage, sync, hidden(context), 0, cache)
        times: dict[tuple[int, int], list[float]] = {span: [] for span in spans}
        others = _OtherLoad()
        started = time.perf_counter()
        for step in range(steps):
            for span in spans:
                elapsed = _timed(stage, sync, hidden(1), context + step, caches[span])
                if step >= settings.decode_warmup:
                    times[span].append(elapsed)
            report(f"decode: step {step + 1} of {steps}", 0.1 + 0.5 * (step + 1) / steps)
            measured = step + 1 - settings.decode_warmup
            if measured >= settings.min_steps and time.perf_counter() - started > settings.budget_s:
                break
        del caches
        other_share = others.share()
        one = statistics.median(times[(0, 1)])
        per_layer, overhead = split_step_time(one, statistics.median(times[(0, 2)])) if n == 2 else (one, 0.0)

        per_token = []
        started = time.perf_counter()
        repeats = settings.prefill_repeats + 1
        for repeat in range(repeats):
            elapsed = _timed(stage, sync, hidden(chunk), 0, stage.new_cache(chunk))
            if repeat > 0:  # the first one warms up kernels for this shape
                per_token.append(elapsed / n / chunk)
            report(f"prefill: chunk {repeat + 1} of {repeats} ({chunk} tokens)", 0.6 + 0.4 * (repeat + 1) / repeats)
            if per_token and time.perf_counter() - started > settings.budget_s:
                break
    finally:
        del stage  # frees the layers before anything else is measured
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return ComputeResult(
        layer_latency_s=per_layer,
        stage_overhead_s=overhead,
        prefill_s_per_token_per_layer=statistics.median(per_token),
        decode_context_tokens=context,
        prefill_tokens=chunk,
        measured_at=datetime.now(timezone.utc).isoformat(timespec="seconds"),
        other_cpu_share=other_share,
        measured_layers=n,
    )


# --- the compute cache ------------------------------------------------------------------------------


def versions() -> dict[str, str]:
    found = {"bench_format": str(BENCH_FORMAT), "torch": torch.__version__}
    for package in ("layerhive", "transformers", "hivemind"):
        with contextlib.suppress(importlib.metadata.PackageNotFoundError):
            found[package] = importlib.metadata.version(package)
    return found


def cache_path(hardware: str, model: str, dtype: str, settings: BenchSettings, root: Path | None = None) -> Path:
    """One file per hardware, model and dtype; a hash covers what the readable name leaves out."""
    compute_settings = [settings.context_tokens, settings.decode_steps, settings.prefill_tokens]
    digest = hashlib.sha256(json.dumps([hardware, model, dtype, compute_settings]).encode()).hexdigest()[:12]
    readable = re.sub(r"[^A-Za-z0-9.]+", "-", f"{model}_{hardware}_{dtype}").strip("-")[:120]
    return (root or layerhive_home() / "bench") / f"{readable}-{digest}.json"


def _read_cache(path: Path, key: dict[str, str]) -> ComputeResult | None:
    try:
        data = json.loads(path.read_text())
        if data.get("key") != key:  # other hardware/model/dtype, or torch/transformers/bench changed
            return None
        return ComputeResult(**data["compute"])
    except FileNotFoundError:
        return None
    except (OSError, ValueError, TypeError, KeyError) as e:
        log.warning("ignoring unreadable bench cache %s: %s", path, e)
        return None


def _write_cache(path: Path, key: dict[str, str], compute: ComputeResult) -> None:
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(f".{os.getpid()}.tmp")
        tmp.write_text(json.dumps({"key": key, "compute": dataclasses.asdict(compute)}, indent=2))
        os.replace(tmp, path)  # atomic: a concurrent reader sees the old file or the new one
    except OSError as e:
        log.warning("could not cache the bench result in %s: %s", path, e)


# --- network ----------------------------------------------------------------------------------------


@dataclass(frozen=True)
class NetworkResult:
    rtt_s: dict[str, float] = field(default_factory=dict)
    uplink_bps: float | None = None
    notes: tuple[str, ...] = ()


def peer_id_of(maddr: str) -> str | None:
    from hivemind.utils.multiaddr import Multiaddr

    with contextlib.suppress(Exception):
        return Multiaddr(maddr).value_for_protocol("p2p")
    return None


async def measure_network(
    initial_peers: Sequence[str], model: str, settings: BenchSettings | None = None, *,
    progress: Progress | None = None,
) -> NetworkResult:
    """RTT to a few of `model`'s servers (found on the DHT) or the bootstrap peers, and uplink to the
    nearest ones that run the probe sink."""
    from node.net.membership import open_dht

    report = _Progress(progress)
    report("joining the swarm's DHT", 0.0)
    try:  # a client-mode peer only dials out, so listening on loopback is enough
        client = await asyncio.get_running_loop().run_in_executor(
            None, lambda: open_dht(initial_peers, ["/ip4/127.0.0.1/tcp/0"], client_mode=True)
        )
    except Exception as e:  # bad or unreachable peers: the compute and memory results still stand
        return NetworkResult(notes=(f"network not measured: cannot join the swarm: {type(e).__name__}: {e}",))
    notes: list[str] = []
    try:
        p2p = await client.dht.replicate_p2p()
        servers: list[str] = []
        try:
            servers = [r.peer_id for r in await client.list_servers(model) if r.state == "online"]
        except Exception as e:  # a DHT hiccup should not cost us the bootstrap peers
            notes.append(f"could not list {model}'s servers: {e}")
        random.shuffle(servers)  # spread the probing load over the swarm
        bootstrap = [p for p in (peer_id_of(m) for m in initial_peers) if p]
        result = await measure_links(p2p, servers + bootstrap, settings, progress=report.span(0.1, 1.0))
        return dataclasses.replace(result, notes=(*notes, *result.notes))
    finally:
        client.shutdown()


async def measure_links(p2p, peers: Sequence[str], settings: BenchSettings | None = None, *,
                        uplink_bytes: int | None = None, progress: Progress | None = None) -> NetworkResult:
    """RTT to the first `settings.max_peers` of `peers` (in order of preference), and
    uplink to the nearest two that run the probe sink (the max of the two: a peer's downlink may be the limit).
    Bounded: at most max_peers x 6 pings and 2 x `uplink_bytes` (default `settings.uplink_bytes`) sent."""
    from node.net.probe import ProbeError, measure_rtt, measure_uplink
    from node.net.protocol import INFO_HANDLER

    settings = settings or DEFAULT_SETTINGS
    report = _Progress(progress)
    candidates = list(dict.fromkeys(peers))[: settings.max_peers]
    if not candidates:
        return NetworkResult(notes=("no peers to measure: no servers listed and no /p2p/ id in the peers",))
    notes: list[str] = []
    rtt: dict[str, float] = {}
    with_sink: list[str] = []
    for i, peer in enumerate(candidates):
        report(f"RTT to {peer[:12]}...", 0.6 * i / len(candidates))
        try:
            rtt[peer] = await measure_rtt(p2p, peer)
            with_sink.append(peer)
        except ProbeError as ping_error:  # a node without probe handlers still answers `info`
            try:
                rtt[peer] = await measure_rtt(p2p, peer, handler=INFO_HANDLER)
            except ProbeError:
                notes.append(f"no RTT to {peer}: {ping_error}")
    uplinks = []
    for peer in sorted(with_sink, key=rtt.__getitem__)[:2]:
        report(f"uplink to {peer[:12]}...", 0.6 + 0.2 * len(uplinks))
        try:
            uplinks.append(await measure_uplink(p2p, peer, uplink_bytes or settings.uplink_bytes, rtt_s=rtt[peer]))
        except ProbeError as e:
            notes.append(f"no uplink to {peer}: {e}")
    if not uplinks:
        notes.append("uplink not measured: no reachable peer runs the layerhive.sink probe")
    report("network measured", 1.0)
    return NetworkResult(rtt, max(uplinks) if uplinks else None, tuple(notes))


# --- the whole bench --------------------------------------------------------------------------------


def choose_quant(source: ModelSource, device: torch.device, dtype: torch.dtype, memory_bytes: float, *,
                 layers: int | None = None, settings: BenchSettings | None = None) -> str:
    """A node's quantization when the user sets none: the least lossy one at which `layers` (default the
    whole model: a node holding all of it needs no other) fit in `memory_bytes` with the bench's KV policy;
    else the smallest, which holds the most layers. Only quantizations with a kernel on `device`."""
    settings = settings or DEFAULT_SETTINGS
    wanted = layers or source.num_layers
    node = NodeSpec("self", "", memory_bytes=memory_bytes, layer_latency_s=1.0, prefill_s_per_token_per_layer=1.0)
    kv_per_token = kv_bytes_per_token(source.config, dtype)
    choices = supported_quants(device)
    for quant in choices:
        spec = ModelSpec(source.name, source.num_layers, source.hidden_size, layer_bytes(source, dtype, quant),
                         kv_per_token)
        if layer_capacity(spec, node, sessions=settings.kv_sessions,
                          context_tokens=settings.kv_context_tokens) >= wanted:
            return quant
    return choices[-1]


def _gb(nbytes: float) -> str:
    return f"{nbytes / 1e9:.2f} GB" if nbytes >= 1e8 else f"{nbytes / 1e6:.1f} MB"


def run_bench(
    model: str | ModelSource,
    *,
    device: str | None = None,
    dtype: torch.dtype | None = None,
    initial_peers: Sequence[str] = (),
    max_memory_bytes: int | None = None,
    force: bool = False,
    settings: BenchSettings | None = None,
    progress: Progress | None = None,
    quant: str | None = None,
) -> BenchResult:
    """Benchmark this machine for `model`, its layers held at `quant` (None: `choose_quant`'s choice for the
    memory offered). Compute comes from the cache unless `force`; memory and network are measured every time.
    Raises BenchError (ModelDoesNotFitError if no layer fits), and checkpoint's ModelNotFoundError /
    UnsupportedModelError / CheckpointError.

    Blocking (seconds to minutes): call it from a worker thread, not from a running event loop."""
    settings = settings or DEFAULT_SETTINGS
    report = _Progress(progress)
    if max_memory_bytes is not None and max_memory_bytes <= 0:
        raise BenchError(f"the memory cap must be positive, got {max_memory_bytes} bytes")
    report("resolving the model", 0.0)
    source = model if isinstance(model, ModelSource) else resolve_model(model, progress=report.span(0.0, 0.05))
    torch_device = resolve_device(device)
    torch_dtype = dtype or default_dtype(torch_device)
    dtype_name = str(torch_dtype).removeprefix("torch.")
    hardware = device_name(torch_device)

    report("measuring memory", 0.05)
    kv_per_token = kv_bytes_per_token(source.config, torch_dtype)
    free, total = free_memory(torch_device)
    offered = usable_memory(torch_device.type, free, total, max_memory_bytes)
    quant = check_quant(quant) if quant is not None else choose_quant(source, torch_device, torch_dtype, offered,
                                                                      settings=settings)
    per_layer = layer_bytes(source, torch_dtype, quant)
    spec = ModelSpec(source.name, source.num_layers, source.hidden_size, per_layer, kv_per_token)
    node = NodeSpec("self", "", memory_bytes=offered, layer_latency_s=1.0, prefill_s_per_token_per_layer=1.0)
    max_layers = layer_capacity(spec, node, sessions=settings.kv_sessions, context_tokens=settings.kv_context_tokens)
    if max_layers < 1:
        kv = kv_per_token * settings.kv_sessions * settings.kv_context_tokens
        limit = (f"the cap of {_gb(max_memory_bytes)}" if max_memory_bytes is not None and
                 max_memory_bytes < usable_memory(torch_device.type, free, total) else
                 f"{_gb(offered)} usable of {_gb(free)} free on {torch_device}")
        raise ModelDoesNotFitError(
            f"{source.name} does not fit: one layer needs {_gb(per_layer)} of {dtype_name} weights "
            f"({quant} quantization) plus "
            f"{_gb(kv)} of KV cache ({settings.kv_sessions} sessions x {settings.kv_context_tokens} tokens), "
            f"but only {limit} is available"
        )

    held = dtype_name if quant == "none" else f"{dtype_name}-{quant}"  # the dtype and quantization timed
    key = {"hardware": hardware, "model": source.name, "dtype": held, **versions()}
    path = cache_path(hardware, source.name, held, settings)
    bench_layers = min(2, max_layers, source.num_layers)
    compute = None if force else _read_cache(path, key)
    if compute is not None and compute.measured_layers < bench_layers:  # measured under a tighter cap
        compute = None
    from_cache = compute is not None
    if compute is None:
        compute = measure_compute(source, torch_device, torch_dtype, settings, num_layers=bench_layers,
                                  progress=report.span(0.07, 0.8), quant=quant)
        _write_cache(path, key, compute)
    notes = [f"compute from cache {path} (--force re-measures)"] if from_cache else []
    if compute.other_cpu_share > BUSY_SHARE:
        notes.append(f"other programs used {compute.other_cpu_share:.0%} of the CPUs while measuring: compute "
                     "times are pessimistic; re-run with --force when the machine is quieter")

    if initial_peers:
        network = asyncio.run(measure_network(initial_peers, source.name, settings,
                                              progress=report.span(0.8, 0.99)))
    else:
        network = NetworkResult(notes=("network not measured: no --initial-peers given",))
    notes += network.notes
    report("done", 1.0)
    return BenchResult(
        model=source.name, device=str(torch_device), device_name=hardware, dtype=dtype_name,
        layer_latency_s=compute.layer_latency_s, stage_overhead_s=compute.stage_overhead_s,
        prefill_s_per_token_per_layer=compute.prefill_s_per_token_per_layer,
        decode_context_tokens=compute.decode_context_tokens, prefill_tokens=compute.prefill_tokens,
        memory_available_bytes=free, memory_bytes=offered, memory_cap_bytes=max_memory_bytes,
        layer_bytes=per_layer, kv_bytes_per_token_per_layer=kv_per_token,
        kv_sessions=settings.kv_sessions, kv_context_tokens=settings.kv_context_tokens, max_layers=max_layers,
        uplink_bps=network.uplink_bps, rtt_s=network.rtt_s,
        measured_at=compute.measured_at, versions=versions(), notes=tuple(notes), from_cache=from_cache,
        num_layers=source.num_layers, quant=quant,
    )


def format_result(result: BenchResult) -> str:
    """The human-readable summary `layerhive bench` prints."""
    ms = lambda s: f"{s * 1e3:.3f} ms"
    lines = [
        f"{result.model} on {result.device} ({result.device_name}), {result.dtype}"
        + (f", weights {result.quant}" if result.quant != "none" else ""),
        f"  decode:  {ms(result.layer_latency_s)} per layer per token (KV context {result.decode_context_tokens})"
        f" + {ms(result.stage_overhead_s)} per stage step",
        f"  prefill: {ms(result.prefill_s_per_token_per_layer)} per token per layer "
        f"(chunk of {result.prefill_tokens} tokens)",
        f"  memory:  {_gb(result.memory_bytes)} offered ({_gb(result.memory_available_bytes)} free"
        + (f", capped at {_gb(result.memory_cap_bytes)}" if result.memory_cap_bytes is not None else "") + ")",
        f"           {_gb(result.layer_bytes)} per layer + {result.kv_bytes_per_token_per_layer} B of KV per token"
        f" per layer -> {result.max_layers} layers fit"
        + (" (the whole model)" if result.max_layers == result.num_layers else f" (of {result.num_layers})")
        + f" with KV for {result.kv_sessions} sessions x {result.kv_context_tokens} tokens",
    ]
    if result.rtt_s or result.uplink_bps is not None:
        rtts = ", ".join(f"{peer[:12]}... {ms(rtt)}" for peer, rtt in result.rtt_s.items()) or "none"
        uplink = "not measured" if result.uplink_bps is None else f"{result.uplink_bps / 1e6:.1f} Mbit/s"
        lines.append(f"  network: uplink {uplink}; RTT {rtts}")
    lines.append(f"  measured {result.measured_at}" + (" (cached)" if result.from_cache else ""))
    lines += [f"  note: {note}" for note in result.notes]
    return "\n".join(lines)

