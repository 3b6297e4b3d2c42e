"""This machine's real totals, for the choices the app offers: how much memory there is to lend, which
devices can run layers, how many CPU threads. Nothing is offered that the machine does not have."""

from __future__ import annotations

import os
from dataclasses import dataclass

import psutil
import torch

from node.serve.benchmark import free_memory, resolve_device, usable_memory

GB = 1e9
SYSTEM_RESERVE_BYTES = int(1.5 * GB)  # the most one may offer leaves this much to the system and the app
_CAP_STEPS_GB = (1, 2, 4, 8, 12, 16, 24, 32, 48, 64, 96, 128, 192, 256)


@dataclass(frozen=True)
class Memory:
    device: str  # "cpu", "cuda:0", "mps": where the layers would live
    total_bytes: int
    free_bytes: int
    usable_bytes: int  # what a node takes when uncapped: free minus headroom (node.serve.benchmark)

    @property
    def max_offer_bytes(self) -> int:
        """The largest cap worth offering: the total, less what the system needs; never above the total."""
        return max(int(GB), self.total_bytes - SYSTEM_RESERVE_BYTES)


def memory(device: str | None = None) -> Memory:
    torch_device = resolve_device(device)
    free, total = free_memory(torch_device)
    return Memory(str(torch_device), total, free, usable_memory(torch_device.type, free, total))


def memory_caps_gb(total_bytes: int) -> list[float]:
    """Round caps for a menu, all below what the machine can offer (a 23 GB machine gets up to 16 GB)."""
    ceiling = Memory("", total_bytes, 0, 0).max_offer_bytes
    return [gb for gb in _CAP_STEPS_GB if gb * GB <= ceiling]


def devices() -> list[tuple[str, str]]:
    """(device, label) for each place layers can run here, the CPU last."""
    found = []
    if torch.cuda.is_available():
        for index in range(torch.cuda.device_count()):
            found.append((f"cuda:{index}", f"GPU {index}: {torch.cuda.get_device_name(index)}"))
    if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
        found.append(("mps", "Apple GPU (Metal)"))
    found.append(("cpu", "CPU only"))
    return found


def cpu_threads() -> int:
    """Logical CPUs this process may use."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # macOS, Windows
        return psutil.cpu_count() or 1


def format_gb(nbytes: float) -> str:
    return f"{nbytes / GB:.1f} GB"
