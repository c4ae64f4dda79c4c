"""Where the Medical SAM3 module's segmentations run, and how Slicer waits for them without freezing.

Two backends, one protocol (the inference server's HTTP job API, spoken by the torch-free
:class:`~MedicalSAM3Core.common.client.Client`):

* :class:`LocalServer` — "this computer": ``medsam3 serve`` in a child process that the module
  starts on first use and stops when Slicer closes (or crashes: the child stops when its standard
  input closes). It listens on 127.0.0.1 only, on a port the operating system picks, and needs a
  random per-session token, so other users of the same computer cannot use it. The child runs
  Slicer's own Python (``PythonSlicer``) unless another interpreter with the engine is configured;
  a foreign interpreter starts from Slicer's *startup* environment (without Slicer's
  ``PYTHONHOME``/``PYTHONPATH``), which the module passes as ``base_env``.
* :class:`RemoteServer` — a GPU server: URL + access token. Nothing is contacted until the user
  has entered a server and agreed to send images to it (Slicer's extension catalog requires it).

Waiting without freezing: 3D Slicer's main thread never releases Python's GIL (checked in Slicer
5.10/5.12 and CTK: no ``PyEval_SaveThread`` around the Qt event loop), so a Python worker thread in
Slicer runs only while the GUI thread runs Python or sleeps, and an upload or download there
crawls. A job's blocking part (waiting for the engine, upload, polling, download) therefore runs in
a child process, :mod:`MedicalSAM3Core.common.runner`, started by :class:`ProcessTask`; the GUI
thread's ``QTimer`` only reads its small progress file, and the result once it is done. The scene is
only ever touched from the GUI thread. Nothing here imports Qt or torch.
"""

from __future__ import annotations

import json
import logging
import os
import secrets
import shutil
import subprocess
import sys
import tempfile
import threading
import time
import weakref
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Mapping, Optional, Sequence
from urllib.parse import urlparse

import numpy as np

import MedicalSAM3Core
from MedicalSAM3Core.common import client as client_module
from MedicalSAM3Core.common import errors as errors_module
from MedicalSAM3Core.common import runner
from MedicalSAM3Core.common.client import Client, ServerError, is_loopback
from MedicalSAM3Core.common.errors import Cancelled, InputError, MedSAM3Error
from MedicalSAM3Core.common.options import SegmentOptions
from MedicalSAM3Core.common.progress import LONG_RUN_S, CancelToken, ProgressEvent, eta_message
from MedicalSAM3Core.common.volume import Volume
from MedicalSAM3Core.common.wire import decode_result

log = logging.getLogger(__name__)


class BackendError(MedSAM3Error):
    """The backend could not be started or used; the message says what to do."""


def engine_python() -> str:
    """The Python that runs the local engine: 3D Slicer's ``PythonSlicer`` inside Slicer (Slicer sets
    ``sys.executable`` to it), this interpreter elsewhere."""
    return shutil.which("PythonSlicer") or sys.executable


def _engine_root() -> str:
    """The folder that holds the ``MedicalSAM3Core`` package (put on a child's ``PYTHONPATH``)."""
    return str(Path(MedicalSAM3Core.__file__).resolve().parents[1])


def _child_env(base: Mapping[str, str], extra: Mapping[str, str]) -> dict:
    env = {**base, **extra, "PYTHONUNBUFFERED": "1"}
    env["PYTHONPATH"] = os.pathsep.join(p for p in (_engine_root(), env.get("PYTHONPATH", "")) if p)
    return env


_NO_WINDOW = getattr(subprocess, "CREATE_NO_WINDOW", 0)  # no console window on Windows


class LocalServer:
    """``medsam3 serve`` on 127.0.0.1 in a child process owned by this object.

    ``model``: folder or hub id ('' = the engine's default: ``$MEDSAM3_MODEL``, else the demo
    model). ``python``: interpreter with the engine's dependencies (default :func:`engine_python`).
    ``base_env``: the environment the child starts from (default: this process's); inside Slicer,
    Slicer's startup environment for an interpreter other than Slicer's own.
    The server's output goes to :attr:`log_path`; its last lines are quoted when it fails to start.
    """

    def __init__(self, model: str = "", device: str = "auto", python: Optional[str] = None,
                 startup_timeout: float = 900.0, env: Optional[dict] = None,
                 base_env: Optional[Mapping[str, str]] = None) -> None:
        self.model, self.device = model, device
        self.python = python or engine_python()
        self.startup_timeout = startup_timeout
        self._extra_env = dict(env or {})
        self._base_env = dict(os.environ if base_env is None else base_env)
        self._token = secrets.token_urlsafe(32)
        self._process: Optional[subprocess.Popen] = None
        self._folder: Optional[Path] = None
        self._client: Optional[Client] = None
        self._lock = threading.Lock()

    @property
    def settings(self) -> tuple[str, str, str]:
        """What the running server was started with; a change needs a restart."""
        return self.model, self.device, self.python

    @property
    def running(self) -> bool:
        return self._process is not None and self._process.poll() is None

    @property
    def log_path(self) -> Optional[Path]:
        return self._folder / "server.log" if self._folder else None

    @property
    def port_file(self) -> Optional[Path]:
        return self._folder / "port" if self._folder else None

    def log_tail(self, lines: int = 15) -> str:
        path = self.log_path
        if path is None or not path.is_file():
            return ""
        return "\n".join(path.read_text(encoding="utf-8", errors="replace").splitlines()[-lines:])

    def launch(self) -> Path:
        """Start the child unless it runs; returns its port file (written once it listens). Does not
        wait: a :class:`ProcessTask` waits for the port file outside Slicer's GUI thread."""
        with self._lock:
            if not self.running:
                self._spawn()
            return self.port_file

    def failure(self) -> Optional[BackendError]:
        """Why the child is no longer running (with the last lines of its log), or None while it runs."""
        if self.running or self._folder is None:
            return None
        return self._stopped("the local Medical SAM3 engine stopped")

    def _stopped(self, what: str) -> BackendError:
        """``what``, the last lines of the engine's log and a hint at the likely fix."""
        tail = self.log_tail()
        return BackendError(what + (f":\n{tail}" if tail else "") + _install_hint(tail))

    def client(self, cancel: Optional[CancelToken] = None) -> Client:
        """A client of the running server, starting it first if needed (blocks while the model loads:
        for scripts and tests; the panel uses :func:`start_job`)."""
        with self._lock:
            if self.running and self._client is not None:
                return self._client
            if not self.running:
                self._spawn()
            self._client = self._await_ready(cancel)
            return self._client

    def _spawn(self) -> None:
        self._stop_locked()
        self._folder = Path(tempfile.mkdtemp(prefix="medsam3-local-"))
        env = _child_env(self._base_env, {**self._extra_env, "MEDSAM3_TOKEN": self._token})
        command = [self.python, "-m", "MedicalSAM3Core", "serve", "--host", "127.0.0.1", "--port", "0",
                   "--port-file", str(self.port_file), "--exit-on-stdin-eof", "--device", self.device]
        if self.model:
            command += ["--model", self.model]
        log.info("starting the local Medical SAM3 engine: %s", " ".join(command))
        with open(self.log_path, "wb") as output:
            self._process = subprocess.Popen(command, stdin=subprocess.PIPE, stdout=output, stderr=subprocess.STDOUT,
                                             env=env, creationflags=_NO_WINDOW)

    def _await_ready(self, cancel: Optional[CancelToken]) -> Client:
        deadline = time.monotonic() + self.startup_timeout
        while not self.port_file.is_file():
            if self._process.poll() is not None:
                error = self._stopped("the local Medical SAM3 engine stopped while starting")
                self._stop_locked()
                raise error
            if cancel is not None and cancel.cancelled:
                self._stop_locked()
                raise Cancelled("cancelled while the local engine was starting")
            if time.monotonic() > deadline:
                self._stop_locked()
                raise BackendError(f"the local engine did not start within {self.startup_timeout:.0f} s")
            time.sleep(0.1)
        port = int(self.port_file.read_text(encoding="utf-8").strip())
        client = Client(f"http://127.0.0.1:{port}", token=self._token, timeout=120.0, poll_interval=0.25)
        try:
            client.wait_until_ready(timeout=60.0, cancel=cancel)
        except BaseException:  # a server that never answered is not kept for the next call
            self._stop_locked()
            raise
        return client

    def endpoint(self) -> tuple[dict, str]:
        """What a :class:`ProcessTask` needs to reach this server (starting it), and the token."""
        return {"server": {"port_file": str(self.launch()), "startup_timeout": self.startup_timeout}}, self._token

    def stop(self, timeout: float = 10.0) -> None:
        """Stop the child (closing its stdin asks it to stop; killed if it does not within ``timeout``)."""
        with self._lock:
            self._stop_locked(timeout)

    def _stop_locked(self, timeout: float = 10.0) -> None:
        process, self._process, self._client = self._process, None, None
        if process is not None:
            try:
                if process.stdin is not None:
                    process.stdin.close()
                process.wait(timeout)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait(5)
        if self._folder is not None and process is not None:
            shutil.rmtree(self._folder, ignore_errors=True)
            self._folder = None


def _install_hint(log_tail: str) -> str:
    if "No module named" in log_tail:
        return ("\n\nA Python package the engine needs is missing: use 'Install dependencies' in the module's "
                "Compute section (or, for another Python environment, install the engine there), or choose the "
                "remote backend.")
    if "CUDA out of memory" in log_tail or "OutOfMemoryError" in log_tail:
        return "\n\nThe GPU ran out of memory: close other GPU programs or choose the device 'cpu'."
    return ""


@dataclass
class RemoteServer:
    """A ``medsam3 serve`` on another computer. ``consent`` is the user's explicit agreement to send
    images there; without it (or without a URL) nothing is ever sent."""

    url: str
    token: str = ""
    consent: bool = False
    verify: bool | str = True  # a CA bundle path for a self-signed certificate

    def checked_url(self) -> str:
        """The server's URL (https when no scheme was typed); raises :class:`InputError` when there is
        no address or no consent, so nothing is contacted then."""
        url = self.url.strip()
        if not url:
            raise InputError("enter the address of the Medical SAM3 server (e.g. https://gpu-box:8765) in the "
                             "Compute section")
        if not self.consent:
            raise InputError("images are only sent to a remote server after you agree: tick 'Send images to this "
                             "server' in the Compute section")
        parsed = urlparse(url if "://" in url else f"https://{url}")
        if parsed.scheme == "http" and not is_loopback(parsed.hostname or ""):
            log.warning("images and the token go to %s without encryption (http); use https outside a trusted "
                        "network", parsed.hostname)
        return parsed.geturl()

    def client(self, cancel: Optional[CancelToken] = None) -> Client:
        try:
            return Client(self.checked_url(), token=self.token.strip() or None, verify=self.verify)
        except ServerError as error:
            raise InputError(str(error)) from None

    def endpoint(self) -> tuple[dict, str]:
        """What a :class:`ProcessTask` needs to reach this server, and the token."""
        self.client()  # validates the address (a malformed URL is an input error, raised here)
        return {"server": {"url": self.checked_url()}, "verify": self.verify}, self.token.strip()

    def failure(self) -> Optional[BackendError]:
        return None


#: The errors a runner can report, by class name (anything else becomes a :class:`BackendError`).
_ERRORS = {cls.__name__: cls for module in (errors_module, client_module) for cls in vars(module).values()
           if isinstance(cls, type) and issubclass(cls, MedSAM3Error)}


class ProcessTask:
    """A job run by :mod:`MedicalSAM3Core.common.runner` in a child process, polled from the GUI thread.

    Read :attr:`progress` and :attr:`finished` from a timer; once finished, :attr:`result` (a
    :class:`~MedicalSAM3Core.common.result.SegmentationResult`, or the server's info dict) or
    :attr:`error` is set. :meth:`cancel` closes the child's standard input: the child cancels the
    server's job and exits (it is killed if it has not within ``cancel_grace`` seconds). The voxels
    are written to the job folder when the task is created: a snapshot, so editing the volume while
    it runs changes nothing. ``watch()`` is asked on every poll whether the backend failed (the local
    engine stopping); its error then ends the task.
    """

    def __init__(self, job: dict, token: str = "", volume: Optional[Volume] = None, python: Optional[str] = None,
                 env: Optional[Mapping[str, str]] = None, watch: Optional[Callable[[], Optional[Exception]]] = None,
                 cancel_grace: float = 15.0) -> None:
        self._folder = Path(tempfile.mkdtemp(prefix="medsam3-job-"))
        # the folder holds image data: removed when the task ends, is closed, or is garbage-collected
        self._cleanup = weakref.finalize(self, shutil.rmtree, str(self._folder), True)
        self._watch = watch
        self._cancel_grace = cancel_grace
        self._cancelled_at: Optional[float] = None
        self._progress: Optional[ProgressEvent] = None
        self._done = False
        self._asked_long = False
        self.device: Optional[str] = None  # the engine's device, once the child reported it
        self.server: Optional[str] = job.get("server", {}).get("url")  # None: the local engine
        self.result = None
        self.error: Optional[BaseException] = None
        self.started_at = time.monotonic()
        job = dict(job)
        if volume is not None:
            np.save(self._folder / runner.VOLUME, np.ascontiguousarray(volume.array), allow_pickle=False)
            job.update(geometry=volume.geometry.to_dict(), modality=volume.modality, source=volume.source)
        (self._folder / runner.JOB).write_text(json.dumps(job), encoding="utf-8")
        child_env = _child_env(os.environ if env is None else env, {runner.TOKEN_VARIABLE: token or ""})
        with open(self._folder / "runner.log", "wb") as output:
            self._process = subprocess.Popen(
                [python or engine_python(), "-m", "MedicalSAM3Core.common.runner", str(self._folder)],
                stdin=subprocess.PIPE, stdout=output, stderr=subprocess.STDOUT, env=child_env,
                creationflags=_NO_WINDOW)

    @property
    def progress(self) -> Optional[ProgressEvent]:
        """The latest progress the child reported (None before the first)."""
        if not self._done:
            try:
                data = json.loads((self._folder / runner.PROGRESS).read_text(encoding="utf-8"))
                eta = data.get("eta_s")
                self._progress = ProgressEvent(int(data["done"]), int(data["total"]), str(data["stage"]),
                                               None if eta is None else float(eta))
                self.device = data.get("device") or self.device
            except (OSError, ValueError, KeyError, TypeError):
                pass  # not written yet, or being replaced: keep the last one
        return self._progress

    def time_left(self) -> Optional[str]:
        """``about 12 min on this computer`` once the engine has estimated it, else None."""
        event = self.progress
        if event is None or event.eta_s is None:
            return None
        return eta_message(event.eta_s, self.device, self.server)

    def long_run_question(self) -> Optional[str]:
        """The question to ask, once per task, when the time left is estimated above
        :data:`~MedicalSAM3Core.common.progress.LONG_RUN_S` (the run goes on meanwhile); else None."""
        event = self.progress
        if self._asked_long or self._done or event is None or event.eta_s is None or event.eta_s <= LONG_RUN_S:
            return None
        self._asked_long = True
        return f"This segmentation will take {self.time_left()}. Go on? (Cancel stops it; nothing is changed.)"

    @property
    def finished(self) -> bool:
        if self._done:
            return True
        if self._process.poll() is None:
            problem = self._watch() if self._watch is not None else None
            overdue = self._cancelled_at is not None and time.monotonic() - self._cancelled_at > self._cancel_grace
            if problem is None and not overdue:
                return False
            self._stop_child()
            self._finish(Cancelled("cancelled") if overdue and problem is None else problem)
            return True
        self._finish(None)
        return True

    @property
    def cancel_requested(self) -> bool:
        return self._cancelled_at is not None

    @property
    def cancelled(self) -> bool:
        return isinstance(self.error, Cancelled)

    def cancel(self) -> None:
        """Ask the job to stop (the server's job is cancelled too); :attr:`finished` follows shortly."""
        if self._cancelled_at is None:
            self._cancelled_at = time.monotonic()
            try:
                self._process.stdin.close()
            except OSError:
                pass

    def wait(self, timeout: Optional[float] = None) -> bool:
        """Block until finished or ``timeout`` seconds passed (scripts and tests; the GUI polls). True when finished."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while not self.finished:
            if deadline is not None and time.monotonic() >= deadline:
                return False
            try:
                self._process.wait(0.05 if deadline is None else max(0.0, min(0.05, deadline - time.monotonic())))
            except subprocess.TimeoutExpired:
                pass
        return True

    def close(self, timeout: float = 2.0) -> None:
        """Cancel (if still running), stop the child and remove the job folder now: for a task nobody
        will poll again (the scene closes, the module is reloaded, Slicer quits)."""
        if not self._done:
            self.cancel()
            self._stop_child(timeout)
            self._finish(None)

    def _stop_child(self, timeout: float = 2.0) -> None:
        try:
            self._process.stdin.close()
        except OSError:
            pass
        try:
            self._process.wait(timeout)
        except subprocess.TimeoutExpired:
            # PythonSlicer is a launcher that runs the real interpreter as its child: that child still
            # sees its standard input close and ends with the cancelled job
            self._process.kill()
            self._process.wait(5)

    def _finish(self, problem: Optional[BaseException]) -> None:
        folder = self._folder
        try:
            if problem is not None:
                self.error = problem
            elif self._cancelled_at is not None:  # a result that came in after Cancel is not written
                self.error = Cancelled("cancelled")
            elif (folder / runner.ERROR).is_file():
                self.error = _runner_error(json.loads((folder / runner.ERROR).read_text(encoding="utf-8")))
            elif (folder / runner.RESULT).is_file():
                self.result = decode_result((folder / runner.RESULT).read_bytes())
            elif (folder / runner.INFO).is_file():
                self.result = json.loads((folder / runner.INFO).read_text(encoding="utf-8"))
            else:
                output = (folder / "runner.log").read_text(encoding="utf-8", errors="replace")[-2000:]
                self.error = BackendError(f"the Medical SAM3 job process ended with status {self._process.returncode}"
                                          + (f":\n{output}" if output.strip() else ""))
        except (OSError, ValueError, MedSAM3Error) as error:
            self.error = BackendError(f"could not read the job's outcome: {error}")
        finally:
            self._done = True
            self._cleanup()


def _runner_error(data: dict) -> BaseException:
    kind, message = str(data.get("type", "")), str(data.get("message", ""))
    if kind == "TimeoutError":
        return BackendError(message)
    cls = _ERRORS.get(kind, BackendError)
    return cls(message)


def start_job(backend, action: str, volume: Optional[Volume] = None, prompts: Sequence[str] = (),
              options: Optional[SegmentOptions] = None, python: Optional[str] = None) -> ProcessTask:
    """Start ``action`` ('segment' or 'info') on ``backend`` (a :class:`LocalServer` or
    :class:`RemoteServer`) in a :class:`ProcessTask`; a local engine is started without waiting.
    Raises :class:`InputError` before anything starts when the backend's settings are unusable."""
    job, token = backend.endpoint()
    job["action"] = action
    if action == "segment":
        job.update(prompts=list(prompts), options=(options or SegmentOptions()).to_dict())
    return ProcessTask(job, token, volume if action == "segment" else None, python=python, watch=backend.failure)
