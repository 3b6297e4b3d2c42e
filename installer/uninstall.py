"""Uninstalling: stop the app, remove what the install's manifest lists (the environment, menu entry, icon, login
item) and the logs; remove the person's data (settings, the node's identity key, downloaded models, chats) only
when they say so; name everything that stays.

Standard library only.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

from installer import processes
from installer.changes import prune_empty, read_manifest, undo_manifest
from installer.layout import APP, Layout, UserData
from installer.progress import Progress


def uninstall(layout: Layout, progress: Progress, *, remove_data: bool | None, state_parents: list[Path]
              ) -> tuple[str, int]:
    root = Path(layout.root)
    said = []
    progress.step(0.05, "Stopping Layerhive")
    stopped = processes.stop_app(root)
    if stopped:
        said.append(f"Stopped the running Layerhive ({len(stopped)} processes).")
    data = [d for d in layout.user_data if _present(d, layout)]
    if data and remove_data is None:
        listing = "\n".join(f"  - {_describe(d)}" for d in data)
        remove_data = progress.ask(f"Also remove your Layerhive data?\n{listing}") or False
    problems = []
    if data and remove_data:
        progress.step(0.2, "Removing your settings, identity and models")
        problems += remove_user_data(layout, data)
    progress.step(0.5, "Removing the program, its menu entry and login item")
    manifest = read_manifest(Path(layout.manifest)) or legacy_manifest(layout)
    installed = [path for path in [*manifest.get("trees", []), *manifest.get("files", [])] if Path(path).exists()]
    problems += undo_manifest(manifest)
    progress.step(0.9, "Removing the logs")
    progress.log.close()  # the log goes with its directory
    removed = [Path(layout.state), *map(Path, layout.program_caches)]
    for path in removed:
        problems += _remove_tree(path)
    removed += [Path(d.path) for d in data if remove_data and d.path is not None]
    problems += prune_empty([*map(Path, manifest.get("dirs", [])), *state_parents, *emptied_parents(removed)])
    if installed:
        said.append("Layerhive is uninstalled. Removed: " + ", ".join(_name(layout, p) for p in installed)
                    + ", and the logs.")
    else:
        said.append(f"Layerhive was not installed for this user (nothing in {root}).")
    if data and remove_data:
        said.append("Removed your data:\n" + "\n".join(f"  - {d.label}" for d in data))
    elif data:
        said.append("Kept your data (delete it by hand, or uninstall with --remove-data yes):\n"
                    + "\n".join(f"  - {_describe(d)}" for d in data))
    shared = [Path(p) for p in layout.shared_caches if Path(p).exists()]
    if shared:
        said.append("Not removed, as other programs share it: " + ", ".join(
            f"{p} ({_size(p) / 1e6:.0f} MB)" for p in shared))
    if problems:
        said.append("Could not remove:\n" + "\n".join(f"  - {p}" for p in problems))
    return "\n".join(said), 1 if problems else 0


def _name(layout: Layout, path: str) -> str:
    names = {str(layout.root): f"the program ({layout.root})", str(layout.menu_entry): "the menu entry",
             str(layout.login_item): "the login item", str(layout.icon): "the icon"}
    return names.get(path, path)


def emptied_parents(removed: list[Path]) -> list[Path]:
    """The directories between the home and what was removed (e.g. ~/.cache once ~/.cache/layerhive is gone):
    pruned when left empty, since the app made them in an empty home; on a lived-in desktop they are not empty."""
    home = Path.home()
    return [parent for path in removed for parent in path.parents if parent.is_relative_to(home) and parent != home]


def legacy_manifest(layout: Layout) -> dict:
    """What an install without a manifest (an earlier installer) added."""
    files = [layout.menu_entry, layout.icon] + ([layout.login_item] if layout.login_item else [])
    return {"trees": [str(layout.root)], "files": [str(p) for p in files], "dirs": [],
            "run_keys": [APP.name] if layout.platform == "win32" else []}


def remove_user_data(layout: Layout, data: list[UserData]) -> list[str]:
    """Removes `data`; keyring entries first, through the environment's keyring module, before it goes."""
    problems = []
    for item in sorted(data, key=lambda d: d.keyring_entry is None):
        if item.keyring_entry is not None:
            if _keyring(layout, "delete", *item.keyring_entry) is not False:  # still there, or cannot tell
                problems.append(_describe(item))
        elif item.path is not None:
            problems += _remove_tree(Path(item.path))
        elif item.registry_key is not None:
            problems += _delete_registry_tree(item.registry_key)
    return problems


_KEYRING = """import sys, keyring, keyring.errors
action, service, name = sys.argv[1:]
if action == "delete":
    try:
        keyring.delete_password(service, name)
    except keyring.errors.PasswordDeleteError:
        pass
print(keyring.get_password(service, name) is not None)
"""


def _keyring(layout: Layout, action: str, service: str, name: str) -> bool | None:
    """Whether the keyring holds the entry (after deleting it, for "delete"); None when it cannot be asked."""
    python = Path(layout.python)
    if not python.exists():
        return None
    try:
        done = subprocess.run([str(python), "-c", _KEYRING, action, service, name], capture_output=True, text=True,
                              timeout=60)
    except (subprocess.SubprocessError, OSError):
        return None
    answer = done.stdout.strip().splitlines()[-1:] if done.returncode == 0 else []
    return {"True": True, "False": False}.get(answer[0]) if answer else None


def _present(item: UserData, layout: Layout) -> bool:
    if item.path is not None:
        return Path(item.path).exists()
    if item.registry_key is not None:
        return _registry_key_exists(item.registry_key)
    if item.keyring_entry is not None:
        return bool(_keyring(layout, "read", *item.keyring_entry))
    return False


def _describe(item: UserData) -> str:
    if item.path is not None:
        return f"{item.label}: {item.path} ({_size(Path(item.path)) / 1e6:.1f} MB)"
    if item.registry_key is not None:
        return f"{item.label}: HKEY_CURRENT_USER\\{item.registry_key}"
    service, name = item.keyring_entry
    return f"{item.label}: service {service!r}, entry {name!r}"


def _size(path: Path) -> int:
    if path.is_file():
        return path.stat().st_size
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file() and not p.is_symlink())


def _remove_tree(path: Path) -> list[str]:
    try:
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path)
        elif path.exists() or path.is_symlink():
            path.unlink()
    except OSError as e:
        return [f"{path}: {e}"]
    return []


def _registry_key_exists(key: str) -> bool:
    if sys.platform != "win32":
        return False
    import winreg

    try:
        winreg.OpenKey(winreg.HKEY_CURRENT_USER, key).Close()
    except OSError:
        return False
    return True


def _delete_registry_tree(key: str) -> list[str]:
    if sys.platform != "win32":
        return []
    import winreg

    try:
        with winreg.OpenKey(winreg.HKEY_CURRENT_USER, key, 0, winreg.KEY_ALL_ACCESS) as handle:
            while True:
                try:
                    child = winreg.EnumKey(handle, 0)
                except OSError:
                    break
                problems = _delete_registry_tree(f"{key}\\{child}")
                if problems:
                    return problems
        winreg.DeleteKey(winreg.HKEY_CURRENT_USER, key)
    except OSError as e:
        return [f"HKEY_CURRENT_USER\\{key}: {e}"]
    return []
