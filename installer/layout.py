"""Where Layerhive goes on each platform, for one user: the one description the installer, the uninstaller and
the macOS and Windows recipes (installer/recipes.py) all read.

Standard library only (it runs before anything is installed). `layout_for("linux" | "darwin" | "win32", env)`
works on any machine, so the macOS and Windows layouts are generated and checked on Linux too.

Three kinds of paths:
- the program (`root` with its venv, menu entry, icon, login item, logs): the uninstaller always removes them;
- the user's data (settings, the node's identity key, downloaded models, chat history): removed only when the
  user says so, and named when kept;
- caches shared with other programs (the Hugging Face hub cache): never removed, named if present.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import PurePath, PurePosixPath, PureWindowsPath


@dataclass(frozen=True)
class App:
    """What the app is called and how it starts, wherever it is installed."""

    id: str = "layerhive"
    name: str = "Layerhive"
    comment: str = "Lend your computer to a swarm that serves language models, and chat through it"
    bundle_id: str = "org.layerhive.Layerhive"  # macOS bundle and launchd label
    gui_script: str = "layerhive-app"  # the wheel's [project.gui-scripts] entry
    # The app's own names for its data (desktop/settings.py's QSettings, node/net/identity.py's keyring service,
    # node/model/checkpoint.py's layerhive_home and the identity desktop/app.py uses).
    qt_org: str = "Layerhive"
    qt_app: str = "Layerhive"
    keyring_service: str = "layerhive"
    identity: str = "desktop"
    home_env: str = "LAYERHIVE_HOME"


APP = App()


@dataclass(frozen=True)
class UserData:
    label: str  # what it is, in words for the user
    path: PurePath | None = None  # a file or directory
    registry_key: str | None = None  # Windows: a key under HKEY_CURRENT_USER
    keyring_entry: tuple[str, str] | None = None  # (service, name) in the OS keyring


@dataclass(frozen=True)
class Layout:
    platform: str  # "linux", "darwin" or "win32"
    root: PurePath  # the program: its venv and anything else only the installer writes
    state: PurePath  # the installer's and the app's logs
    menu_entry: PurePath  # .desktop file, .app bundle or Start-menu shortcut
    login_item: PurePath | None  # autostart .desktop, LaunchAgent plist; None on Windows (a Run-key value)
    icon: PurePath
    program_caches: tuple[PurePath, ...]  # the app's own caches and logs outside `state`: removed with it
    user_data: tuple[UserData, ...]
    shared_caches: tuple[PurePath, ...]

    @property
    def venv(self) -> PurePath:
        return self.root / "venv"

    @property
    def bin(self) -> PurePath:
        return self.venv / ("Scripts" if self.platform == "win32" else "bin")

    @property
    def python(self) -> PurePath:
        return self.bin / ("python.exe" if self.platform == "win32" else "python")

    @property
    def app_executable(self) -> PurePath:
        return self.bin / (f"{APP.gui_script}.exe" if self.platform == "win32" else APP.gui_script)

    @property
    def manifest(self) -> PurePath:
        """What an install added (recipes.Manifest), so the uninstaller removes exactly that."""
        return self.root / "manifest.json"

    @property
    def install_log(self) -> PurePath:
        return self.state / "install.log"

    @property
    def launch_log(self) -> PurePath:
        return self.state / "launch.log"


def platform_key(platform: str) -> str:
    """sys.platform's value reduced to the three layouts."""
    if platform.startswith("linux") or platform.startswith("freebsd"):
        return "linux"
    if platform in ("darwin", "win32"):
        return platform
    raise ValueError(f"no layout for platform {platform!r}")


def layout_for(platform: str, env: Mapping[str, str]) -> Layout:
    """The layout for the user whose environment is `env` (HOME / USERPROFILE and the platform's variables)."""
    key = platform_key(platform)
    return {"linux": _linux, "darwin": _macos, "win32": _windows}[key](env)


def _home(env: Mapping[str, str], pure: type[PurePath]) -> PurePath:
    home = env.get("USERPROFILE" if pure is PureWindowsPath else "HOME")
    if not home:
        raise ValueError("no home directory in the environment")
    return pure(home)


def _app_home(env: Mapping[str, str], home: PurePath) -> PurePath:
    """node.model.checkpoint.layerhive_home(): identity files, converted models, the bench cache, config.json."""
    given = env.get(APP.home_env)
    return type(home)(given) if given else home / ".cache" / APP.id


def _identity() -> UserData:
    """The node's identity key when held by the OS keyring (else it is a file in the app's home, listed apart)."""
    return UserData("this computer's node identity, in the keyring",
                    keyring_entry=(APP.keyring_service, APP.identity))


def _xdg(env: Mapping[str, str], variable: str, home: PurePath, *default: str) -> PurePath:
    value = env.get(variable)
    return PurePosixPath(value) if value and value.startswith("/") else home.joinpath(*default)


def _linux(env: Mapping[str, str]) -> Layout:
    home = _home(env, PurePosixPath)
    data = _xdg(env, "XDG_DATA_HOME", home, ".local", "share")
    config = _xdg(env, "XDG_CONFIG_HOME", home, ".config")
    state = _xdg(env, "XDG_STATE_HOME", home, ".local", "state")
    cache = _xdg(env, "XDG_CACHE_HOME", home, ".cache")
    return Layout(
        platform="linux",
        root=data / APP.id,
        state=state / APP.id,
        menu_entry=data / "applications" / f"{APP.id}.desktop",
        login_item=config / "autostart" / f"{APP.id}.desktop",
        icon=data / "icons" / "hicolor" / "256x256" / "apps" / f"{APP.id}.png",
        program_caches=(cache / APP.qt_org, state / APP.qt_org),  # Qt's CacheLocation and StateLocation
        user_data=(
            UserData("settings", config / APP.qt_org),
            UserData("chats and other app data", data / APP.qt_org),
            UserData("downloaded models, network config and identity files", _app_home(env, home)),
            _identity(),
        ),
        shared_caches=(cache / "huggingface",),
    )


def _macos(env: Mapping[str, str]) -> Layout:
    home = _home(env, PurePosixPath)
    library = home / "Library"
    support = library / "Application Support" / APP.name  # Qt's app data is its sibling .../Layerhive/Layerhive
    return Layout(
        platform="darwin",
        root=support / "app",
        state=library / "Logs" / APP.name,
        menu_entry=home / "Applications" / f"{APP.name}.app",
        login_item=library / "LaunchAgents" / f"{APP.bundle_id}.plist",
        icon=home / "Applications" / f"{APP.name}.app" / "Contents" / "Resources" / f"{APP.id}.icns",
        program_caches=(library / "Caches" / APP.qt_org,),
        user_data=(
            UserData("settings", library / "Preferences" / f"com.{APP.qt_org.lower()}.{APP.qt_app}.plist"),
            UserData("chats and other app data", support / APP.qt_app),
            UserData("downloaded models, network config and identity files", _app_home(env, home)),
            _identity(),
        ),
        shared_caches=(home / ".cache" / "huggingface",),
    )


def _windows(env: Mapping[str, str]) -> Layout:
    home = _home(env, PureWindowsPath)
    local = PureWindowsPath(env.get("LOCALAPPDATA") or home / "AppData" / "Local")
    roaming = PureWindowsPath(env.get("APPDATA") or home / "AppData" / "Roaming")
    programs = roaming / "Microsoft" / "Windows" / "Start Menu" / "Programs"
    return Layout(
        platform="win32",
        root=local / APP.name / "app",
        state=local / APP.name / "logs",
        menu_entry=programs / f"{APP.name}.lnk",
        login_item=None,
        icon=local / APP.name / "app" / f"{APP.id}.ico",
        program_caches=(local / APP.qt_org / "cache",),
        user_data=(
            UserData("settings", registry_key=f"Software\\{APP.qt_org}"),
            UserData("chats and other app data", roaming / APP.qt_org),
            UserData("downloaded models, network config and identity files", _app_home(env, home)),
            _identity(),
        ),
        shared_caches=(home / ".cache" / "huggingface",),
    )

