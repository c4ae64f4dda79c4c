"""An interactive session on a ``medsam3 serve`` server, with the methods of the engine's
``VolumeSession`` (torch-free: numpy + requests).

>>> with client.open_session(volume, SegmentOptions(mode="slices")) as session:   # uploads once
...     result = session.text(["liver"], progress=print, cancel=token)    # a SegmentationResult
...     liver = result.parameters["session_object_ids"][0]
...     patch = session.refine(liver, points=[(40, 120.5, 98)], labels=[0])   # one slice's box
...     patch = session.propagate(liver, progress=print, cancel=token)
...     patch = session.undo()

Every interaction returns a :class:`~.interaction.MaskPatch` (only the slices that changed, within
their bounding box), so Slicer code keeps its masks in step with either kind of session. Mistakes a
local session refuses with :class:`InputError` (unknown object, points on two slices, a seed of the
wrong shape) raise :class:`~.client.InvalidInteraction`, an :class:`InputError` too; a session that
expired on the server raises :class:`~.client.SessionNotFound`. ``text`` and ``propagate`` run as
server tasks: progress is polled, and ``cancel`` cancels the task on the server (the session is left
as it was, as locally).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Optional, Sequence, Union

import numpy as np
import requests

from .client import (Client, InvalidInteraction, JobFailed, ServerBusy, ServerError, SessionBusy, SessionNotFound,
                     _sleep, result_bytes_for)
from .errors import Cancelled, InputError
from .interaction import MaskPatch, check_points
from .progress import CancelToken, ProgressEvent
from .prompts import default_dictionary
from .result import SegmentationResult
from .volume import Volume
from .wire import MEDIA_TYPE, decode_patch, decode_result, encode_mask

ERROR_HEADER = "X-MedSAM3-Error"


@dataclass
class RemoteObject:
    """One object of a remote session, as ``GET /v1/sessions/{id}`` lists it."""

    object_id: int
    name: str
    slices: list = field(default_factory=list)
    conditioning_slices: list = field(default_factory=list)

    def summary(self) -> dict:
        return {"object_id": self.object_id, "name": self.name, "slices": list(self.slices),
                "conditioning_slices": list(self.conditioning_slices)}


class RemoteSession:
    """A server session on one uploaded volume (see the module docstring); from :meth:`Client.open_session`."""

    #: seconds a click, seed, undo or object request may take before it is abandoned as unreachable (the first
    #: click on a slice computes its features: seconds on a CPU with a full-size model)
    CLICK_TIMEOUT_S = 60.0

    def __init__(self, client: Client, info: dict, volume: Optional[Volume] = None,
                 click_timeout: Optional[float] = None) -> None:
        self.client = client
        self.click_timeout = float(click_timeout or min(client.timeout, self.CLICK_TIMEOUT_S))
        self.id: str = info["session_id"]
        self.volume = volume
        self.shape = tuple(int(n) for n in info["shape"])
        self.n_slices = int(info["n_slices"])
        self.slice_axis: str = info["slice_axis"]
        self.axis = int(info["axis"])
        self.expires: float = float(info["expires"])
        self.closed = False

    # -- plumbing ----------------------------------------------------------------------------------
    def _call(self, method: str, path: str = "", **kwargs) -> requests.Response:
        if self.closed:
            raise SessionNotFound(f"session {self.id} is closed")
        if kwargs.pop("click", False):  # an interaction: a short read timeout, the GUI waits for it
            kwargs.setdefault("timeout", (min(10.0, self.click_timeout), self.click_timeout))
        response = self.client._request(method, f"/v1/sessions/{self.id}{path}", **kwargs)
        if response.status_code < 400:
            return response
        kind, detail = response.headers.get(ERROR_HEADER, ""), Client._detail(response)
        if kind == "unknown-object" or response.status_code in (413, 422):
            raise InvalidInteraction(detail)
        if response.status_code == 404:
            raise SessionNotFound(detail)
        if kind == "session-busy":
            raise SessionBusy(detail)
        if response.status_code == 503:
            raise ServerBusy(detail)
        raise ServerError(f"server error: {detail}")

    def _patch(self, response: requests.Response) -> Optional[MaskPatch]:
        if response.status_code == 204:
            return None
        try:
            return decode_patch(response.content, self.shape)
        except InputError as error:
            raise ServerError(f"the server's patch is unusable: {error}") from None

    def _wait(self, status: dict, progress: Optional[Callable[[ProgressEvent], None]],
              cancel: Optional[CancelToken]) -> bytes:
        """Poll a task until it ends; cancel it on the server when ``cancel`` fires. Returns its result."""
        task, last, asked = status["task_id"], None, False
        while True:
            if cancel is not None and cancel.cancelled and not asked:
                self._call("POST", f"/tasks/{task}/cancel")
                asked = True  # keep polling: the server stops within one slice and says so
            status = self._call("GET", f"/tasks/{task}").json()
            p = status["progress"]
            event = ProgressEvent(p["done"], p["total"], p["stage"], p.get("eta_s"))
            if progress is not None and event != last:
                progress(event)
                last = event
            state = status["state"]
            if state == "done":  # also when the task ended before a cancel reached it (as locally)
                return self._call("GET", f"/tasks/{task}/result").content
            if state == "cancelled":
                raise Cancelled(f"{status['kind']} cancelled; the session is unchanged")
            if state == "failed":
                if status.get("error_kind") == "invalid":
                    raise InvalidInteraction(status.get("error") or "the server refused the request")
                raise JobFailed(f"{status['kind']} failed on the server: {status.get('error')}")
            _sleep(self.client.poll_interval, None if asked else cancel)

    # -- the VolumeSession methods ------------------------------------------------------------------
    def text(self, prompts: Sequence[str], progress: Optional[Callable[[ProgressEvent], None]] = None,
             cancel: Optional[CancelToken] = None, keep_objects: bool = True) -> SegmentationResult:
        """Segment ``prompts`` on the server; each becomes an object (ids in
        ``result.parameters["session_object_ids"]``) unless ``keep_objects`` is False."""
        status = self._call("POST", "/text", json={"prompts": list(prompts), "keep_objects": bool(keep_objects)}).json()
        body = self._wait(status, progress, cancel)
        labels = default_dictionary().most_labels(list(prompts))
        try:
            result = decode_result(body, max_bytes=result_bytes_for(self.shape, labels))
        except InputError as error:
            raise ServerError(f"the server's result is unusable: {error}") from None
        if result.shape != self.shape:
            raise ServerError(f"the server returned a result of shape {result.shape} for a session of {self.shape}")
        return result

    def add_object(self, name: str = "") -> int:
        return int(self._call("POST", "/objects", json={"name": name}, click=True).json()["object_id"])

    def remove_object(self, object_id: int) -> None:
        self._call("DELETE", f"/objects/{int(object_id)}", click=True)

    def refine(self, object_id: int, points: Optional[Sequence] = None, labels: Optional[Sequence] = None,
               box: Optional[Sequence] = None, replace_prompts: bool = False) -> MaskPatch:
        """Clicks and/or a box on one slice (continuous voxel indices ``(z, y, x)``); the slice's new mask."""
        pts, lab, corners = check_points(points, labels, box)  # the local session's checks, before sending
        body = {"points": pts.tolist(), "labels": lab.tolist(),
                "box": None if corners is None else corners.tolist(), "replace_prompts": bool(replace_prompts)}
        return self._patch(self._call("POST", f"/objects/{int(object_id)}/refine", json=body, click=True))

    def seed(self, object_id: int, mask: np.ndarray, key_slices: Union[str, Sequence[int]] = "largest") -> MaskPatch:
        """Replace the object's mask with ``mask`` (bool ``(z, y, x)``, the volume's shape); sent bit-packed."""
        mask = np.asarray(mask)
        if mask.shape != self.shape:
            raise InputError(f"a seed mask must have the volume's shape {self.shape}, got {mask.shape}")
        body = encode_mask(mask, key_slices)
        return self._patch(self._call("POST", f"/objects/{int(object_id)}/seed", data=body,
                                      headers={"Content-Type": MEDIA_TYPE}, click=True))

    def propagate(self, object_id: int, progress: Optional[Callable[[ProgressEvent], None]] = None,
                  cancel: Optional[CancelToken] = None, first: Optional[int] = None,
                  last: Optional[int] = None) -> MaskPatch:
        """Re-track the object from its corrected slices (a server task: progress, cancel)."""
        status = self._call("POST", f"/objects/{int(object_id)}/propagate", json={"first": first, "last": last}).json()
        body = self._wait(status, progress, cancel)
        try:
            return decode_patch(body, self.shape)
        except InputError as error:
            raise ServerError(f"the server's patch is unusable: {error}") from None

    def undo(self) -> Optional[MaskPatch]:
        """Take back the last interaction; None when there is none."""
        return self._patch(self._call("POST", "/undo", click=True))

    def prepare(self, slices: Sequence[int], object_id: Optional[int] = None) -> None:
        """Have the server compute the features of ``slices`` ahead of clicks."""
        self._call("POST", "/prepare", json={"slices": [int(s) for s in slices],
                                             "object_id": None if object_id is None else int(object_id)})

    def mask(self, object_id: int) -> np.ndarray:
        """The object's whole mask, bool ``(z, y, x)`` (only its bounding box travels)."""
        full = np.zeros(self.shape, dtype=bool)
        patch = self._patch(self._call("GET", f"/objects/{int(object_id)}/mask"))
        patch.apply(full)
        return full

    def info(self) -> dict:
        """Shape, slice axis, expiry, objects and the latest task, as the server reports them (refreshes
        the session's idle time)."""
        info = self._call("GET").json()
        self.expires = float(info["expires"])
        return info

    @property
    def objects(self) -> dict[int, RemoteObject]:
        return {o["object_id"]: RemoteObject(**o) for o in self.info()["objects"]}

    def close(self) -> None:
        """Close the session on the server (frees its memory; an unknown session is not an error)."""
        if self.closed:
            return
        try:
            self._call("DELETE")
        except SessionNotFound:
            pass
        finally:
            self.closed = True

    def __enter__(self) -> "RemoteSession":
        return self

    def __exit__(self, *exc) -> None:
        try:
            self.close()
        except ServerError:  # best effort: the server expires it anyway
            pass
