"""What a person waits for, from the installer file to the first answer, in an empty home directory.

- build: `installer/build.py` (the wheel in an isolated build environment, the three installer files);
- install: the installer with `--offline --system-site-packages` (the wheel only; torch, Qt and the rest come from
  this Python), against a baseline measured in the same run: the same two steps by hand (`python -m venv` and
  `pip install --no-deps` of the wheel), so the ratio is the installer's own cost (stopping a running app, the
  checks, the menu entries, the manifest);
- `--full`: a real install from this machine's pip settings (torch and every dependency downloaded), its time
  and the size of what it installed; with `--torch-wheels DIR`, a second one whose torch index is a local mirror
  of DIR's +cpu wheels (the path a machine that reaches download.pytorch.org takes);
- the installed app: `layerhive-app --self-test` (headless), the time from launch to the first window, to serving
  and to the answer. With the tiny test model, and with `--embedded` the default model: first launch in an empty
  home (fetching and converting the model), then a second launch (the model cached).

Medians over --repeat runs.
Usage: python benchmarks/installer_times.py [--repeat 3] [--embedded] [--full [--torch-wheels /opt/wheels]]
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path
from urllib.parse import quote

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from installer.build import MARKER, build  # noqa: E402
from installer.layout import layout_for  # noqa: E402
from tests.conftest import build_tiny_checkpoint  # noqa: E402
from tests.installer.conftest import http_server, run_installer, user_env  # noqa: E402

OFFLINE = ("--offline", "--system-site-packages", "--no-launch", "--login-item", "no")
Rows = dict[str, list[float]]


def size_mb(path: Path) -> float:
    return sum(p.lstat().st_size for p in path.rglob("*") if p.is_file() or p.is_symlink()) / 1e6


def timed(run) -> float:
    began = time.perf_counter()
    run()
    return time.perf_counter() - began


def checked(done: subprocess.CompletedProcess) -> subprocess.CompletedProcess:
    if done.returncode != 0:
        raise SystemExit(f"failed ({done.returncode}):\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}")
    return done


def by_hand(home: Path, wheel: Path) -> None:
    """The baseline: the environment and the wheel, with nothing else."""
    venv = home / "venv"
    checked(subprocess.run([sys.executable, "-m", "venv", "--system-site-packages", str(venv)], capture_output=True,
                           text=True))
    checked(subprocess.run([str(venv / "bin" / "python"), "-m", "pip", "install", "--no-deps", "--no-index",
                            str(wheel)], capture_output=True, text=True))


def self_test(app: Path, env: dict[str, str], model: str) -> dict[str, float]:
    done = checked(subprocess.run([str(app), "--self-test", "--model", model], capture_output=True, text=True,
                                  env={**env, "QT_QPA_PLATFORM": "offscreen"}, timeout=1800))
    report = json.loads([line for line in done.stdout.splitlines() if line.startswith("{")][-1])
    return dict(report["timings"])  # seconds from launch to first window, serving, answered


def offline_runs(rows: Rows, installer: Path, work: Path, repeat: int) -> None:
    """The installer against the same steps by hand; the installed app's self-test with the tiny model."""
    unpacked = work / "payload"
    unpacked.mkdir()
    subprocess.run(["tar", "-xzf", "-", "-C", str(unpacked)], input=installer.read_bytes().partition(MARKER)[2],
                   check=True)
    wheel = next(unpacked.glob("layerhive-*.whl"))
    model = str(build_tiny_checkpoint(work / "tiny", "llama", 6))
    for run in range(repeat):
        hand = work / f"hand{run}"
        rows.setdefault("baseline: venv + pip install wheel (s)", []).append(timed(lambda h=hand: by_hand(h, wheel)))
        env, layout = empty_home(work / f"home{run}")
        rows.setdefault("install --offline (s)", []).append(
            timed(lambda e=env: checked(run_installer(installer, e, *OFFLINE))))
        rows.setdefault("install --offline, size (MB)", []).append(size_mb(Path(layout.root)))
        for key, value in self_test(Path(layout.app_executable), env, model).items():
            rows.setdefault(f"tiny model: launch to {key} (s)", []).append(value)
        rows.setdefault("uninstall (s)", []).append(timed(lambda e=env: checked(
            run_installer(installer, e, "--uninstall", "--remove-data", "yes"))))


def embedded_runs(rows: Rows, installer: Path, work: Path) -> None:
    """The default model: the first launch in an empty home fetches and converts it, the second finds it."""
    env, layout = empty_home(work / "home-embedded")
    checked(run_installer(installer, env, *OFFLINE))
    for launch in ("first", "second"):
        for key, value in self_test(Path(layout.app_executable), env, "smollm2-135m").items():
            rows.setdefault(f"SmolLM2, {launch} launch: to {key} (s)", []).append(value)


def full_run(rows: Rows, installer: Path, work: Path, name: str, **env_extra: str) -> None:
    env, layout = empty_home(work / f"home-{name.split()[0]}")
    rows[f"full install, {name} (s)"] = [timed(lambda: checked(run_installer(
        installer, {**env, **env_extra}, "--no-launch", "--login-item", "no", timeout=3600)))]
    rows[f"full install, {name}, size (MB)"] = [size_mb(Path(layout.root))]
    torch = re.findall(r"Successfully installed .*?(torch-\S+)", Path(layout.install_log).read_text())
    print(f"{name}: installed {torch}", flush=True)


@contextmanager
def torch_index_mirror(wheels: Path, work: Path):
    """torch's index layout (cpu/torch/) served on 127.0.0.1 from the +cpu wheels in `wheels`."""
    listing = work / "torch-index" / "cpu" / "torch"
    listing.mkdir(parents=True)
    links = []
    for wheel in sorted(wheels.glob("torch-*+cpu-*.whl")):
        (listing / wheel.name).symlink_to(wheel)
        links.append(f'<a href="{quote(wheel.name)}">{wheel.name}</a>')
    (listing / "index.html").write_text("<html><body>" + "\n".join(links))
    with http_server(work / "torch-index") as url:
        yield url


def empty_home(home: Path):
    home.mkdir()
    return user_env(home), layout_for("linux", {"HOME": str(home)})


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeat", type=int, default=1)
    parser.add_argument("--embedded", action="store_true", help="also the default model's first and second launch")
    parser.add_argument("--full", action="store_true", help="also a real install with downloads (minutes, GBs)")
    parser.add_argument("--torch-wheels", type=Path, default=None,
                        help="with --full: also an install whose torch index is a local mirror of these +cpu wheels")
    args = parser.parse_args()
    rows: Rows = {}
    work = Path(tempfile.mkdtemp(prefix="layerhive-installer-bench-"))
    try:
        dist = work / "dist"
        rows["build installer files (s)"] = [timed(lambda: build(dist))]
        installer = dist / "layerhive-install.run"
        rows["installer file (MB)"] = [installer.stat().st_size / 1e6]
        offline_runs(rows, installer, work, args.repeat)
        if args.embedded:
            embedded_runs(rows, installer, work)
        if args.full:
            full_run(rows, installer, work, "from this machine's pip settings")
        if args.full and args.torch_wheels:
            with torch_index_mirror(args.torch_wheels, work) as mirror:
                full_run(rows, installer, work, "torch from its (mirrored) CPU index", LAYERHIVE_TORCH_INDEX=mirror)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    print(f"{'':60} {'median':>9}  runs")
    for name, values in rows.items():
        print(f"{name:60} {statistics.median(values):9.2f}  {len(values)}")
    hand, offline = rows["baseline: venv + pip install wheel (s)"], rows["install --offline (s)"]
    print(f"installer / by hand: {statistics.median(offline) / statistics.median(hand):.2f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
