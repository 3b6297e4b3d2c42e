"""User-changeable network settings: which bootstrap peers to join and which relays to serve through.

Precedence, highest first: the command line, the environment, `layerhive_home()/config.json`, the defaults below.

- `LAYERHIVE_INITIAL_PEERS`: space- or comma-separated multiaddrs of bootstrap peers.
- `LAYERHIVE_RELAYS`: multiaddrs of relay peers (usually bootstrap peers) that a node which cannot be dialled
  directly serves through.

config.json example: `{"initial_peers": ["/dns4/boot.example.org/tcp/31337/p2p/Qm..."], "relays": []}`.
An unknown key is an error naming the key (a typo must not silently fall back to the defaults).
"""

from __future__ import annotations

import difflib
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from node.model.checkpoint import layerhive_home

# Placeholder: no public Layerhive bootstrap peers exist yet. Whoever hosts one (`layerhive bootstrap`)
# publishes its multiaddrs; users add them to config.json or LAYERHIVE_INITIAL_PEERS until they ship here.
DEFAULT_INITIAL_PEERS: tuple[str, ...] = ()
DEFAULT_RELAYS: tuple[str, ...] = ()

CONFIG_FILE_NAME = "config.json"
_LIST_KEYS = ("initial_peers", "relays")
_ENV = {"initial_peers": "LAYERHIVE_INITIAL_PEERS", "relays": "LAYERHIVE_RELAYS"}


class ConfigError(ValueError):
    pass


@dataclass(frozen=True)
class NetworkConfig:
    initial_peers: tuple[str, ...] = DEFAULT_INITIAL_PEERS
    relays: tuple[str, ...] = DEFAULT_RELAYS


def config_path() -> Path:
    return layerhive_home() / CONFIG_FILE_NAME


def load_config(path: Path | None = None, environ: dict[str, str] | None = None) -> NetworkConfig:
    """The defaults, overridden by the config file (if it exists), overridden by the environment."""
    path = path or config_path()
    environ = dict(os.environ) if environ is None else environ
    values: dict[str, tuple[str, ...]] = {}
    if path.exists():
        values.update(_parse_file(path))
    for key, variable in _ENV.items():
        if environ.get(variable, "").strip():
            values[key] = _split_maddrs(environ[variable])
    return NetworkConfig(**values)


def default_initial_peers() -> list[str]:
    """Where to join when no --initial-peers is given: the config file, LAYERHIVE_INITIAL_PEERS, or the built-in
    list; empty means no swarm is known (commands then start a local one, or say what is missing)."""
    return list(load_config().initial_peers)


def _parse_file(path: Path) -> dict[str, tuple[str, ...]]:
    try:
        data: Any = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise ConfigError(f"{path}: not readable JSON: {e}") from e
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a JSON object with keys {list(_LIST_KEYS)}")
    values = {}
    for key, value in data.items():
        if key not in _LIST_KEYS:
            close = difflib.get_close_matches(str(key), _LIST_KEYS, n=1)
            hint = f"; did you mean {close[0]!r}?" if close else ""
            raise ConfigError(f"{path}: unknown key {key!r} (known: {', '.join(_LIST_KEYS)}){hint}")
        if not isinstance(value, list) or not all(isinstance(item, str) and item.startswith("/") for item in value):
            raise ConfigError(f"{path}: {key!r} must be a list of multiaddr strings (starting with '/')")
        values[key] = tuple(value)
    return values


def _split_maddrs(text: str) -> tuple[str, ...]:
    return tuple(part for part in text.replace(",", " ").split() if part)
