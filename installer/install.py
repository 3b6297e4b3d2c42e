"""Installs Layerhive for the current user, from a wheel that sits next to this file (see build.py).

Standard library only: this runs before anything else is installed. It

1. makes a virtual environment in the user's data directory (nothing goes system-wide, no root needed),
2. installs torch for this machine's accelerator (CUDA when `nvidia-smi` answers, the CPU build otherwise;
   on macOS PyPI's build, which has MPS), then the Layerhive wheel with its dependencies,
3. adds a menu entry and a login item, so the tray app starts with the session, and
4. starts the tray app.

`--uninstall` removes all of it (the model cache in ~/.cache stays: it can be large and is shared).
"""

from __future__ import annotations

import argparse
import glob
import os
import shutil
import subprocess
import sys
import venv
from pathlib import Path

APP_ID = "layerhive"
HERE = Path(__file__).resolve().parent
TORCH_INDEXES = {"cuda": "https://download.pytorch.org/whl/cu126", "cpu": "https://download.pytorch.org/whl/cpu"}


def data_home() -> Path:
    return Path(os.environ.get("XDG_DATA_HOME") or Path.home() / ".local" / "share")


def config_home() -> Path:
    return Path(os.environ.get("XDG_CONFIG_HOME") or Path.home() / ".config")


def install_dir() -> Path:
    return data_home() / APP_ID


def venv_bin(root: Path) -> Path:
    return root / "venv" / ("Scripts" if os.name == "nt" else "bin")


def accelerator() -> str:
    """Which torch build this machine wants: 'cuda', 'mps' (macOS: PyPI's default build) or 'cpu'."""
    if sys.platform == "darwin":
        return "mps"
    if shutil.which("nvidia-smi"):
        try:
            subprocess.run(["nvidia-smi", "-L"], check=True, capture_output=True, timeout=20)
            return "cuda"
        except (subprocess.SubprocessError, OSError):
            pass
    return "cpu"


def desktop_entry(exec_path: Path, icon_path: Path, *, autostart: bool) -> str:
    lines = [
        "[Desktop Entry]", "Type=Application", "Name=Layerhive",
        "Comment=Lend your GPU to a swarm that serves language models, and chat through it",
        f"Exec={exec_path}", f"Icon={icon_path}", "Terminal=false", "Categories=Network;Utility;",
        "StartupNotify=false",
    ]
    if autostart:
        lines.append("X-GNOME-Autostart-enabled=true")
    return "\n".join(lines) + "\n"


def entry_paths() -> tuple[Path, Path, Path]:
    """(menu entry, login item, icon)."""
    return (data_home() / "applications" / f"{APP_ID}.desktop",
            config_home() / "autostart" / f"{APP_ID}.desktop",
            data_home() / "icons" / "hicolor" / "256x256" / "apps" / f"{APP_ID}.png")


def run(command: list[str]) -> None:
    print("+", " ".join(map(str, command)), flush=True)
    subprocess.run(command, check=True)


def install(args: argparse.Namespace) -> Path:
    wheels = sorted(glob.glob(str(HERE / "layerhive-*.whl")))
    if not wheels:
        raise SystemExit(f"no layerhive wheel next to {__file__}: build the installer with installer/build.py")
    root = install_dir()
    print(f"Installing Layerhive into {root}")
    venv.EnvBuilder(with_pip=True, clear=True, system_site_packages=args.system_site_packages).create(root / "venv")
    python = venv_bin(root) / ("python.exe" if os.name == "nt" else "python")
    pip = [str(python), "-m", "pip", "install", "--disable-pip-version-check"]
    if args.offline:  # dependencies must be there already (the tests: a venv over the system's packages)
        run([*pip, "--no-deps", "--no-index", wheels[-1]])
    else:
        kind = accelerator()
        print(f"torch build: {kind}")
        run([*pip, "torch", *(["--index-url", TORCH_INDEXES[kind]] if kind in TORCH_INDEXES else [])])
        run([*pip, wheels[-1]])
    app = venv_bin(root) / ("layerhive-app.exe" if os.name == "nt" else "layerhive-app")
    if os.name != "nt":
        menu, login, icon = entry_paths()
        for path in (menu, login, icon):
            path.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(HERE / "layerhive.png", icon)
        menu.write_text(desktop_entry(app, icon, autostart=False))
        login.write_text(desktop_entry(app, icon, autostart=True))
        print(f"Added {menu} and the login item {login}")
    return app


def uninstall() -> None:
    for path in entry_paths():
        path.unlink(missing_ok=True)
    shutil.rmtree(install_dir(), ignore_errors=True)
    print("Layerhive is uninstalled (downloaded model shards stay in ~/.cache/layerhive and ~/.cache/huggingface).")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--uninstall", action="store_true")
    parser.add_argument("--no-launch", action="store_true", help="do not start the tray app afterwards")
    parser.add_argument("--offline", action="store_true",
                        help="install only the wheel; its dependencies must already be importable (see next)")
    parser.add_argument("--system-site-packages", action="store_true",
                        help="let the environment see the system's packages (e.g. a torch already installed)")
    args = parser.parse_args(argv)
    if args.uninstall:
        uninstall()
        return 0
    app = install(args)
    if not args.no_launch:
        subprocess.Popen([str(app)], start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        print("Layerhive is starting: look for the amber honeycomb in your tray.")
    return 0


if __name__ == "__main__":
    sys.exit(main())
