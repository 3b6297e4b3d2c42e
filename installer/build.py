"""Builds the Linux installer: one self-extracting file, `dist/layerhive-install.run`, that a contributor
double-clicks (or runs). It carries the Layerhive wheel, `install.py` and the icon; the dependencies
(torch for the machine's accelerator, hivemind, Qt, ...) come from the package indexes at install time.

Usage: python installer/build.py [--out dist]
"""

from __future__ import annotations

import argparse
import io
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
MARKER = b"__LAYERHIVE_PAYLOAD__\n"

# Unpacks the payload after the marker line to a temporary directory and runs install.py from there.
LAUNCHER = b"""#!/bin/sh
# Layerhive installer: installs Layerhive for this user (no root needed) and starts it.
# Options: --uninstall, --no-launch (see install.py --help).
set -e
for candidate in python3.13 python3.12 python3.11 python3.10 python3; do
    if "$candidate" -c 'import sys, venv; sys.exit(sys.version_info < (3, 10))' >/dev/null 2>&1; then
        PYTHON="$candidate"; break
    fi
done
if [ -z "$PYTHON" ]; then
    echo "Layerhive needs Python 3.10 or newer with venv (e.g. apt install python3 python3-venv)." >&2
    exit 1
fi
workdir=$(mktemp -d)
trap 'rm -rf "$workdir"' EXIT
line=$(grep -an '^__LAYERHIVE_PAYLOAD__$' "$0" | cut -d: -f1)
tail -n +"$((line + 1))" "$0" | tar -xz -C "$workdir"
"$PYTHON" "$workdir/install.py" "$@"
exit $?
"""


def build_wheel(out: Path) -> Path:
    """The project's wheel, built from this checkout (no build isolation: setuptools is already here)."""
    with tempfile.TemporaryDirectory() as scratch:
        subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q",
                        "-w", str(out), str(REPO)], check=True, cwd=scratch)
    wheels = sorted(out.glob("layerhive-*.whl"), key=lambda p: p.stat().st_mtime)
    if not wheels:
        raise SystemExit("pip built no layerhive wheel")
    return wheels[-1]


def build(out: Path) -> Path:
    out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as scratch:
        wheel = build_wheel(Path(scratch))
        payload = io.BytesIO()
        with tarfile.open(fileobj=payload, mode="w:gz") as tar:
            tar.add(REPO / "installer" / "install.py", arcname="install.py")
            tar.add(REPO / "assets" / "layerhive.png", arcname="layerhive.png")
            tar.add(wheel, arcname=wheel.name)
    target = out / "layerhive-install.run"
    target.write_bytes(LAUNCHER + MARKER + payload.getvalue())
    target.chmod(0o755)
    return target


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=REPO / "dist")
    target = build(parser.parse_args().out)
    print(f"{target} ({target.stat().st_size / 1e6:.1f} MB)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
