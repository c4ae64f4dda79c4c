"""Test harness: a real uvicorn server on 127.0.0.1 (ephemeral port) in a background thread."""

from __future__ import annotations

import threading
import time
from contextlib import contextmanager

TOKEN = "test-token-0123456789abcdef"


@contextmanager
def running_server(run, config, info=None):
    """Serve ``create_app(run, config)`` on 127.0.0.1:<free port>; yields the base URL."""
    import uvicorn

    from MedicalSAM3Core.serving.app import create_app
    from MedicalSAM3Core.serving.serve import bound_port

    app = create_app(run, config, info=info)
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=0, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        if time.monotonic() > deadline or not thread.is_alive():
            raise RuntimeError("test server did not start")
        time.sleep(0.02)
    try:
        yield f"http://127.0.0.1:{bound_port(server)}", app
    finally:
        server.should_exit = True
        thread.join(30)
