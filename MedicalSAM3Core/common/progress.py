"""The progress and cancellation protocol shared by the CLI, the server and the Slicer module.

The engine calls ``progress(ProgressEvent)`` after every batch of slices and checks
``cancel.raise_if_cancelled()`` before every batch, so a cancel takes effect within one batch.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass
from typing import Callable, Optional

from .errors import Cancelled


@dataclass(frozen=True)
class ProgressEvent:
    """One progress report.

    ``done``/``total`` count slice visits across all stages of the job (a volume segmented in
    ``propagate`` mode visits some slices more than once), ``stage`` says what is running.
    """

    done: int
    total: int
    stage: str
    #: seconds still to go, estimated from the time the work done so far took (None: not known yet)
    eta_s: Optional[float] = None

    @property
    def fraction(self) -> float:
        return 0.0 if self.total <= 0 else min(1.0, self.done / self.total)


ProgressCallback = Callable[[ProgressEvent], None]


class CancelToken:
    """Thread-safe cancellation flag. ``cancel()`` from any thread; the engine polls it."""

    def __init__(self) -> None:
        self._event = threading.Event()

    def cancel(self) -> None:
        self._event.set()

    @property
    def cancelled(self) -> bool:
        return self._event.is_set()

    def raise_if_cancelled(self) -> None:
        if self._event.is_set():
            raise Cancelled("segmentation cancelled")


def _now() -> float:
    return time.monotonic()


class ProgressTracker:
    """Counts work units for one job and forwards them to an optional callback."""

    def __init__(self, total: int, callback: Optional[ProgressCallback] = None,
                 cancel: Optional[CancelToken] = None, clock: Optional[Callable[[], float]] = None) -> None:
        self.total = total
        self.done = 0
        #: the total to estimate the time left with while :attr:`total` is still growing (propagate
        #: mode counts its tracking sweeps only once it has probed where they start); None: :attr:`total`
        self.eta_total: Optional[int] = None
        self._callback = callback
        self._cancel = cancel
        self._clock = clock or _now
        self._started = self._clock()

    def check(self) -> None:
        if self._cancel is not None:
            self._cancel.raise_if_cancelled()

    def eta_s(self) -> Optional[float]:
        """Seconds still to go at the pace of the work done so far (None before any is done)."""
        total = self.eta_total if self.eta_total is not None else self.total
        if self.done <= 0 or total <= 0:
            return None
        return max(0.0, (self._clock() - self._started) / self.done * max(0, total - self.done))

    def advance(self, n: int, stage: str) -> None:
        self.done += n
        if self._callback is not None:
            self._callback(ProgressEvent(self.done, self.total, stage, self.eta_s()))


#: A run estimated to take longer than this (seconds) is worth a question before it goes on.
LONG_RUN_S = 600.0


def format_duration(seconds: float) -> str:
    """``3 h 10 min``, ``12 min``, ``40 s`` (rounded as a person would say it)."""
    seconds = max(0.0, float(seconds))
    if seconds < 60:
        return f"{max(1, round(seconds / 5) * 5 if seconds >= 10 else round(seconds))} s"
    minutes = round(seconds / 60)
    if minutes < 60:
        return f"{minutes} min"
    hours, minutes = divmod(minutes, 60)
    return f"{hours} h {minutes} min" if minutes else f"{hours} h"


def eta_message(eta_s: float, device: Optional[str] = None, server: Optional[str] = None) -> str:
    """What the CLI and the panel say about the time a run still needs: ``about 3 h 10 min on this
    computer; a GPU server ...``. ``device``: 'cpu', 'cuda:0', ... (None: unknown, taken as a CPU);
    ``server``: the server's address when the run is remote. The GPU-server hint is added when a run
    on a CPU will be long (:data:`LONG_RUN_S`)."""
    cpu = device is None or device.startswith("cpu")
    where = f"on the server {server}" if server else ("on this computer" if cpu else f"on {device}")
    text = f"about {format_duration(eta_s)} {where}"
    if eta_s > LONG_RUN_S and cpu:
        text += "; a GPU server takes seconds to minutes (see 'Run on a GPU server' in the README)"
    return text
