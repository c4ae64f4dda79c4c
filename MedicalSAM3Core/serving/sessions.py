"""Interactive sessions behind ``medsam3 serve`` (issue #27): upload a volume once, then click, box,
seed, undo and re-propagate with small requests whose answers carry only the slices that changed.

One server session wraps one engine :class:`~MedicalSAM3Core.inference.session.VolumeSession` (its
objects, clicks, undo history and its bounded cache of slice features, ``--session-cache-mb``).

Routes (all under ``/v1/sessions``, all need the token when one is set):

=======================================================  ==========================================
``POST   /v1/sessions``                                  open: a wire request (volume, geometry,
                                                         modality, options; prompts may be empty,
                                                         else a text task starts at once) -> 201
``GET    /v1/sessions/{sid}``                            shape, slice axis, expiry, objects, task
``DELETE /v1/sessions/{sid}``                            close (cancels its task, frees its memory)
``POST   /v1/sessions/{sid}/objects``                    ``{"name"}`` -> ``{"object_id"}`` (201)
``DELETE /v1/sessions/{sid}/objects/{oid}``              remove an object
``POST   /v1/sessions/{sid}/objects/{oid}/refine``       ``{"points": [[z, y, x]...], "labels",
                                                         "box": [[z, y, x], [z, y, x]],
                                                         "replace_prompts"}`` -> patch
``POST   /v1/sessions/{sid}/objects/{oid}/seed``         a wire mask message -> patch
``GET    /v1/sessions/{sid}/objects/{oid}/mask``         the object's whole mask as a patch (its box)
``POST   /v1/sessions/{sid}/objects/{oid}/propagate``    ``{"first", "last"}`` -> task (202)
``POST   /v1/sessions/{sid}/text``                       ``{"prompts", "keep_objects"}`` -> task (202)
``POST   /v1/sessions/{sid}/undo``                       patch, or 204 when there is nothing to undo
``POST   /v1/sessions/{sid}/prepare``                    ``{"slices", "object_id"}``: cache features
``GET    /v1/sessions/{sid}/tasks/{tid}``                task state and progress (as a job's)
``POST   /v1/sessions/{sid}/tasks/{tid}/cancel``         cancel (within one slice; nothing changes)
``GET    /v1/sessions/{sid}/tasks/{tid}/result``         text: a wire result (``session_object_ids``
                                                         in its sidecar's parameters); propagate: a
                                                         patch. 409 until the task is done
=======================================================  ==========================================

Patches are ``medsam3-patch`` wire messages (:func:`~MedicalSAM3Core.common.wire.encode_patch`):
the :class:`~MedicalSAM3Core.common.interaction.MaskPatch` header and the bit-packed mask of the
changed slices' bounding box, never the whole volume. Errors are JSON ``{"detail"}`` plus a header
``X-MedSAM3-Error`` saying which kind: 404 ``unknown-session`` / ``unknown-object`` /
``unknown-task``, 409 ``session-busy`` / ``not-ready``, 413, 422 ``invalid``, 503 ``sessions-full``
(with ``Retry-After``) or ``sessions-off``.

Concurrency (the sessions of a server share its model; the engine session holds one lock):

* clicks (refine, seed, undo, prepare, add/remove object, mask) run at once in the request thread
  pool: never queued behind another session's long task, nor behind a job (PyTorch runs forward
  passes of one model in several threads; each session has its own features, objects and tracker
  state, so they share only the read-only weights);
* long tasks (text, propagate) run in a background thread and report progress; at most one runs at
  a time per model (others wait as ``queued``, cancellable), bounding the GPU memory they take;
* one session runs one task at a time, and while it runs the session refuses clicks with 409
  ``session-busy`` at once (the engine lock would hold them until the task ends): cancel the task
  or wait for it. Reading the session (``GET``, task status) is always answered.

Memory: a session holds its volume, its objects' masks and at most ``--session-cache-mb`` of slice
features (on the model's device); at most ``--max-sessions`` are open. A session idle for
``--session-ttl`` seconds (no request, no running task) is closed on a timer.
"""

from __future__ import annotations

import logging
import secrets
import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Callable, Iterator, Optional, Sequence

import numpy as np

from ..common.errors import Cancelled, InputError, MedSAM3Error
from ..common.options import SLICE_AXES, SegmentOptions
from ..common.progress import CancelToken, ProgressEvent
from ..common.volume import Volume
from ..common.wire import JobRequest
from .jobs import _explain

log = logging.getLogger("medsam3.server")

#: ``open(volume, options, cache_mb)`` -> an engine ``VolumeSession`` (one per model / device).
OpenSession = Callable[[Volume, SegmentOptions, float], object]
#: What a task runs: ``work(progress, cancel)`` -> the encoded result (bytes).
TaskWork = Callable[[Callable[[ProgressEvent], None], CancelToken], bytes]
ACTIVE = ("queued", "running")


class UnknownSession(MedSAM3Error):
    """No such session (never opened, closed, or expired)."""


class SessionBusy(MedSAM3Error):
    """The session runs a task; clicks wait until it ends or is cancelled."""


class SessionsFull(MedSAM3Error):
    """The server holds its maximum of open sessions."""


@dataclass
class Task:
    """One long request of a session (text prompts or a propagation), run in the background."""

    id: str
    kind: str
    object_id: Optional[int] = None
    state: str = "queued"
    progress: ProgressEvent = ProgressEvent(0, 0, "queued")
    error: Optional[str] = None
    error_kind: Optional[str] = None  # "invalid" (the request, named in error), "engine" (a crash), "cancelled"
    result: Optional[bytes] = None
    cancel: CancelToken = field(default_factory=CancelToken)
    created: float = field(default_factory=time.time)
    started: Optional[float] = None
    finished: Optional[float] = None
    thread: Optional[threading.Thread] = None

    def status(self) -> dict:
        return {"task_id": self.id, "kind": self.kind, "object_id": self.object_id, "state": self.state,
                "progress": {"done": self.progress.done, "total": self.progress.total, "stage": self.progress.stage,
                             "eta_s": self.progress.eta_s},
                "error": self.error, "error_kind": self.error_kind, "created": self.created, "started": self.started, "finished": self.finished,
                "result_bytes": len(self.result) if self.result is not None else None}


@dataclass
class ServerSession:
    id: str
    client: str
    engine: object  # the engine's VolumeSession
    slot: int  # which model (device) it runs on
    slice_axis: str
    compression: Optional[str]
    ttl: float
    created: float = field(default_factory=time.time)
    last_used: float = field(default_factory=time.time)
    in_flight: int = 0
    task: Optional[Task] = None  # the latest task (only one is kept)
    closed: bool = False

    @property
    def shape(self) -> tuple[int, int, int]:
        return tuple(int(n) for n in self.engine.volume.shape)

    @property
    def busy(self) -> bool:
        return self.task is not None and self.task.state in ACTIVE

    def objects(self) -> list[dict]:
        # read without the engine lock (a task may hold it): list() of a dict is atomic in CPython,
        # and a task changes objects only when it commits
        return [obj.summary() for obj in sorted(list(self.engine.objects.values()), key=lambda o: o.object_id)]

    def info(self) -> dict:
        return {"session_id": self.id, "shape": list(self.shape), "n_slices": int(self.engine.n_slices),
                "slice_axis": self.slice_axis, "axis": SLICE_AXES[self.slice_axis], "ttl_s": self.ttl,
                "expires": self.last_used + self.ttl, "created": self.created, "objects": self.objects(),
                "task": self.task.status() if self.task is not None else None}


class SessionManager:
    """Open sessions: the cap, idle expiry, and their background tasks. Thread-safe.

    ``openers``: one per model (device); a new session goes to the model with the fewest open.
    """

    def __init__(self, openers: Sequence[OpenSession], max_sessions: int = 4, ttl: float = 900.0,
                 cache_mb: float = 1024.0) -> None:
        if max_sessions < 0 or not ttl > 0 or not cache_mb >= 0:
            raise ValueError("max_sessions >= 0, ttl > 0 and cache_mb >= 0")
        self.openers = list(openers)
        self.max_sessions, self.ttl, self.cache_mb = max_sessions, ttl, cache_mb
        self._sessions: dict[str, ServerSession] = {}
        self._lock = threading.Lock()
        self._long = [threading.Semaphore(1) for _ in self.openers]  # one long task at a time per model
        self._stop = threading.Event()
        self._timer: Optional[threading.Thread] = None

    @property
    def enabled(self) -> bool:
        return bool(self.openers) and self.max_sessions > 0

    # -- lifecycle ----------------------------------------------------------------------------
    def start(self) -> None:
        if self._timer is None:
            self._stop.clear()
            self._timer = threading.Thread(target=self._expire_on_timer, name="medsam3-session-expiry", daemon=True)
            self._timer.start()

    def stop(self, timeout: float = 30.0) -> None:
        """Close every session: cancel their tasks and wait for them."""
        self._stop.set()
        with self._lock:
            sessions = list(self._sessions.values())
            self._sessions.clear()
        for session in sessions:
            self._drop(session)
        deadline = time.monotonic() + timeout
        for session in sessions:
            thread = session.task.thread if session.task is not None else None
            if thread is not None:
                thread.join(max(0.0, deadline - time.monotonic()))
        if self._timer is not None:
            self._timer.join(timeout)
            self._timer = None

    def _expire_on_timer(self) -> None:
        while not self._stop.wait(max(0.05, min(30.0, self.ttl / 2))):
            self.expire()

    # -- sessions -------------------------------------------------------------------------------
    def full_message(self) -> str:
        return (f"the server holds its maximum of {self.max_sessions} open sessions (--max-sessions); close one "
                f"(DELETE /v1/sessions/ID) or retry when an idle one expires (after {self.ttl:.0f} s, --session-ttl)")

    def has_room(self) -> bool:
        """Whether a session opened now would fit (checked before a body is decoded)."""
        self.expire()
        with self._lock:
            return len(self._sessions) < self.max_sessions

    def create(self, request: JobRequest, client: str) -> ServerSession:
        """Open a session on ``request``'s volume and options (its prompts are not run here)."""
        self.expire()
        with self._lock:
            if len(self._sessions) >= self.max_sessions:
                raise SessionsFull(self.full_message())
            counts = [0] * len(self.openers)
            for session in self._sessions.values():
                counts[session.slot] += 1
            slot = int(np.argmin(counts))
            placeholder = ServerSession(id=secrets.token_urlsafe(16), client=client, engine=None, slot=slot,
                                        slice_axis=request.options.slice_axis, compression=request.result_compression,
                                        ttl=self.ttl, in_flight=1)
            self._sessions[placeholder.id] = placeholder  # holds its place in the cap while the engine prepares
        try:
            placeholder.engine = self.openers[slot](request.volume, request.options, self.cache_mb)
        except BaseException:
            with self._lock:
                self._sessions.pop(placeholder.id, None)
            raise
        with self._lock:
            placeholder.in_flight -= 1
            placeholder.last_used = time.time()
        log.info("session %s opened by %s: volume %s %s, slice axis %s, on model %d", placeholder.id, client,
                 list(request.volume.shape), request.volume.array.dtype, request.options.slice_axis, slot)
        return placeholder

    def _lookup_locked(self, session_id: str) -> ServerSession:
        session = self._sessions.get(session_id)
        if session is None or session.engine is None:
            raise UnknownSession(f"no session {session_id!r} (never opened, closed, or expired after "
                                 f"{self.ttl:.0f} s idle)")
        return session

    @contextmanager
    def use(self, session_id: str, interactive: bool = False) -> Iterator[ServerSession]:
        """The session for one request: refreshes its idle time and keeps it from expiring meanwhile.
        ``interactive``: the request needs the engine, refused while the session runs a task."""
        self.expire()
        with self._lock:
            session = self._lookup_locked(session_id)
            if interactive and session.busy:
                task = session.task
                raise SessionBusy(f"session {session_id} is running a {task.kind} task ({task.id}); cancel it "
                                  f"(POST /v1/sessions/{session_id}/tasks/{task.id}/cancel) or wait for it to end")
            session.in_flight += 1
            session.last_used = time.time()
        try:
            yield session
        finally:
            with self._lock:
                session.in_flight -= 1
                session.last_used = time.time()

    def close(self, session_id: str) -> bool:
        with self._lock:
            session = self._sessions.get(session_id)
            if session is None or session.engine is None:
                return False
            del self._sessions[session_id]
        self._drop(session)
        log.info("session %s closed", session_id)
        return True

    def _drop(self, session: ServerSession) -> None:
        session.closed = True
        if session.task is not None:
            session.task.cancel.cancel()

    def expire(self) -> None:
        """Close sessions idle for longer than the TTL (no request in flight, no task running)."""
        now = time.time()
        with self._lock:
            old = [s for s in self._sessions.values() if s.engine is not None and s.in_flight == 0 and not s.busy
                   and now - s.last_used > self.ttl]
            for session in old:
                del self._sessions[session.id]
        for session in old:
            self._drop(session)
            log.info("session %s expired after %.0f s idle", session.id, self.ttl)

    def counts(self) -> dict:
        with self._lock:
            sessions = list(self._sessions.values())
        return {"open": len(sessions), "capacity": self.max_sessions, "ttl_s": self.ttl, "cache_mb": self.cache_mb,
                "tasks_running": sum(s.task is not None and s.task.state == "running" for s in sessions)}

    # -- tasks ------------------------------------------------------------------------------------
    def start_task(self, session: ServerSession, kind: str, work: TaskWork, object_id: Optional[int] = None) -> Task:
        """Run ``work`` in the background as the session's task (one at a time per session)."""
        with self._lock:
            if session.busy:
                raise SessionBusy(f"session {session.id} is already running a {session.task.kind} task "
                                  f"({session.task.id}); cancel it or wait for it to end")
            if session.closed:
                raise UnknownSession(f"session {session.id} was closed")
            task = Task(id=secrets.token_urlsafe(8), kind=kind, object_id=object_id)
            session.task = task  # the previous task and its result are dropped
            task.thread = threading.Thread(target=self._run_task, args=(session, task, work),
                                           name=f"medsam3-session-task-{task.id}", daemon=True)
        task.thread.start()
        log.info("session %s: %s task %s started", session.id, kind, task.id)
        return task

    def cancel_task(self, session: ServerSession, task_id: str) -> Task:
        task = self.task(session, task_id)
        with self._lock:
            if task.state in ACTIVE:
                task.cancel.cancel()
        return task

    def task(self, session: ServerSession, task_id: str) -> Task:
        task = session.task
        if task is None or task.id != task_id:
            raise KeyError(task_id)
        return task

    def _finish(self, session: ServerSession, task: Task, state: str, error: Optional[str] = None,
                result: Optional[bytes] = None, kind: Optional[str] = None) -> None:
        with self._lock:
            task.state, task.error, task.result, task.finished = state, error, result, time.time()
            task.error_kind = kind if state == "failed" else ("cancelled" if state == "cancelled" else None)
            session.last_used = task.finished  # the client gets a whole TTL to collect the result

    def _run_task(self, session: ServerSession, task: Task, work: TaskWork) -> None:
        slot = self._long[session.slot]
        while not slot.acquire(timeout=0.1):  # waits while another session's task runs on this model
            if task.cancel.cancelled:
                self._finish(session, task, "cancelled", "cancelled before it started")
                return
        try:
            if task.cancel.cancelled:  # cancelled while it waited, even if the slot came free at that moment
                self._finish(session, task, "cancelled", "cancelled before it started")
                return
            with self._lock:
                task.state, task.started = "running", time.time()

            def progress(event: ProgressEvent) -> None:
                task.progress = event

            try:
                result = work(progress, task.cancel)
            except Cancelled:
                self._finish(session, task, "cancelled", "cancelled while running; the session is unchanged")
                log.info("session %s: task %s cancelled", session.id, task.id)
            except InputError as error:
                self._finish(session, task, "failed", str(error), kind="invalid")
                log.info("session %s: task %s failed: %s", session.id, task.id, error)
            except Exception as error:  # an engine crash must not kill the server
                self._finish(session, task, "failed", _explain(error), kind="engine")
                log.exception("session %s: task %s failed", session.id, task.id)
            else:
                self._finish(session, task, "done", result=result)
                log.info("session %s: %s task %s done in %.2f s (%d result bytes)", session.id, task.kind, task.id,
                         task.finished - task.started, len(result))
        finally:
            slot.release()
