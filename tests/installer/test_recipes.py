"""The one description (installer/layout.py) rendered for Linux, macOS and Windows, checked as far as Linux allows:
the macOS bundle and LaunchAgent are written into a temporary home by the installer's own transaction and parsed
(plistlib, `sh -n`, the bundle's launcher run); the Windows icon, shortcut script, Run-key value and the .ps1
installer are checked for content and structure (no PowerShell here to run them)."""

from __future__ import annotations

import base64
import io
import plistlib
import re
import shlex
import struct
import subprocess
import tarfile
import zipfile
from pathlib import Path, PurePosixPath, PureWindowsPath

import pytest

from installer.build import MARKER, PAYLOAD_MODULES
from installer.changes import Changes, read_manifest, undo_manifest, write_manifest
from installer.layout import APP, layout_for
from installer.recipes import (
    FileItem,
    RunKeyItem,
    ShortcutItem,
    desktop_entry,
    icns_from_png,
    ico_from_png,
    integration_items,
    powershell_shortcut,
)
from tests.installer.conftest import files_under

ICON = (Path(__file__).parents[2] / "assets" / "layerhive.png").read_bytes()
WINDOWS_ENV = {"USERPROFILE": r"C:\Users\Ann O'Neil", "LOCALAPPDATA": r"C:\Users\Ann O'Neil\AppData\Local",
               "APPDATA": r"C:\Users\Ann O'Neil\AppData\Roaming"}


@pytest.mark.parametrize("platform, env", [("linux", {"HOME": "/home/ann"}), ("darwin", {"HOME": "/Users/ann"}),
                                           ("win32", WINDOWS_ENV)])
def test_the_program_and_the_persons_data_never_share_a_directory(platform, env):
    """Removing the program (or rolling it back) must not touch data or the log that names what went wrong."""
    layout = layout_for(platform, env)
    program = [layout.root, layout.state, *layout.program_caches]
    data = [d.path for d in layout.user_data if d.path is not None]
    for p in program:
        for d in data:
            assert not p.is_relative_to(d) and not d.is_relative_to(p), (p, d)
    assert not layout.state.is_relative_to(layout.root), "a rollback of the root keeps the log"
    assert layout.app_executable.is_relative_to(layout.venv) and layout.manifest.parent == layout.root
    assert any(d.keyring_entry == (APP.keyring_service, APP.identity) for d in layout.user_data)


def test_linux_menu_entry_and_login_item_quote_a_home_with_spaces():
    layout = layout_for("linux", {"HOME": "/home/ann lee", "XDG_DATA_HOME": "/data/ann", "XDG_CONFIG_HOME": "relative"})
    assert layout.root == PurePosixPath("/data/ann/layerhive")
    assert layout.login_item == PurePosixPath("/home/ann lee/.config/autostart/layerhive.desktop"), \
        "a relative XDG path is invalid and ignored, as the spec says"
    items = {item.path: item for item in integration_items(layout, ICON, login_item=True)}
    entry = items[layout.menu_entry].content.decode()
    exec_line = next(line for line in entry.splitlines() if line.startswith("Exec="))
    assert shlex.split(exec_line[5:]) == [str(layout.app_executable)]
    assert items[layout.login_item].content.decode() == desktop_entry(layout, autostart=True)
    assert items[layout.icon].content == ICON
    assert layout.login_item not in {i.path for i in integration_items(layout, ICON, login_item=False)}


def test_the_macos_bundle_and_launch_agent_install_and_uninstall_in_a_home(tmp_path):
    layout = layout_for("darwin", {"HOME": str(tmp_path)})
    changes = Changes()
    changes.make_tree(Path(layout.root))
    for item in integration_items(layout, ICON, login_item=True):
        changes.apply(item)
    write_manifest(Path(layout.manifest), changes.manifest())
    changes.commit()

    bundle = Path(layout.menu_entry)
    info = plistlib.loads((bundle / "Contents" / "Info.plist").read_bytes())
    assert info["CFBundleIdentifier"] == APP.bundle_id and info["LSUIElement"] is True
    launcher = bundle / "Contents" / "MacOS" / info["CFBundleExecutable"]
    assert launcher.stat().st_mode & 0o111
    subprocess.run(["sh", "-n", str(launcher)], check=True)
    icns = (bundle / "Contents" / "Resources" / info["CFBundleIconFile"]).read_bytes()
    assert icns[:4] == b"icns" and struct.unpack(">I", icns[4:8])[0] == len(icns) and icns[8:12] == b"ic08"
    assert icns[16:] == ICON

    agent = plistlib.loads(Path(layout.login_item).read_bytes())
    assert agent["Label"] == APP.bundle_id and agent["RunAtLoad"] is True and "KeepAlive" not in agent
    assert agent["ProgramArguments"] == [str(launcher)]
    assert Path(layout.login_item).name == f"{APP.bundle_id}.plist"

    app = Path(layout.app_executable)  # what the bundle starts: here a script that shows its arguments
    app.parent.mkdir(parents=True)
    app.write_text("#!/bin/sh\necho started with \"$@\"\n")
    app.chmod(0o755)
    ran = subprocess.run([str(launcher), "--self-test", "a b"], capture_output=True, text=True, check=True)
    assert ran.stdout == "started with --self-test a b\n"

    assert not undo_manifest(read_manifest(Path(layout.manifest)))
    assert files_under(tmp_path) == [], "the bundle, the agent and the directories made for them are gone"


def test_the_windows_icon_shortcut_and_login_item():
    layout = layout_for("win32", WINDOWS_ENV)
    assert layout.root == PureWindowsPath(r"C:\Users\Ann O'Neil\AppData\Local\Layerhive\app")
    assert layout.menu_entry.parent.name == "Programs" and layout.menu_entry.suffix == ".lnk"
    assert str(layout.app_executable).endswith(r"venv\Scripts\layerhive-app.exe")
    items = integration_items(layout, ICON, login_item=True)
    icon = next(i for i in items if isinstance(i, FileItem))
    count, = struct.unpack("<H", icon.content[4:6])
    width, height, _, _, planes, bits, size, offset = struct.unpack("<BBBBHHII", icon.content[6:22])
    assert icon.path == layout.icon and count == 1 and (width, height) == (0, 0)  # 0 means 256
    assert (planes, bits, size, offset) == (1, 32, len(ICON), 22) and icon.content[22:] == ICON
    shortcut = next(i for i in items if isinstance(i, ShortcutItem))
    script = powershell_shortcut(shortcut)
    assert "CreateShortcut('C:\\Users\\Ann O''Neil\\AppData\\Roaming" in script, "quotes doubled in PowerShell"
    assert f"$link.TargetPath = '{str(layout.app_executable).replace(chr(39), chr(39) * 2)}'" in script
    assert script.count("'") % 2 == 0 and script.rstrip().endswith("$link.Save()")
    run_key = next(i for i in items if isinstance(i, RunKeyItem))
    assert run_key == RunKeyItem(APP.name, f'"{layout.app_executable}"')
    assert not any(isinstance(i, RunKeyItem) for i in integration_items(layout, ICON, login_item=False))
    assert ico_from_png(ICON) == icon.content and icns_from_png(ICON)[:4] == b"icns"


def test_the_three_installer_files_carry_the_same_payload(installer_file):
    unix = installer_file.read_bytes()
    assert (installer_file.parent / "Layerhive-Install.command").read_bytes() == unix
    script, _, packed = unix.partition(MARKER)
    with tarfile.open(fileobj=io.BytesIO(packed), mode="r:gz") as tar:
        unix_files = {m.name: tar.extractfile(m).read() for m in tar.getmembers() if m.isfile()}
    assert {f"installer/{m}.py" for m in PAYLOAD_MODULES} | {"layerhive.png"} <= set(unix_files)
    assert any(re.fullmatch(r"layerhive-[\d.]+-py3-none-any\.whl", name) for name in unix_files)

    ps1 = (installer_file.parent / "layerhive-install.ps1").read_bytes()
    assert b"\r\n" in ps1 and b"\n" not in ps1.replace(b"\r\n", b""), "CRLF throughout"
    text = ps1.decode()
    encoded = re.search(r"^\$payload = @'\r\n(.*?)\r\n'@\r\n", text, re.MULTILINE | re.DOTALL).group(1)
    with zipfile.ZipFile(io.BytesIO(base64.b64decode("".join(encoded.split())))) as archive:
        assert {name: archive.read(name) for name in archive.namelist()} == unix_files
    code = text.replace(encoded, "")
    assert code.count("{") == code.count("}") and code.count("(") == code.count(")")
    assert "-m installer @arguments" in code and "exit (Install-Layerhive $args)" in code


def test_the_shell_launcher_parses_and_names_what_is_missing(installer_file, tmp_path):
    script = installer_file.read_bytes().partition(MARKER)[0]
    (tmp_path / "launcher.sh").write_bytes(script)
    subprocess.run(["sh", "-n", str(tmp_path / "launcher.sh")], check=True)

    wrong = subprocess.run(["sh", str(installer_file)], env={"PATH": "/usr/bin:/bin", "LAYERHIVE_PYTHON": "/bin/false"},
                           capture_output=True, text=True, stdin=subprocess.DEVNULL)
    assert wrong.returncode == 1 and "LAYERHIVE_PYTHON=/bin/false is not a Python 3.10" in wrong.stderr

    bare = tmp_path / "bin"  # a system with no Python at all
    bare.mkdir()
    (bare / "uname").symlink_to("/bin/uname")
    none = subprocess.run(["/bin/sh", str(installer_file)], env={"PATH": str(bare)}, capture_output=True, text=True,
                          stdin=subprocess.DEVNULL)
    assert none.returncode == 1 and "Layerhive needs Python 3.10 or newer with venv" in none.stderr
