"""Qt's system libraries: what `ldd` says PySide6's real xcb plugin lacks, cross-checked with the dynamic loader
itself; a library that really is missing (a plugin built here against one, then deleted) named with the way to get
it; the package commands for Debian/Ubuntu, Fedora and a distribution the table does not know."""

from __future__ import annotations

import ctypes
import re
import shutil
import subprocess
import sys

import pytest

from installer.syslibs import PACKAGES, describe_missing, install_commands, missing_libraries, xcb_plugin


def loads(soname: str) -> bool:
    try:
        ctypes.CDLL(soname)
    except OSError:
        return False
    return True


def test_the_check_agrees_with_the_loader_on_pyside6s_real_plugin():
    plugin = xcb_plugin(sys.executable)
    assert plugin is not None and plugin.name == "libqxcb.so"
    missing = missing_libraries(plugin)
    listed = subprocess.run(["ldd", str(plugin)], capture_output=True, text=True).stdout
    needed = set(re.findall(r"^\s*(\S+) =>", listed, re.MULTILINE))
    assert {"libxcb-cursor.so.0", "libxkbcommon-x11.so.0"} <= needed, "the libraries the issue ran into"
    for soname in needed & PACKAGES.keys():
        assert (soname in missing) == (not loads(soname)), soname


@pytest.mark.skipif(shutil.which("gcc") is None, reason="needs gcc to build a plugin with a missing dependency")
def test_a_library_that_is_really_missing_is_named(tmp_path):
    lib = tmp_path / "lib"
    lib.mkdir()
    (tmp_path / "dep.c").write_text("int layerhive_dep(void) { return 1; }\n")
    (tmp_path / "plugin.c").write_text("int layerhive_dep(void);\nint plugin(void) { return layerhive_dep(); }\n")
    subprocess.run(["gcc", "-shared", "-fPIC", "-Wl,-soname,liblayerhive-gone.so.1", "-o",
                    str(lib / "liblayerhive-gone.so.1"), str(tmp_path / "dep.c")], check=True)
    subprocess.run(["gcc", "-shared", "-fPIC", "-o", str(tmp_path / "plugin.so"), str(tmp_path / "plugin.c"),
                    f"-L{lib}", "-l:liblayerhive-gone.so.1"], check=True)
    (lib / "liblayerhive-gone.so.1").unlink()
    missing = missing_libraries(tmp_path / "plugin.so")
    assert missing == ["liblayerhive-gone.so.1"]
    text = describe_missing(missing + ["libxcb-cursor.so.0"], {"ID": "debian"})
    assert "sudo apt-get install libxcb-cursor0" in text and "liblayerhive-gone.so.1: install the package" in text


def test_the_command_fits_the_distribution():
    missing = ["libxcb-cursor.so.0", "libxkbcommon-x11.so.0", "libxcb-icccm.so.4", "libxcb-keysyms.so.1"]
    apt = "sudo apt-get install libxcb-cursor0 libxcb-icccm4 libxcb-keysyms1 libxkbcommon-x11-0"
    dnf = "sudo dnf install libxkbcommon-x11 xcb-util-cursor xcb-util-keysyms xcb-util-wm"
    assert install_commands(missing, {"ID": "ubuntu", "ID_LIKE": "debian"}) == [apt]
    assert install_commands(missing, {"ID": "rocky", "ID_LIKE": "rhel centos fedora"}) == [dnf]
    assert install_commands(missing, {"ID": "gentoo"}) == [apt, dnf], "unknown: both, the person picks"
    assert install_commands(["libunknown.so.3"], {"ID": "debian"}) == []
