"""Hub downloads fetch only the shards that hold a node's layers: the real `huggingface_hub` client against a
local HTTP server that speaks the Hub's API (through HF_ENDPOINT), serving a tiny sharded checkpoint."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

pytestmark = pytest.mark.timeout(300)
REPO, COMMIT = "tiny-org/tiny-llama", "0123456789abcdef0123456789abcdef01234567"


class FakeHub(BaseHTTPRequestHandler):
    """Model info (`/api/models/{repo}/revision/{rev}`), its file list (`/api/models/{repo}/tree/{rev}`), files
    (`/{repo}/resolve/{rev}/{file}`, HEAD and GET, with byte ranges); records each file GET: (file, "full"|"range")."""

    root: Path
    requests: list[tuple[str, str]]

    def log_message(self, *_) -> None:  # quiet
        pass

    def do_HEAD(self) -> None:
        self._file(send_body=False)

    def do_GET(self) -> None:
        if self.path.startswith(f"/api/models/{REPO}/revision/"):
            siblings = [{"rfilename": f.name} for f in sorted(self.root.iterdir())]
            self._send(200, json.dumps({"id": REPO, "modelId": REPO, "sha": COMMIT, "siblings": siblings}).encode(),
                       {"Content-Type": "application/json"})
        elif self.path.startswith(f"/api/models/{REPO}/tree/"):
            tree = [{"type": "file", "path": f.name, "size": f.stat().st_size,
                     "oid": hashlib.sha1(f.read_bytes()).hexdigest()} for f in sorted(self.root.iterdir())]
            self._send(200, json.dumps(tree).encode(), {"Content-Type": "application/json"})
        else:
            self._file(send_body=True)

    def _file(self, send_body: bool) -> None:
        prefix = f"/{REPO}/resolve/"
        path = self.path.split("?")[0]
        if not path.startswith(prefix):
            return self._send(404, b"{}", {"X-Error-Code": "RepoNotFound"})
        filename = path[len(prefix):].split("/", 1)[1]
        file = self.root / filename
        if not file.is_file():
            return self._send(404, b"{}", {"X-Error-Code": "EntryNotFound"})
        data = file.read_bytes()
        headers = {"X-Repo-Commit": COMMIT, "ETag": f'"{hashlib.sha256(data).hexdigest()}"'}
        status, body = 200, data
        if self.headers.get("Range"):
            first, _, last = self.headers["Range"].removeprefix("bytes=").partition("-")
            end = min(int(last) + 1 if last else len(data), len(data))
            status, body = 206, data[int(first): end]
            headers["Content-Range"] = f"bytes {first}-{end - 1}/{len(data)}"
        if send_body:
            self.requests.append((filename, "range" if status == 206 else "full"))
        self._send(status, body if send_body else b"", {**headers, "Content-Length": str(len(body))},
                   length_only=not send_body)

    def _send(self, status: int, body: bytes, headers: dict[str, str], length_only: bool = False) -> None:
        self.send_response(status)
        for key, value in headers.items():
            self.send_header(key, value)
        if "Content-Length" not in headers:
            self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if not length_only:
            self.wfile.write(body)


@pytest.fixture
def fake_hub(tiny_checkpoint):
    """A FakeHub serving a 6-layer llama, one layer per shard, on a free loopback port."""
    handler = type("Hub", (FakeHub,), {"root": tiny_checkpoint("llama", num_layers=6), "requests": []})
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    handler.endpoint = f"http://127.0.0.1:{server.server_port}"
    yield handler
    server.shutdown()
    thread.join()


# Run in a fresh process: huggingface_hub reads HF_ENDPOINT when it is imported.
NODE_SCRIPT = """
import json, sys, torch
from node.model.checkpoint import layer_bytes, load_layers, resolve_model, weight_map
source = resolve_model(sys.argv[1])
print(json.dumps({"revision": source.revision, "layers": source.num_layers}), flush=True)
input()
print(json.dumps({"layer_bytes": layer_bytes(source, torch.float32)}), flush=True)
input()
layers = load_layers(source, 2, 4, dtype=torch.float32)
wanted = sorted({f for k, f in weight_map(source).items() if k.startswith(("model.layers.2.", "model.layers.3."))})
print(json.dumps({"loaded": sorted(layers), "wanted": wanted}), flush=True)
"""


def test_a_hub_model_downloads_only_the_shards_of_the_nodes_layers(fake_hub, tmp_path):
    env = {**os.environ, "HF_ENDPOINT": fake_hub.endpoint, "HF_HUB_CACHE": str(tmp_path / "hf-cache"),
           "HF_HUB_DISABLE_XET": "1", "HF_HUB_OFFLINE": "0"}
    with subprocess.Popen([sys.executable, "-c", NODE_SCRIPT, REPO], env=env, text=True,
                          stdin=subprocess.PIPE, stdout=subprocess.PIPE) as node:
        def step() -> dict:
            line = node.stdout.readline()
            assert line, "the node process failed (see its stderr above)"
            return json.loads(line)

        assert step() == {"revision": COMMIT, "layers": 6}
        assert not [f for f, _ in fake_hub.requests if f.endswith(".safetensors")]  # config, tokenizer, index only
        node.stdin.write("\n")
        node.stdin.flush()
        assert step()["layer_bytes"] > 0
        assert {kind for f, kind in fake_hub.requests if f.endswith(".safetensors")} == {"range"}  # headers only

        fake_hub.requests.clear()
        node.stdin.write("\n")
        node.stdin.flush()
        result = step()
        assert 2 <= len(result["wanted"]) <= 3 and "layers.1.mlp.up_proj.weight" in result["loaded"]  # of 7 shards
        assert sorted(f for f, kind in fake_hub.requests if kind == "full") == result["wanted"]
    assert node.returncode == 0
