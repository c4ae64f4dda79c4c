"""One client job in a process of its own, for a host whose main thread keeps Python's GIL.

3D Slicer's main thread holds Python's GIL all the time (neither Slicer nor CTK/PythonQt release
it around the Qt event loop), so a Python worker *thread* inside Slicer only runs while the main
thread happens to execute Python or sleep: an upload, the status polling and the download would
crawl in slivers. The Slicer module therefore hands the blocking part of a job to this process::

    python -m MedicalSAM3Core.common.runner FOLDER

and only reads small files from the GUI thread's timer. Torch-free (numpy, requests: Slicer's
own Python runs it). The protocol, all in ``FOLDER`` (a private temporary folder the host made):

* ``job.json`` (in): ``{"action": "segment" | "info", "server": {"url": ...} or {"port_file": ...,
  "startup_timeout": seconds}, "verify": true | CA-bundle path, "prompts": [...], "options": {...},
  "geometry": {...}, "modality": ...}``; ``volume.npy`` (in, segment): the voxels ``(z, y, x)``.
* ``MEDSAM3_RUNNER_TOKEN`` (environment): the server's access token (never written to disk).
* ``progress.json`` (out): the latest :class:`ProgressEvent` (with the server's device once known),
  replaced atomically.
* ``result.medsam3`` (out, segment): the result in the wire format, uncompressed;
  ``info.json`` (out, info): the server's ``/v1/info``.
* ``error.json`` (out): ``{"type": class name, "message": text}`` when the job failed or was cancelled.
* Standard input: the host keeps it open; closing it (the host cancelling, exiting or crashing)
  cancels the job, which is then also cancelled and deleted on the server.

Exit status 0: done; 1: failed; 2: cancelled.
"""

from __future__ import annotations

import json
import os
import sys
import threading
import time
from pathlib import Path
from typing import Optional

import numpy as np

from .errors import Cancelled, InputError
from .options import SegmentOptions
from .progress import CancelToken, ProgressEvent
from .volume import Geometry, Volume

TOKEN_VARIABLE = "MEDSAM3_RUNNER_TOKEN"
JOB, VOLUME, PROGRESS, RESULT, INFO, ERROR = ("job.json", "volume.npy", "progress.json", "result.medsam3",
                                              "info.json", "error.json")


def write_atomically(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` so that a reader sees the old file or the whole new one."""
    partial = path.with_name(path.name + ".partial")
    partial.write_bytes(data)
    for attempt in range(20):
        try:
            os.replace(partial, path)
            return
        except PermissionError:  # Windows: the reader has the old file open for a moment
            time.sleep(0.01 * (attempt + 1))
    os.replace(partial, path)


def _watch_stdin(cancel: CancelToken) -> None:
    try:
        while sys.stdin.buffer.read(4096):
            pass
    except (OSError, ValueError):
        pass
    cancel.cancel()


def _server_url(server: dict, cancel: CancelToken, progress) -> str:
    """The server's URL; for the host's local engine, waits until it has written its port file."""
    if server.get("url"):
        progress(ProgressEvent(0, 0, "connecting"))
        return server["url"]
    progress(ProgressEvent(0, 0, "starting the engine"))
    port_file = Path(server["port_file"])
    deadline = time.monotonic() + float(server.get("startup_timeout", 900.0))
    while not port_file.is_file():
        cancel.raise_if_cancelled()
        if time.monotonic() > deadline:
            raise TimeoutError(f"the local engine did not start within {server.get('startup_timeout', 900.0):.0f} s")
        time.sleep(0.05)
    return f"http://127.0.0.1:{int(port_file.read_text(encoding='utf-8').strip())}"


def run(folder: Path, cancel: Optional[CancelToken] = None) -> None:
    """Run the job described in ``folder`` (see the module docstring); raises what went wrong."""
    from .client import Client, ServerUnreachable

    cancel = cancel or CancelToken()
    job = json.loads((folder / JOB).read_text(encoding="utf-8"))

    device = {}

    def progress(event: ProgressEvent) -> None:
        try:
            write_atomically(folder / PROGRESS, json.dumps(
                {"done": event.done, "total": event.total, "stage": event.stage, "eta_s": event.eta_s,
                 **device}).encode("utf-8"))
        except OSError:  # progress is a courtesy; the job goes on
            pass

    server = job["server"]
    url = _server_url(server, cancel, progress)
    local = not server.get("url")
    client = Client(url, token=os.environ.get(TOKEN_VARIABLE) or None, verify=job.get("verify", True),
                    **({"timeout": 120.0, "poll_interval": 0.25} if local else {}))
    if local:  # the port is open a moment before the app answers
        info = client.wait_until_ready(timeout=60.0, interval=0.1, cancel=cancel)
    else:
        try:
            info = client.info()
        except ServerUnreachable:
            cancel.raise_if_cancelled()
            raise
    device["device"] = info.get("device")  # for the host's estimate of the time left ("on this computer")
    if job["action"] == "info":
        (folder / INFO).write_text(json.dumps(info), encoding="utf-8")
        return
    if job["action"] != "segment":
        raise InputError(f"unknown runner action {job['action']!r}")
    volume = Volume(np.load(folder / VOLUME, allow_pickle=False), Geometry.from_dict(job["geometry"]),
                    modality=job.get("modality"), source=job.get("source"))
    (folder / VOLUME).unlink()  # image data stays on disk no longer than needed
    options = SegmentOptions.from_dict(job.get("options", {}))
    result = client.segment(volume, job["prompts"], options, progress=progress, cancel=cancel)
    from .wire import encode_result

    write_atomically(folder / RESULT, encode_result(result, compression="none"))


def main(argv: Optional[list[str]] = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 1:
        print("usage: python -m MedicalSAM3Core.common.runner FOLDER", file=sys.stderr)
        return 64
    folder = Path(argv[0])
    cancel = CancelToken()
    threading.Thread(target=_watch_stdin, args=(cancel,), name="stdin-watch", daemon=True).start()
    try:
        run(folder, cancel)
        return 0
    except BaseException as error:  # reported to the host, which shows it
        cancelled = isinstance(error, Cancelled) or cancel.cancelled
        message = str(error) or type(error).__name__
        try:
            write_atomically(folder / ERROR, json.dumps({"type": "Cancelled" if cancelled else type(error).__name__,
                                                         "message": message}).encode("utf-8"))
        except OSError:
            pass
        print(f"{type(error).__name__}: {message}", file=sys.stderr)
        return 2 if cancelled else 1


if __name__ == "__main__":
    sys.exit(main())
