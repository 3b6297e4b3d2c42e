"""Builds the installers from this checkout, into dist/:

- `layerhive-install.run` (Linux) and `Layerhive-Install.command` (macOS: the same script; Finder opens
  .command files in Terminal): a shell script that finds a Python >= 3.10 and carries the installer
  (the `installer` package), the Layerhive wheel and the icon as a tar.gz after a marker line;
- `layerhive-install.ps1` (Windows): a PowerShell script that does the same with a base64 zip.

The dependencies (torch for the machine's accelerator, hivemind, Qt, ...) come from the package indexes at install
time. The wheel is built by pip in an isolated build environment that brings the setuptools pyproject.toml asks
for, so any Python >= 3.10 with pip builds it, whatever setuptools (or none) it has.

Usage: python installer/build.py [--out dist]
"""

from __future__ import annotations

import argparse
import base64
import io
import shutil
import subprocess
import sys
import tarfile
import tempfile
import zipfile
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
MARKER = b"__LAYERHIVE_PAYLOAD__\n"
PAYLOAD_MODULES = ("__init__", "__main__", "layout", "recipes", "changes", "progress", "progress_qt", "commands",
                   "torch_source", "syslibs", "processes", "install", "uninstall")
WHEEL_SOURCES = ("pyproject.toml", "README.md", "node", "swarm", "desktop")
ICON = REPO / "assets" / "layerhive.png"

# Finds a Python >= 3.10 with venv and pip, unpacks the payload after the marker line, runs the installer.
SH_LAUNCHER = b"""#!/bin/sh
# Layerhive installer: installs Layerhive for this user (no root needed) and starts it.
# Options: --uninstall, --login-item yes|no, --no-launch, --help (python -m installer --help).
# LAYERHIVE_PYTHON=/path/to/python3 chooses the Python (default: the newest python3.x >= 3.10 on PATH).
say() {  # on the terminal, or in a dialog when double-clicked without one
    echo "$1" >&2
    [ -t 2 ] && return
    if [ "$(uname)" = Darwin ]; then osascript -e "display alert \\"Layerhive\\" message \\"$1\\"" >/dev/null 2>&1
    elif command -v zenity >/dev/null 2>&1; then zenity --error --title=Layerhive --text="$1" 2>/dev/null
    elif command -v kdialog >/dev/null 2>&1; then kdialog --title Layerhive --error "$1" 2>/dev/null
    elif command -v xmessage >/dev/null 2>&1; then xmessage -center "$1" 2>/dev/null
    fi
}
usable() { "$1" -c 'import sys, venv, ensurepip; sys.exit(sys.version_info < (3, 10))' >/dev/null 2>&1; }
PYTHON=
if [ -n "$LAYERHIVE_PYTHON" ]; then
    if ! usable "$LAYERHIVE_PYTHON"; then
        say "LAYERHIVE_PYTHON=$LAYERHIVE_PYTHON is not a Python 3.10 or newer with venv."
        exit 1
    fi
    PYTHON=$LAYERHIVE_PYTHON
else
    for candidate in python3.14 python3.13 python3.12 python3.11 python3.10 python3 python; do
        if usable "$candidate"; then PYTHON=$(command -v "$candidate"); break; fi
    done
fi
if [ -z "$PYTHON" ]; then
    if [ "$(uname)" = Darwin ]; then hint="install it from python.org or with: brew install python"
    elif command -v apt-get >/dev/null 2>&1; then hint="install it with: sudo apt-get install python3 python3-venv"
    elif command -v dnf >/dev/null 2>&1; then hint="install it with: sudo dnf install python3"
    else hint="install it with your package manager"; fi
    say "Layerhive needs Python 3.10 or newer with venv: $hint"
    exit 1
fi
workdir=$(mktemp -d "${TMPDIR:-/tmp}/layerhive-install.XXXXXX") || exit 1
trap 'rm -rf "$workdir"' EXIT
trap 'exit 130' INT TERM
line=$(grep -an '^__LAYERHIVE_PAYLOAD__$' "$0" | head -n 1 | cut -d: -f1)
if ! tail -n +"$((line + 1))" "$0" | tar -xzf - -C "$workdir"; then
    say "This installer file is damaged (its payload does not unpack): download it again."
    exit 1
fi
(cd "$workdir" && "$PYTHON" -m installer "$@")
exit $?
"""

PS1_TEMPLATE = r"""# Layerhive installer for Windows: installs Layerhive for this user (no administrator rights).
# Run it with a right-click > Run with PowerShell, or:
#     powershell -ExecutionPolicy Bypass -File layerhive-install.ps1 [--uninstall] [--login-item yes|no]
$ErrorActionPreference = 'Stop'

function Find-Python {
    foreach ($candidate in @('py -3', 'python', 'python3')) {
        $parts = $candidate.Split(' ')
        try {
            $check = 'import sys, venv; print(sys.version_info >= (3, 10))'
            $answer = & $parts[0] @($parts | Select-Object -Skip 1) -c $check 2>$null
            if ($answer -eq 'True') { return ,$parts }
        } catch { }
    }
    return $null
}

function Say([string] $text) {
    [Console]::Error.WriteLine($text)
    try {
        Add-Type -AssemblyName PresentationFramework
        [void][System.Windows.MessageBox]::Show($text, 'Layerhive')
    } catch { }
}

function Install-Layerhive([string[]] $arguments) {
    $python = Find-Python
    if (-not $python) {
        Say ('Layerhive needs Python 3.10 or newer. Install it with: winget install -e --id Python.Python.3.12 ' +
             '(or from python.org), then run this installer again.')
        return 1
    }
    $work = Join-Path ([IO.Path]::GetTempPath()) ('layerhive-install-' + [Guid]::NewGuid())
    New-Item -ItemType Directory -Path $work | Out-Null
    try {
        $zip = Join-Path $work 'payload.zip'
        [IO.File]::WriteAllBytes($zip, [Convert]::FromBase64String($payload))
        Expand-Archive -Path $zip -DestinationPath $work
        Push-Location $work
        try {
            & $python[0] @($python | Select-Object -Skip 1) -m installer @arguments
            return $LASTEXITCODE
        } finally {
            Pop-Location
        }
    } finally {
        Remove-Item -Recurse -Force $work -ErrorAction SilentlyContinue
    }
}

$payload = @'
__PAYLOAD__
'@

exit (Install-Layerhive $args)
"""


def copy_wheel_sources(dest: Path) -> None:
    """What the wheel is built from, copied: pip builds in the source tree, and a stale build/ there could carry
    modules deleted since."""
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc", "*.egg-info", "build", "dist")
    dest.mkdir(parents=True)
    for name in WHEEL_SOURCES:
        source = REPO / name
        if source.is_dir():
            shutil.copytree(source, dest / name, ignore=ignore)
        else:
            shutil.copy2(source, dest / name)


def build_wheel(out: Path) -> Path:
    """The project's wheel, built by pip in an isolated build environment (see the module docstring)."""
    with tempfile.TemporaryDirectory(prefix="layerhive-wheel-") as scratch:
        source = Path(scratch) / "source"
        copy_wheel_sources(source)
        built = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--disable-pip-version-check",
                                "-w", str(out), str(source)], capture_output=True, text=True, cwd=scratch)
    if built.returncode != 0:
        said = "\n".join((built.stdout + built.stderr).strip().splitlines()[-15:])
        raise SystemExit(f"pip could not build the Layerhive wheel (does this Python have pip? "
                         f"`{sys.executable} -m ensurepip` adds it):\n{said}")
    wheels = sorted(out.glob("layerhive-*.whl"), key=lambda p: p.stat().st_mtime)
    if not wheels:
        raise SystemExit("pip built no layerhive wheel")
    return wheels[-1]


def payload_files(wheel: Path) -> list[tuple[Path, str]]:
    """(file, name in the payload): the installer package, the wheel, the icon."""
    modules = [(REPO / "installer" / f"{name}.py", f"installer/{name}.py") for name in PAYLOAD_MODULES]
    return [*modules, (wheel, wheel.name), (ICON, "layerhive.png")]


def tar_payload(files: list[tuple[Path, str]]) -> bytes:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w:gz") as tar:
        for path, name in files:
            tar.add(path, arcname=name)
    return buffer.getvalue()


def zip_payload(files: list[tuple[Path, str]]) -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", zipfile.ZIP_DEFLATED) as archive:
        for path, name in files:
            archive.write(path, name)
    return buffer.getvalue()


def ps1_installer(zipped: bytes) -> str:
    encoded = base64.b64encode(zipped).decode()
    lines = "\n".join(encoded[i:i + 100] for i in range(0, len(encoded), 100))
    return PS1_TEMPLATE.replace("__PAYLOAD__", lines)


def build(out: Path) -> Path:
    """Writes the three installers into `out`; returns the Linux one."""
    out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="layerhive-build-") as scratch:
        files = payload_files(build_wheel(Path(scratch)))
        unix = SH_LAUNCHER + MARKER + tar_payload(files)
        windows = ps1_installer(zip_payload(files))
    linux, macos = out / "layerhive-install.run", out / "Layerhive-Install.command"
    for target in (linux, macos):
        target.write_bytes(unix)
        target.chmod(0o755)
    (out / "layerhive-install.ps1").write_text(windows, newline="\r\n")  # Windows PowerShell 5 reads CRLF best
    return linux


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=REPO / "dist")
    target = build(parser.parse_args().out)
    for path in sorted(target.parent.glob("*"), key=lambda p: p.name):
        if path.name.lower().startswith("layerhive-install"):
            print(f"{path} ({path.stat().st_size / 1e6:.1f} MB)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
