"""The job queue behind ``medsam3 serve``: one worker thread per device (``--devices``: one
GPU each, each with its own copy of the model) consuming one bounded queue; a job goes to the
first free worker.

Jobs are isolated: each has its own volume, cancel token and result; nothing is shared between
them but the loaded model. A job moves ``queued -> running -> done | failed | cancelled``; its
input volume is dropped as soon as it finishes, and finished jobs (with their encoded results)
expire ``result_ttl`` seconds later so memory is given back even if no client collects them.
"""

from __future__ import annotations

import logging
import queue
import secrets
import threading
import time
from dataclasses import dataclass, field
from typing import Callable, Optional, Sequence, Union

from ..common.errors import Cancelled, InputError, MedSAM3Error
from ..common.progress import CancelToken, ProgressEvent
from ..common.result import SegmentationResult
from ..common.wire import JobRequest, encode_result

log = logging.getLogger("medsam3.server")

RunJob = Callable[[JobRequest, Callable[[ProgressEvent], None], CancelToken], SegmentationResult]
FINISHED = ("done", "failed", "cancelled")


class QueueFull(MedSAM3Error):
    """The bounded queue has no room; the client should retry later."""


@dataclass
class Job:
    id: str
    client: str
    request: Optional[JobRequest]
    body_bytes: int
    state: str = "queued"
    progress: ProgressEvent = ProgressEvent(0, 0, "queued")
    error: Optional[str] = None
    result: Optional[bytes] = None
    warnings: list[str] = field(default_factory=list)
    cancel: CancelToken = field(default_factory=CancelToken)
    created: float = field(default_factory=time.time)
    started: Optional[float] = None
    finished: Optional[float] = None

    def status(self) -> dict:
        """The job as the status endpoint reports it (no image data)."""
        return {"job_id": self.id, "state": self.state,
                "progress": {"done": self.progress.done, "total": self.progress.total, "stage": self.progress.stage,
                             "eta_s": self.progress.eta_s},
                "error": self.error, "warnings": list(self.warnings), "created": self.created,
                "started": self.started, "finished": self.finished,
                "result_bytes": len(self.result) if self.result is not None else None}


class JobManager:
    """Bounded queue + one worker thread per job function + TTL expiry. Thread-safe.

    ``run`` is one job function, or several (one per device, each holding its model); ``names``
    names the workers in ``/v1/info`` (default ``worker 0``, ...).
    """

    def __init__(self, run: Union[RunJob, Sequence[RunJob]], queue_size: int = 8, result_ttl: float = 3600.0,
                 names: Optional[Sequence[str]] = None) -> None:
        if queue_size < 1:
            raise ValueError("queue_size must be >= 1")
        self._runs = [run] if callable(run) else list(run)
        if not self._runs:
            raise ValueError("a job manager needs at least one job function")
        self.names = list(names) if names is not None else [f"worker {i}" for i in range(len(self._runs))]
        if len(self.names) != len(self._runs):
            raise ValueError("one name per job function")
        self._running: list[Optional[str]] = [None] * len(self._runs)  # job id per worker
        # unbounded: the capacity counts the jobs still queued, so a cancelled or deleted queued job frees
        # its slot at once (its id left in the queue is skipped by the worker)
        self._queue: queue.Queue[Optional[str]] = queue.Queue()
        self._jobs: dict[str, Job] = {}
        self._lock = threading.Lock()
        self._ttl = result_ttl
        self.queue_size = queue_size
        self._workers: list[threading.Thread] = []

    # -- lifecycle ----------------------------------------------------------------------------
    def start(self) -> None:
        if not self._workers:
            self._workers = [threading.Thread(target=self._work, args=(index,), name=f"medsam3-worker-{index}",
                                              daemon=True) for index in range(len(self._runs))]
            for worker in self._workers:
                worker.start()

    def stop(self, timeout: float = 30.0) -> None:
        """Cancel what runs, drop what waits, and join the workers."""
        with self._lock:
            for job in self._jobs.values():
                if job.state in ("queued", "running"):
                    job.cancel.cancel()
        for _ in self._workers:
            self._queue.put_nowait(None)  # one stop sign per worker
        for worker in self._workers:
            worker.join(timeout)
        self._workers = []

    # -- API ------------------------------------------------------------------------------------
    def submit(self, request: JobRequest, client: str, body_bytes: int) -> Job:
        self.expire()
        job = Job(id=secrets.token_urlsafe(16), client=client, request=request, body_bytes=body_bytes)
        with self._lock:
            if self._queued_locked() >= self.queue_size:
                raise QueueFull(f"the queue is full ({self.queue_size} jobs waiting); retry later")
            self._jobs[job.id] = job
            self._queue.put_nowait(job.id)
        log.info("job %s submitted by %s: volume %s %s, %d bytes on the wire, prompts %s, mode %s",
                 job.id, client, list(request.volume.shape), request.volume.array.dtype, body_bytes,
                 request.prompts, request.options.mode)
        return job

    def _queued_locked(self) -> int:
        return sum(job.state == "queued" for job in self._jobs.values())

    def has_room(self) -> bool:
        """Whether a job submitted now would be queued (checked before a body is decoded)."""
        with self._lock:
            return self._queued_locked() < self.queue_size

    def get(self, job_id: str) -> Optional[Job]:
        self.expire()
        with self._lock:
            return self._jobs.get(job_id)

    def cancel(self, job_id: str) -> Optional[Job]:
        with self._lock:
            job = self._jobs.get(job_id)
            if job is not None and job.state in ("queued", "running"):
                job.cancel.cancel()
                if job.state == "queued":
                    self._finish(job, "cancelled", error="cancelled before it started")
            return job

    def delete(self, job_id: str) -> bool:
        with self._lock:
            job = self._jobs.pop(job_id, None)
            if job is not None and job.state == "queued":
                self._finish(job, "cancelled", error="deleted before it started")
        if job is None:
            return False
        job.cancel.cancel()
        job.request = None
        job.result = None
        log.info("job %s deleted", job_id)
        return True

    def expire(self) -> None:
        """Forget finished jobs older than the TTL (their results are freed)."""
        now = time.time()
        with self._lock:
            old = [j for j in self._jobs.values() if j.finished is not None and now - j.finished > self._ttl]
            for job in old:
                del self._jobs[job.id]
        for job in old:
            log.info("job %s expired after %.0f s", job.id, self._ttl)

    def workers(self) -> list[dict]:
        """Each worker's name and the job it runs (``None`` when idle), for ``/v1/info``."""
        with self._lock:
            return [{"name": name, "job": job_id} for name, job_id in zip(self.names, self._running)]

    def counts(self) -> dict:
        with self._lock:
            states = [j.state for j in self._jobs.values()]
        return {"queued": states.count("queued"), "running": states.count("running"), "capacity": self.queue_size,
                "finished_kept": sum(s in FINISHED for s in states)}

    # -- worker -------------------------------------------------------------------------------
    def _finish(self, job: Job, state: str, error: Optional[str] = None) -> None:
        job.state, job.error, job.finished = state, error, time.time()
        job.request = None  # the input volume is not kept once the job is over

    def _work(self, index: int = 0) -> None:
        while True:
            try:  # wakes up now and then to free expired results even when no request comes
                job_id = self._queue.get(timeout=max(0.05, min(60.0, self._ttl / 2)))
            except queue.Empty:
                self.expire()
                continue
            if job_id is None:
                return
            with self._lock:
                job = self._jobs.get(job_id)
                if job is None or job.state != "queued":
                    continue
                job.state, job.started = "running", time.time()
                request = job.request
                self._running[index] = job.id
            try:
                self._execute(job, request, self._runs[index])
            finally:
                with self._lock:
                    self._running[index] = None

    def _execute(self, job: Job, request: JobRequest, run: RunJob) -> None:
        def progress(event: ProgressEvent) -> None:
            job.progress = event

        try:
            result = run(request, progress, job.cancel)
            encoded = encode_result(result, request.result_compression)
        except Cancelled:
            with self._lock:
                self._finish(job, "cancelled", error="cancelled while running")
            log.info("job %s cancelled after %.1f s", job.id, time.time() - job.started)
            return
        except InputError as error:
            with self._lock:
                self._finish(job, "failed", error=str(error))
            log.info("job %s failed: %s", job.id, error)
            return
        except Exception as error:  # an engine crash must not kill the worker or lose the job
            message = _explain(error)
            with self._lock:
                self._finish(job, "failed", error=message)
            log.exception("job %s failed", job.id)
            return
        with self._lock:
            job.result, job.warnings = encoded, list(result.warnings)
            self._finish(job, "done")
        log.info("job %s done in %.2f s (queued %.2f s): %d result bytes", job.id, job.finished - job.started,
                 job.started - job.created, len(encoded))


def _explain(error: Exception) -> str:
    text = f"{type(error).__name__}: {error}"
    if "out of memory" in str(error).lower():
        return ("the server ran out of GPU memory: " + text + " — try mode 'slices', a smaller batch_size, "
                "or fewer prompts per job")
    return "the server failed while segmenting: " + text
