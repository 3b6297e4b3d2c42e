"""What the machine reports now, for desktop.policy: seconds since the last input, battery, GPU temperature.

Each reading is best effort and answers None when this machine or desktop cannot tell (a desktop PC
has no battery, a machine without an NVIDIA driver has no NVML, Wayland does not tell other programs
about input), so the rule that needs it is skipped rather than the app failing.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging
import os
import subprocess
import sys
from datetime import datetime

import psutil

from desktop.policy import Conditions

logger = logging.getLogger(__name__)


def read_conditions() -> Conditions:
    return Conditions(now=datetime.now(), idle_s=idle_seconds(), on_battery=on_battery(), gpu_temp_c=gpu_temperature())


def on_battery() -> bool | None:
    try:
        battery = psutil.sensors_battery()
    except Exception:  # not implemented on this platform
        return None
    return None if battery is None or battery.power_plugged is None else not battery.power_plugged


class _Nvml:
    """NVML, initialised once; unavailable (no driver, no GPU) is remembered rather than retried each tick."""

    available: bool | None = None

    @classmethod
    def hottest(cls) -> float | None:
        if cls.available is False:
            return None
        try:
            import pynvml

            if cls.available is None:
                pynvml.nvmlInit()
                cls.available = True
            count = pynvml.nvmlDeviceGetCount()
            temperatures = [pynvml.nvmlDeviceGetTemperature(pynvml.nvmlDeviceGetHandleByIndex(i),
                                                            pynvml.NVML_TEMPERATURE_GPU) for i in range(count)]
            return float(max(temperatures)) if temperatures else None
        except Exception as e:
            if cls.available is None:
                logger.info("no GPU temperature: %s", e)
            cls.available = False
            return None


def gpu_temperature() -> float | None:
    """The hottest NVIDIA GPU's temperature in °C; None without NVML (no driver or no GPU)."""
    return _Nvml.hottest()


def idle_seconds() -> float | None:
    """Seconds since the last keyboard or mouse input in this session; None where the desktop cannot tell."""
    try:
        if sys.platform == "win32":
            return _windows_idle()
        if sys.platform == "darwin":
            return _macos_idle()
        if os.environ.get("DISPLAY") and not os.environ.get("WAYLAND_DISPLAY"):
            return _x11_idle()
    except Exception as e:
        logger.debug("idle time unavailable: %s", e)
    return None


class _XScreenSaverInfo(ctypes.Structure):
    _fields_ = [("window", ctypes.c_ulong), ("state", ctypes.c_int), ("kind", ctypes.c_int),
                ("til_or_since", ctypes.c_ulong), ("idle", ctypes.c_ulong), ("eventMask", ctypes.c_ulong)]


class _X11:
    """One display connection for the process: opening a connection counts as activity on some X servers
    (Xvfb does it), so a fresh one per reading would always find the machine just used."""

    display: int | None = None
    functions: tuple | None = None

    @classmethod
    def idle(cls) -> float | None:
        if cls.functions is None:
            xlib_name, xss_name = ctypes.util.find_library("X11"), ctypes.util.find_library("Xss")
            if not xlib_name or not xss_name:
                return None
            xlib, xss = ctypes.cdll.LoadLibrary(xlib_name), ctypes.cdll.LoadLibrary(xss_name)
            xlib.XOpenDisplay.restype = ctypes.c_void_p
            xlib.XOpenDisplay.argtypes = [ctypes.c_char_p]
            xlib.XDefaultRootWindow.restype = ctypes.c_ulong
            xlib.XDefaultRootWindow.argtypes = [ctypes.c_void_p]
            xss.XScreenSaverAllocInfo.restype = ctypes.POINTER(_XScreenSaverInfo)
            xss.XScreenSaverQueryInfo.argtypes = [ctypes.c_void_p, ctypes.c_ulong, ctypes.POINTER(_XScreenSaverInfo)]
            cls.functions = (xlib, xss, xss.XScreenSaverAllocInfo())
        xlib, xss, info = cls.functions
        if cls.display is None:
            cls.display = xlib.XOpenDisplay(None)
            if not cls.display:
                cls.display = None
                return None
        if not xss.XScreenSaverQueryInfo(cls.display, xlib.XDefaultRootWindow(cls.display), info):
            return None  # the server has no MIT-SCREEN-SAVER extension
        return info.contents.idle / 1000.0


def _x11_idle() -> float | None:
    return _X11.idle()


def _windows_idle() -> float | None:
    class LastInputInfo(ctypes.Structure):
        _fields_ = [("cbSize", ctypes.c_uint), ("dwTime", ctypes.c_uint)]

    info = LastInputInfo(ctypes.sizeof(LastInputInfo), 0)
    if not ctypes.windll.user32.GetLastInputInfo(ctypes.byref(info)):  # type: ignore[attr-defined]
        return None
    return ((ctypes.windll.kernel32.GetTickCount() - info.dwTime) & 0xFFFFFFFF) / 1000.0  # type: ignore[attr-defined]


def _macos_idle() -> float | None:
    out = subprocess.run(["ioreg", "-c", "IOHIDSystem", "-d", "4"], capture_output=True, text=True, timeout=5).stdout
    for line in out.splitlines():
        if "HIDIdleTime" in line:
            return int(line.rsplit("=", 1)[1].strip()) / 1e9
    return None
