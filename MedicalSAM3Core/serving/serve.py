"""Start the inference server: checks, model loading, uvicorn.

Security rules enforced here, before the model is even loaded:

* binding to anything but the loopback interface requires a token (``--token-file`` or
  ``$MEDSAM3_TOKEN``); the server refuses to start otherwise;
* TLS is uvicorn's (``--ssl-certfile``/``--ssl-keyfile``); without it, use the server on a trusted
  network or behind a TLS-terminating reverse proxy.
"""

from __future__ import annotations

import logging
import os
import secrets
import socket
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

from ..common.errors import InputError
from ..common.progress import CancelToken, ProgressEvent
from ..common.client import is_loopback
from ..common.wire import JobRequest
from .app import ServerConfig, create_app

log = logging.getLogger("medsam3.server")
MIN_TOKEN_CHARS = 24  # 'medsam3 token' writes 43 (256 bits); fewer characters are too easy to guess


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


@dataclass
class ServeSettings:
    model: str
    host: str = "127.0.0.1"
    port: int = 8765
    token: Optional[str] = None
    device: str = "auto"
    dtype: str = "auto"
    ssl_certfile: Optional[str] = None
    ssl_keyfile: Optional[str] = None
    config: ServerConfig = ServerConfig()


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
    if not 0 <= settings.port <= 65535:
        raise InputError(f"port must be in 0..65535, got {settings.port}")


def settings_warnings(settings: ServeSettings, token_file: Optional[Path] = None) -> list[str]:
    """What is allowed but unsafe, said when the server starts: a token file other users can read,
    and tokens and images sent without TLS to a server that listens beyond this computer."""
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
    return warnings


def engine_runner(model) -> Callable[[JobRequest, Callable[[ProgressEvent], None], CancelToken], object]:
    """The job function for a loaded model: the same :class:`Segmenter` the CLI uses."""
    from ..inference.engine import Segmenter

    segmenter = Segmenter(model)

    def run(request: JobRequest, progress, cancel):
        return segmenter.segment(request.volume, request.prompts, request.options, progress=progress, cancel=cancel)

    return run


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


def build_server(settings: ServeSettings, model=None):
    """A configured (not yet running) ``uvicorn.Server``; loads the model unless one is given."""
    import uvicorn

    check_settings(settings)
    if model is None:
        from ..inference.models import load_model

        model = load_model(settings.model, device=settings.device, dtype=settings.dtype)
    app = create_app(engine_runner(model), settings.config, info=model_info(model))
    config = uvicorn.Config(app, host=settings.host, port=settings.port, log_level="info",
                            ssl_certfile=settings.ssl_certfile, ssl_keyfile=settings.ssl_keyfile,
                            timeout_graceful_shutdown=10)
    return uvicorn.Server(config)


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
