"""Idle and slow clients (they need no token to connect), over real sockets on 127.0.0.1: the header
deadline, the keep-alive timeout, the cap on open connections, and what the log says when the server
runs out of file descriptors anyway (issue #30, item 2)."""

from __future__ import annotations

import logging
import os
import select
import socket
import ssl
import subprocess
import sys
import time
from pathlib import Path
from urllib.parse import urlparse

import pytest
import requests

from MedicalSAM3Core.common.errors import InputError
from MedicalSAM3Core.serving.app import ServerConfig
from MedicalSAM3Core.serving.serve import (ConnectionGuard, ConnectionLimits, RateLimitedLog, ServeSettings,
                                           check_settings, settings_warnings)

from harness import running_server, self_signed_certificate

REPO = Path(__file__).resolve().parents[2]
HEALTH = b"GET /v1/health HTTP/1.1\r\nHost: test\r\n\r\n"


def _nothing(request, progress, cancel):  # no job reaches it: these tests never submit one
    raise AssertionError("no job expected")


def _connect(url: str) -> socket.socket:
    address = urlparse(url)
    return socket.create_connection((address.hostname, address.port), timeout=5)


def _read_response(sock: socket.socket) -> bytes:
    """One whole response to a request without a body (headers and a Content-Length body)."""
    data = b""
    while b"\r\n\r\n" not in data:
        data += sock.recv(4096)
    head, _, body = data.partition(b"\r\n\r\n")
    length = int(next(line.split(b":")[1] for line in head.split(b"\r\n") if line.lower().startswith(b"content-length")))
    while len(body) < length:
        body += sock.recv(4096)
    return head


def _closed_now(sock: socket.socket) -> bool:
    """Whether the server has closed ``sock`` (whatever it sent before, such as a response, is skipped)."""
    while select.select([sock], [], [], 0)[0]:
        try:
            if not sock.recv(65536):
                return True
        except ssl.SSLWantReadError:  # a TLS record that is no data (a session ticket): still open
            return False
        except OSError:  # reset
            return True
    return False


def _watch(groups: dict, dribble: set, seconds: float) -> dict:
    """Send a line every 0.2 s on each socket in ``dribble`` and note when the server closes each
    socket of ``groups`` (name -> sockets); returns name -> closing times, seconds from now (None: open)."""
    start = time.monotonic()
    closed = {sock: None for sockets in groups.values() for sock in sockets}
    next_dribble = start
    while time.monotonic() - start < seconds and None in closed.values():
        now = time.monotonic()
        if now >= next_dribble:
            for sock in dribble:
                if closed[sock] is None:
                    try:
                        sock.sendall(b"x-slow: 1\r\n")
                    except OSError:
                        pass  # closed: noticed below
            next_dribble = now + 0.2
        readable = select.select([s for s, at in closed.items() if at is None], [], [], 0.05)[0]
        for sock in readable:
            if _closed_now(sock):
                closed[sock] = time.monotonic() - start
    return {name: [closed[sock] for sock in sockets] for name, sockets in groups.items()}


def test_idle_and_slow_clients_are_closed_after_the_header_timeout_and_health_answers_meanwhile():
    limits = ConnectionLimits(header_timeout=1.5, keep_alive_timeout=0.3)
    with running_server(_nothing, ServerConfig(), connections=limits) as (url, _):
        groups = {name: [_connect(url) for _ in range(5)]
                  for name in ("idle", "slow headers", "slow body after its answer", "kept alive, idle",
                               "kept alive, then slow headers")}
        for sock in groups["slow headers"]:
            sock.sendall(b"GET /v1/health HTTP/1.1\r\nHost: test\r\n")
        for sock in groups["slow body after its answer"]:  # 405 at once; the rest of the body never comes
            sock.sendall(b"POST /v1/health HTTP/1.1\r\nHost: test\r\nContent-Length: 1000000\r\n\r\n")
        for sock in groups["kept alive, idle"] + groups["kept alive, then slow headers"]:
            sock.sendall(HEALTH)
            assert b" 200 " in _read_response(sock)
        for sock in groups["kept alive, then slow headers"]:
            sock.sendall(b"GET /v1/health HTTP/1.1\r\n")
        health = requests.get(url + "/v1/health", timeout=5)
        assert health.status_code == 200 and health.elapsed.total_seconds() < 1.0
        assert not any(_closed_now(sock) for sock in groups["idle"] + groups["slow headers"]), \
            "health must answer while they are open"
        dribble = set(groups["slow headers"] + groups["slow body after its answer"] + groups["kept alive, then slow headers"])
        closed = _watch(groups, dribble, seconds=limits.header_timeout + 2.0)
        for name, times in closed.items():
            assert None not in times, f"{name}: a connection was never closed ({times})"
        assert max(closed["kept alive, idle"]) < limits.keep_alive_timeout + 0.7, closed  # the keep-alive timeout
        assert max(max(times) for times in closed.values()) < limits.header_timeout + 1.0, closed
        for sockets in groups.values():
            for sock in sockets:
                sock.close()


def test_above_max_connections_the_longest_waiting_is_closed_not_health_nor_a_busy_upload():
    with running_server(_nothing, ServerConfig(token="t" * 32), connections=ConnectionLimits(max_connections=8)) as (url, _):
        upload = _connect(url)  # the oldest connection, but busy: its request is being uploaded
        upload.sendall(b"POST /v1/jobs HTTP/1.1\r\nHost: test\r\nContent-Length: 10\r\n\r\n12345")
        time.sleep(0.2)
        idle = []
        for _ in range(30):
            idle.append(_connect(url))
            time.sleep(0.005)  # in order: the server sees them one after the other
        assert requests.get(url + "/v1/health", timeout=5).status_code == 200
        time.sleep(0.3)
        still_open = [sock for sock in idle if not _closed_now(sock)]
        assert len(still_open) <= 7, f"{len(still_open)} idle connections open, more than max_connections allows"
        assert idle[0] not in still_open and idle[-1] in still_open, "the longest waiting must go first"
        upload.sendall(b"67890")
        assert b" 401 " in _read_response(upload)  # the busy upload was left alone (and answered: no token)
        for sock in idle + [upload]:
            sock.close()


def test_when_every_connection_is_busy_a_new_one_is_refused():
    with running_server(_nothing, ServerConfig(), connections=ConnectionLimits(max_connections=1)) as (url, _):
        upload = _connect(url)
        upload.sendall(b"POST /v1/jobs HTTP/1.1\r\nHost: test\r\nContent-Length: 10\r\n\r\n12345")
        time.sleep(0.2)
        surplus = _connect(url)
        assert _watch({"surplus": [surplus]}, set(), seconds=2.0)["surplus"][0] is not None
        upload.sendall(b"67890")
        assert b" 422 " in _read_response(upload)  # malformed body, but answered: the upload was not closed
        upload.close()
        surplus.close()


def test_tls_handshake_and_headers_have_the_header_timeout(tmp_path):
    cert, key = self_signed_certificate(tmp_path)
    limits = ConnectionLimits(header_timeout=1.0)
    with running_server(_nothing, ServerConfig(), ssl_certfile=str(cert), ssl_keyfile=str(key),
                        connections=limits) as (url, _):
        no_handshake = _connect(url)  # asyncio's default would wait 60 s for the ClientHello
        context = ssl.create_default_context(cafile=str(cert))
        no_request = context.wrap_socket(_connect(url), server_hostname="127.0.0.1")
        no_request.setblocking(False)  # a TLS socket: select() then recv() until EOF, as for plain ones
        assert requests.get(url + "/v1/health", timeout=5, verify=str(cert)).status_code == 200
        closed = _watch({"no handshake": [no_handshake], "no request": [no_request]}, set(), seconds=3.0)
        assert all(times[0] is not None and times[0] < limits.header_timeout + 1.0 for times in closed.values()), closed
        no_handshake.close()
        no_request.close()


def _serve_with_few_files(tmp_path: Path, open_files: int, limits: ConnectionLimits):
    """A model-free server process whose open-file limit is ``open_files``; returns (process, port)."""
    port_file = tmp_path / "port"
    process = subprocess.Popen([sys.executable, str(Path(__file__).with_name("few_files_server.py")), str(port_file),
                                str(open_files), str(limits.max_connections), str(limits.header_timeout)],
                               cwd=REPO, env={**os.environ, "PYTHONPATH": str(REPO)}, stdin=subprocess.DEVNULL,
                               stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 30
    while not port_file.exists():
        if process.poll() is not None or time.monotonic() > deadline:
            process.kill()
            raise RuntimeError(f"the test server did not start: {process.communicate()[1].decode()}")
        time.sleep(0.05)
    return process, int(port_file.read_text())


def _stop(process) -> str:
    """Stop the server process; its log (stderr)."""
    process.terminate()
    try:
        return process.communicate(timeout=15)[1].decode()
    except subprocess.TimeoutExpired:
        process.kill()
        return process.communicate()[1].decode()


def _health_seconds(port: int, timeout: float) -> float:
    """Seconds until /v1/health answers 200 on a new connection (fails after ``timeout``)."""
    started = time.monotonic()
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as sock:
        sock.sendall(HEALTH)
        assert b" 200 " in _read_response(sock)
    return time.monotonic() - started


def _flood_then_health(process, port: int, connections: int, timeout: float, within: float) -> str:
    """Open ``connections`` idle connections, assert /v1/health answers in under ``within`` seconds
    meanwhile, then close them and stop the server; returns its log."""
    flood = []
    try:
        flood = [socket.create_connection(("127.0.0.1", port), timeout=5) for _ in range(connections)]
        assert _health_seconds(port, timeout=timeout) < within
    finally:
        for sock in flood:
            sock.close()
        log = _stop(process)
    return log


@pytest.mark.skipif(sys.platform == "win32", reason="RLIMIT_NOFILE is POSIX")
def test_a_flood_beyond_the_open_file_limit_leaves_health_answering_and_the_log_short(tmp_path):
    """The attack of issue #30 scaled down: more idle connections than the process may open files.
    The cap closes the surplus; health answers within about one accept() retry (1 s)."""
    process, port = _serve_with_few_files(tmp_path, open_files=96, limits=ConnectionLimits(max_connections=20,
                                                                                         header_timeout=30.0))
    log = _flood_then_health(process, port, connections=150, timeout=6.0, within=4.0)
    assert "Traceback" not in log and log.count("Too many open files") <= 1, log[:3000]
    assert len(log.splitlines()) <= 6, log[:3000]


@pytest.mark.skipif(sys.platform == "win32", reason="RLIMIT_NOFILE is POSIX")
def test_failed_accepts_are_one_log_line_per_interval_and_the_server_recovers(tmp_path):
    """--max-connections set above what the process may open: accept() fails with EMFILE (asyncio
    logged a traceback per try, thousands a second); the header timeout then frees the files."""
    process, port = _serve_with_few_files(tmp_path, open_files=48, limits=ConnectionLimits(max_connections=1000,
                                                                                         header_timeout=1.0))
    log = _flood_then_health(process, port, connections=80, timeout=8.0, within=6.0)
    assert "Traceback" not in log and log.count("Too many open files") == 1, log[:3000]
    assert "out of system resource: [Errno 24] Too many open files; lower --max-connections" in log


def test_rate_limited_log_says_how_many_it_left_out(caplog):
    now = [0.0]
    say = RateLimitedLog(logging.getLogger("medsam3.server"), logging.ERROR, interval=10.0, clock=lambda: now[0])
    with caplog.at_level(logging.ERROR, logger="medsam3.server"):
        for second in range(26):  # one event a second, plus a burst of 1000 at 3 s
            now[0] = float(second)
            for _ in range(1000 if second == 3 else 1):
                say("accept failed: %s", "EMFILE")
    assert [r.getMessage() for r in caplog.records] == [
        "accept failed: EMFILE",
        "accept failed: EMFILE (and 1008 more like it in the last 10 s, not logged)",
        "accept failed: EMFILE (and 9 more like it in the last 10 s, not logged)"]


def test_the_loop_exception_handler_limits_out_of_resource_errors_only(caplog):
    import errno

    class Loop:
        def __init__(self):
            self.passed_on = []

        def default_exception_handler(self, context):
            self.passed_on.append(context)

    now = [0.0]
    guard, loop = ConnectionGuard(ConnectionLimits(), clock=lambda: now[0]), Loop()
    emfile = OSError(errno.EMFILE, "Too many open files")
    with caplog.at_level(logging.ERROR, logger="medsam3.server"):
        for _ in range(2000):
            guard.handle_loop_exception(loop, {"message": "socket.accept() out of system resource", "exception": emfile})
        other = {"message": "Task exception was never retrieved", "exception": RuntimeError("boom")}
        guard.handle_loop_exception(loop, other)
    assert len(caplog.records) == 1 and "Traceback" not in caplog.text
    assert caplog.records[0].getMessage() == ("socket.accept() out of system resource: [Errno 24] Too many open files; "
                                              "lower --max-connections or raise the open-file limit (ulimit -n)")
    assert loop.passed_on == [other]


@pytest.mark.parametrize("limits, message", [
    (ConnectionLimits(header_timeout=0), "--header-timeout must be a positive number of seconds, got 0"),
    (ConnectionLimits(header_timeout=float("nan")), "--header-timeout must be a positive"),
    (ConnectionLimits(keep_alive_timeout=-1), "--keep-alive-timeout must be a positive number of seconds, got -1"),
    (ConnectionLimits(keep_alive_timeout=float("inf")), "--keep-alive-timeout must be a positive"),
    (ConnectionLimits(max_connections=0), "--max-connections must be at least 1, got 0"),
])
def test_bad_connection_limits_are_refused_naming_the_option(limits, message):
    with pytest.raises(InputError, match=message.replace("-", r"\-")):
        check_settings(ServeSettings(model="m", connections=limits))


def test_an_open_file_limit_below_max_connections_is_warned_about(monkeypatch):
    from MedicalSAM3Core.serving import serve

    monkeypatch.setattr(serve, "_open_file_limit", lambda: 256)
    assert settings_warnings(ServeSettings(model="m", connections=ConnectionLimits(max_connections=150))) == []
    [warning] = settings_warnings(ServeSettings(model="m", connections=ConnectionLimits(max_connections=500)))
    assert "only 256 files" in warning and "ulimit -n 564" in warning and "--max-connections" in warning
