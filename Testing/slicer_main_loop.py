"""A stand-in for 3D Slicer's main thread, for tests and benchmarks of the module's background runs.

In Slicer the main thread holds Python's GIL all the time: Slicer, CTK and PythonQt never release
it around the Qt event loop (no ``PyEval_SaveThread`` in Slicer 5.10/5.12), so while the event
loop waits or renders in C++, no Python thread can run; a worker thread only gets the GIL while
the main thread executes Python (the interpreter hands it over every ``sys.getswitchinterval()``)
or calls something that releases it. :class:`MainLoop` reproduces that: between two timer ticks
the thread waits in C *with the GIL held* (a ``ctypes.PyDLL`` call, which does not release it) and
runs some Python, as slots and observers do; at each tick it calls the module's poll function.
``busy=False`` is the comparison: an idle main thread that sleeps (GIL released) between ticks.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import sys
import threading
import time
from typing import Callable


def _gil_holding_sleep() -> Callable[[float], None]:
    if sys.platform == "win32":
        sleep = ctypes.PyDLL("kernel32").Sleep  # PyDLL: the call keeps the GIL
        return lambda seconds: sleep(int(seconds * 1000))
    libc = ctypes.PyDLL(ctypes.util.find_library("c"))
    usleep = libc.usleep
    usleep.argtypes = [ctypes.c_uint]
    return lambda seconds: usleep(int(seconds * 1e6))


hold_gil = _gil_holding_sleep()


def _run_python(seconds: float) -> None:
    end = time.perf_counter() + seconds
    total = 0
    while time.perf_counter() < end:
        total += sum(i * i for i in range(200))


def starvation(seconds: float = 0.3) -> float:
    """How much a Python worker thread gets done while the main thread waits with the GIL held,
    relative to while it sleeps (GIL released): ~0 when :func:`hold_gil` starves threads as
    Slicer's main thread does (the worker runs at most one switch interval after the call starts)."""
    count, stop = [0], threading.Event()

    def worker():
        while not stop.is_set():
            count[0] += 1

    thread = threading.Thread(target=worker, daemon=True)
    thread.start()
    while count[0] == 0:
        time.sleep(0.001)
    progress = []
    for wait in (time.sleep, hold_gil):
        before = count[0]
        wait(seconds)
        progress.append(count[0] - before)
    stop.set()
    thread.join()
    return progress[1] / max(1, progress[0])


class MainLoop:
    """Call ``on_tick`` every ``tick`` seconds (the module's ``QTimer``) until ``done()``.

    ``busy``: between ticks, hold the GIL in C for ``tick`` seconds and run ``python_share`` of that
    time as Python (Slicer's main thread); else sleep with the GIL released (an idle reference).
    """

    def __init__(self, tick: float = 0.2, busy: bool = True, python_share: float = 0.05) -> None:
        self.tick, self.busy, self.python_share = tick, busy, python_share

    def run_until(self, done: Callable[[], bool], on_tick: Callable[[], None], timeout: float = 600.0) -> float:
        """Run until ``done()``; returns the seconds it took."""
        started = time.perf_counter()
        while True:
            on_tick()
            if done():
                return time.perf_counter() - started
            if time.perf_counter() - started > timeout:
                raise TimeoutError(f"not done within {timeout} s")
            if self.busy:
                hold_gil(self.tick * (1.0 - self.python_share))
                _run_python(self.tick * self.python_share)
            else:
                time.sleep(self.tick)
