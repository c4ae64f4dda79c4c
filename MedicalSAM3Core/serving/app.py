"""``medsam3 serve``: the HTTP job API (FastAPI) in front of one loaded model.

Endpoints (all under ``/v1``; OpenAPI schema at ``/openapi.json``, docs at ``/docs``):

====================================  =========================================================
``GET    /v1/health``                 liveness (no token needed; says nothing about jobs)
``GET    /v1/info``                   versions, model id, device, GPU memory, queue, workers, limits
``POST   /v1/jobs``                   submit (body: :mod:`~MedicalSAM3Core.common.wire` request)
``GET    /v1/jobs/{id}``              state and progress (slices done / total, stage)
``POST   /v1/jobs/{id}/cancel``       cancel (takes effect within one batch of slices)
``GET    /v1/jobs/{id}/result``       the result (wire format; 409 until the job is done)
``DELETE /v1/jobs/{id}``              forget the job and free its result
``/v1/sessions/...``                  interactive sessions: upload once, then clicks, seeds,
                                      undo and propagation (see :mod:`.sessions`)
====================================  =========================================================

Errors are JSON ``{"detail": "..."}`` with 401 (token), 404 (unknown job), 409 (not ready),
413 (body too large), 422 (malformed request, named), 429 (queue full, with ``Retry-After``).
The client never names a file on the server: volumes travel in the request body only.
"""

from __future__ import annotations

import asyncio
import hmac
import logging
import time
from contextlib import asynccontextmanager
from dataclasses import asdict, dataclass
from typing import Optional, Sequence, Union

from fastapi import Depends, FastAPI, HTTPException, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import JSONResponse, Response
from starlette.requests import ClientDisconnect

from .. import __version__
from ..common.errors import InputError
from ..common.wire import MEDIA_TYPE, WIRE_VERSION, Limits, decode_request
from .jobs import JobManager, QueueFull, RunJob
from .session_routes import add_session_routes
from .sessions import OpenSession, SessionManager

#: Request bodies decoded at the same time (each may expand to a whole volume in memory).
MAX_CONCURRENT_DECODES = 2

log = logging.getLogger("medsam3.server")
API_VERSION = 1


@dataclass(frozen=True)
class ServerConfig:
    """What ``medsam3 serve`` was started with (everything but the model)."""

    token: Optional[str] = None
    max_body_bytes: int = 1 << 30
    limits: Limits = Limits()
    queue_size: int = 8
    result_ttl: float = 3600.0
    retry_after: int = 5
    max_sessions: int = 4  # interactive sessions open at once (0: none)
    session_ttl: float = 900.0  # seconds a session may stay idle before it is closed
    session_cache_mb: float = 1024.0  # slice features one session keeps (on the model's device)


def create_app(run: Union[RunJob, Sequence[RunJob]], config: ServerConfig, info: Optional[dict] = None,
               names: Optional[Sequence[str]] = None, sessions: Sequence[OpenSession] = ()) -> FastAPI:
    """The FastAPI application. ``run`` segments one :class:`JobRequest` (the model lives in it); a
    list of them is one worker each (one per device, ``names`` naming them), behind one queue.
    ``info`` adds model id / device / GPU memory to ``/v1/info`` (a callable or a dict).
    ``sessions``: one session opener per model (``serve.session_opener``); none: no ``/v1/sessions``."""
    manager = JobManager(run, queue_size=config.queue_size, result_ttl=config.result_ttl, names=names)
    session_manager = SessionManager(sessions, max_sessions=config.max_sessions, ttl=config.session_ttl,
                                     cache_mb=config.session_cache_mb)
    decoding = asyncio.Semaphore(MAX_CONCURRENT_DECODES)

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        manager.start()
        session_manager.start()
        yield
        session_manager.stop()
        manager.stop()

    app = FastAPI(title="Medical SAM3 inference server", version=__version__, lifespan=lifespan,
                  description=__doc__.split("\n\n")[0])
    app.state.jobs = manager
    app.state.sessions = session_manager

    def authorize(request: Request) -> None:
        if config.token is None:
            return
        header = request.headers.get("authorization", "")
        scheme, _, supplied = header.partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(supplied.strip().encode(), config.token.encode()):
            raise HTTPException(401, "missing or wrong access token (send 'Authorization: Bearer <token>')",
                                headers={"WWW-Authenticate": "Bearer"})

    auth = [Depends(authorize)]

    def job_or_404(job_id: str):
        job = manager.get(job_id)
        if job is None:
            raise HTTPException(404, f"no job {job_id!r} (unknown, deleted, or expired after {config.result_ttl:.0f} s)")
        return job

    @app.get("/v1/health")
    def health() -> dict:
        return {"status": "ok", "api_version": API_VERSION}

    @app.get("/v1/info", dependencies=auth)
    def server_info() -> dict:
        extra = info() if callable(info) else dict(info or {})
        return {"version": __version__, "api_version": API_VERSION, "wire_version": WIRE_VERSION, **extra,
                "queue": manager.counts(), "workers": manager.workers(),
                "sessions": {**session_manager.counts(), "enabled": session_manager.enabled},
                "limits": {"max_body_bytes": config.max_body_bytes, **asdict(config.limits)}}

    async def read_body(request: Request, limit: int) -> Optional[bytearray]:
        """The request body, refused with 413 past ``limit`` bytes (declared or streamed); None when the
        client went away mid-upload (nothing to answer, nothing to log loudly)."""
        declared = request.headers.get("content-length")
        if declared is not None and declared.isdigit() and int(declared) > limit:
            raise HTTPException(413, f"request body of {declared} bytes exceeds this server's limit of {limit} bytes")
        body = bytearray()
        try:
            async for chunk in request.stream():
                body += chunk
                if len(body) > limit:
                    raise HTTPException(413, f"request body exceeds this server's limit of {limit} bytes")
        except ClientDisconnect:
            log.info("a client disconnected during its upload (%d bytes received)", len(body))
            return None
        return body

    @app.post("/v1/jobs", dependencies=auth, status_code=202, openapi_extra={
        "requestBody": {"required": True, "content": {MEDIA_TYPE: {"schema": {"type": "string", "format": "binary"}}},
                        "description": "a wire-format request (see MedicalSAM3Core.common.wire)"}})
    async def submit(request: Request) -> JSONResponse:
        body = await read_body(request, config.max_body_bytes)
        if body is None:
            return Response(status_code=400)
        if not manager.has_room():  # refused before decoding: a queued job holds its decoded volume
            raise HTTPException(429, f"the queue is full ({manager.queue_size} jobs waiting); retry later",
                                headers={"Retry-After": str(config.retry_after)})
        started = time.perf_counter()
        try:
            async with decoding:  # a few decodes at a time: each may expand to a whole volume
                job_request = await run_in_threadpool(decode_request, body, config.limits)
        except InputError as error:
            raise HTTPException(422, f"malformed request: {error}") from None
        client = request.client.host if request.client else "?"
        try:
            job = manager.submit(job_request, client, len(body))
        except QueueFull as error:
            raise HTTPException(429, str(error), headers={"Retry-After": str(config.retry_after)}) from None
        log.info("job %s decoded in %.2f s", job.id, time.perf_counter() - started)
        return JSONResponse(job.status(), status_code=202, headers={"Location": f"/v1/jobs/{job.id}"})

    @app.get("/v1/jobs/{job_id}", dependencies=auth)
    def job_status(job_id: str) -> dict:
        return job_or_404(job_id).status()

    @app.post("/v1/jobs/{job_id}/cancel", dependencies=auth, status_code=202)
    def cancel(job_id: str) -> dict:
        job = manager.cancel(job_id)
        if job is None:
            raise HTTPException(404, f"no job {job_id!r}")
        return job.status()

    @app.get("/v1/jobs/{job_id}/result", dependencies=auth,
             responses={200: {"content": {MEDIA_TYPE: {}}, "description": "a wire-format result"}})
    def result(job_id: str) -> Response:
        job = job_or_404(job_id)
        if job.state != "done" or job.result is None:
            detail = f"job {job_id} is {job.state}" + (f": {job.error}" if job.error else "")
            raise HTTPException(409, detail)
        return Response(job.result, media_type=MEDIA_TYPE)

    @app.delete("/v1/jobs/{job_id}", dependencies=auth, status_code=204)
    def delete(job_id: str) -> Response:
        if not manager.delete(job_id):
            raise HTTPException(404, f"no job {job_id!r}")
        return Response(status_code=204)

    add_session_routes(app, session_manager, config, auth, read_body, decoding)
    return app
