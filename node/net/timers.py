"""Callbacks at exact moments of the event loop's clock, for emulated network links (tests and benchmarks).

asyncio waits in epoll with a timeout rounded up to the millisecond, so a 20 ms `call_later` fires 20.1-21 ms later:
time a real link does not take, which the emulated WAN ring paid on every leg. On Linux a timerfd, which the loop
watches like a socket, wakes it within ~0.1 ms of the moment. Measured with benchmarks/ring_timeline.py (3 stages,
20 ms legs, medians of 186 tokens, 2-core VM): the three legs took 3.14 ms beyond their delay with asyncio's timers,
1.84-2.29 ms (three runs) with these. Elsewhere (macOS) `call_at` is used as it is.

An idle loop still wakes late, though: 0.27-0.30 ms median after a 20 ms wait on this VM (p90 0.33-0.36 ms), the
thread's wake-up, which a real link does not add (its sender writes at once; only the receiver wakes). So the timer
is armed that much early (the median of the last wake-ups, at most `MAX_LEAD_S`) and the loop spins the rest of the
way to each callback's moment: callbacks still never run early, and a spin is tens of microseconds.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import heapq
import itertools
import os
import statistics
import sys
import time
import weakref
from collections import deque
from collections.abc import Callable

_CLOCK_MONOTONIC = 1  # the clock of time.monotonic(), which asyncio's loop.time() reads
_TFD_NONBLOCK, _TFD_CLOEXEC, _TFD_TIMER_ABSTIME = os.O_NONBLOCK, os.O_CLOEXEC, 1


class _Timespec(ctypes.Structure):
    _fields_ = [("tv_sec", ctypes.c_long), ("tv_nsec", ctypes.c_long)]


class _Itimerspec(ctypes.Structure):
    _fields_ = [("it_interval", _Timespec), ("it_value", _Timespec)]


def _libc() -> ctypes.CDLL | None:
    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.timerfd_create.argtypes = [ctypes.c_int, ctypes.c_int]
        libc.timerfd_settime.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.POINTER(_Itimerspec), ctypes.c_void_p]
        return libc
    except (OSError, AttributeError):
        return None


MAX_LEAD_S = 0.001  # the most a timer is armed early: what the loop may spin for one message


class PreciseTimers:
    """`call_later(delay_s, callback, *args)` on the loop, firing within ~0.1 ms of its moment (on the loop.time()
    clock) if the loop is free then. Callbacks due at the same moment run in the order they were scheduled."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self._heap: list[tuple[float, int, Callable, tuple]] = []
        self._order = itertools.count()
        self._wakeups: deque[float] = deque(maxlen=31)  # how late the last wake-ups came after the armed moment
        self.lead_s = 0.0  # how early the timer is armed: their median, so a busy loop's late wake-up is an outlier
        self._libc = _libc()
        self._fd = self._libc.timerfd_create(_CLOCK_MONOTONIC, _TFD_NONBLOCK | _TFD_CLOEXEC) if self._libc else -1
        self._armed_for: float | None = None
        if self._fd >= 0:
            loop.add_reader(self._fd, self._fire)
            weakref.finalize(loop, os.close, self._fd)  # the loop's selector forgets it when the loop closes

    def call_later(self, delay_s: float, callback: Callable, *args) -> None:
        loop = asyncio.get_running_loop()
        when = loop.time() + delay_s
        if self._fd < 0:
            loop.call_at(when, callback, *args)
            return
        heapq.heappush(self._heap, (when, next(self._order), callback, args))
        if self._armed_for is None or when - self.lead_s < self._armed_for:
            self._arm(when - self.lead_s)

    def _arm(self, when: float) -> None:
        seconds, fraction = divmod(max(when, 1e-9), 1.0)  # an all-zero time would disarm the timer
        spec = _Itimerspec(_Timespec(0, 0), _Timespec(int(seconds), int(fraction * 1e9)))
        if self._libc.timerfd_settime(self._fd, _TFD_TIMER_ABSTIME, ctypes.byref(spec), None) != 0:
            raise OSError(ctypes.get_errno(), "timerfd_settime failed")
        self._armed_for = when

    def _fire(self) -> None:
        with contextlib.suppress(BlockingIOError):  # woken for a moment re-armed since
            os.read(self._fd, 8)
        loop = asyncio.get_running_loop()
        if self._armed_for is not None:
            self._wakeups.append(loop.time() - self._armed_for)
            self.lead_s = min(MAX_LEAD_S, max(0.0, statistics.median(self._wakeups)))
        self._armed_for = None
        while self._heap and self._heap[0][0] <= loop.time() + self.lead_s:
            when, _, callback, args = heapq.heappop(self._heap)
            while time.monotonic() < when:  # loop.time() reads this clock; a spin of at most `lead_s`
                pass
            try:  # now, not at the loop's next turn (another 35-100 us here)
                callback(*args)
            except Exception as e:  # as call_at would: a failing callback is the loop's to report
                loop.call_exception_handler({"message": f"timer callback {callback!r} failed", "exception": e})
        if self._heap:
            self._arm(self._heap[0][0] - self.lead_s)


_per_loop: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, PreciseTimers] = weakref.WeakKeyDictionary()


def precise_timers() -> PreciseTimers:
    """The running loop's timers."""
    loop = asyncio.get_running_loop()
    if (timers := _per_loop.get(loop)) is None:
        timers = _per_loop[loop] = PreciseTimers(loop)
    return timers


def call_later_precisely(delay_s: float, callback: Callable, *args) -> None:
    """`loop.call_later` on the running loop, to ~0.1 ms rather than to the millisecond (see the module docstring)."""
    precise_timers().call_later(delay_s, callback, *args)
