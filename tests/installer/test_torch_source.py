"""Choosing torch's build and index: the accelerator read from the tools' real output formats, torch's index probed
over real HTTP (a local server with the index's layout, a port nobody listens on), and real pip runs showing that
the person's own index stays first, torch's is only added, and a torch index that fails midway falls back."""

from __future__ import annotations

import subprocess
import sys

import pytest

from installer.commands import InstallError, pip_install
from installer.install import install_torch
from installer.progress import Log, Progress
from installer.torch_source import (
    Accelerator,
    TorchChoice,
    choose_torch,
    machine_tag,
    newest_torch,
    parse_nvidia_smi,
    python_tag,
    rocm_version,
)
from tests.installer.conftest import closed_port, http_server

NVIDIA_L = "GPU 0: NVIDIA GeForce RTX 3060 (UUID: GPU-2f6b4c1e-93d8-1a2b-7c3d-5e6f7a8b9c0d)\n"
NVIDIA_HEADER = """\
+-----------------------------------------------------------------------------------------+
| NVIDIA-SMI 550.54.14              Driver Version: 550.54.14      CUDA Version: 12.4     |
|-----------------------------------------+------------------------+----------------------+
"""


def test_an_nvidia_gpu_gets_the_newest_cuda_build_its_driver_runs():
    gpu = parse_nvidia_smi(NVIDIA_L, NVIDIA_HEADER)
    assert gpu == Accelerator("cuda", (12, 4), "NVIDIA GeForce RTX 3060, driver CUDA 12.4")
    assert gpu.builds() == ["cu124", "cu121", "cu118"]
    assert parse_nvidia_smi("", NVIDIA_HEADER) is None and parse_nvidia_smi(NVIDIA_L, "no version") is None
    assert Accelerator("cuda", (13, 1)).builds()[0] == "cu130"
    assert Accelerator("cuda", (11, 4)).builds() == [], "too old a driver: the default index's build"


def test_rocm_is_read_from_its_install(tmp_path):
    (tmp_path / "bin").mkdir()
    (tmp_path / "bin" / "rocminfo").write_text("")
    assert rocm_version(tmp_path) is None, "no version file: not a ROCm install to trust"
    (tmp_path / ".info").mkdir()
    (tmp_path / ".info" / "version").write_text("6.2.4-120\n")
    assert rocm_version(tmp_path) == (6, 2, 4)
    assert Accelerator("rocm", (6, 2, 4)).builds() == ["rocm6.2.4", "rocm6.1", "rocm6.0"]
    assert Accelerator("mps").builds() == []


def wheel(version: str, build: str, python: str | None = None, platform: str | None = None) -> str:
    python = python or python_tag()
    platform = platform or f"manylinux_2_28_{machine_tag()}"
    return f'<a href="torch-{version}%2B{build}-{python}-{python}-{platform}.whl#sha256=00">x</a>'


@pytest.fixture
def torch_index(tmp_path):
    """A local index with download.pytorch.org/whl's layout: <build>/torch/ lists wheels."""
    listings = {
        "cpu": [wheel("2.8.0", "cpu"), wheel("2.9.1", "cpu"), wheel("2.10.0", "cpu", python="cp39")],
        "cu124": [wheel("2.6.0", "cu124"), wheel("2.9.0", "cu124", platform="win_amd64")],
    }
    for build, links in listings.items():
        (tmp_path / "whl" / build / "torch").mkdir(parents=True)
        (tmp_path / "whl" / build / "torch" / "index.html").write_text("<html><body>" + "\n".join(links))
    (tmp_path / "whl" / "simple").mkdir()  # the person's own index: empty
    with http_server(tmp_path / "whl") as url:
        yield url


def test_the_newest_wheel_for_this_python_and_machine_is_chosen(torch_index, monkeypatch):
    assert newest_torch(f"{torch_index}/cpu", "cpu") == "2.9.1", "not 2.10.0, which is for another Python"
    assert newest_torch(f"{torch_index}/cu121", "cu121") is None, "404: no such build"
    monkeypatch.setenv("LAYERHIVE_TORCH_INDEX", f"{torch_index}/")
    logged = []
    choice = choose_torch(Accelerator("cuda", (12, 6), "a GPU"), log=logged.append)
    assert choice == TorchChoice("torch==2.6.0+cu124", f"{torch_index}/cu124", "a GPU: torch 2.6.0+cu124")
    assert any("cu126" in line for line in logged), "the newer build's index was tried first"


def test_an_unreachable_torch_index_leaves_torch_to_the_persons_index(monkeypatch):
    monkeypatch.setenv("LAYERHIVE_TORCH_INDEX", f"http://127.0.0.1:{closed_port()}/whl")
    logged = []
    choice = choose_torch(Accelerator("cpu", detail="no GPU"), log=logged.append)
    assert choice.requirement == "torch" and choice.extra_index is None and "unreachable" in choice.note
    assert "did not answer" in logged[0]
    assert choose_torch(Accelerator("cuda", (12, 4)), pip_no_index=True).extra_index is None, \
        "pip set to no index: torch's index is not added either"


@pytest.fixture(scope="module")
def bare_python(tmp_path_factory) -> str:
    """A Python without torch, so pip really looks for it."""
    venv = tmp_path_factory.mktemp("bare") / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=300)
    return str(venv / "bin" / "python")


def test_pip_keeps_the_persons_index_first_and_falls_back_when_torchs_fails(torch_index, bare_python, tmp_path,
                                                                          monkeypatch):
    for variable in ("PIP_FIND_LINKS", "PIP_EXTRA_INDEX_URL", "PIP_NO_INDEX"):
        monkeypatch.delenv(variable, raising=False)
    monkeypatch.setenv("PIP_CONFIG_FILE", "/dev/null")
    monkeypatch.setenv("PIP_INDEX_URL", f"{torch_index}/simple")  # the person's mirror
    progress = Progress(Log(tmp_path / "install.log"), "test", stream=open("/dev/null", "w"))  # noqa: SIM115
    choice = TorchChoice("torch==2.9.1+cpu", f"{torch_index}/cpu", "cpu")  # listed, but no file to download
    with pytest.raises(InstallError, match="Installing torch failed"):
        install_torch(pip_install(bare_python), choice, progress)
    log = (tmp_path / "install.log").read_text()
    looked = [line.split("Looking in indexes: ")[1] for line in log.splitlines() if "Looking in indexes:" in line]
    assert looked == [f"{torch_index}/simple, {torch_index}/cpu", f"{torch_index}/simple"], \
        "first the person's index plus torch's, then the person's alone"
    assert "--index-url" not in log and "trying your package index instead" in log
    progress.stream.close()
