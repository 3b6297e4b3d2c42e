"""The install as a transaction: every file and directory it adds is recorded, everything it replaces is set aside,
so a failed or cancelled install is undone exactly, and a finished one leaves a manifest for the uninstaller.

Standard library only.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

from installer.recipes import RUN_KEY, FileItem, Item, RunKeyItem, ShortcutItem, powershell_shortcut

MANIFEST_VERSION = 1


def missing_parents(path: Path) -> list[Path]:
    """The directories `mkdir(parents=True)` would create for `path`, outermost first."""
    missing = []
    for parent in [path, *path.parents]:
        if parent.exists():
            break
        missing.append(parent)
    return missing[::-1]


def make_dirs(path: Path) -> list[Path]:
    created = missing_parents(path)
    path.mkdir(parents=True, exist_ok=True)
    return created


class Changes:
    def __init__(self, previous_dirs: list[str] | None = None) -> None:
        self.trees: list[Path] = []  # directories made by this install, removed whole
        self.dirs: list[Path] = [Path(d) for d in previous_dirs or []]  # parents made for our files: pruned if empty
        self.files: list[Path] = []
        self.run_keys: list[str] = []
        self._set_aside: list[tuple[Path, Path]] = []  # (original, where it waits) until commit or rollback
        self._new_dirs: list[Path] = []  # made by this run: removed on rollback
        self._new_run_keys: list[tuple[str, str | None]] = []  # (name, previous value)

    # --- changing things ----------------------------------------------------------------------------------

    def set_aside(self, path: Path) -> Path | None:
        """Moves an existing file or directory out of the way (restored on rollback, deleted on commit)."""
        if not path.exists() and not path.is_symlink():
            return None
        aside = path.with_name(f".{path.name}.previous-{os.getpid()}")
        if aside.exists():
            _remove(aside)
        path.rename(aside)
        self._set_aside.append((path, aside))
        return aside

    def make_tree(self, path: Path) -> None:
        """A directory only this install writes into (the program's root)."""
        self.set_aside(path)
        self._record_dirs(make_dirs(path.parent))
        path.mkdir()
        self.trees.append(path)

    def apply(self, item: Item) -> None:
        if isinstance(item, FileItem):
            self._write(Path(item.path), item.content, executable=item.executable)
        elif isinstance(item, ShortcutItem):
            self._shortcut(item)
        elif isinstance(item, RunKeyItem):
            self._run_key(item)
        else:
            raise TypeError(f"unknown item {item!r}")

    def _record_dirs(self, created: list[Path]) -> None:
        self._new_dirs += created
        self.dirs += [d for d in created if d not in self.dirs]

    def _write(self, path: Path, content: bytes, *, executable: bool = False) -> None:
        self.set_aside(path)
        self._record_dirs(make_dirs(path.parent))
        path.write_bytes(content)
        if executable:
            path.chmod(0o755)
        self.files.append(path)

    def _shortcut(self, item: ShortcutItem) -> None:
        path = Path(item.path)
        self.set_aside(path)
        self._record_dirs(make_dirs(path.parent))
        self.files.append(path)  # before running: a half-written shortcut is removed on rollback too
        subprocess.run(["powershell", "-NoProfile", "-NonInteractive", "-Command", powershell_shortcut(item)],
                       check=True, capture_output=True, timeout=60)

    def _run_key(self, item: RunKeyItem) -> None:
        import winreg  # Windows only

        with winreg.CreateKey(winreg.HKEY_CURRENT_USER, RUN_KEY) as key:
            try:
                previous = winreg.QueryValueEx(key, item.name)[0]
            except FileNotFoundError:
                previous = None
            self._new_run_keys.append((item.name, previous))
            winreg.SetValueEx(key, item.name, 0, winreg.REG_SZ, item.command)
        self.run_keys.append(item.name)

    # --- ending the transaction ---------------------------------------------------------------------------

    def commit(self) -> None:
        for _original, aside in self._set_aside:
            _remove(aside)
        self._set_aside.clear()

    def rollback(self) -> list[str]:
        """Undoes everything, newest first; returns what could not be undone (for the message and the log)."""
        problems = []
        for name, previous in reversed(self._new_run_keys):
            problems += _attempt(lambda n=name, p=previous: restore_run_key(n, p), f"the login item {name}")
        for path in reversed(self.files):
            problems += _attempt(lambda p=path: _remove(p), str(path))
        for path in reversed(self.trees):
            problems += _attempt(lambda p=path: _remove(p), str(path))
        for path in reversed(self._new_dirs):
            problems += _attempt(lambda p=path: p.exists() and not any(p.iterdir()) and p.rmdir(), str(path))
        for original, aside in reversed(self._set_aside):
            problems += _attempt(lambda o=original, a=aside: a.rename(o), f"{original} (left in {aside})")
        return problems

    def manifest(self, extra_dirs: list[Path] = ()) -> dict:
        dirs = self.dirs + [d for d in extra_dirs if d not in self.dirs]
        return {"version": MANIFEST_VERSION, "trees": [str(p) for p in self.trees],
                "files": [str(p) for p in self.files], "dirs": [str(p) for p in dirs], "run_keys": self.run_keys}


def write_manifest(path: Path, manifest: dict) -> None:
    path.write_text(json.dumps(manifest, indent=1) + "\n")


def read_manifest(path: Path) -> dict | None:
    try:
        manifest = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return manifest if isinstance(manifest, dict) and manifest.get("version") == MANIFEST_VERSION else None


def undo_manifest(manifest: dict) -> list[str]:
    """Removes what an install recorded: files, trees, login-item values, then the directories it made, if empty.
    Returns what could not be removed."""
    problems = []
    for name in manifest.get("run_keys", []):
        problems += _attempt(lambda n=name: restore_run_key(n, None), f"the login item {name}")
    for path in [*manifest.get("files", []), *manifest.get("trees", [])]:
        problems += _attempt(lambda p=Path(path): _remove(p), path)
    problems += prune_empty([Path(d) for d in manifest.get("dirs", [])])
    return problems


def prune_empty(dirs: list[Path]) -> list[str]:
    """Removes those of `dirs` that are empty, deepest first (a parent empties once its children are gone)."""
    problems = []
    for path in sorted(set(dirs), key=lambda p: len(p.parts), reverse=True):
        problems += _attempt(lambda p=path: p.is_dir() and not any(p.iterdir()) and p.rmdir(), str(path))
    return problems


def restore_run_key(name: str, previous: str | None) -> None:
    if sys.platform != "win32":
        return
    import winreg

    with winreg.OpenKey(winreg.HKEY_CURRENT_USER, RUN_KEY, 0, winreg.KEY_SET_VALUE) as key:
        if previous is None:
            with contextlib.suppress(FileNotFoundError):
                winreg.DeleteValue(key, name)
        else:
            winreg.SetValueEx(key, name, 0, winreg.REG_SZ, previous)


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    elif path.exists() or path.is_symlink():
        path.unlink()


def _attempt(action, what: str) -> list[str]:
    try:
        action()
    except OSError as e:
        return [f"{what}: {e}"]
    return []
