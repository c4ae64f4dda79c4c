"""Test harness: a real uvicorn server on 127.0.0.1 (ephemeral port) in a background thread."""

from __future__ import annotations

import shutil
import subprocess
import threading
import time
from contextlib import contextmanager
from pathlib import Path

import pytest

TOKEN = "test-token-0123456789abcdef"


@contextmanager
def running_server(run, config, info=None, ssl_certfile=None, ssl_keyfile=None, connections=None, sessions=()):
    """Serve ``create_app(run, config)`` on 127.0.0.1:<free port>, with uvicorn configured as
    ``medsam3 serve`` configures it (``connections``: its ConnectionLimits, default the defaults;
    ``sessions``: session openers, ``serve.session_opener(model)``, for ``/v1/sessions``);
    yields (base URL, app)."""
    from MedicalSAM3Core.serving.app import create_app
    from MedicalSAM3Core.serving.serve import ConnectionLimits, ServeSettings, bound_port, uvicorn_server

    app = create_app(run, config, info=info, sessions=sessions)
    settings = ServeSettings(model="", host="127.0.0.1", port=0, ssl_certfile=ssl_certfile, ssl_keyfile=ssl_keyfile,
                             connections=connections or ConnectionLimits())
    server = uvicorn_server(app, settings, log_level="warning")
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        if time.monotonic() > deadline or not thread.is_alive():
            raise RuntimeError("test server did not start")
        time.sleep(0.02)
    try:
        scheme = "https" if ssl_certfile else "http"
        yield f"{scheme}://127.0.0.1:{bound_port(server)}", app
    finally:
        server.should_exit = True
        thread.join(30)


def self_signed_certificate(folder: Path) -> tuple[Path, Path]:
    """A certificate for 127.0.0.1 and its key (PEM files in ``folder``); skips the test without openssl."""
    if shutil.which("openssl") is None:
        pytest.skip("openssl command not available to make a test certificate")
    cert, key = Path(folder) / "cert.pem", Path(folder) / "key.pem"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1", "-subj", "/CN=127.0.0.1",
                    "-addext", "subjectAltName=IP:127.0.0.1", "-keyout", str(key), "-out", str(cert)],
                   check=True, capture_output=True)
    return cert, key
