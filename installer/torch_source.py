"""Which torch build this machine wants, and where pip gets it, without overriding the user's pip settings.

- NVIDIA (`nvidia-smi` answers): a CUDA build no newer than the driver supports (cu130 ... cu118).
- AMD (ROCm installed): a ROCm build no newer than the installed ROCm.
- macOS: the default index's build (it has MPS). Windows without NVIDIA: the default index's (CPU) build.
- Linux without a GPU: the CPU build (PyPI's Linux build carries CUDA libraries: ~4x the download).

torch's own index is only ever added as an *extra* index (`--extra-index-url`, which pip appends to the user's
index-url and extra-index-urls from pip.conf or PIP_* variables), and only when it answers and lists a torch
wheel for this Python and machine; otherwise torch comes from the user's index like every other package.
`LAYERHIVE_TORCH_INDEX` replaces https://download.pytorch.org/whl (a mirror with the same layout).

Standard library only.
"""

from __future__ import annotations

import os
import platform
import re
import shutil
import subprocess
import sys
import urllib.error
import urllib.parse
import urllib.request
from dataclasses import dataclass
from pathlib import Path

DEFAULT_TORCH_INDEX = "https://download.pytorch.org/whl"
TORCH_INDEX_ENV = "LAYERHIVE_TORCH_INDEX"
CUDA_BUILDS = ((13, 0), (12, 9), (12, 8), (12, 6), (12, 4), (12, 1), (11, 8))  # newest first
ROCM_BUILDS = ((6, 4), (6, 3), (6, 2, 4), (6, 1), (6, 0))
PROBE_TIMEOUT_S = 10.0
_WHEEL = re.compile(r"torch-(\d+(?:\.\d+)*)\+(\w+)-(cp\d+)-(cp\d+)-([\w.]+?)\.whl")


@dataclass(frozen=True)
class Accelerator:
    kind: str  # "cuda", "rocm", "mps" or "cpu"
    version: tuple[int, ...] = ()  # the driver's CUDA version, or the installed ROCm version
    detail: str = ""  # for the user and the log, e.g. "NVIDIA GeForce RTX 3060, driver CUDA 12.4"

    def builds(self) -> list[str]:
        """torch's local version tags that fit, best first (e.g. ["cu126", "cu124", ...])."""
        if self.kind == "cuda":
            return [f"cu{b[0]}{b[1]}" for b in CUDA_BUILDS if b <= self.version]
        if self.kind == "rocm":
            return ["rocm" + ".".join(map(str, b)) for b in ROCM_BUILDS if b <= self.version]
        if self.kind == "cpu" and sys.platform.startswith("linux"):
            return ["cpu"]
        return []  # the default index's build is the right one


@dataclass(frozen=True)
class TorchChoice:
    requirement: str  # "torch" or "torch==2.9.1+cu128"
    extra_index: str | None  # an index pip adds to the user's ones
    note: str  # why, in words


def detect_accelerator() -> Accelerator:
    if sys.platform == "darwin":
        return Accelerator("mps", detail="macOS: Metal (MPS)")
    nvidia = nvidia_gpu()
    if nvidia is not None:
        return nvidia
    rocm = rocm_version()
    if rocm is not None:
        return Accelerator("rocm", rocm, f"AMD GPU, ROCm {'.'.join(map(str, rocm))}")
    return Accelerator("cpu", detail="no GPU found: CPU")


def nvidia_gpu() -> Accelerator | None:
    if not shutil.which("nvidia-smi"):
        return None
    try:
        names = subprocess.run(["nvidia-smi", "-L"], capture_output=True, text=True, timeout=20, check=True).stdout
        header = subprocess.run(["nvidia-smi"], capture_output=True, text=True, timeout=20, check=True).stdout
    except (subprocess.SubprocessError, OSError):
        return None  # installed but no working driver: the CPU build
    return parse_nvidia_smi(names, header)


def parse_nvidia_smi(names: str, header: str) -> Accelerator | None:
    """From `nvidia-smi -L` ("GPU 0: NVIDIA GeForce RTX 3060 (UUID: ...)") and `nvidia-smi`'s header
    ("... CUDA Version: 12.4 ...")."""
    gpus = re.findall(r"^GPU \d+: (.+?)(?: \(UUID:.*)?$", names, re.MULTILINE)
    version = re.search(r"CUDA Version:\s*(\d+)\.(\d+)", header)
    if not gpus or not version:
        return None
    cuda = (int(version.group(1)), int(version.group(2)))
    return Accelerator("cuda", cuda, f"{', '.join(gpus)}, driver CUDA {cuda[0]}.{cuda[1]}")


def rocm_version(root: Path = Path("/opt/rocm")) -> tuple[int, ...] | None:
    """ROCm's version from its install (`/opt/rocm/.info/version`, e.g. "6.2.4-120"), if there is a GPU tool."""
    if not (shutil.which("rocminfo") or shutil.which("rocm-smi") or (root / "bin" / "rocminfo").exists()):
        return None
    try:
        text = (root / ".info" / "version").read_text()
    except OSError:
        return None
    match = re.match(r"(\d+)\.(\d+)(?:\.(\d+))?", text.strip())
    if not match:
        return None
    return tuple(int(part) for part in match.groups() if part is not None)


def torch_index_base() -> str:
    return (os.environ.get(TORCH_INDEX_ENV) or DEFAULT_TORCH_INDEX).rstrip("/")


def choose_torch(accelerator: Accelerator, *, pip_no_index: bool = False, log=print) -> TorchChoice:
    """The first of the accelerator's builds whose index answers with a wheel for this Python and machine."""
    builds = accelerator.builds()
    if not builds:
        return TorchChoice("torch", None, f"{accelerator.detail}: torch from your package index")
    if pip_no_index:
        return TorchChoice("torch", None, "pip is set to use no index: torch from your find-links")
    base = torch_index_base()
    for build in builds:
        url = f"{base}/{build}"
        try:
            version = newest_torch(url, build)
        except OSError as e:
            log(f"torch index {url} did not answer ({e})")
            continue
        if version is not None:
            return TorchChoice(f"torch=={version}+{build}", url, f"{accelerator.detail}: torch {version}+{build}")
        log(f"torch index {url} has no torch {build} wheel for {python_tag()} on {machine_tag()}")
    return TorchChoice("torch", None, f"{accelerator.detail}: torch's index ({base}) is unreachable or has no "
                                      "build for this Python, so torch comes from your package index")


def newest_torch(index_url: str, build: str, timeout_s: float = PROBE_TIMEOUT_S) -> str | None:
    """The newest torch version the index lists for this Python and machine, or None. Raises OSError when the
    index does not answer."""
    request = urllib.request.Request(f"{index_url}/torch/", headers={"User-Agent": "layerhive-installer"})
    try:
        with urllib.request.urlopen(request, timeout=timeout_s) as response:
            page = response.read(16 << 20).decode(errors="replace")
    except urllib.error.HTTPError as e:
        if e.code == 404:
            return None
        raise
    except (urllib.error.URLError, TimeoutError, ValueError) as e:  # ValueError: a malformed URL
        raise OSError(str(getattr(e, "reason", e))) from e
    return newest_version(urllib.parse.unquote(page), build)


def newest_version(listing: str, build: str, python: str | None = None, machine: str | None = None) -> str | None:
    python, machine = python or python_tag(), machine or machine_tag()
    versions = [
        tuple(int(x) for x in m.group(1).split("."))
        for m in _WHEEL.finditer(listing)
        if m.group(2) == build and m.group(3) == python and m.group(4) == python and machine in m.group(5)
    ]
    return ".".join(map(str, max(versions))) if versions else None


def python_tag() -> str:
    return f"cp{sys.version_info.major}{sys.version_info.minor}"


def machine_tag() -> str:
    """The part of a wheel's platform tag that names this machine (linux_x86_64, manylinux_2_28_aarch64, win_amd64)."""
    machine = platform.machine().lower()
    machine = {"amd64": "x86_64", "arm64": "aarch64"}.get(machine, machine) if sys.platform != "win32" else machine
    return f"win_{machine}" if sys.platform == "win32" else machine


def pip_setting(python: str, name: str) -> str | None:
    """A pip setting as pip itself resolves it (pip.conf files, then PIP_* variables)."""
    try:
        listed = subprocess.run([python, "-m", "pip", "config", "list"], capture_output=True, text=True,
                                timeout=60).stdout
    except (subprocess.SubprocessError, OSError):
        return None
    from_env, from_files = None, None
    for line in listed.splitlines():  # e.g. "global.index-url='https://...'" or ":env:.no-index='1'"
        key, _, raw = line.partition("=")
        if key.rpartition(".")[2] == name:
            value = raw.strip().strip("'\"")
            if key.startswith(":env:"):
                from_env = value
            else:
                from_files = value
    return from_env if from_env is not None else from_files  # PIP_* variables override pip.conf, as in pip


def pip_flag(python: str, name: str) -> bool:
    return (pip_setting(python, name) or "").lower() in ("1", "true", "yes", "on")
