"""Qt's system libraries on Linux: which ones the app's Qt cannot find, and the exact command that installs them.

PySide6's wheels bring Qt but not the X11/xcb libraries its platform plugin links to (libxcb-cursor0,
libxkbcommon-x11-0, libxcb-icccm4, ...); without one, the app dies before any of its code can show a message.
What is needed is read from the plugin itself: `ldd` on PySide6's xcb platform plugin (xcb is also Qt's fallback
under Wayland) lists every library it loads, directly or not, and which of them are not found.

Standard library only.
"""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

# soname -> (Debian/Ubuntu package, Fedora/RHEL package)
PACKAGES = {
    "libxcb-cursor.so.0": ("libxcb-cursor0", "xcb-util-cursor"),
    "libxcb-icccm.so.4": ("libxcb-icccm4", "xcb-util-wm"),
    "libxcb-image.so.0": ("libxcb-image0", "xcb-util-image"),
    "libxcb-keysyms.so.1": ("libxcb-keysyms1", "xcb-util-keysyms"),
    "libxcb-render-util.so.0": ("libxcb-render-util0", "xcb-util-renderutil"),
    "libxcb-util.so.1": ("libxcb-util1", "xcb-util"),
    "libxcb-randr.so.0": ("libxcb-randr0", "libxcb"),
    "libxcb-render.so.0": ("libxcb-render0", "libxcb"),
    "libxcb-shape.so.0": ("libxcb-shape0", "libxcb"),
    "libxcb-shm.so.0": ("libxcb-shm0", "libxcb"),
    "libxcb-sync.so.1": ("libxcb-sync1", "libxcb"),
    "libxcb-xfixes.so.0": ("libxcb-xfixes0", "libxcb"),
    "libxcb-xinerama.so.0": ("libxcb-xinerama0", "libxcb"),
    "libxcb-xinput.so.0": ("libxcb-xinput0", "libxcb"),
    "libxcb-xkb.so.1": ("libxcb-xkb1", "libxcb"),
    "libxcb-glx.so.0": ("libxcb-glx0", "libxcb"),
    "libxcb.so.1": ("libxcb1", "libxcb"),
    "libxkbcommon.so.0": ("libxkbcommon0", "libxkbcommon"),
    "libxkbcommon-x11.so.0": ("libxkbcommon-x11-0", "libxkbcommon-x11"),
    "libX11-xcb.so.1": ("libx11-xcb1", "libX11-xcb"),
    "libX11.so.6": ("libx11-6", "libX11"),
    "libSM.so.6": ("libsm6", "libSM"),
    "libICE.so.6": ("libice6", "libICE"),
    "libGL.so.1": ("libgl1", "libglvnd-glx"),
    "libEGL.so.1": ("libegl1", "libglvnd-egl"),
    "libOpenGL.so.0": ("libopengl0", "libglvnd-opengl"),
    "libfontconfig.so.1": ("libfontconfig1", "fontconfig"),
    "libfreetype.so.6": ("libfreetype6", "freetype"),
    "libdbus-1.so.3": ("libdbus-1-3", "dbus-libs"),
    "libglib-2.0.so.0": ("libglib2.0-0", "glib2"),
    "libgthread-2.0.so.0": ("libglib2.0-0", "glib2"),
}
_NOT_FOUND = re.compile(r"^\s*(\S+)\s+=>\s+not found", re.MULTILINE)


def xcb_plugin(python: str) -> Path | None:
    """PySide6's xcb platform plugin in the environment of `python`, found without importing Qt."""
    code = ("import importlib.util as u; s = u.find_spec('PySide6'); "
            "print(s.submodule_search_locations[0] if s else '')")
    try:
        found = subprocess.run([python, "-c", code], capture_output=True, text=True, timeout=60).stdout.strip()
    except (subprocess.SubprocessError, OSError):
        return None
    plugin = Path(found) / "Qt" / "plugins" / "platforms" / "libqxcb.so" if found else None
    return plugin if plugin is not None and plugin.exists() else None


def missing_libraries(elf: Path) -> list[str]:
    """The sonames `elf` needs, directly or through the libraries it loads, that the loader cannot find."""
    ldd = shutil.which("ldd")
    if ldd is None:
        raise OSError("ldd is not installed")
    listed = subprocess.run([ldd, str(elf)], capture_output=True, text=True, timeout=60)
    return sorted(set(_NOT_FOUND.findall(listed.stdout + listed.stderr)))


def read_os_release(path: Path = Path("/etc/os-release")) -> dict[str, str]:
    try:
        text = path.read_text()
    except OSError:
        return {}
    pairs = (line.split("=", 1) for line in text.splitlines() if "=" in line and not line.startswith("#"))
    return {key.strip(): value.strip().strip('"') for key, value in pairs}


def install_commands(sonames: list[str], os_release: dict[str, str]) -> list[str]:
    """The command(s) that install the packages providing `sonames`: the distribution's own when known
    (Debian/Ubuntu: apt-get, Fedora/RHEL: dnf), else both."""
    family = {os_release.get("ID", ""), *os_release.get("ID_LIKE", "").split()}
    apt = sorted({PACKAGES[s][0] for s in sonames if s in PACKAGES})
    dnf = sorted({PACKAGES[s][1] for s in sonames if s in PACKAGES})
    commands = []
    if apt and (family & {"debian", "ubuntu"} or not family & {"fedora", "rhel", "centos"}):
        commands.append("sudo apt-get install " + " ".join(apt))
    if dnf and (family & {"fedora", "rhel", "centos"} or not family & {"debian", "ubuntu"}):
        commands.append("sudo dnf install " + " ".join(dnf))
    return commands


def qt_problem(python: str) -> str | None:
    """None when Qt's xcb plugin finds every library it needs; else what is missing and how to install it."""
    plugin = xcb_plugin(python)
    if plugin is None:
        return None  # no PySide6 wheel for xcb here (e.g. another platform): nothing this check can read
    try:
        missing = missing_libraries(plugin)
    except (OSError, subprocess.SubprocessError):
        return None  # no ldd (e.g. a musl system): the app's own start is then the check
    return describe_missing(missing, read_os_release()) if missing else None


def describe_missing(missing: list[str], os_release: dict[str, str]) -> str:
    commands = install_commands(missing, os_release)
    unknown = [s for s in missing if s not in PACKAGES]
    text = f"Qt, which draws Layerhive's windows, needs system libraries that are missing: {', '.join(missing)}."
    if commands:
        text += " Install them with:\n    " + "\n  or\n    ".join(commands)
    if unknown:
        text += f"\nFor {', '.join(unknown)}: install the package that provides it (e.g. `apt-file search NAME`)."
    return text
