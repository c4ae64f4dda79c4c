"""Start the inference server: checks, model loading, uvicorn.

Security rules enforced here, before the model is even loaded:

* binding to anything but the loopback interface requires a token (``--token-file`` or
  ``$MEDSAM3_TOKEN``); the server refuses to start otherwise;
* TLS is uvicorn's (``--ssl-certfile``/``--ssl-keyfile``); without it, use the server on a trusted
  network or behind a TLS-terminating reverse proxy.

Idle and slow clients (they need no token to connect) are bounded by :class:`ConnectionLimits`: a
deadline for the TLS handshake and for the request headers, uvicorn's keep-alive timeout, and a cap
on open connections; running out of file descriptors anyway is one log line per 10 s, not a
traceback per failed ``accept()``.
"""

from __future__ import annotations

import asyncio
import errno
import logging
import math
import os
import secrets
import socket
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

import uvicorn
from uvicorn.protocols.http.h11_impl import H11Protocol

from ..common.errors import InputError
from ..common.progress import CancelToken, ProgressEvent
from ..common.client import is_loopback
from ..common.wire import JobRequest
from .app import ServerConfig, create_app

log = logging.getLogger("medsam3.server")
MIN_TOKEN_CHARS = 24  # 'medsam3 token' writes 43 (256 bits); fewer characters are too easy to guess
#: Seconds between two log lines about the same kind of connection trouble.
LOG_INTERVAL = 10.0
#: File descriptors the server needs besides its client connections (libraries, model files, threads).
FD_RESERVE = 64
#: ``accept()`` errors that mean "out of file descriptors or memory" (asyncio retries a second later).
OUT_OF_RESOURCES = frozenset({errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM})


def read_token(token_file: Optional[Path]) -> Optional[str]:
    """The access token from ``token_file`` (first line) or ``$MEDSAM3_TOKEN``; None if neither."""
    if token_file is not None:
        try:
            token = Path(token_file).read_text(encoding="utf-8").strip().splitlines()[0].strip()
        except (OSError, IndexError) as error:
            raise InputError(f"cannot read a token from {token_file}: {error}") from None
    else:
        token = os.environ.get("MEDSAM3_TOKEN", "").strip() or None
    if token is not None and len(token) < MIN_TOKEN_CHARS:
        raise InputError(f"the access token is too short ({len(token)} characters, need {MIN_TOKEN_CHARS}); "
                         "make one with 'medsam3 token FILE'")
    return token


def write_token(path: Path) -> str:
    """Write a new random token (256 bits, URL-safe) to ``path``, readable by the owner only."""
    path = Path(path)
    if path.exists():
        raise InputError(f"{path} exists; remove it first (a token is never overwritten silently)")
    token = secrets.token_urlsafe(32)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w", encoding="utf-8") as handle:
        handle.write(token + "\n")
    return token


@dataclass(frozen=True)
class ConnectionLimits:
    """How long, and how many, client connections the server keeps open.

    * ``header_timeout``: seconds a client has to send a complete request line and headers, counted
      from when the connection opened, or, on a kept-alive connection, from the end of the previous
      response (the rest of a request body the server has already answered counts too). Sending
      bytes does not extend it, so a client that trickles its headers (slowloris) is closed like an
      idle one. With TLS the handshake gets the same time, before that.
    * ``keep_alive_timeout``: a kept-alive connection on which the client sends nothing at all is
      closed after this many seconds (uvicorn's ``timeout_keep_alive``).
    * ``max_connections``: when more are open, the server closes the connection that has waited
      longest for a request (the new one itself when all others are busy with requests), so idle or
      stalled connections neither exhaust the file descriptors nor lock ``/v1/health`` out.
      uvicorn's own ``limit_concurrency`` is not used: it answers 503 to every request while too
      many connections are open, idle ones included, which is what a flood of them wants.

    A request still being uploaded or answered is never closed by these limits.
    """

    header_timeout: float = 10.0
    keep_alive_timeout: float = 5.0
    max_connections: int = 100


@dataclass
class ServeSettings:
    model: str
    host: str = "127.0.0.1"
    port: int = 8765
    token: Optional[str] = None
    device: str = "auto"
    dtype: str = "auto"
    devices: tuple[str, ...] = ()  # --devices: one worker (and one copy of the model) per device
    ssl_certfile: Optional[str] = None
    ssl_keyfile: Optional[str] = None
    config: ServerConfig = ServerConfig()
    connections: ConnectionLimits = ConnectionLimits()


def check_settings(settings: ServeSettings) -> None:
    """Refuse unsafe or impossible settings before anything heavy happens."""
    if not is_loopback(settings.host) and not settings.config.token:
        raise InputError(f"refusing to listen on {settings.host} without an access token: anyone who can reach "
                         "this machine could use it. Make a token with 'medsam3 token FILE' and pass "
                         "--token-file FILE (or bind to 127.0.0.1)")
    if bool(settings.ssl_certfile) != bool(settings.ssl_keyfile):
        raise InputError("TLS needs both --ssl-certfile and --ssl-keyfile")
    for path in (settings.ssl_certfile, settings.ssl_keyfile):
        if path and not Path(path).is_file():
            raise InputError(f"TLS file not found: {path}")
    if settings.devices:
        if settings.device != "auto":
            raise InputError("--device and --devices exclude each other: --devices cuda:0,cuda:1 runs one worker "
                             "per device")
        repeated = sorted({d for d in settings.devices if settings.devices.count(d) > 1 and d != "cpu"})
        if repeated:
            raise InputError(f"--devices names {', '.join(repeated)} twice: one worker per GPU")
    if not 0 <= settings.port <= 65535:
        raise InputError(f"port must be in 0..65535, got {settings.port}")
    limits = settings.connections
    for option, seconds in (("--header-timeout", limits.header_timeout),
                            ("--keep-alive-timeout", limits.keep_alive_timeout)):
        if not 0 < seconds < math.inf:  # NaN fails this too
            raise InputError(f"{option} must be a positive number of seconds, got {seconds}")
    if limits.max_connections < 1:
        raise InputError(f"--max-connections must be at least 1, got {limits.max_connections}")
    config = settings.config
    if config.max_sessions < 0:
        raise InputError(f"--max-sessions must be 0 (no interactive sessions) or more, got {config.max_sessions}")
    if not 0 < config.session_ttl < math.inf:
        raise InputError(f"--session-ttl must be a positive number of seconds, got {config.session_ttl}")
    if not 0 <= config.session_cache_mb < math.inf:
        raise InputError(f"--session-cache-mb must be a number of MB, 0 or more, got {config.session_cache_mb}")


def settings_warnings(settings: ServeSettings, token_file: Optional[Path] = None) -> list[str]:
    """What is allowed but unsafe, said when the server starts: a token file other users can read,
    tokens and images sent without TLS to a server that listens beyond this computer, and an
    open-file limit too low for ``max_connections``."""
    warnings = []
    if token_file is not None and os.name == "posix":
        mode = Path(token_file).stat().st_mode
        if mode & 0o077:
            warnings.append(f"the token file {token_file} can be read by other users (mode {oct(mode & 0o777)}); "
                            f"run: chmod 600 {token_file}")
    if not is_loopback(settings.host) and not settings.ssl_certfile:
        warnings.append(f"listening on {settings.host} without TLS: the token and the images travel unencrypted; "
                        "pass --ssl-certfile/--ssl-keyfile or put an https reverse proxy in front "
                        "(README: Run on a GPU server)")
    needed = settings.connections.max_connections + FD_RESERVE
    limit = _open_file_limit()
    if limit is not None and limit < needed:
        warnings.append(f"this process may open only {limit} files, too few for --max-connections "
                        f"{settings.connections.max_connections} plus the server's own {FD_RESERVE}: new connections "
                        f"would fail with 'Too many open files'; raise the limit (ulimit -n {needed}) or lower "
                        "--max-connections")
    return warnings


def _open_file_limit() -> Optional[int]:
    """This process's soft limit on open files; None where there is none or it is unknown (Windows)."""
    try:
        import resource
    except ImportError:
        return None
    soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    return None if soft == resource.RLIM_INFINITY else soft


def engine_runner(model) -> Callable[[JobRequest, Callable[[ProgressEvent], None], CancelToken], object]:
    """The job function for a loaded model: the same :class:`Segmenter` the CLI uses."""
    from ..inference.engine import Segmenter

    segmenter = Segmenter(model)

    def run(request: JobRequest, progress, cancel):
        return segmenter.segment(request.volume, request.prompts, request.options, progress=progress, cancel=cancel)

    return run


def session_opener(model) -> Callable[[object, object, float], object]:
    """Opens interactive sessions on a loaded model: ``open(volume, options, cache_mb)`` -> the engine's
    :class:`~MedicalSAM3Core.inference.session.VolumeSession` (what ``/v1/sessions`` serves)."""
    from ..inference.engine import Segmenter

    segmenter = Segmenter(model)

    def open_session(volume, options, cache_mb: float):
        return segmenter.session(volume, options, cache_mb=cache_mb)

    return open_session


def model_info(model) -> Callable[[], dict]:
    def info() -> dict:
        import torch

        data = {"model_id": model.model_id, "device": str(model.device), "image_size": model.image_size,
                "tracker": model.video is not None}
        if model.device.type == "cuda":
            free, total = torch.cuda.mem_get_info(model.device)
            data["gpu"] = {"name": torch.cuda.get_device_name(model.device), "memory_free_bytes": free,
                           "memory_total_bytes": total}
        return data

    return info


def build_server(settings: ServeSettings, model=None) -> uvicorn.Server:
    """A configured (not yet running) ``uvicorn.Server``; loads the model unless one is given."""
    check_settings(settings)
    from ..inference.models import load_model

    if settings.devices:  # one worker per device, each with its own copy of the model
        models = [model] if model is not None and len(settings.devices) == 1 else \
            [load_model(settings.model, device=device, dtype=settings.dtype) for device in settings.devices]
    else:
        models = [model if model is not None else load_model(settings.model, device=settings.device,
                                                              dtype=settings.dtype)]
    infos = [model_info(m) for m in models]

    def info() -> dict:
        data = infos[0]()
        if len(models) > 1:
            data["devices"] = [i() for i in infos]
        return data

    app = create_app([engine_runner(m) for m in models], settings.config, info=info,
                     names=[str(m.device) for m in models], sessions=[session_opener(m) for m in models])
    return uvicorn_server(app, settings)


def uvicorn_server(app, settings: ServeSettings, log_level: str = "info") -> uvicorn.Server:
    """A configured (not yet running) ``uvicorn.Server`` for ``app`` with the address, TLS files and
    :class:`ConnectionLimits` of ``settings``.

    It runs on asyncio's own event loop and uvicorn's h11 protocol (whatever optional accelerators
    are installed), as :class:`GuardedH11Protocol` and :class:`GuardedServer` extend those two.
    """
    guard = ConnectionGuard(settings.connections)
    config = uvicorn.Config(app, host=settings.host, port=settings.port, log_level=log_level,
                            ssl_certfile=settings.ssl_certfile, ssl_keyfile=settings.ssl_keyfile,
                            timeout_graceful_shutdown=10, loop="asyncio", http=guard.protocol,
                            timeout_keep_alive=settings.connections.keep_alive_timeout)
    return GuardedServer(config, guard)


class RateLimitedLog:
    """Log one kind of event at most once per ``interval`` seconds, so that a flood of them stays
    readable: the first is logged at once, those within the next ``interval`` are only counted, and
    the next line logged says how many were left out."""

    def __init__(self, logger: logging.Logger, level: int, interval: float = LOG_INTERVAL,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.logger, self.level, self.interval, self.clock = logger, level, interval, clock
        self._last: Optional[float] = None
        self._left_out = 0

    def __call__(self, message: str, *args) -> None:
        now = self.clock()
        if self._last is not None and now - self._last < self.interval:
            self._left_out += 1
            return
        if self._left_out:
            message += f" (and {self._left_out} more like it in the last {now - self._last:.0f} s, not logged)"
        self.logger.log(self.level, message, *args)
        self._last, self._left_out = now, 0


class ConnectionGuard:
    """The :class:`ConnectionLimits` of one server, shared by all its connections, and its
    rate-limited logs of closed slow clients, surplus connections and failed ``accept()`` calls."""

    def __init__(self, limits: ConnectionLimits, clock: Callable[[], float] = time.monotonic) -> None:
        self.limits = limits
        self.log_timeout = RateLimitedLog(log, logging.INFO, clock=clock)
        self.log_surplus = RateLimitedLog(log, logging.WARNING, clock=clock)
        self.log_accept_error = RateLimitedLog(log, logging.ERROR, clock=clock)

    def protocol(self, **kwargs) -> "GuardedH11Protocol":
        """The protocol of one new connection (uvicorn's ``Config(http=...)`` factory)."""
        return GuardedH11Protocol(guard=self, **kwargs)

    def handle_loop_exception(self, loop: asyncio.AbstractEventLoop, context: dict) -> None:
        """The event loop's exception handler. Running out of file descriptors (or memory) is one
        rate-limited line: asyncio reports each failed ``accept()`` with a traceback, and retries it
        up to the listen backlog times per wake-up (thousands of lines a second). Anything else goes
        to asyncio's default handler."""
        error = context.get("exception")
        if isinstance(error, OSError) and error.errno in OUT_OF_RESOURCES:
            self.log_accept_error("%s: %s; lower --max-connections or raise the open-file limit (ulimit -n)",
                                  context.get("message", "event loop"), error)
        else:
            loop.default_exception_handler(context)


class GuardedH11Protocol(H11Protocol):
    """uvicorn's h11 protocol with the header deadline and the connection cap of
    :class:`ConnectionLimits`, which uvicorn lacks: it times out a kept-alive connection only while
    no byte arrives, and a new one never.

    The deadline runs whenever the server owes the client nothing (no request yet, or the last one
    answered) and stops once the headers of the next request are complete.
    """

    def __init__(self, *args, guard: ConnectionGuard, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.guard = guard
        self.waiting_since: Optional[float] = None  # loop time the running header deadline started
        self._deadline: Optional[asyncio.TimerHandle] = None

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._watch_headers()
        self._enforce_max_connections()

    def connection_lost(self, exc: Optional[Exception]) -> None:
        self._stop_deadline()
        super().connection_lost(exc)

    def handle_events(self) -> None:
        super().handle_events()
        self._watch_headers()

    def on_response_complete(self) -> None:
        super().on_response_complete()
        self._watch_headers()

    def _watch_headers(self) -> None:
        """Start the header deadline when the connection waits for a request, stop it when not."""
        waiting = not self.transport.is_closing() and (self.cycle is None or self.cycle.response_complete)
        if not waiting:
            self._stop_deadline()
        elif self._deadline is None:
            self.waiting_since = self.loop.time()
            self._deadline = self.loop.call_later(self.guard.limits.header_timeout, self._headers_timed_out)

    def _stop_deadline(self) -> None:
        if self._deadline is not None:
            self._deadline.cancel()
        self._deadline = self.waiting_since = None

    def _close(self) -> None:
        self._stop_deadline()
        self.transport.close()

    def _peer(self) -> str:
        return "%s:%d" % self.client if self.client else "?"

    def _headers_timed_out(self) -> None:
        self.guard.log_timeout("closed the connection from %s: no complete request within %g s (--header-timeout)",
                               self._peer(), self.guard.limits.header_timeout)
        self._close()

    def _enforce_max_connections(self) -> None:
        """Above ``max_connections`` open connections, close the one that has waited longest for a
        request: this new one waits too, so it is closed when every other one is busy."""
        open_connections = [c for c in self.connections if not c.transport.is_closing()]
        if len(open_connections) <= self.guard.limits.max_connections:
            return
        waiting = [c for c in open_connections if isinstance(c, GuardedH11Protocol) and c.waiting_since is not None]
        oldest = min(waiting, key=lambda c: c.waiting_since)
        if oldest is self:
            self.guard.log_surplus("%d connections open, all busy (--max-connections %d): refused a new one from %s",
                                   len(open_connections) - 1, self.guard.limits.max_connections, self._peer())
        else:
            self.guard.log_surplus("%d connections open (--max-connections %d): closed the one from %s that had waited "
                                   "longest for a request (%.1f s)", len(open_connections),
                                   self.guard.limits.max_connections, oldest._peer(),
                                   self.loop.time() - oldest.waiting_since)
        oldest._close()


class GuardedServer(uvicorn.Server):
    """``uvicorn.Server`` that installs :meth:`ConnectionGuard.handle_loop_exception` on its event
    loop and gives TLS handshakes the header timeout (asyncio's default is 60 s; uvicorn sets none)."""

    def __init__(self, config: uvicorn.Config, guard: ConnectionGuard) -> None:
        super().__init__(config)
        self.guard = guard

    async def startup(self, sockets=None) -> None:
        loop = asyncio.get_running_loop()
        loop.set_exception_handler(self.guard.handle_loop_exception)
        create_server = loop.create_server

        async def create_server_with_handshake_timeout(*args, **kwargs):
            if kwargs.get("ssl") is not None:
                kwargs["ssl_handshake_timeout"] = self.guard.limits.header_timeout
            return await create_server(*args, **kwargs)

        loop.create_server = create_server_with_handshake_timeout  # uvicorn's startup() has no other way in
        try:
            await super().startup(sockets=sockets)
        finally:
            del loop.create_server  # the loop's own method again


def write_port_when_listening(server, path: Path, timeout: float = 3600.0) -> threading.Thread:
    """Write the port ``server`` listens on to ``path`` (atomically) as soon as it listens.

    With ``--port 0`` the operating system picks a free port; a parent program (the Slicer
    module's local backend) reads it from this file instead of guessing a free port itself.
    """
    path = Path(path)

    def watch() -> None:
        deadline = time.monotonic() + timeout
        while not server.started:
            if server.should_exit or time.monotonic() > deadline:
                return
            time.sleep(0.05)
        partial = path.with_name(path.name + ".partial")
        partial.write_text(f"{bound_port(server)}\n", encoding="utf-8")
        os.replace(partial, path)

    thread = threading.Thread(target=watch, name="medsam3-port-file", daemon=True)
    thread.start()
    return thread


def exit_on_stdin_eof(server, stream=None) -> threading.Thread:
    """Stop ``server`` when its standard input reaches end of file.

    A parent that starts the server with a pipe on its stdin never writes to it; when the parent
    exits, or crashes, the pipe closes and the server stops instead of holding the GPU forever.
    """
    stream = stream if stream is not None else sys.stdin.buffer

    def watch() -> None:
        try:
            while stream.read(4096):
                pass
        except (OSError, ValueError):
            pass
        log.info("standard input closed: stopping the server")
        server.should_exit = True

    thread = threading.Thread(target=watch, name="medsam3-stdin-watch", daemon=True)
    thread.start()
    return thread


def bound_port(server) -> int:
    """The port a started uvicorn server listens on (useful with port 0)."""
    for sock in server.servers[0].sockets:
        if sock.family in (socket.AF_INET, socket.AF_INET6):
            return sock.getsockname()[1]
    raise RuntimeError("server has no TCP socket")
