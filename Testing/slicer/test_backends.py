"""The module's compute path as Slicer runs it: a real local engine process (``medsam3 serve`` started by
:class:`LocalServer`), the torch-free client, a background task polled like the panel's timer, and
the segments written into a real MRML scene (slicer-core)."""

from __future__ import annotations

import subprocess
import sys
import time

import numpy as np
import pytest

import slicer
import slicer.util

from MedicalSAM3Core.common.client import AuthError, Client
from MedicalSAM3Core.common.errors import Cancelled, InputError
from MedicalSAM3Core.common.options import SegmentOptions
from MedicalSAM3Core.inference.engine import Segmenter
from MedicalSAM3Lib.backends import BackendError, BackgroundTask, LocalServer, RemoteServer
from MedicalSAM3Lib.scene import finish_segmentation, segment_mask, start_segmentation, volume_from_node
from phantoms import make_phantom

OPTIONS = SegmentOptions(mode="slices", score_threshold=0.2)
OBLIQUE = np.block([[np.linalg.qr(np.array([[0.9, 0.3, 0.1], [-0.2, 0.8, 0.4], [0.1, -0.3, 0.9]]))[0]
                     @ np.diag([0.8, 0.9, 2.5]), np.array([[10.0], [-20.0], [30.0]])], [np.zeros((1, 3)), np.ones((1, 1))]])


@pytest.fixture(scope="module")
def local_server(tiny_model_dir):
    server = LocalServer(model=str(tiny_model_dir), device="cpu", python=sys.executable, startup_timeout=180)
    yield server
    server.stop()


def _poll(task: BackgroundTask, timeout: float = 120.0) -> list:
    """What the panel's QTimer does: read progress until the task ends."""
    seen, deadline = [], time.monotonic() + timeout
    while True:
        finished = task.finished
        if task.progress is not None and (not seen or seen[-1] != task.progress):
            seen.append(task.progress)
        if finished:
            return seen
        assert time.monotonic() < deadline, "task did not finish"
        time.sleep(0.02)


def test_local_engine_segments_into_the_scene_like_the_engine_itself(scene, local_server, tiny_model):
    volume_node = slicer.util.addVolumeFromArray(make_phantom(), ijkToRAS=OBLIQUE, name="ct")
    task = start_segmentation(volume_node, ["liver", "spleen"], OPTIONS, local_server)
    events = _poll(task)
    assert task.error is None, task.error
    assert events and events[0].stage == "starting the engine" and events[-1].done == events[-1].total > 0
    node = finish_segmentation(task, volume_node, segmentations_logic=scene.segmentations)
    expected = Segmenter(tiny_model).segment(volume_from_node(volume_node), ["liver", "spleen"], OPTIONS)
    assert any(label.voxel_count for label in expected.labels)
    for label in expected.labels:
        np.testing.assert_array_equal(segment_mask(node, f"MedicalSAM3_{label.name.lower()}", volume_node),
                                      expected.label_map == label.value)
    info = local_server.client().info()
    assert info["model_id"] == local_server.model and info["device"] == "cpu"
    assert local_server.client().url.startswith("http://127.0.0.1:")


def test_the_local_engine_needs_its_token(local_server):
    url = local_server.client().url
    with pytest.raises(AuthError, match="token"):
        Client(url, token="not-the-token-0123456789").info()
    with pytest.raises(AuthError):
        Client(url).info()


def test_cancel_stops_the_run_and_changes_nothing(scene, local_server):
    volume_node = slicer.util.addVolumeFromArray(np.repeat(make_phantom(), 8, axis=0), name="ct")
    nodes = scene.mrml.GetNumberOfNodes()
    task = start_segmentation(volume_node, ["liver", "spleen", "aorta"], SegmentOptions(mode="slices", batch_size=1),
                              local_server)
    while task.progress is None or task.progress.total == 0:  # cancel mid-run, once the server counts slices
        assert not task.finished, task.error
        time.sleep(0.01)
    started = time.monotonic()
    task.cancel()
    _poll(task, timeout=30)
    assert task.cancelled and time.monotonic() - started < 10
    with pytest.raises(Cancelled):
        finish_segmentation(task, volume_node, segmentations_logic=scene.segmentations)
    assert scene.mrml.GetNumberOfNodes() == nodes
    deadline = time.monotonic() + 10  # the server stops the job within one batch of slices
    while local_server.client().info()["queue"]["running"]:
        assert time.monotonic() < deadline, "the cancelled job kept running on the server"
        time.sleep(0.05)


def test_bad_input_is_refused_before_anything_starts(scene, local_server):
    volume_node = slicer.util.addVolumeFromArray(make_phantom(), name="ct")
    with pytest.raises(InputError, match="structure name"):
        start_segmentation(volume_node, [""], OPTIONS, local_server)
    with pytest.raises(InputError, match="score_threshold"):
        start_segmentation(volume_node, ["liver"], SegmentOptions(score_threshold=1.5), local_server)


def test_an_engine_that_cannot_start_says_why(tmp_path):
    broken = LocalServer(model=str(tmp_path / "no_such_model"), device="cpu", python=sys.executable, startup_timeout=120)
    task = BackgroundTask(lambda progress, cancel: broken.client(cancel))
    _poll(task)
    assert isinstance(task.error, BackendError)
    assert "no_such_model" in str(task.error) and "stopped while starting" in str(task.error)
    assert not broken.running


def test_the_engine_stops_when_slicer_goes_away(tiny_model_dir):
    """Closing the child's stdin is what the operating system does when Slicer exits or crashes."""
    server = LocalServer(model=str(tiny_model_dir), device="cpu", python=sys.executable, startup_timeout=180)
    server.client()
    process = server._process
    process.stdin.close()
    process.wait(30)
    assert process.returncode is not None
    server.stop()


def test_remote_server_sends_nothing_without_an_address_and_consent():
    with pytest.raises(InputError, match="address"):
        RemoteServer("", token="x" * 20, consent=True).client()
    with pytest.raises(InputError, match="agree"):
        RemoteServer("https://gpu-box:8765", token="x" * 20, consent=False).client()
    client = RemoteServer("gpu-box:8765", token="x" * 20, consent=True).client()
    assert client.url == "https://gpu-box:8765"  # no scheme typed: https, never plain http


def test_remote_backend_through_a_real_server(scene, local_server):
    """The remote backend is the same client against any server; here the local one, by URL + token."""
    remote = RemoteServer(local_server.client().url, token=local_server._token, consent=True)
    volume_node = slicer.util.addVolumeFromArray(make_phantom(), name="ct")
    task = start_segmentation(volume_node, ["liver"], OPTIONS, remote)
    _poll(task)
    node = finish_segmentation(task, volume_node, segmentations_logic=scene.segmentations)
    assert node.GetSegmentation().GetSegment("MedicalSAM3_liver") is not None


def test_server_cli_writes_its_port_and_exits_with_its_parent(tiny_model_dir, tmp_path):
    port_file = tmp_path / "port"
    process = subprocess.Popen([sys.executable, "-m", "MedicalSAM3Core", "serve", "--model", str(tiny_model_dir),
                                "--port", "0", "--port-file", str(port_file), "--exit-on-stdin-eof", "--device", "cpu"],
                               stdin=subprocess.PIPE, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 120
        while not port_file.is_file():
            assert process.poll() is None and time.monotonic() < deadline, process.stderr.read().decode()[-2000:]
            time.sleep(0.05)
        port = int(port_file.read_text())
        assert Client(f"http://127.0.0.1:{port}").health()["status"] == "ok"
        process.stdin.close()
        assert process.wait(30) == 0
    finally:
        if process.poll() is None:
            process.kill()
