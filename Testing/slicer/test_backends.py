"""The module's compute path as Slicer runs it: a real local engine process (``medsam3 serve`` started by
:class:`LocalServer`), the torch-free client in a job process (:class:`ProcessTask`, polled like the
panel's timer), and the segments written into a real MRML scene (slicer-core)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

import slicer
import slicer.util

import MedicalSAM3Core
from MedicalSAM3Core.common.client import AuthError, Client
from MedicalSAM3Core.common.errors import Cancelled, InputError
from MedicalSAM3Core.common.options import SegmentOptions
from MedicalSAM3Core.common.volume import Volume
from MedicalSAM3Core.inference.engine import Segmenter
from MedicalSAM3Lib.backends import BackendError, LocalServer, ProcessTask, RemoteServer, start_job
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


def _poll(task: ProcessTask, timeout: float = 120.0) -> list:
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
    node = finish_segmentation(task, volume_node, segmentations_logic=scene.segmentations).node
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
    task = start_job(broken, "info")
    _poll(task)
    assert isinstance(task.error, BackendError)
    assert "no_such_model" in str(task.error) and "engine stopped" in str(task.error)
    assert not broken.running
    with pytest.raises(BackendError, match="stopped while starting"):  # the blocking path says the same
        broken.client()


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
    node = finish_segmentation(task, volume_node, segmentations_logic=scene.segmentations).node
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


def _round_trip(scene, server, volume_node, busy: bool) -> float:
    """Apply -> segments in the scene, with the panel's timer (200 ms) on a simulated Slicer main thread."""
    from slicer_main_loop import MainLoop

    started = time.perf_counter()
    task = start_segmentation(volume_node, ["liver", "spleen"], OPTIONS, server)
    MainLoop(tick=0.2, busy=busy).run_until(lambda: task.finished, lambda: task.progress, timeout=600)
    finish_segmentation(task, volume_node, segmentations_logic=scene.segmentations)
    return time.perf_counter() - started


def test_runs_are_not_starved_by_a_main_thread_that_keeps_the_gil(scene, local_server):
    """Slicer's main thread never releases the GIL (see Testing/slicer_main_loop.py). A 512 x 512 x 100
    volume's whole round trip through the local backend (voxels out of the scene, engine, segments
    written) may take at most 1.5x as long on such a thread as on an idle one."""
    from slicer_main_loop import starvation

    assert starvation() < 0.1, "the harness does not hold the GIL as Slicer's main thread does"
    rng = np.random.default_rng(0)
    array = rng.normal(40, 200, (100, 512, 512)).astype(np.int16)
    volume_node = slicer.util.addVolumeFromArray(array, ijkToRAS=np.diag([0.7, 0.7, 2.0, 1.0]), name="big")
    _round_trip(scene, local_server, volume_node, busy=False)  # warm-up: the engine loads the model lazily
    idle = min(_round_trip(scene, local_server, volume_node, busy=False) for _ in range(2))
    busy = _round_trip(scene, local_server, volume_node, busy=True)
    print(f"round trip: idle main thread {idle:.2f} s, GIL-holding main thread {busy:.2f} s ({busy / idle:.2f}x)")
    assert busy <= 1.5 * idle, f"{busy:.2f} s with a busy main thread vs {idle:.2f} s idle ({busy / idle:.2f}x)"


def _running_server():
    """The server tests' harness (a real uvicorn server in a thread)."""
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "server"))
    from harness import running_server

    return running_server


@pytest.mark.parametrize("api_delta, update", [(+1, "this client"), (-1, "the server")])
def test_a_server_of_another_version_says_so_in_one_sentence_before_any_upload(scene, api_delta, update):
    """A newer panel talking to an older server, or the reverse: one sentence naming both versions
    and the side to update, at Test connection and before upload (not a 4xx/5xx)."""
    from MedicalSAM3Core import __version__
    from MedicalSAM3Core.common.client import API_VERSION, VersionMismatch
    from MedicalSAM3Core.serving.app import ServerConfig

    calls = []

    def run(request, progress, cancel):
        calls.append(request)
        raise AssertionError("nothing may be uploaded to a server of another version")

    running_server = _running_server()
    with running_server(run, ServerConfig(), info={"api_version": API_VERSION + api_delta, "version": "7.0.0"}) as (url, _):
        remote = RemoteServer(url, consent=True)
        connection = start_job(remote, "info")  # what Test connection runs
        _poll(connection)
        volume_node = slicer.util.addVolumeFromArray(make_phantom(), name="ct")
        upload = start_segmentation(volume_node, ["liver"], OPTIONS, remote)  # what Apply runs
        _poll(upload)
    for task in (connection, upload):
        assert isinstance(task.error, VersionMismatch), task.error
        message = str(task.error)
        assert message.count(". ") == 0 and message.endswith(".")  # one sentence
        assert "7.0.0" in message and __version__ in message and f"update {update}" in message
    assert calls == []


def test_the_engine_of_another_python_starts_without_slicers_python_environment(tmp_path, monkeypatch):
    """Slicer sets PYTHONHOME/PYTHONPATH for its own Python; a foreign interpreter must not inherit them:
    it starts from the environment given as ``base_env`` (Slicer's startup environment)."""
    dump = tmp_path / "env.json"
    fake_python = tmp_path / "python"
    fake_python.write_text(f"#!{sys.executable}\nimport json, os\njson.dump(dict(os.environ), open({str(dump)!r}, 'w'))\n")
    fake_python.chmod(0o755)
    monkeypatch.setenv("PYTHONHOME", "/opt/Slicer/lib/Python")
    monkeypatch.setenv("PYTHONNOUSERSITE", "1")
    startup = {"PATH": "/usr/bin:/bin", "HOME": str(tmp_path), "PYTHONPATH": "/home/me/lib"}
    server = LocalServer(python=str(fake_python), base_env=startup, startup_timeout=30)
    server.launch()
    deadline = time.monotonic() + 30
    while server.running or not dump.is_file():
        assert time.monotonic() < deadline, "the fake interpreter did not run"
        time.sleep(0.05)
    env = json.loads(dump.read_text())
    assert "PYTHONHOME" not in env and "PYTHONNOUSERSITE" not in env
    engine_root = str(Path(MedicalSAM3Core.__file__).resolve().parents[1])
    assert env["PYTHONPATH"].split(os.pathsep) == [engine_root, "/home/me/lib"] and env["HOME"] == str(tmp_path)
    assert isinstance(server.failure(), BackendError)  # it stopped: the panel would say so
    server.stop()


def test_the_volume_is_a_snapshot_and_a_removed_volume_gets_nothing_written(scene, local_server, tiny_model):
    phantom = make_phantom()
    volume_node = slicer.util.addVolumeFromArray(phantom.copy(), name="ct")
    task = start_segmentation(volume_node, ["liver"], OPTIONS, local_server)
    slicer.util.arrayFromVolume(volume_node)[:] = 0  # the user edits the volume while the run goes on
    slicer.util.arrayFromVolumeModified(volume_node)
    _poll(task)
    expected = Segmenter(tiny_model).segment(
        Volume(phantom, volume_from_node(volume_node).geometry), ["liver"], OPTIONS)
    np.testing.assert_array_equal(task.result.label_map, expected.label_map)

    task = start_segmentation(volume_node, ["liver"], OPTIONS, local_server)
    _poll(task)
    nodes = scene.mrml.GetNumberOfNodes()
    scene.mrml.RemoveNode(volume_node)  # e.g. the scene was closed while the run went on
    with pytest.raises(InputError, match="removed"):
        finish_segmentation(task, volume_node, segmentations_logic=scene.segmentations)
    assert scene.mrml.GetNumberOfNodes() == nodes - 1


def test_cancel_wins_over_a_result_not_yet_polled_and_job_folders_do_not_stay(scene, local_server):
    volume_node = slicer.util.addVolumeFromArray(make_phantom(), name="ct")
    task = start_segmentation(volume_node, ["liver"], OPTIONS, local_server)
    folder = task._folder
    task._process.wait(120)  # the result is in; the panel has not polled yet
    assert (folder / "result.medsam3").is_file() and not (folder / "volume.npy").exists()  # voxels removed at once
    task.cancel()  # the user pressed Cancel in between: nothing may be written
    assert task.finished and task.cancelled and task.result is None
    assert not folder.exists()

    task = start_segmentation(volume_node, ["liver"], OPTIONS, local_server)
    folder = task._folder
    assert (folder / "volume.npy").is_file() or task._process.poll() is not None
    task.close()  # the scene closes: the run is dropped without being polled again
    assert task.finished and task.cancelled and not folder.exists()


def test_the_panel_shows_the_time_left_and_asks_once_about_a_long_run(tmp_path):
    """What the panel's timer reads: the engine's estimate (here a stand-in: 37 s per slice, 300 slices
    left on a CPU) as text, and one question when it is over ten minutes."""
    task = ProcessTask({"action": "segment", "server": {"port_file": str(tmp_path / "never"), "startup_timeout": 60},
                        "prompts": ["liver"], "options": OPTIONS.to_dict()},
                       volume=Volume(make_phantom()))
    try:
        deadline = time.monotonic() + 30
        while task.progress is None:  # the job process says it waits for the engine
            assert time.monotonic() < deadline and not task.finished, task.error
            time.sleep(0.02)
        assert task.time_left() is None and task.long_run_question() is None
        (task._folder / "progress.json").write_text(json.dumps(
            {"done": 1, "total": 301, "stage": "segmenting slices", "eta_s": 37.0 * 300, "device": "cpu"}))
        assert task.time_left().startswith("about 3 h 5 min on this computer; a GPU server")
        question = task.long_run_question()
        assert question.startswith("This segmentation will take about 3 h 5 min on this computer")
        assert task.long_run_question() is None  # asked once
    finally:
        task.close()
    assert task.cancelled
