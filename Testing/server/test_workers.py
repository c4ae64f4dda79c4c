"""Several workers behind one queue (issue #29, part 3: ``medsam3 serve --devices cuda:0,cuda:1``):
jobs run at the same time on different workers, a free worker takes the next job, ``/v1/info``
lists the workers, and results through a two-worker server equal the local engine's. Tested with
CPU workers (each its own copy of the model)."""

import threading
import time

import numpy as np
import pytest

from MedicalSAM3Core import cli
from MedicalSAM3Core.common.client import Client
from MedicalSAM3Core.common.options import SegmentOptions
from MedicalSAM3Core.common.result import SegmentationResult
from MedicalSAM3Core.common.volume import Volume
from MedicalSAM3Core.common.wire import JobRequest
from MedicalSAM3Core.inference.engine import Segmenter
from MedicalSAM3Core.serving.jobs import JobManager
from MedicalSAM3Core.serving.serve import ServeSettings, bound_port, build_server
from phantoms import make_phantom


def _wait(condition, seconds=10.0):
    deadline = time.monotonic() + seconds
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError("timed out")
        time.sleep(0.01)


def test_two_workers_run_two_jobs_at_once_and_a_free_worker_takes_the_next():
    release = threading.Event()

    def blocking(request, progress, cancel):
        release.wait(10)
        return SegmentationResult(np.zeros(request.volume.shape, np.uint8), request.volume.geometry, [])

    manager = JobManager([blocking, blocking], queue_size=4, names=["cpu", "cpu"])
    manager.start()
    try:
        volume = Volume(np.zeros((2, 4, 4), np.int16))
        jobs = [manager.submit(JobRequest(volume, ["liver"]), "test", 1) for _ in range(3)]
        _wait(lambda: manager.counts()["running"] == 2)
        assert manager.counts()["queued"] == 1  # two at once, the third waits for a free worker
        assert sorted(w["job"] for w in manager.workers()) == sorted(j.id for j in jobs[:2])
        release.set()
        _wait(lambda: all(j.state == "done" for j in jobs))
        assert [w["job"] for w in manager.workers()] == [None, None]
    finally:
        release.set()
        manager.stop()


def test_a_server_with_two_cpu_workers_lists_them_and_gives_the_local_result(tiny_model_dir, tiny_model):
    server = build_server(ServeSettings(model=str(tiny_model_dir), port=0, devices=("cpu", "cpu")))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    _wait(lambda: server.started, 60)
    try:
        client = Client(f"http://127.0.0.1:{bound_port(server)}", poll_interval=0.05)
        info = client.info()
        assert [w["name"] for w in info["workers"]] == ["cpu", "cpu"] and len(info["devices"]) == 2
        options = SegmentOptions(mode="slices", score_threshold=0.2)
        volumes = [Volume(make_phantom((4, 40, 48), seed=seed)) for seed in (1, 2)]
        results = [None, None]

        def one(i):
            results[i] = client.segment(volumes[i], ["liver", "spleen"], options)

        threads = [threading.Thread(target=one, args=(i,)) for i in range(2)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(120)
        for volume, result in zip(volumes, results):
            local = Segmenter(tiny_model).segment(volume, ["liver", "spleen"], options)
            np.testing.assert_array_equal(result.label_map, local.label_map)
    finally:
        server.should_exit = True
        thread.join(30)


@pytest.mark.parametrize("extra, message", [(["--device", "cuda", "--devices", "cpu"], "exclude each other"),
                                            (["--devices", "cuda:0,cuda:0"], "twice")])
def test_serve_refuses_contradictory_devices_with_exit_2(tmp_path, capsys, extra, message):
    assert cli.main(["serve", "--model", str(tmp_path / "none"), *extra]) == 2
    assert message in capsys.readouterr().err
