"""Client for ``medsam3 serve`` (torch-free: numpy + requests, both in 3D Slicer's Python).

>>> client = Client("https://gpu-box:8765", token=open("token.txt").read().strip())
>>> result = client.segment(volume, ["liver", "spleen"], SegmentOptions(mode="slices"),
...                         progress=print, cancel=token)

``segment`` returns the same :class:`SegmentationResult` the local engine returns. For clicks and
corrections, ``client.open_session(volume, options)`` uploads the volume once and returns a
:class:`~.remote_session.RemoteSession` with the methods of the engine's ``VolumeSession``. It uploads the
volume once (gzip-compressed, :mod:`.wire`), polls the job's progress, and downloads the result.
Errors are :class:`ServerError` subclasses whose messages say what to do. Only idempotent requests
(GET, DELETE) are retried on connection errors; a submission is retried only when the server
answered 429 (queue full), which means it did not take the job.
"""

from __future__ import annotations

import ipaddress
import logging
import time
from typing import Callable, Optional, Sequence
from urllib.parse import urlparse

import numpy as np
import requests
from requests.adapters import HTTPAdapter
from urllib3.util.retry import Retry

from .. import __version__
from .errors import Cancelled, InputError, MedSAM3Error
from .options import SegmentOptions
from .progress import CancelToken, ProgressEvent
from .prompts import default_dictionary
from .result import SegmentationResult
from .volume import Volume
from .wire import MEDIA_TYPE, WIRE_VERSION, decode_result, encode_request

log = logging.getLogger(__name__)
API_VERSION = 1


class ServerError(MedSAM3Error):
    """Something went wrong talking to the server (base class)."""


class ServerUnreachable(ServerError):
    """No connection (wrong URL, server down, firewall, TLS failure)."""


class AuthError(ServerError):
    """The server rejected the access token (HTTP 401)."""


class VersionMismatch(ServerError):
    """Client and server speak different API or wire versions."""


class RequestRejected(ServerError):
    """The server refused the request as malformed or too large (HTTP 413/422)."""


class ServerBusy(ServerError):
    """The server's queue stayed full for longer than the client was willing to wait (HTTP 429)."""


class JobFailed(ServerError):
    """The job ran and failed on the server; the message is the server's explanation."""


class SessionNotFound(ServerError):
    """The server has no such interactive session (closed, or expired after its idle time-to-live)."""


class SessionBusy(ServerError):
    """The session runs a long task (text prompts, propagation); cancel it or wait for it (HTTP 409)."""


class InvalidInteraction(RequestRejected, InputError):
    """The server refused a session request as unusable (unknown object, points on two slices, a seed
    mask of the wrong shape...). An :class:`InputError`, as the same mistake on a local session is."""


class Client:
    """A connection to one ``medsam3 serve`` instance.

    ``timeout`` bounds every single HTTP request (connect and read); ``busy_timeout`` how long
    :meth:`submit` keeps retrying while the queue is full; ``verify`` is passed to requests
    (a CA bundle path for self-signed TLS certificates, or True).
    """

    def __init__(self, url: str, token: Optional[str] = None, timeout: float = 60.0, poll_interval: float = 0.5,
                 busy_timeout: float = 300.0, verify: bool | str = True) -> None:
        parsed = urlparse(url)
        if parsed.scheme not in ("http", "https") or not parsed.netloc:
            raise ServerError(f"server URL must look like http://host:port or https://host:port, got {url!r}")
        self.url = url.rstrip("/")
        self.timeout, self.poll_interval, self.busy_timeout = timeout, poll_interval, busy_timeout
        self._session = requests.Session()
        self._verify = verify  # passed per request: a Session-level value loses to $REQUESTS_CA_BUNDLE
        if token:
            self._session.headers["Authorization"] = f"Bearer {token.strip()}"
            if parsed.scheme == "http" and not is_loopback(parsed.hostname or ""):
                log.warning("sending the access token to %s without TLS; use https:// outside a trusted network",
                            parsed.hostname)
        retry = Retry(total=3, connect=3, read=2, backoff_factor=0.5, status_forcelist=(502, 503, 504),
                      allowed_methods=frozenset({"GET", "DELETE"}), raise_on_status=False)
        adapter = HTTPAdapter(max_retries=retry)
        self._session.mount("http://", adapter)
        self._session.mount("https://", adapter)
        self._checked = False

    # -- low level ------------------------------------------------------------------------------
    def _request(self, method: str, path: str, **kwargs) -> requests.Response:
        kwargs.setdefault("timeout", (min(10.0, self.timeout), self.timeout))
        kwargs.setdefault("verify", self._verify)
        try:
            response = self._session.request(method, self.url + path, **kwargs)
        except requests.exceptions.SSLError as error:
            raise ServerUnreachable(f"TLS handshake with {self.url} failed ({error}); check the certificate "
                                    "(pass the CA bundle as verify=...)") from None
        except (requests.exceptions.ConnectionError, requests.exceptions.Timeout) as error:
            raise ServerUnreachable(f"cannot reach the server at {self.url}: {type(error).__name__}; check the URL, "
                                    "that 'medsam3 serve' is running there and that the port is open") from None
        if response.status_code == 401:
            raise AuthError(f"the server at {self.url} rejected the access token; check the token "
                            "(the one in the server's --token-file)")
        return response

    @staticmethod
    def _detail(response: requests.Response) -> str:
        try:
            detail = response.json().get("detail")
        except ValueError:
            detail = None
        return str(detail) if detail else f"HTTP {response.status_code}: {response.text[:200]}"

    def _check(self, response: requests.Response) -> requests.Response:
        if response.status_code in (413, 422):
            raise RequestRejected(f"the server refused the request: {self._detail(response)}")
        if response.status_code == 404:
            raise JobFailed(f"the server does not know this job: {self._detail(response)}")
        if response.status_code >= 400:
            raise ServerError(f"server error: {self._detail(response)}")
        return response

    # -- API --------------------------------------------------------------------------------------
    def health(self) -> dict:
        return self._check(self._request("GET", "/v1/health")).json()

    def info(self) -> dict:
        """Server version, model id, device, GPU memory, queue and limits; checks that the server
        speaks this client's API and wire versions (:class:`VersionMismatch`, one sentence saying
        which side to update, before anything is uploaded)."""
        response = self._request("GET", "/v1/info")
        if response.status_code == 404:
            raise VersionMismatch(f"The server at {self.url} does not offer the Medical SAM3 /v1 API that this "
                                  f"client (version {__version__}) speaks: check the address, or update the server "
                                  f"to the same version.")
        info = self._check(response).json()
        if info.get("api_version") != API_VERSION or info.get("wire_version") != WIRE_VERSION:
            raise VersionMismatch(version_mismatch_message(self.url, info))
        self._checked = True
        return info

    def wait_until_ready(self, timeout: float = 120.0, interval: float = 0.5,
                         cancel: Optional[CancelToken] = None) -> dict:
        """Poll until the server answers (e.g. right after starting it); returns :meth:`info`."""
        deadline = time.monotonic() + timeout
        while True:
            if cancel is not None:
                cancel.raise_if_cancelled()
            try:
                return self.info()
            except ServerUnreachable:
                if time.monotonic() > deadline:
                    raise
                time.sleep(interval)

    def submit(self, volume: Volume, prompts: Sequence[str], options: Optional[SegmentOptions] = None,
               cancel: Optional[CancelToken] = None) -> str:
        """Upload one job; returns its id. Waits (up to ``busy_timeout``) while the queue is full."""
        if not self._checked:
            self.info()
        body = encode_request(volume, prompts, options)
        deadline = time.monotonic() + self.busy_timeout
        while True:
            if cancel is not None:
                cancel.raise_if_cancelled()
            response = self._request("POST", "/v1/jobs", data=body, headers={"Content-Type": MEDIA_TYPE})
            if response.status_code != 429:
                return self._check(response).json()["job_id"]
            wait = float(response.headers.get("Retry-After", "5"))
            if time.monotonic() + wait > deadline:
                raise ServerBusy(f"the server's queue stayed full for {self.busy_timeout:.0f} s; try again later")
            _sleep(wait, cancel)

    def status(self, job_id: str) -> dict:
        return self._check(self._request("GET", f"/v1/jobs/{job_id}")).json()

    def cancel(self, job_id: str) -> dict:
        return self._check(self._request("POST", f"/v1/jobs/{job_id}/cancel")).json()

    def delete(self, job_id: str) -> None:
        response = self._request("DELETE", f"/v1/jobs/{job_id}")
        if response.status_code not in (204, 404):
            self._check(response)

    def open_session(self, volume: Volume, options: Optional[SegmentOptions] = None,
                     cancel: Optional[CancelToken] = None):
        """Upload ``volume`` once and open an interactive session on it: a
        :class:`~.remote_session.RemoteSession`, used as the engine's ``VolumeSession`` is (text,
        clicks, seeds, propagation, undo) and closed with :meth:`~.remote_session.RemoteSession.close`
        (or a ``with`` block). Raises :class:`ServerBusy` when the server holds its maximum of sessions."""
        from .remote_session import RemoteSession

        if not self._checked:
            self.info()
        if cancel is not None:
            cancel.raise_if_cancelled()
        body = encode_request(volume, [], options)
        response = self._request("POST", "/v1/sessions", data=body, headers={"Content-Type": MEDIA_TYPE})
        if response.status_code == 503:
            raise ServerBusy(f"the server cannot open a session now: {self._detail(response)}")
        if response.status_code in (404, 405):
            raise VersionMismatch(f"the server at {self.url} does not offer interactive sessions (/v1/sessions): "
                                  "update the server to this client's version")
        info = self._check(response).json()
        if tuple(info["shape"]) != volume.shape:
            raise ServerError(f"the server opened a session of shape {info['shape']} for a volume of shape "
                              f"{volume.shape}; refusing it")
        return RemoteSession(self, info, volume)

    def result(self, job_id: str, max_bytes: int = 1 << 36) -> SegmentationResult:
        """The job's result; a reply that would decode to more than ``max_bytes`` is refused."""
        response = self._request("GET", f"/v1/jobs/{job_id}/result")
        if response.status_code == 409:
            raise JobFailed(self._detail(response))
        try:
            return decode_result(self._check(response).content, max_bytes=max_bytes)
        except MedSAM3Error as error:
            raise ServerError(f"the server's result is unusable: {error}") from None

    def segment(self, volume: Volume, prompts: Sequence[str], options: Optional[SegmentOptions] = None,
                progress: Optional[Callable[[ProgressEvent], None]] = None,
                cancel: Optional[CancelToken] = None) -> SegmentationResult:
        """Segment ``volume`` on the server; blocks until done. Raises :class:`Cancelled` if
        ``cancel`` fires (the server job is cancelled and deleted) and :class:`JobFailed` with the
        server's explanation if the job fails. The job is deleted on the server afterwards."""
        job_id = self.submit(volume, prompts, options, cancel)
        try:
            last = None
            while True:
                if cancel is not None and cancel.cancelled:
                    self.cancel(job_id)
                    raise Cancelled("segmentation cancelled")
                status = self.status(job_id)
                event = ProgressEvent(status["progress"]["done"], status["progress"]["total"],
                                      status["progress"]["stage"], status["progress"].get("eta_s"))
                if progress is not None and event != last:
                    progress(event)
                    last = event
                if status["state"] == "done":
                    labels = default_dictionary().most_labels(prompts)  # "kidneys": two labels
                    result = self.result(job_id, max_bytes=result_bytes_for(volume.shape, labels))
                    break
                if status["state"] == "cancelled":
                    raise Cancelled(f"the job was cancelled on the server: {status.get('error')}")
                if status["state"] == "failed":
                    raise JobFailed(f"segmentation failed on the server: {status.get('error')}")
                _sleep(self.poll_interval, cancel)
        finally:
            try:
                self.delete(job_id)
            except ServerError as error:  # best effort: the server expires it anyway
                log.warning("could not delete job %s: %s", job_id, error)
        if result.shape != volume.shape or result.geometry != volume.geometry:
            raise ServerError(f"the server returned a result on another grid ({result.shape}) than the volume "
                              f"sent ({volume.shape}); refusing it")
        return result


def result_bytes_for(shape: Sequence[int], n_prompts: int) -> int:
    """The most a result for a volume of ``shape`` and ``n_prompts`` labels decodes to: a label map
    of up to 2 bytes per voxel and one bit-packed mask per label (a larger reply is refused; a
    paired structure is two labels: :meth:`PromptDictionary.most_labels`)."""
    voxels = int(np.prod(shape, dtype=np.int64))
    return 2 * voxels + n_prompts * (voxels // 8 + 1) + (1 << 16)


def version_mismatch_message(url: str, info: dict) -> str:
    """One sentence for a server whose API or wire version differs from this client's: both
    versions, and which side to update (the older one)."""
    api, wire = info.get("api_version"), info.get("wire_version")
    server = (api, wire) if isinstance(api, int) and isinstance(wire, int) else (0, 0)
    older = "the server" if server < (API_VERSION, WIRE_VERSION) else "this client (the 3D Slicer extension)"
    return (f"The Medical SAM3 server at {url} is version {info.get('version', 'unknown')} (API {api}, wire {wire}) "
            f"and this client is version {__version__} (API {API_VERSION}, wire {WIRE_VERSION}); they cannot work "
            f"together: update {older} so both are the same version.")


def _sleep(seconds: float, cancel: Optional[CancelToken]) -> None:
    """Sleep, waking early (within 0.1 s) when ``cancel`` fires."""
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        if cancel is not None and cancel.cancelled:
            return
        time.sleep(min(0.1, max(0.0, end - time.monotonic())))


def is_loopback(host: str) -> bool:
    """True for 127.0.0.0/8, ::1 and ``localhost``; False for 0.0.0.0, LAN addresses and other names."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False
