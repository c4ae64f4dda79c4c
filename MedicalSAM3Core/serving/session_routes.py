"""The ``/v1/sessions`` routes (see :mod:`.sessions` for the table, the wire messages and the
concurrency rules). JSON bodies are small (``MAX_JSON_BYTES``) and validated here, with errors that
name the field; engine errors (:class:`InputError`) become 422 with the engine's message."""

from __future__ import annotations

import asyncio
import logging
from contextlib import contextmanager
from typing import Awaitable, Callable, Optional

from fastapi import FastAPI, HTTPException, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import JSONResponse, Response
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from ..common.errors import InputError
from ..common.wire import MEDIA_TYPE, check_prompts, decode_mask, decode_request, encode_patch, encode_result
from .jobs import _explain
from .sessions import ServerSession, SessionBusy, SessionManager, SessionsFull, UnknownSession

log = logging.getLogger("medsam3.server")
#: The largest JSON body of a session request (clicks, prompts, slice lists).
MAX_JSON_BYTES = 1 << 20
MAX_POINTS = 1000
ERROR_HEADER = "X-MedSAM3-Error"

Point = tuple[float, float, float]


class _Body(BaseModel):
    model_config = ConfigDict(extra="forbid")


class NewObject(_Body):
    name: str = Field("", max_length=200)


class Refine(_Body):
    points: Optional[list[Point]] = Field(None, max_length=MAX_POINTS)
    labels: Optional[list[int]] = Field(None, max_length=MAX_POINTS)
    box: Optional[tuple[Point, Point]] = None
    replace_prompts: bool = False


class Propagate(_Body):
    first: Optional[int] = None
    last: Optional[int] = None


class Prepare(_Body):
    slices: list[int] = Field(max_length=4096)
    object_id: Optional[int] = None


class Text(_Body):
    prompts: list[str]
    keep_objects: bool = True


def _error(status: int, detail: str, kind: str, headers: Optional[dict] = None) -> HTTPException:
    return HTTPException(status, detail, headers={ERROR_HEADER: kind, **(headers or {})})


def add_session_routes(app: FastAPI, manager: SessionManager, config, auth: list,
                       read_body: Callable[[Request, int], Awaitable[Optional[bytearray]]],
                       decoding: asyncio.Semaphore) -> None:
    """Register the session routes on ``app`` (``config``: the :class:`ServerConfig`)."""
    def schema(model: type[BaseModel]) -> dict:
        return {"requestBody": {"required": True, "content": {"application/json": {"schema": model.model_json_schema()}}}}

    wire_reply = {200: {"content": {MEDIA_TYPE: {}}, "description": "a wire-format mask patch"}}

    @contextmanager
    def session_for(session_id: str, interactive: bool = False):
        try:
            with manager.use(session_id, interactive) as session:
                yield session
        except UnknownSession as error:
            raise _error(404, str(error), "unknown-session") from None
        except SessionBusy as error:
            raise _error(409, str(error), "session-busy") from None

    def require_object(session: ServerSession, object_id: int) -> None:
        if object_id not in session.engine.objects:
            raise _error(404, f"no object {object_id} in session {session.id} (objects: "
                              f"{sorted(session.engine.objects)})", "unknown-object")

    async def parse(request: Request, model: type[BaseModel]):
        body = await read_body(request, MAX_JSON_BYTES)
        if body is None:
            raise _error(400, "the client disconnected during its request", "invalid")
        try:
            return model.model_validate_json(bytes(body) or b"{}")
        except ValidationError as error:
            problems = "; ".join(f"{'.'.join(str(p) for p in e['loc']) or 'body'}: {e['msg']}"
                                 for e in error.errors(include_url=False))
            raise _error(422, f"malformed request: {problems}", "invalid") from None

    async def engine_call(function, *args, **kwargs):
        try:
            return await run_in_threadpool(function, *args, **kwargs)
        except InputError as error:
            raise _error(422, str(error), "invalid") from None
        except HTTPException:
            raise
        except Exception as error:  # an engine crash answers 500 with an explanation, the server goes on
            log.exception("session request failed")
            raise _error(500, _explain(error), "engine") from None

    def patch_response(session: ServerSession, patch) -> Response:
        if patch is None:
            return Response(status_code=204)
        return Response(encode_patch(patch, session.compression), media_type=MEDIA_TYPE)

    def check_enabled() -> None:
        if not manager.enabled:
            raise _error(503, "this server accepts no interactive sessions (started with --max-sessions 0 or "
                              "without a model for them)", "sessions-off")

    @app.post("/v1/sessions", dependencies=auth, status_code=201, openapi_extra={
        "requestBody": {"required": True, "content": {MEDIA_TYPE: {"schema": {"type": "string", "format": "binary"}}},
                        "description": "a wire-format request (prompts may be empty)"}})
    async def open_session(request: Request) -> JSONResponse:
        check_enabled()
        body = await read_body(request, config.max_body_bytes)
        if body is None:
            return Response(status_code=400)
        full = _error(503, manager.full_message(), "sessions-full", {"Retry-After": str(config.retry_after)})
        if not manager.has_room():  # refused before decoding, as a full job queue is
            raise full
        try:
            async with decoding:
                decoded = await run_in_threadpool(decode_request, body, config.limits, True)
        except InputError as error:
            raise _error(422, f"malformed request: {error}", "invalid") from None
        del body
        client = request.client.host if request.client else "?"
        try:
            session = await run_in_threadpool(manager.create, decoded, client)
        except SessionsFull:
            raise full from None
        except InputError as error:
            raise _error(422, str(error), "invalid") from None
        except Exception as error:
            log.exception("opening a session failed")
            raise _error(500, _explain(error), "engine") from None
        if decoded.prompts:  # text prompts sent with the volume start the session's first task
            start_text(session, decoded.prompts, True)
        return JSONResponse(session.info(), status_code=201, headers={"Location": f"/v1/sessions/{session.id}"})

    @app.get("/v1/sessions/{session_id}", dependencies=auth)
    def session_info(session_id: str) -> dict:
        with session_for(session_id) as session:
            return session.info()

    @app.delete("/v1/sessions/{session_id}", dependencies=auth, status_code=204)
    def close_session(session_id: str) -> Response:
        if not manager.close(session_id):
            raise _error(404, f"no session {session_id!r}", "unknown-session")
        return Response(status_code=204)

    @app.post("/v1/sessions/{session_id}/objects", dependencies=auth, status_code=201, openapi_extra=schema(NewObject))
    async def add_object(session_id: str, request: Request) -> JSONResponse:
        with session_for(session_id, interactive=True) as session:
            body = await parse(request, NewObject)
            object_id = await engine_call(session.engine.add_object, body.name)
            return JSONResponse({"object_id": object_id, "objects": session.objects()}, status_code=201)

    @app.delete("/v1/sessions/{session_id}/objects/{object_id}", dependencies=auth, status_code=204)
    async def remove_object(session_id: str, object_id: int) -> Response:
        with session_for(session_id, interactive=True) as session:
            require_object(session, object_id)
            await engine_call(session.engine.remove_object, object_id)
            return Response(status_code=204)

    @app.post("/v1/sessions/{session_id}/objects/{object_id}/refine", dependencies=auth, responses=wire_reply,
              openapi_extra=schema(Refine))
    async def refine(session_id: str, object_id: int, request: Request) -> Response:
        with session_for(session_id, interactive=True) as session:
            require_object(session, object_id)
            body = await parse(request, Refine)
            patch = await engine_call(session.engine.refine, object_id, body.points, body.labels, body.box,
                                      body.replace_prompts)
            return patch_response(session, patch)

    @app.post("/v1/sessions/{session_id}/objects/{object_id}/seed", dependencies=auth, responses=wire_reply,
              openapi_extra={"requestBody": {"required": True, "content": {MEDIA_TYPE: {
                  "schema": {"type": "string", "format": "binary"}}}, "description": "a wire-format mask message"}})
    async def seed(session_id: str, object_id: int, request: Request) -> Response:
        with session_for(session_id, interactive=True) as session:
            require_object(session, object_id)
            body = await read_body(request, config.max_body_bytes)
            if body is None:
                return Response(status_code=400)
            try:
                async with decoding:
                    mask, key_slices = await run_in_threadpool(decode_mask, body, session.shape)
            except InputError as error:
                raise _error(422, f"malformed seed: {error}", "invalid") from None
            patch = await engine_call(session.engine.seed, object_id, mask, key_slices)
            return patch_response(session, patch)

    @app.get("/v1/sessions/{session_id}/objects/{object_id}/mask", dependencies=auth, responses=wire_reply)
    async def object_mask(session_id: str, object_id: int) -> Response:
        with session_for(session_id, interactive=True) as session:
            require_object(session, object_id)
            return patch_response(session, await engine_call(session.engine.mask_patch, object_id))

    @app.post("/v1/sessions/{session_id}/undo", dependencies=auth, responses={
        **wire_reply, 204: {"description": "nothing to undo"}})
    async def undo(session_id: str) -> Response:
        with session_for(session_id, interactive=True) as session:
            return patch_response(session, await engine_call(session.engine.undo))

    @app.post("/v1/sessions/{session_id}/prepare", dependencies=auth, openapi_extra=schema(Prepare))
    async def prepare(session_id: str, request: Request) -> dict:
        with session_for(session_id, interactive=True) as session:
            body = await parse(request, Prepare)
            if body.object_id is not None:
                require_object(session, body.object_id)
            await engine_call(session.engine.prepare, body.slices, body.object_id)
            return {"prepared": len(body.slices)}

    def start_text(session: ServerSession, prompts: list, keep_objects: bool):
        def work(progress, cancel) -> bytes:
            result = session.engine.text(prompts, progress, cancel, keep_objects=keep_objects)
            return encode_result(result, session.compression)

        try:
            return manager.start_task(session, "text", work)
        except SessionBusy as error:
            raise _error(409, str(error), "session-busy") from None
        except UnknownSession as error:
            raise _error(404, str(error), "unknown-session") from None

    @app.post("/v1/sessions/{session_id}/text", dependencies=auth, status_code=202, openapi_extra=schema(Text))
    async def text(session_id: str, request: Request) -> JSONResponse:
        with session_for(session_id) as session:
            body = await parse(request, Text)
            try:
                check_prompts(body.prompts, config.limits)
            except InputError as error:
                raise _error(422, str(error), "invalid") from None
            task = start_text(session, body.prompts, body.keep_objects)
            return JSONResponse(task.status(), status_code=202,
                                headers={"Location": f"/v1/sessions/{session_id}/tasks/{task.id}"})

    @app.post("/v1/sessions/{session_id}/objects/{object_id}/propagate", dependencies=auth, status_code=202,
              openapi_extra=schema(Propagate))
    async def propagate(session_id: str, object_id: int, request: Request) -> JSONResponse:
        with session_for(session_id) as session:
            require_object(session, object_id)
            body = await parse(request, Propagate)
            try:  # said at once; the engine checks again when it runs
                session.engine.check_propagation(object_id, body.first, body.last)
            except InputError as error:
                raise _error(422, str(error), "invalid") from None

            def work(progress, cancel) -> bytes:
                patch = session.engine.propagate(object_id, progress, cancel, body.first, body.last)
                return encode_patch(patch, session.compression)

            try:
                task = manager.start_task(session, "propagate", work, object_id=object_id)
            except SessionBusy as error:
                raise _error(409, str(error), "session-busy") from None
            return JSONResponse(task.status(), status_code=202,
                                headers={"Location": f"/v1/sessions/{session_id}/tasks/{task.id}"})

    def task_or_404(session: ServerSession, task_id: str):
        try:
            return manager.task(session, task_id)
        except KeyError:
            raise _error(404, f"no task {task_id!r} in session {session.id} (only its latest task is kept)",
                         "unknown-task") from None

    @app.get("/v1/sessions/{session_id}/tasks/{task_id}", dependencies=auth)
    def task_status(session_id: str, task_id: str) -> dict:
        with session_for(session_id) as session:
            return task_or_404(session, task_id).status()

    @app.post("/v1/sessions/{session_id}/tasks/{task_id}/cancel", dependencies=auth, status_code=202)
    def cancel_task(session_id: str, task_id: str) -> dict:
        with session_for(session_id) as session:
            task_or_404(session, task_id)
            return manager.cancel_task(session, task_id).status()

    @app.get("/v1/sessions/{session_id}/tasks/{task_id}/result", dependencies=auth, responses={
        200: {"content": {MEDIA_TYPE: {}}, "description": "text: a wire-format result; propagate: a mask patch"}})
    def task_result(session_id: str, task_id: str) -> Response:
        with session_for(session_id) as session:
            task = task_or_404(session, task_id)
            if task.state != "done" or task.result is None:
                raise _error(409, f"task {task_id} is {task.state}" + (f": {task.error}" if task.error else ""),
                             "not-ready")
            return Response(task.result, media_type=MEDIA_TYPE)
