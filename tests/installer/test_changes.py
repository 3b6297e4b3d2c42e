"""The install as a transaction: what a failed run changed is undone (an earlier install restored byte for byte,
directories it made removed), and a finished run's manifest lets the uninstaller remove exactly that."""

from __future__ import annotations

from pathlib import Path

from installer.changes import Changes, read_manifest, undo_manifest, write_manifest
from installer.recipes import FileItem
from tests.installer.conftest import files_under


def earlier_install(home: Path) -> Path:
    root = home / "share" / "layerhive"
    (root / "venv").mkdir(parents=True)
    (root / "venv" / "old").write_text("the earlier install")
    (home / "share" / "applications").mkdir()
    (home / "share" / "applications" / "layerhive.desktop").write_text("old entry")
    return root


def test_a_rollback_restores_the_earlier_install_and_removes_what_was_made(tmp_path):
    root = earlier_install(tmp_path)
    before = {p: p.read_bytes() for p in tmp_path.rglob("*") if p.is_file()}
    changes = Changes()
    changes.make_tree(root)
    (root / "venv").mkdir()
    (root / "venv" / "new").write_text("half a new install")
    changes.apply(FileItem(tmp_path / "share" / "applications" / "layerhive.desktop", b"new entry"))
    changes.apply(FileItem(tmp_path / "config" / "autostart" / "layerhive.desktop", b"login", executable=True))
    assert (tmp_path / "config" / "autostart" / "layerhive.desktop").stat().st_mode & 0o111
    assert changes.rollback() == []
    assert {p: p.read_bytes() for p in tmp_path.rglob("*") if p.is_file()} == before
    assert not (tmp_path / "config").exists(), "the directories made for the login item are gone too"
    assert not any(".previous-" in name for name in files_under(tmp_path))


def test_a_commit_drops_what_was_set_aside_and_the_manifest_undoes_the_install(tmp_path):
    root = earlier_install(tmp_path)
    changes = Changes(previous_dirs=[str(tmp_path / "share" / "applications")])
    changes.make_tree(root)
    changes.apply(FileItem(tmp_path / "share" / "applications" / "layerhive.desktop", b"new entry"))
    changes.apply(FileItem(tmp_path / "config" / "autostart" / "layerhive.desktop", b"login"))
    write_manifest(root / "manifest.json", changes.manifest([tmp_path / "state"]))
    changes.commit()
    assert not any(".previous-" in name for name in files_under(tmp_path))
    assert (tmp_path / "share" / "applications" / "layerhive.desktop").read_text() == "new entry"

    (tmp_path / "state").mkdir()
    (tmp_path / "share" / "other-app.txt").write_text("not ours")
    manifest = read_manifest(root / "manifest.json")
    assert manifest["dirs"][0] == str(tmp_path / "share" / "applications"), "kept from the earlier install"
    assert undo_manifest(manifest) == []
    assert files_under(tmp_path) == ["share", "share/other-app.txt"], "ours gone, the rest untouched"
    assert read_manifest(tmp_path / "nothing.json") is None
