"""``medsam3 serve`` + the torch-free client, over real HTTP on 127.0.0.1 with the tiny model."""

from __future__ import annotations

import json
import struct
import threading
import time

import numpy as np
import pytest
import requests

from phantoms import make_phantom
from MedicalSAM3Core.common.client import AuthError, Client, JobFailed, RequestRejected, ServerUnreachable, VersionMismatch
from MedicalSAM3Core.common.errors import Cancelled, InputError
from MedicalSAM3Core.common.options import SegmentOptions
from MedicalSAM3Core.common.progress import CancelToken
from MedicalSAM3Core.common.volume import Geometry, Volume
from MedicalSAM3Core.common.wire import MAGIC, MEDIA_TYPE, Limits, decode_request, encode_request
from MedicalSAM3Core.inference.engine import Segmenter
from MedicalSAM3Core.serving.app import ServerConfig

from harness import TOKEN, running_server, self_signed_certificate

OPTIONS = dict(score_threshold=0.2, new_object_threshold=0.22)
OBLIQUE = Geometry(spacing=(0.8, 0.9, 2.5), origin=(-120.0, 35.5, 410.0),
                   direction=tuple(np.linalg.qr(np.array([[0.9, 0.3, 0.1], [-0.2, 0.8, 0.4], [0.1, -0.3, 0.9]]))[0].ravel()))


def _volume(depth=10, seed=0, geometry=OBLIQUE) -> Volume:
    return Volume(make_phantom((depth, 40, 48), seed=seed), geometry, modality="CT")


def _assert_same(remote, local) -> None:
    np.testing.assert_array_equal(remote.label_map, local.label_map)
    assert remote.label_map.dtype == local.label_map.dtype
    assert remote.geometry == local.geometry
    assert json.loads(json.dumps(remote.sidecar())) == json.loads(json.dumps(local.sidecar()))
    assert len(remote.packed_masks) == len(local.packed_masks)
    for i in range(len(local.labels)):
        np.testing.assert_array_equal(remote.mask(i), local.mask(i))


@pytest.mark.parametrize("mode", ["slices", "propagate", "clips"])
def test_server_result_equals_local_engine(engine_server, tiny_model, mode):
    url, _ = engine_server
    volume = _volume()
    options = SegmentOptions(mode=mode, **OPTIONS)
    events = []
    remote = Client(url, token=TOKEN).segment(volume, ["liver", "spleen"], options, progress=events.append)
    local = Segmenter(tiny_model).segment(volume, ["liver", "spleen"], options)
    _assert_same(remote, local)
    assert any(label.voxel_count for label in remote.labels), "the comparison must not be between two empty results"
    assert events and events[-1].done == events[-1].total > 0


def test_info_and_health(engine_server):
    url, _ = engine_server
    assert requests.get(url + "/v1/health", timeout=10).json()["status"] == "ok"
    info = Client(url, token=TOKEN).info()
    assert info["device"] == "cpu" and info["model_id"] and info["queue"]["capacity"] == 8
    assert info["limits"]["max_voxels"] > 0
    schema = requests.get(url + "/openapi.json", timeout=10).json()
    assert "/v1/jobs" in schema["paths"] and MEDIA_TYPE in json.dumps(schema["paths"]["/v1/jobs"])


def test_token_required(engine_server):
    url, _ = engine_server
    body = encode_request(_volume(2), ["liver"])
    for headers in ({}, {"Authorization": "Bearer wrong-token-000000000000"}, {"Authorization": TOKEN}):
        assert requests.post(url + "/v1/jobs", data=body, headers=headers, timeout=10).status_code == 401
        assert requests.get(url + "/v1/info", headers=headers, timeout=10).status_code == 401
    with pytest.raises(AuthError, match="token"):
        Client(url, token="wrong-token-000000000000").info()
    with pytest.raises(AuthError):
        Client(url).info()


def _post(url, body):
    return requests.post(url + "/v1/jobs", data=body, timeout=30,
                         headers={"Authorization": f"Bearer {TOKEN}", "Content-Type": MEDIA_TYPE})


def _raw_message(header: dict, payload: bytes) -> bytes:
    head = json.dumps(header).encode()
    return MAGIC + struct.pack("<I", len(head)) + head + payload


def _good_header(**changes) -> dict:
    header = {"format": "medsam3-request", "wire_version": 1, "compression": "none",
              "arrays": [{"name": "volume", "dtype": "<i2", "shape": [2, 4, 4]}],
              "geometry": Geometry().to_dict(), "modality": "CT", "prompts": ["liver"], "options": {}}
    header.update(changes)
    return header


BAD_REQUESTS = {
    "garbage": (b"hello, this is not a volume", "magic"),
    "bad json": (MAGIC + struct.pack("<I", 5) + b"{nope", "JSON"),
    "wrong dtype": (_raw_message(_good_header(arrays=[{"name": "volume", "dtype": "|b1", "shape": [2, 4, 4]}]),
                                 bytes(32)), "voxel type"),
    "object dtype": (_raw_message(_good_header(arrays=[{"name": "volume", "dtype": "|O", "shape": [2, 4, 4]}]),
                                  bytes(256)), "voxel type"),
    "shape/payload mismatch": (_raw_message(_good_header(), bytes(10)), "payload"),
    "2D volume": (_raw_message(_good_header(arrays=[{"name": "volume", "dtype": "<i2", "shape": [4, 4]}]),
                               bytes(32)), "3D"),
    "geometry not orthonormal": (_raw_message(_good_header(geometry={"spacing": [1, 1, 1], "origin": [0, 0, 0],
                                                                     "direction": [1, 0, 0, 0, 1, 0, 0, 0, 5]}),
                                              bytes(64)), "orthonormal"),
    "geometry missing": (_raw_message(_good_header(geometry=None), bytes(64)), "geometry"),
    "empty prompts": (_raw_message(_good_header(prompts=[]), bytes(64)), "empty prompt"),
    "blank prompt": (_raw_message(_good_header(prompts=["  "]), bytes(64)), "empty prompt"),
    "unknown option": (_raw_message(_good_header(options={"turbo": True}), bytes(64)), "unknown option"),
    "bad option type": (_raw_message(_good_header(options={"score_threshold": "high"}), bytes(64)), "wrong type"),
    "mask threshold out of range": (_raw_message(_good_header(options={"mask_threshold": 1.5}), bytes(64)),
                                    "mask_threshold must be in [0, 1)"),
    "nan voxels": (_raw_message(_good_header(arrays=[{"name": "volume", "dtype": "<f4", "shape": [2, 4, 4]}]),
                                np.full(32, np.nan, "<f4").tobytes()), "NaN"),
    "wire version": (_raw_message(_good_header(wire_version=7), bytes(64)), "wire version"),
    "zip bomb": (_raw_message(_good_header(compression="gzip"),
                              __import__("gzip").compress(bytes(10_000_000))), "payload"),
}


@pytest.mark.parametrize("case", sorted(BAD_REQUESTS))
def test_malformed_requests_get_422_naming_the_problem(engine_server, case):
    url, _ = engine_server
    body, expected = BAD_REQUESTS[case]
    response = _post(url, body)
    assert response.status_code == 422, response.text
    assert expected.lower() in response.json()["detail"].lower()


def test_client_surfaces_rejections(engine_server):
    url, _ = engine_server
    volume = Volume(np.zeros((2, 4, 4), np.float32))
    volume.array[0, 0, 0] = np.nan  # bypasses the local check, as a buggy client would
    with pytest.raises(RequestRejected, match="NaN"):
        Client(url, token=TOKEN).submit(volume, ["liver"])


def test_unknown_job_is_404(engine_server):
    url, _ = engine_server
    headers = {"Authorization": f"Bearer {TOKEN}"}
    for method, path in (("GET", "/v1/jobs/nope"), ("GET", "/v1/jobs/nope/result"),
                         ("POST", "/v1/jobs/nope/cancel"), ("DELETE", "/v1/jobs/nope")):
        assert requests.request(method, url + path, headers=headers, timeout=10).status_code == 404


def test_oversize_body_is_413(tiny_model):
    from MedicalSAM3Core.serving.serve import engine_runner

    with running_server(engine_runner(tiny_model), ServerConfig(max_body_bytes=1000)) as (url, _):
        body = encode_request(_volume(4), ["liver"], compression="none")
        assert len(body) > 1000
        response = _post(url, body)
        assert response.status_code == 413 and "1000" in response.json()["detail"]
        with pytest.raises(RequestRejected, match="limit"):
            Client(url).submit(_volume(4), ["liver"])


def test_oversize_volume_is_422(tiny_model):
    from MedicalSAM3Core.common.wire import Limits
    from MedicalSAM3Core.serving.serve import engine_runner

    with running_server(engine_runner(tiny_model), ServerConfig(limits=Limits(max_voxels=1000))) as (url, _):
        response = _post(url, encode_request(_volume(4), ["liver"]))
        assert response.status_code == 422 and "limit" in response.json()["detail"]


def test_two_clients_at_once(engine_server, tiny_model):
    url, _ = engine_server
    jobs = {"a": (_volume(8, seed=1), ["liver"]), "b": (_volume(12, seed=2), ["spleen", "aorta"])}
    results, errors = {}, []

    def work(name):
        try:
            volume, prompts = jobs[name]
            results[name] = Client(url, token=TOKEN).segment(volume, prompts, SegmentOptions(mode="slices", **OPTIONS))
        except Exception as error:  # reported below
            errors.append(error)

    threads = [threading.Thread(target=work, args=(name,)) for name in jobs]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(120)
    assert not errors
    for name, (volume, prompts) in jobs.items():
        _assert_same(results[name], Segmenter(tiny_model).segment(volume, prompts, SegmentOptions(mode="slices", **OPTIONS)))


def test_cancel_stops_a_running_job_and_the_next_runs(engine_server, tiny_model):
    url, app = engine_server
    client = Client(url, token=TOKEN, poll_interval=0.05)
    cancel = CancelToken()
    seen = []

    def on_progress(event):
        seen.append(event)
        if event.done > 0:
            cancel.cancel()

    long_volume = _volume(300)
    started = time.monotonic()
    with pytest.raises(Cancelled):
        client.segment(long_volume, ["liver"], SegmentOptions(mode="propagate", batch_size=1, **OPTIONS),
                       progress=on_progress, cancel=cancel)
    assert time.monotonic() - started < 30
    assert seen and seen[-1].done < seen[-1].total, "cancel must stop the job before the end"
    # the worker is free again and the next job is correct
    deadline = time.monotonic() + 30
    while app.state.jobs.counts()["running"] and time.monotonic() < deadline:
        time.sleep(0.05)
    assert app.state.jobs.counts()["running"] == 0
    volume = _volume(6)
    options = SegmentOptions(mode="slices", **OPTIONS)
    _assert_same(client.segment(volume, ["liver"], options), Segmenter(tiny_model).segment(volume, ["liver"], options))


def test_queue_full_is_429_and_cancelled_queued_job_never_runs():
    gate, ran = threading.Event(), []

    def run(request, progress, cancel):  # holds the single worker until the test opens the gate
        ran.append(request.prompts[0])
        gate.wait(30)
        cancel.raise_if_cancelled()
        from MedicalSAM3Core.common.result import SegmentationResult

        return SegmentationResult(np.zeros(request.volume.shape, np.uint8), request.volume.geometry, [])

    with running_server(run, ServerConfig(queue_size=1, retry_after=3)) as (url, _):
        first = _post(url, encode_request(_volume(2), ["first"])).json()["job_id"]
        deadline = time.monotonic() + 10
        while not ran and time.monotonic() < deadline:
            time.sleep(0.02)
        second = _post(url, encode_request(_volume(2), ["second"]))
        assert second.status_code == 202
        third = _post(url, encode_request(_volume(2), ["third"]))
        assert third.status_code == 429 and third.headers["Retry-After"] == "3"
        assert "full" in third.json()["detail"]
        client = Client(url)
        assert client.cancel(second.json()["job_id"])["state"] == "cancelled"
        gate.set()
        deadline = time.monotonic() + 10
        while client.status(first)["state"] != "done" and time.monotonic() < deadline:
            time.sleep(0.05)
        assert client.status(first)["state"] == "done"
        assert ran == ["first"]
        with pytest.raises(JobFailed, match="cancelled"):
            client.result(second.json()["job_id"])


def test_results_expire_after_ttl(tiny_model):
    from MedicalSAM3Core.serving.serve import engine_runner

    with running_server(engine_runner(tiny_model), ServerConfig(result_ttl=0.3)) as (url, app):
        client = Client(url, poll_interval=0.05)
        job = client.submit(_volume(2), ["liver"], SegmentOptions(mode="slices", **OPTIONS))
        deadline = time.monotonic() + 30
        while client.status(job)["state"] != "done" and time.monotonic() < deadline:
            time.sleep(0.05)
        time.sleep(0.5)
        with pytest.raises(JobFailed, match="expired"):
            client.status(job)
        assert app.state.jobs.counts()["finished_kept"] == 0


def test_engine_failures_reach_the_client_and_the_worker_survives():
    calls = []

    def run(request, progress, cancel):
        calls.append(request.prompts)
        if request.prompts == ["boom"]:
            raise RuntimeError("CUDA out of memory. Tried to allocate 20.00 GiB")
        if request.prompts == ["bad"]:
            raise InputError("the prompt 'bad' is not usable")
        from MedicalSAM3Core.common.result import SegmentationResult

        return SegmentationResult(np.ones(request.volume.shape, np.uint8), request.volume.geometry, [])

    with running_server(run, ServerConfig()) as (url, _):
        client = Client(url, poll_interval=0.05)
        with pytest.raises(JobFailed, match="out of GPU memory.*slices"):
            client.segment(_volume(2), ["boom"])
        with pytest.raises(JobFailed, match="'bad' is not usable"):
            client.segment(_volume(2), ["bad"])
        assert client.segment(_volume(2), ["fine"]).label_map.all()
    assert calls == [["boom"], ["bad"], ["fine"]]


def test_unreachable_and_version_mismatch(engine_server, monkeypatch):
    with pytest.raises(ServerUnreachable, match="cannot reach"):
        Client("http://127.0.0.1:9", timeout=2).info()
    with pytest.raises(Exception, match="URL"):
        Client("gpu-box:8765")
    url, _ = engine_server
    import MedicalSAM3Core.common.client as client_module

    monkeypatch.setattr(client_module, "API_VERSION", 2)
    with pytest.raises(VersionMismatch, match="API"):
        Client(url, token=TOKEN).info()


def test_refuses_public_bind_without_token(tmp_path):
    from MedicalSAM3Core.cli import main
    from MedicalSAM3Core.serving.serve import ServeSettings, check_settings

    with pytest.raises(InputError, match="without an access token"):
        check_settings(ServeSettings(model="x", host="0.0.0.0"))
    check_settings(ServeSettings(model="x", host="0.0.0.0", config=ServerConfig(token=TOKEN)))
    check_settings(ServeSettings(model="x", host="127.0.0.1"))
    assert main(["serve", "--host", "0.0.0.0", "--model", str(tmp_path / "missing")]) == 2
    short = tmp_path / "short.txt"
    short.write_text("abc\n")
    assert main(["serve", "--host", "0.0.0.0", "--token-file", str(short)]) == 2


@pytest.mark.parametrize("option", [["--header-timeout", "0"], ["--keep-alive-timeout", "nan"],
                                    ["--max-connections", "0"]])
def test_serve_refuses_bad_connection_limits_with_exit_2(option, tmp_path, capsys):
    from MedicalSAM3Core.cli import main

    assert main(["serve", "--model", str(tmp_path / "missing"), *option]) == 2
    assert option[0] in capsys.readouterr().err


def test_token_command(tmp_path):
    from MedicalSAM3Core.cli import main

    path = tmp_path / "token.txt"
    assert main(["token", str(path)]) == 0
    assert len(path.read_text().strip()) >= 32 and (path.stat().st_mode & 0o777) == 0o600
    assert main(["token", str(path)]) == 2  # never overwritten


def test_cli_segment_through_server_writes_the_same_files(engine_server, tiny_model_dir, tmp_path, monkeypatch,
                                                          capsys):
    import SimpleITK as sitk

    from MedicalSAM3Core.cli import main
    from MedicalSAM3Core.imaging.io import image_from_array

    url, _ = engine_server
    image = tmp_path / "ct.nii.gz"
    sitk.WriteImage(image_from_array(_volume(6).array, OBLIQUE), str(image))
    token = tmp_path / "token.txt"
    token.write_text(TOKEN + "\n")
    common = ["segment", str(image), "-p", "liver, spleen", "--mode", "slices", "--threshold", "0.2", "-q"]
    assert main(common + ["--server", url, "--token-file", str(token), "-o", str(tmp_path / "remote.nii.gz")]) == 0
    assert main(common + ["--model", str(tiny_model_dir), "--device", "cpu", "-o", str(tmp_path / "local.nii.gz")]) == 0
    remote = sitk.ReadImage(str(tmp_path / "remote.nii.gz"))
    local = sitk.ReadImage(str(tmp_path / "local.nii.gz"))
    np.testing.assert_array_equal(sitk.GetArrayFromImage(remote), sitk.GetArrayFromImage(local))
    assert remote.GetDirection() == local.GetDirection() and remote.GetOrigin() == local.GetOrigin()
    remote_sidecar = json.loads((tmp_path / "remote.json").read_text())
    local_sidecar = json.loads((tmp_path / "local.json").read_text())
    assert remote_sidecar["labels"] == local_sidecar["labels"]
    assert main(common + ["--server", url, "--model", "x", "-o", str(tmp_path / "x.nii.gz")]) == 2
    capsys.readouterr()
    free_text = ["segment", str(image), "-p", "liver, my blob", "--mode", "slices", "-q", "--server", url,
                 "--token-file", str(token), "-o", str(tmp_path / "free.nii.gz")]
    assert main(free_text) == 0  # the server's warnings are said on this side too, as a local run says them
    warned = [w for w in json.loads((tmp_path / "free.json").read_text())["warnings"] if "my blob" in w]
    assert warned and f"medsam3: warning: {warned[0]}" in capsys.readouterr().err


def test_submit_endpoint_fuzz_never_500():
    """Hypothesis-generated bodies (valid, malformed, truncated, random) against the real endpoint."""
    from hypothesis import HealthCheck, given, settings
    from fuzzing import fuzz_bodies

    from MedicalSAM3Core.common.result import SegmentationResult

    def run(request, progress, cancel):
        return SegmentationResult(np.zeros(request.volume.shape, np.uint8), request.volume.geometry, [])

    statuses = []
    with running_server(run, ServerConfig(queue_size=64, max_body_bytes=1 << 16)) as (url, _):
        session = requests.Session()

        @settings(max_examples=150, deadline=None, suppress_health_check=list(HealthCheck))
        @given(fuzz_bodies())
        def post(body):
            response = session.post(url + "/v1/jobs", data=body, headers={"Content-Type": MEDIA_TYPE}, timeout=30)
            statuses.append(response.status_code)
            assert response.status_code in (202, 413, 422, 429), response.text
            assert "detail" in response.json() or response.status_code == 202

        post()
        valid = _post(url, encode_request(_volume(2), ["liver"]))
        assert valid.status_code == 202
    assert statuses.count(422) > 50


def test_bounded_load_test_loses_nothing():
    """The load test against a server of two workers (issue #29: several devices behind one queue)."""
    import subprocess
    import sys
    from pathlib import Path

    script = Path(__file__).resolve().parents[1] / "benchmarks" / "load_test.py"
    out = subprocess.run([sys.executable, str(script), "--jobs", "20", "--threads", "4", "--depth", "4",
                          "--deadline", "240", "--workers", "2"], capture_output=True, text=True, timeout=400)
    assert out.returncode == 0, out.stdout + out.stderr
    assert "completed 20, failed explicitly 0, lost 0" in out.stdout, out.stdout
    assert "latency p50" in out.stdout


def test_gzip_only_client_gets_a_gzip_result_and_logs_hold_no_image_data(engine_server, caplog):
    """A client without zstandard (e.g. a bare Slicer) sends gzip and must get gzip back."""
    import logging

    from MedicalSAM3Core.common.wire import decode_result

    url, _ = engine_server
    headers = {"Authorization": f"Bearer {TOKEN}", "Content-Type": MEDIA_TYPE}
    body = encode_request(_volume(3), ["liver"], SegmentOptions(mode="slices", **OPTIONS), compression="gzip",
                          accept=["gzip", "none"])
    with caplog.at_level(logging.INFO, logger="medsam3.server"):
        job = requests.post(url + "/v1/jobs", data=body, headers=headers, timeout=30).json()["job_id"]
        deadline = time.monotonic() + 60
        while requests.get(f"{url}/v1/jobs/{job}", headers=headers, timeout=10).json()["state"] != "done":
            assert time.monotonic() < deadline
            time.sleep(0.05)
        content = requests.get(f"{url}/v1/jobs/{job}/result", headers=headers, timeout=10).content
    head_len = struct.unpack("<I", content[8:12])[0]
    assert json.loads(content[12:12 + head_len])["compression"] == "gzip"
    assert decode_result(content).shape == (3, 40, 48)
    text = caplog.text
    assert job in text and "['liver']" in text and "[3, 40, 48]" in text and "done in" in text
    assert len(text) < 5000  # job metadata only, never voxel data


def test_tls_with_a_self_signed_certificate(tmp_path, tiny_model):
    """uvicorn's TLS options as documented: the client verifies the server against the given CA."""
    from MedicalSAM3Core.serving.serve import engine_runner

    cert, key = self_signed_certificate(tmp_path)
    config = ServerConfig(token=TOKEN)
    with running_server(engine_runner(tiny_model), config, ssl_certfile=str(cert), ssl_keyfile=str(key)) as (url, _):
        assert url.startswith("https://")
        volume = _volume(3)
        options = SegmentOptions(mode="slices", **OPTIONS)
        result = Client(url, token=TOKEN, verify=str(cert)).segment(volume, ["liver"], options)
        _assert_same(result, Segmenter(tiny_model).segment(volume, ["liver"], options))
        with pytest.raises(ServerUnreachable, match="TLS|certificate"):
            Client(url, token=TOKEN).info()  # not trusted without the CA
        with pytest.raises(ServerUnreachable):
            Client(url.replace("https", "http"), token=TOKEN, timeout=5).info()


def _bomb(voxels_mib: int) -> bytes:
    """A small zstd body whose header claims ``voxels_mib`` MiB of uint8 zeros (they compress to nothing)."""
    return encode_request(Volume(np.zeros((voxels_mib, 1024, 1024), np.uint8)), ["liver"], compression="zstd")


def test_cancelled_or_deleted_queued_jobs_free_their_slot_at_once():
    gate, ran = threading.Event(), []

    def run(request, progress, cancel):
        ran.append(request.prompts[0])
        gate.wait(30)
        from MedicalSAM3Core.common.result import SegmentationResult

        return SegmentationResult(np.zeros(request.volume.shape, np.uint8), request.volume.geometry, [])

    with running_server(run, ServerConfig(queue_size=1)) as (url, _):
        client = Client(url)
        _post(url, encode_request(_volume(2), ["first"]))
        deadline = time.monotonic() + 10
        while not ran and time.monotonic() < deadline:
            time.sleep(0.02)
        second = _post(url, encode_request(_volume(2), ["second"])).json()["job_id"]
        assert _post(url, encode_request(_volume(2), ["third"])).status_code == 429
        client.cancel(second)  # the slot is free now, not when the running job ends
        third = _post(url, encode_request(_volume(2), ["third"]))
        assert third.status_code == 202 and client.info()["queue"]["queued"] == 1
        client.delete(third.json()["job_id"])
        assert _post(url, encode_request(_volume(2), ["fourth"])).status_code == 202
        gate.set()
        deadline = time.monotonic() + 10
        while len(ran) < 2 and time.monotonic() < deadline:
            time.sleep(0.02)
        assert ran == ["first", "fourth"]


def test_small_bodies_claiming_big_volumes_do_not_fill_the_servers_memory():
    """Issue #30 item 1: a body of a few KB claiming hundreds of MiB is refused from its header when it
    exceeds the limits, and is never decoded while the queue is full; memory stays flat."""
    import tracemalloc

    gate = threading.Event()

    def run(request, progress, cancel):
        gate.wait(30)
        raise RuntimeError("not reached in this test")

    bomb = _bomb(64)
    assert len(bomb) < 100_000
    config = ServerConfig(queue_size=1, max_body_bytes=5 << 20, limits=Limits(max_voxels=32 << 20))
    with running_server(run, config) as (url, _):
        tracemalloc.start()
        try:
            before = tracemalloc.get_traced_memory()[0]
            for _ in range(4):  # more voxels than this server accepts: refused before decompressing
                response = _post(url, bomb)
                assert response.status_code == 422 and "exceeds this server's limits" in response.json()["detail"]
            assert tracemalloc.get_traced_memory()[1] - before < 20 << 20
        finally:
            tracemalloc.stop()
    small = _bomb(16)  # within the limits; the queue is full: refused before decoding
    with running_server(run, ServerConfig(queue_size=1)) as (url, _):
        assert _post(url, encode_request(_volume(2), ["first"])).status_code == 202  # runs (waits at the gate)
        assert _post(url, encode_request(_volume(2), ["second"])).status_code == 202  # queued: the queue is full
        tracemalloc.start()
        try:
            before = tracemalloc.get_traced_memory()[0]
            for _ in range(4):
                assert _post(url, small).status_code == 429
            assert tracemalloc.get_traced_memory()[1] - before < 8 << 20  # 16 MiB each if they were decoded
        finally:
            tracemalloc.stop()
            gate.set()


@pytest.mark.parametrize("change, message", [
    (lambda h: h["arrays"][0].update(dtype=[]), "voxel type"),
    (lambda h: h["arrays"][0].update(dtype={}), "voxel type"),
    (lambda h: h["geometry"].update(direction=[1, 0.5, 0, 0, 1, 0, 0, 0, 1]), "orthonormal"),
    (lambda h: h["geometry"].update(direction=[2, 0, 0, 0, 0.5, 0, 0, 0, 1]), "orthonormal"),
    (lambda h: h["geometry"].update(spacing=[1e200, 1, 1]), "implausible"),
])
def test_malformed_headers_are_named_not_500(change, message):
    body = encode_request(_volume(2), ["liver"], compression="none")
    head_len = struct.unpack("<I", body[8:12])[0]
    header = json.loads(body[12:12 + head_len])
    change(header)
    head = json.dumps(header).encode()
    with pytest.raises(InputError, match=message):
        decode_request(MAGIC + struct.pack("<I", len(head)) + head + body[12 + head_len:])


def test_finished_results_expire_on_a_timer_without_any_request():
    from MedicalSAM3Core.common.result import SegmentationResult
    from MedicalSAM3Core.common.wire import JobRequest
    from MedicalSAM3Core.serving.jobs import JobManager

    def run(request, progress, cancel):
        return SegmentationResult(np.zeros(request.volume.shape, np.uint8), request.volume.geometry, [])

    manager = JobManager(run, queue_size=2, result_ttl=0.2)
    manager.start()
    try:
        job = manager.submit(JobRequest(_volume(2), ["liver"]), "test", 1)
        deadline = time.monotonic() + 10
        while manager._jobs and time.monotonic() < deadline:  # no get(), no submit(): only the timer
            time.sleep(0.05)
        assert job.finished is not None and manager._jobs == {}
    finally:
        manager.stop()


def test_the_client_refuses_a_reply_bigger_than_what_it_asked_for():
    from MedicalSAM3Core.common.client import ServerError
    from MedicalSAM3Core.common.result import SegmentationResult

    def run(request, progress, cancel):  # a hostile server: a tiny volume in, 64 MiB of zeros out
        return SegmentationResult(np.zeros((64, 1024, 1024), np.uint8), request.volume.geometry, [])

    with running_server(run, ServerConfig()) as (url, _):
        with pytest.raises(ServerError, match="unusable.*limit"):
            Client(url, poll_interval=0.05).segment(_volume(2), ["liver"])


def test_a_client_leaving_mid_upload_is_one_line_in_the_log(caplog):
    import logging
    import socket
    from urllib.parse import urlparse

    with running_server(lambda *a: None, ServerConfig()) as (url, _):
        address = urlparse(url)
        with caplog.at_level(logging.INFO):
            with socket.create_connection((address.hostname, address.port), timeout=5) as sock:
                sock.sendall(b"POST /v1/jobs HTTP/1.1\r\nHost: x\r\nContent-Type: application/vnd.medsam3\r\n"
                             b"Content-Length: 100000\r\n\r\n" + b"x" * 1000)
            deadline = time.monotonic() + 5
            while "disconnected during its upload" not in caplog.text and time.monotonic() < deadline:
                time.sleep(0.05)
        assert "disconnected during its upload" in caplog.text
        assert "Traceback" not in caplog.text and not [r for r in caplog.records if r.levelno >= logging.ERROR]
        assert Client(url).health()["status"] == "ok"


def test_unsafe_serving_settings_are_said_and_short_tokens_refused(tmp_path):
    import os

    from MedicalSAM3Core.serving.serve import ServeSettings, read_token, settings_warnings

    short = tmp_path / "short"
    short.write_text("0123456789abcdefghij\n")  # 20 characters
    with pytest.raises(InputError, match="too short"):
        read_token(short)
    token_file = tmp_path / "token"
    token_file.write_text("x" * 43 + "\n")
    os.chmod(token_file, 0o644)
    warnings = settings_warnings(ServeSettings(model="m", host="0.0.0.0"), token_file)
    assert any("chmod 600" in w for w in warnings) and any("without TLS" in w for w in warnings)
    os.chmod(token_file, 0o600)
    assert settings_warnings(ServeSettings(model="m", host="127.0.0.1"), token_file) == []
