"""Where the Medical SAM3 module's segmentations run, and how Slicer waits for them without freezing.

Two backends, one protocol (the inference server's HTTP job API, spoken by the torch-free
:class:`~MedicalSAM3Core.common.client.Client`):

* :class:`LocalServer` — "this computer": ``medsam3 serve`` in a child process that the module
  starts on first use and stops when Slicer closes (or crashes: the child stops when its standard
  input closes). It listens on 127.0.0.1 only, on a port the operating system picks, and needs a
  random per-session token, so other users of the same computer cannot use it. The child runs
  Slicer's own Python (``PythonSlicer``) unless another interpreter with the engine is configured.
* :class:`RemoteServer` — a GPU server: URL + access token. Nothing is contacted until the user
  has entered a server and agreed to send images to it (Slicer's extension catalog requires it).

:class:`BackgroundTask` runs the blocking part of a job (starting the server, upload, GPU work,
download) in a worker thread and is polled from the GUI thread (a ``QTimer`` in the widget), so
the scene is only ever touched from the GUI thread. Nothing here imports Qt or torch.
"""

from __future__ import annotations

import logging
import os
import secrets
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional, Sequence
from urllib.parse import urlparse

import MedicalSAM3Core
from MedicalSAM3Core.common.client import Client, ServerError, is_loopback
from MedicalSAM3Core.common.errors import Cancelled, InputError, MedSAM3Error
from MedicalSAM3Core.common.options import SegmentOptions
from MedicalSAM3Core.common.progress import CancelToken, ProgressEvent
from MedicalSAM3Core.common.result import SegmentationResult
from MedicalSAM3Core.common.volume import Volume

log = logging.getLogger(__name__)


class BackendError(MedSAM3Error):
    """The backend could not be started or used; the message says what to do."""


def engine_python() -> str:
    """The Python that runs the local engine: 3D Slicer's ``PythonSlicer`` inside Slicer (Slicer sets
    ``sys.executable`` to it), this interpreter elsewhere."""
    return shutil.which("PythonSlicer") or sys.executable


class LocalServer:
    """``medsam3 serve`` on 127.0.0.1 in a child process owned by this object.

    ``model``: folder or hub id ('' = the engine's default: ``$MEDSAM3_MODEL``, else the demo
    model). ``python``: interpreter with the engine's dependencies (default :func:`engine_python`).
    The server's output goes to :attr:`log_path`; its last lines are quoted when it fails to start.
    """

    def __init__(self, model: str = "", device: str = "auto", python: Optional[str] = None,
                 startup_timeout: float = 900.0, env: Optional[dict] = None) -> None:
        self.model, self.device = model, device
        self.python = python or engine_python()
        self.startup_timeout = startup_timeout
        self._extra_env = dict(env or {})
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

    def log_tail(self, lines: int = 15) -> str:
        path = self.log_path
        if path is None or not path.is_file():
            return ""
        return "\n".join(path.read_text(encoding="utf-8", errors="replace").splitlines()[-lines:])

    def client(self, cancel: Optional[CancelToken] = None) -> Client:
        """A client of the running server, starting it first if needed (blocks while the model loads)."""
        with self._lock:
            if self.running and self._client is not None:
                return self._client
            self._start(cancel)
            return self._client

    def _start(self, cancel: Optional[CancelToken]) -> None:
        self._stop_locked()
        self._folder = Path(tempfile.mkdtemp(prefix="medsam3-local-"))
        port_file = self._folder / "port"
        engine_root = str(Path(MedicalSAM3Core.__file__).resolve().parents[1])
        env = {**os.environ, **self._extra_env, "MEDSAM3_TOKEN": self._token, "PYTHONUNBUFFERED": "1"}
        env["PYTHONPATH"] = os.pathsep.join(p for p in (engine_root, env.get("PYTHONPATH", "")) if p)
        command = [self.python, "-m", "MedicalSAM3Core", "serve", "--host", "127.0.0.1", "--port", "0",
                   "--port-file", str(port_file), "--exit-on-stdin-eof", "--device", self.device]
        if self.model:
            command += ["--model", self.model]
        log.info("starting the local Medical SAM3 engine: %s", " ".join(command))
        with open(self.log_path, "wb") as output:
            flags = getattr(subprocess, "CREATE_NO_WINDOW", 0)  # no console window on Windows
            self._process = subprocess.Popen(command, stdin=subprocess.PIPE, stdout=output, stderr=subprocess.STDOUT,
                                             env=env, creationflags=flags)
        deadline = time.monotonic() + self.startup_timeout
        while not port_file.is_file():
            if self._process.poll() is not None:
                tail = self.log_tail()
                self._stop_locked()
                raise BackendError("the local Medical SAM3 engine stopped while starting"
                                   + (f":\n{tail}" if tail else "") + _install_hint(tail))
            if cancel is not None and cancel.cancelled:
                self._stop_locked()
                raise Cancelled("cancelled while the local engine was starting")
            if time.monotonic() > deadline:
                self._stop_locked()
                raise BackendError(f"the local engine did not start within {self.startup_timeout:.0f} s")
            time.sleep(0.1)
        port = int(port_file.read_text(encoding="utf-8").strip())
        client = Client(f"http://127.0.0.1:{port}", token=self._token, timeout=120.0, poll_interval=0.25)
        try:
            client.wait_until_ready(timeout=60.0, cancel=cancel)
        except BaseException:  # a server that never answered is not kept for the next call
            self._stop_locked()
            raise
        self._client = client

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
                "Compute section, or choose the remote backend.")
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

    def client(self, cancel: Optional[CancelToken] = None) -> Client:
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
        try:
            return Client(parsed.geturl(), token=self.token.strip() or None, verify=self.verify)
        except ServerError as error:
            raise InputError(str(error)) from None


def segment_with(backend, volume: Volume, prompts: Sequence[str], options: SegmentOptions,
                 progress: Optional[Callable[[ProgressEvent], None]] = None,
                 cancel: Optional[CancelToken] = None) -> SegmentationResult:
    """Segment on ``backend`` (a :class:`LocalServer` or :class:`RemoteServer`); blocking."""
    if progress is not None:
        progress(ProgressEvent(0, 0, "starting the engine" if isinstance(backend, LocalServer) else "connecting"))
    client = backend.client(cancel)
    if cancel is not None:
        cancel.raise_if_cancelled()
    return client.segment(volume, list(prompts), options, progress=progress, cancel=cancel)


class BackgroundTask:
    """Run ``work(progress, cancel)`` in a worker thread; poll it from the GUI thread.

    The worker never touches the scene: the GUI thread reads :attr:`progress` while it runs and
    takes :attr:`result` (or :attr:`error`) once :attr:`finished`.
    """

    def __init__(self, work: Callable[[Callable[[ProgressEvent], None], CancelToken], object]) -> None:
        self._work = work
        self.cancel_token = CancelToken()
        self.progress: Optional[ProgressEvent] = None
        self.result = None
        self.error: Optional[BaseException] = None
        self.started_at = time.monotonic()
        self._thread = threading.Thread(target=self._run, name="medsam3-task", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        try:
            self.result = self._work(self._report, self.cancel_token)
        except BaseException as error:  # handed to the GUI thread, which shows it
            self.error = error

    def _report(self, event: ProgressEvent) -> None:
        self.progress = event

    @property
    def finished(self) -> bool:
        return not self._thread.is_alive()

    @property
    def cancelled(self) -> bool:
        return isinstance(self.error, Cancelled)

    def cancel(self) -> None:
        self.cancel_token.cancel()

    def wait(self, timeout: Optional[float] = None) -> bool:
        """Block until finished (tests and the self-test; the GUI polls instead). True when finished."""
        self._thread.join(timeout)
        return self.finished
