"""The progress and cancellation protocol shared by the CLI, the server and the Slicer module.

The engine calls ``progress(ProgressEvent)`` after every batch of slices and checks
``cancel.raise_if_cancelled()`` before every batch, so a cancel takes effect within one batch.
"""

from __future__ import annotations

import threading
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


class ProgressTracker:
    """Counts work units for one job and forwards them to an optional callback."""

    def __init__(self, total: int, callback: Optional[ProgressCallback] = None,
                 cancel: Optional[CancelToken] = None) -> None:
        self.total = total
        self.done = 0
        self._callback = callback
        self._cancel = cancel

    def check(self) -> None:
        if self._cancel is not None:
            self._cancel.raise_if_cancelled()

    def advance(self, n: int, stage: str) -> None:
        self.done += n
        if self._callback is not None:
            self._callback(ProgressEvent(self.done, self.total, stage))
