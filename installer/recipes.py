"""What the installer adds to the desktop on each platform, rendered from the one description (installer/layout.py):
the menu entry, the icon and the login item, as items the installer applies and records (installer/changes.py).

- Linux: freedesktop .desktop files (menu and ~/.config/autostart) and a hicolor icon.
- macOS: an .app bundle in ~/Applications (Info.plist, a launcher script, an .icns icon) and a LaunchAgent plist.
- Windows: a Start-menu shortcut (made by PowerShell: a .lnk is a binary COM format) with an .ico icon, and a
  value under HKCU\\...\\Run for the login item.

Standard library only. Every renderer is pure, so the three platforms' items are generated and checked anywhere.
"""

from __future__ import annotations

import plistlib
import shlex
import struct
from dataclasses import dataclass
from pathlib import PurePath

from installer.layout import APP, Layout

RUN_KEY = r"Software\Microsoft\Windows\CurrentVersion\Run"


@dataclass(frozen=True)
class FileItem:
    path: PurePath
    content: bytes
    executable: bool = False


@dataclass(frozen=True)
class RunKeyItem:
    """Windows login item: a value under HKEY_CURRENT_USER\\<RUN_KEY>."""

    name: str
    command: str


@dataclass(frozen=True)
class ShortcutItem:
    """Windows Start-menu shortcut, written by `powershell_shortcut(item)`."""

    path: PurePath
    target: PurePath
    icon: PurePath
    description: str


Item = FileItem | RunKeyItem | ShortcutItem


def integration_items(layout: Layout, icon_png: bytes, *, login_item: bool) -> list[Item]:
    """The menu entry, its icon and (if wanted) the login item for `layout`'s platform."""
    render = {"linux": _linux_items, "darwin": _macos_items, "win32": _windows_items}[layout.platform]
    return render(layout, icon_png, login_item)


# --- Linux ---------------------------------------------------------------------------------------------------


def desktop_entry(layout: Layout, *, autostart: bool) -> str:
    lines = [
        "[Desktop Entry]", "Type=Application", f"Name={APP.name}", f"Comment={APP.comment}",
        f"Exec={_desktop_exec_quote(str(layout.app_executable))}", f"Icon={layout.icon}", "Terminal=false",
        "Categories=Network;Utility;", "StartupNotify=false",
    ]
    if autostart:
        lines.append("X-GNOME-Autostart-enabled=true")
    return "\n".join(lines) + "\n"


def _desktop_exec_quote(path: str) -> str:
    """The Exec key's quoting (Desktop Entry Specification): double quotes when the path has reserved characters."""
    if not any(c in path for c in ' \t\n"\'\\><~|&;$*?#()`'):
        return path
    escaped = "".join("\\" + c if c in '"`$\\' else c for c in path)
    return f'"{escaped}"'


def _linux_items(layout: Layout, icon_png: bytes, login_item: bool) -> list[Item]:
    items: list[Item] = [
        FileItem(layout.icon, icon_png),
        FileItem(layout.menu_entry, desktop_entry(layout, autostart=False).encode()),
    ]
    if login_item and layout.login_item is not None:
        items.append(FileItem(layout.login_item, desktop_entry(layout, autostart=True).encode()))
    return items


# --- macOS ---------------------------------------------------------------------------------------------------


def bundle_executable(layout: Layout) -> PurePath:
    return layout.menu_entry / "Contents" / "MacOS" / APP.name


def info_plist() -> bytes:
    return plistlib.dumps({
        "CFBundleName": APP.name, "CFBundleDisplayName": APP.name, "CFBundleIdentifier": APP.bundle_id,
        "CFBundleExecutable": APP.name, "CFBundlePackageType": "APPL", "CFBundleIconFile": f"{APP.id}.icns",
        "CFBundleShortVersionString": "0.1.0", "CFBundleInfoDictionaryVersion": "6.0",
        "LSMinimumSystemVersion": "11.0",
        "LSUIElement": True,  # a menu-bar app: no Dock icon
    })


def bundle_launcher(layout: Layout) -> str:
    return f"#!/bin/sh\n# Starts {APP.name} from the environment the installer made.\nexec " \
           f"{shlex.quote(str(layout.app_executable))} \"$@\"\n"


def launch_agent(layout: Layout) -> bytes:
    """~/Library/LaunchAgents plist: starts the app at login, once (no KeepAlive: Quit in the menu means quit)."""
    return plistlib.dumps({
        "Label": APP.bundle_id, "ProgramArguments": [str(bundle_executable(layout))], "RunAtLoad": True,
        "ProcessType": "Interactive", "LimitLoadToSessionType": "Aqua",
        "StandardOutPath": str(layout.launch_log), "StandardErrorPath": str(layout.launch_log),
    })


def icns_from_png(png: bytes) -> bytes:
    """An .icns holding the PNG as its 256x256 image ('ic08' entries may be PNG since macOS 10.7)."""
    width, height = png_size(png)
    if (width, height) != (256, 256):
        raise ValueError(f"the icon must be 256x256, got {width}x{height}")
    entry = b"ic08" + struct.pack(">I", 8 + len(png)) + png
    return b"icns" + struct.pack(">I", 8 + len(entry)) + entry


def _macos_items(layout: Layout, icon_png: bytes, login_item: bool) -> list[Item]:
    contents = layout.menu_entry / "Contents"
    items: list[Item] = [
        FileItem(contents / "Info.plist", info_plist()),
        FileItem(bundle_executable(layout), bundle_launcher(layout).encode(), executable=True),
        FileItem(layout.icon, icns_from_png(icon_png)),
    ]
    if login_item and layout.login_item is not None:
        items.append(FileItem(layout.login_item, launch_agent(layout)))
    return items


# --- Windows -------------------------------------------------------------------------------------------------


def ico_from_png(png: bytes) -> bytes:
    """A one-image .ico whose image is the PNG itself (PNG entries are valid since Windows Vista)."""
    width, height = png_size(png)
    if width > 256 or height > 256:
        raise ValueError(f"an .ico image is at most 256x256, got {width}x{height}")
    header = struct.pack("<HHH", 0, 1, 1)
    entry = struct.pack("<BBBBHHII", width % 256, height % 256, 0, 0, 1, 32, len(png), 6 + 16)
    return header + entry + png


def _ps_quote(text: str) -> str:
    return "'" + text.replace("'", "''") + "'"


def powershell_shortcut(item: ShortcutItem) -> str:
    """A PowerShell script that writes the shortcut (WScript.Shell's CreateShortcut)."""
    return "\n".join([
        "$ErrorActionPreference = 'Stop'",
        "$shell = New-Object -ComObject WScript.Shell",
        f"$link = $shell.CreateShortcut({_ps_quote(str(item.path))})",
        f"$link.TargetPath = {_ps_quote(str(item.target))}",
        f"$link.WorkingDirectory = {_ps_quote(str(item.target.parent))}",
        f"$link.IconLocation = {_ps_quote(str(item.icon) + ',0')}",
        f"$link.Description = {_ps_quote(item.description)}",
        "$link.Save()",
    ]) + "\n"


def _windows_items(layout: Layout, icon_png: bytes, login_item: bool) -> list[Item]:
    items: list[Item] = [
        FileItem(layout.icon, ico_from_png(icon_png)),
        ShortcutItem(layout.menu_entry, layout.app_executable, layout.icon, APP.comment),
    ]
    if login_item:
        items.append(RunKeyItem(APP.name, f'"{layout.app_executable}"'))
    return items


def png_size(png: bytes) -> tuple[int, int]:
    if png[:8] != b"\x89PNG\r\n\x1a\n" or png[12:16] != b"IHDR":
        raise ValueError("not a PNG image")
    width, height = struct.unpack(">II", png[16:24])
    return width, height
