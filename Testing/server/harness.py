"""Test harness: a real uvicorn server on 127.0.0.1 (ephemeral port) in a background thread."""

from __future__ import annotations

import threading
import time
from contextlib import contextmanager

TOKEN = "test-token-0123456789abcdef"


@contextmanager
def running_server(run, config, info=None, ssl_certfile=None, ssl_keyfile=None):
    """Serve ``create_app(run, config)`` on 127.0.0.1:<free port>; yields (base URL, app)."""
    import uvicorn

    from MedicalSAM3Core.serving.app import create_app
    from MedicalSAM3Core.serving.serve import bound_port

    app = create_app(run, config, info=info)
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=0, log_level="warning",
                                           ssl_certfile=ssl_certfile, ssl_keyfile=ssl_keyfile))
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
