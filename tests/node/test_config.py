"""Network configuration: defaults, config.json, environment overrides, and clear errors for typos."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from node.net.config import DEFAULT_INITIAL_PEERS, ConfigError, NetworkConfig, load_config

PEER = "/ip4/203.0.113.7/tcp/31337/p2p/QmYyQSo1c1Ym7orWxLYvCrM2EmxFTANf8wXmmE7DWjhx5N"


def test_defaults_without_file_or_environment(tmp_path):
    assert load_config(tmp_path / "config.json", environ={}) == NetworkConfig(DEFAULT_INITIAL_PEERS, ())


def test_file_then_environment_override(tmp_path):
    path = tmp_path / "config.json"
    path.write_text(json.dumps({"initial_peers": [PEER], "relays": [PEER]}))
    assert load_config(path, environ={}) == NetworkConfig((PEER,), (PEER,))
    other = PEER.replace("203.0.113.7", "198.51.100.1")
    config = load_config(path, environ={"LAYERHIVE_INITIAL_PEERS": f"{other}, {PEER}"})
    assert config == NetworkConfig((other, PEER), (PEER,))


def test_typo_names_the_key(tmp_path):
    path = tmp_path / "config.json"
    path.write_text(json.dumps({"inital_peers": [PEER]}))
    with pytest.raises(ConfigError, match="unknown key 'inital_peers'.*did you mean 'initial_peers'"):
        load_config(path, environ={})


@pytest.mark.parametrize("text", ["{not json", "[]", '{"relays": "/ip4/1.2.3.4/tcp/1"}', '{"relays": ["x"]}'])
def test_malformed_file_is_a_clear_error(tmp_path, text):
    path = tmp_path / "config.json"
    path.write_text(text)
    with pytest.raises(ConfigError, match="config.json"):
        load_config(path, environ={})


def test_commands_say_so_when_the_configured_swarm_is_malformed(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"inital_peers": [PEER]}))
    env = {**os.environ, "LAYERHIVE_HOME": str(tmp_path)}
    env.pop("LAYERHIVE_INITIAL_PEERS", None)
    done = subprocess.run([sys.executable, "-m", "node.app.cli", "status", "--model", str(tmp_path)],
                          capture_output=True, text=True, timeout=60, env=env)
    assert done.returncode == 2 and "unknown key 'inital_peers'" in done.stderr
