"""Interactive sessions on ``medsam3 serve`` (issue #27, part 2) over real HTTP on 127.0.0.1 with the
tiny model: a :class:`RemoteSession` gives the patches and masks of a local ``VolumeSession``, answers
carry only the changed slices' box, propagation reports progress and cancels without a trace, idle
sessions expire, the cap and the token hold, and bad requests are named with their status codes."""

from __future__ import annotations

import threading
import time

import numpy as np
import pytest
import requests
import torch

from harness import TOKEN, running_server
from phantoms import make_phantom
from MedicalSAM3Core.common.client import (AuthError, Client, InvalidInteraction, ServerBusy, SessionBusy,
                                           SessionNotFound)
from MedicalSAM3Core.common.errors import Cancelled, InputError
from MedicalSAM3Core.common.interaction import MaskPatch
from MedicalSAM3Core.common.options import SegmentOptions
from MedicalSAM3Core.common.progress import CancelToken
from MedicalSAM3Core.common.volume import Volume
from MedicalSAM3Core.common.wire import MEDIA_TYPE, decode_patch, encode_mask, encode_request
from MedicalSAM3Core.inference.engine import Segmenter
from MedicalSAM3Core.inference.models import load_model
from MedicalSAM3Core.serving.app import ServerConfig
from MedicalSAM3Core.serving.serve import engine_runner, model_info, session_opener

AUTH = {"Authorization": f"Bearer {TOKEN}"}
OPTIONS = dict(score_threshold=0.2, new_object_threshold=0.22)


@pytest.fixture(scope="module")
def visible(tiny_model_dir):
    """A fresh tiny model with the tracker's object score pushed up, so that clicks and propagation give
    real masks (not the "no object" constant); the server and the local sessions share it."""
    model = load_model(str(tiny_model_dir), device="cpu")
    with torch.no_grad():
        model.video.tracker_model.mask_decoder.pred_obj_score_head.proj_out.bias.fill_(5.0)
    return model


@pytest.fixture(scope="module")
def server(visible):
    config = ServerConfig(token=TOKEN, max_sessions=8)
    with running_server(engine_runner(visible), config, info=model_info(visible),
                        sessions=[session_opener(visible)]) as (url, app):
        yield url, app


def _volume(depth=10, seed=0) -> Volume:
    return Volume(make_phantom((depth, 40, 48), seed=seed), modality="CT")


def _assert_same_patch(remote: MaskPatch, local: MaskPatch) -> None:
    assert remote.to_dict() == local.to_dict()
    np.testing.assert_array_equal(remote.mask, local.mask)


def _open(url, volume, options=None, **client_options):
    return Client(url, token=TOKEN, poll_interval=0.05, **client_options).open_session(volume, options)


def test_remote_clicks_seed_propagation_and_undo_equal_the_local_session(server, visible):
    url, _ = server
    volume = _volume()
    local = Segmenter(visible).session(volume)
    with _open(url, volume) as remote:
        assert (remote.shape, remote.n_slices, remote.slice_axis) == (volume.shape, 10, "k")
        obj = remote.add_object("structure")
        assert local.add_object("structure") == obj
        drawn = np.zeros(volume.shape, bool)
        drawn[2, 8:20, 10:30] = True
        drawn[7, 12:26, 16:34] = True
        other = remote.add_object("drawn")
        assert local.add_object("drawn") == other
        mirror = {obj: np.zeros(volume.shape, bool), other: np.zeros(volume.shape, bool)}
        steps = [
            ("refine", obj, dict(points=[(3, 20.0, 24.0)], labels=[1])),
            ("refine", obj, dict(points=[(3, 22.5, 30.0)], labels=[0])),
            ("refine", obj, dict(box=[(6, 10, 10), (6, 30, 40)])),
            ("propagate", obj, {}),
            ("seed", other, dict(mask=drawn, key_slices="all")),
            ("propagate", other, dict(first=1, last=8)),
        ]
        events = []
        for method, object_id, kwargs in steps:
            extra = dict(progress=events.append) if method == "propagate" else {}
            remote_patch = getattr(remote, method)(object_id, **kwargs, **extra)
            local_patch = getattr(local, method)(object_id, **kwargs)
            _assert_same_patch(remote_patch, local_patch)
            remote_patch.apply(mirror[object_id])
            np.testing.assert_array_equal(mirror[object_id], local.mask(object_id))
            if method == "refine":  # a click changes one slice, within its box
                assert remote_patch.slices == [kwargs.get("points", kwargs.get("box"))[0][0]]
                assert remote_patch.mask.shape[0] == 1
        assert events and events[-1].done == events[-1].total > 0
        assert mirror[obj].any() and mirror[obj][[0, 9]].any(), "propagation must reach the ends with real masks"
        for object_id in (obj, other):
            np.testing.assert_array_equal(remote.mask(object_id), local.mask(object_id))
        for _ in range(3):
            remote_patch, local_patch = remote.undo(), local.undo()
            _assert_same_patch(remote_patch, local_patch)
            remote_patch.apply(mirror[remote_patch.object_id])
            np.testing.assert_array_equal(mirror[remote_patch.object_id], local.mask(remote_patch.object_id))
        assert {o: r.summary() for o, r in remote.objects.items()} == {o: s.summary() for o, s in local.objects.items()}
        remote.remove_object(other)
        local.remove_object(other)
        assert list(remote.objects) == [obj]


def test_a_click_answer_carries_one_slice_box_not_the_volume(server):
    url, _ = server
    volume = _volume(depth=24)
    with _open(url, volume) as remote:
        obj = remote.add_object()
        response = requests.post(f"{url}/v1/sessions/{remote.id}/objects/{obj}/refine", headers=AUTH, timeout=60,
                                 json={"points": [[5, 20, 24]], "labels": [1]})
        assert response.status_code == 200 and response.headers["content-type"] == MEDIA_TYPE
        patch = decode_patch(response.content, volume.shape)
        assert patch.slices == [5] and patch.start[0] == 5 and patch.mask.shape[0] == 1 and patch.mask.any()
        whole_volume_bits = volume.array.size // 8
        assert len(response.content) < whole_volume_bits / 10, "a click answer must not carry the volume"
        undone = requests.post(f"{url}/v1/sessions/{remote.id}/undo", headers=AUTH, timeout=30)
        assert undone.status_code == 200 and decode_patch(undone.content).slices == [5]
        assert remote.undo().slices == []  # the object's creation: it had no mask left
        assert remote.undo() is None  # nothing left to undo: HTTP 204
        assert requests.post(f"{url}/v1/sessions/{remote.id}/undo", headers=AUTH, timeout=30).status_code == 204


def test_text_in_a_session_equals_the_local_sessions_text_and_its_objects(server, visible):
    url, _ = server
    volume = _volume(seed=3)
    options = SegmentOptions(mode="slices", **OPTIONS)
    local = Segmenter(visible).session(volume, options)
    expected = local.text(["liver", "spleen"])
    events = []
    with _open(url, volume, options) as remote:
        result = remote.text(["liver", "spleen"], progress=events.append)
        np.testing.assert_array_equal(result.label_map, expected.label_map)
        assert result.parameters["session_object_ids"] == expected.parameters["session_object_ids"] == [1, 2]
        assert [label.name for label in result.labels] == [label.name for label in expected.labels]
        assert any(label.voxel_count for label in result.labels), "the comparison must not be between empty results"
        for object_id in (1, 2):
            np.testing.assert_array_equal(remote.mask(object_id), local.mask(object_id))
        assert events and events[-1].done == events[-1].total == 10


def test_cancelling_a_propagation_midway_leaves_the_session_unchanged_and_clicks_wait_meanwhile(server):
    url, _ = server
    volume = _volume(depth=40)
    with _open(url, volume) as remote:
        obj = remote.add_object()
        click = remote.refine(obj, points=[(20, 20, 24)], labels=[1])
        before = remote.mask(obj)
        # while a propagation runs, the session refuses clicks at once (409), and answers reads
        started = requests.post(f"{url}/v1/sessions/{remote.id}/objects/{obj}/propagate", headers=AUTH, json={},
                                timeout=30)
        assert started.status_code == 202
        task = started.json()["task_id"]
        busy = requests.post(f"{url}/v1/sessions/{remote.id}/objects/{obj}/refine", headers=AUTH, timeout=30,
                             json={"points": [[3, 20, 24]], "labels": [1]})
        assert busy.status_code == 409 and busy.headers["X-MedSAM3-Error"] == "session-busy"
        assert "propagate task" in busy.json()["detail"] and "cancel" in busy.json()["detail"]
        with pytest.raises(SessionBusy):
            remote.undo()
        assert remote.info()["task"]["task_id"] == task
        early = requests.get(f"{url}/v1/sessions/{remote.id}/tasks/{task}/result", headers=AUTH, timeout=30)
        assert early.status_code == 409 and early.headers["X-MedSAM3-Error"] == "not-ready"
        cancelled = requests.post(f"{url}/v1/sessions/{remote.id}/tasks/{task}/cancel", headers=AUTH, timeout=30)
        assert cancelled.status_code == 202
        deadline = time.monotonic() + 30
        while (status := requests.get(f"{url}/v1/sessions/{remote.id}/tasks/{task}", headers=AUTH,
                                      timeout=30).json())["state"] in ("queued", "running"):
            assert time.monotonic() < deadline
            time.sleep(0.05)
        assert status["state"] == "cancelled" and status["progress"]["done"] < status["progress"]["total"]

        # and through the client: the CancelToken cancels the server task mid-way
        token, seen = CancelToken(), []

        def cancel_midway(event):
            seen.append(event)
            if event.done >= 3:
                token.cancel()

        with pytest.raises(Cancelled, match="unchanged"):
            remote.propagate(obj, progress=cancel_midway, cancel=token)
        assert seen and seen[-1].done < seen[-1].total, "the cancel must stop the propagation before its end"
        np.testing.assert_array_equal(remote.mask(obj), before)
        undone = remote.undo()  # the last interaction is still the click
        assert undone.slices == click.slices == [20]


def test_idle_sessions_expire_and_the_cap_is_503_naming_it(visible):
    config = ServerConfig(max_sessions=1, session_ttl=0.6)
    with running_server(engine_runner(visible), config, sessions=[session_opener(visible)]) as (url, app):
        client = Client(url, poll_interval=0.05)
        first = client.open_session(_volume(2))
        refused = requests.post(url + "/v1/sessions", data=encode_request(_volume(2), []), timeout=30,
                                headers={"Content-Type": MEDIA_TYPE})
        assert refused.status_code == 503 and refused.headers["X-MedSAM3-Error"] == "sessions-full"
        assert "1 open sessions (--max-sessions)" in refused.json()["detail"] and refused.headers["Retry-After"]
        with pytest.raises(ServerBusy, match="--max-sessions"):
            client.open_session(_volume(2))
        for _ in range(6):  # requests keep a session alive past its idle time-to-live
            time.sleep(0.2)
            first.add_object()
        assert client.info()["sessions"]["open"] == 1
        time.sleep(1.2)  # idle: the timer closes it without any request
        assert app.state.sessions.counts()["open"] == 0
        with pytest.raises(SessionNotFound, match="expired"):
            first.add_object()
        second = client.open_session(_volume(2))  # its place is free again
        second.close()
        assert app.state.sessions.counts()["open"] == 0  # closing frees it at once
        third = client.open_session(_volume(2))
        assert third.id != second.id
        third.close()


def test_a_running_task_keeps_its_session_open_past_the_ttl_and_a_queued_one_cancels():
    """The time-to-live counts idle time: not while a task runs, and afresh from its end (to fetch its result).
    Long tasks of one model run one at a time; a waiting one is cancelled before it starts."""
    from MedicalSAM3Core.common.wire import JobRequest
    from MedicalSAM3Core.serving.sessions import SessionManager

    manager = SessionManager([lambda volume, options, cache_mb: object()], max_sessions=2, ttl=0.2)
    gate = threading.Event()

    def blocked(progress, cancel):
        gate.wait(10)
        return b"done"

    one, two = (manager.create(JobRequest(_volume(2), []), "test") for _ in range(2))
    running = manager.start_task(one, "propagate", blocked)
    waiting = manager.start_task(two, "propagate", lambda progress, cancel: b"never")
    time.sleep(0.5)
    manager.expire()
    assert running.state == "running" and waiting.state == "queued"
    assert manager.counts()["open"] == 2, "sessions with a task are not idle"
    manager.cancel_task(two, waiting.id)
    gate.set()
    running.thread.join(10)
    waiting.thread.join(10)
    assert (running.state, running.result) == ("done", b"done")
    assert (waiting.state, waiting.error) == ("cancelled", "cancelled before it started")
    manager.expire()
    assert manager.counts()["open"] == 2, "a finished task gives its session a whole time-to-live"
    time.sleep(0.3)
    manager.expire()
    assert manager.counts()["open"] == 0


def test_every_session_route_requires_the_token(server):
    url, _ = server
    with _open(url, _volume(2)) as remote:
        obj = remote.add_object()
        routes = [("POST", "/v1/sessions"), ("GET", "/v1/sessions/{session_id}"),
                  ("DELETE", "/v1/sessions/{session_id}"), ("POST", "/v1/sessions/{session_id}/objects"),
                  ("DELETE", "/v1/sessions/{session_id}/objects/{object_id}"),
                  ("POST", "/v1/sessions/{session_id}/objects/{object_id}/refine"),
                  ("POST", "/v1/sessions/{session_id}/objects/{object_id}/seed"),
                  ("GET", "/v1/sessions/{session_id}/objects/{object_id}/mask"),
                  ("POST", "/v1/sessions/{session_id}/objects/{object_id}/propagate"),
                  ("POST", "/v1/sessions/{session_id}/text"), ("POST", "/v1/sessions/{session_id}/undo"),
                  ("POST", "/v1/sessions/{session_id}/prepare"), ("GET", "/v1/sessions/{session_id}/tasks/{task_id}"),
                  ("POST", "/v1/sessions/{session_id}/tasks/{task_id}/cancel"),
                  ("GET", "/v1/sessions/{session_id}/tasks/{task_id}/result")]
        schema = requests.get(url + "/openapi.json", timeout=10).json()["paths"]
        documented = {(method.upper(), path) for path, item in schema.items() if path.startswith("/v1/sessions")
                      for method in item}
        assert documented == set(routes), "every session route is checked here"
        for headers in ({}, {"Authorization": "Bearer wrong-token-000000000000"}):
            for method, template in routes:
                path = template.format(session_id=remote.id, object_id=obj, task_id="x")
                response = requests.request(method, url + path, headers=headers, json={}, timeout=10)
                assert response.status_code == 401, (method, path, response.status_code)
        assert remote.objects[obj].name  # the session is untouched
        with pytest.raises(AuthError):
            Client(url, token="wrong-token-000000000000").open_session(_volume(2))


def test_bad_session_requests_are_named_with_their_status_codes(server):
    url, _ = server
    volume = _volume(4)
    with _open(url, volume) as remote:
        obj = remote.add_object()
        base = f"{url}/v1/sessions/{remote.id}"

        def call(method, path, status, kind, message, **kwargs):
            response = requests.request(method, base + path, headers={**AUTH, **kwargs.pop("headers", {})},
                                        timeout=30, **kwargs)
            assert response.status_code == status, (path, response.text)
            assert response.headers.get("X-MedSAM3-Error") == kind
            assert message in response.json()["detail"], response.json()["detail"]

        for method, path in (("GET", ""), ("POST", "/undo"), ("DELETE", "")):
            response = requests.request(method, f"{url}/v1/sessions/nope{path}", headers=AUTH, timeout=30)
            assert response.status_code == 404 and "no session 'nope'" in response.json()["detail"]
        call("POST", f"/objects/{obj + 7}/refine", 404, "unknown-object", f"no object {obj + 7}",
             json={"points": [[1, 5, 5]], "labels": [1]})
        call("POST", f"/objects/{obj}/refine", 422, "invalid", "one slice",
             json={"points": [[1, 5, 5], [2, 5, 5]], "labels": [1, 1]})
        call("POST", f"/objects/{obj}/refine", 422, "invalid", "points.0",
             json={"points": [[1, 5]], "labels": [1]})
        call("POST", f"/objects/{obj}/refine", 422, "invalid", "turbo", json={"points": [[1, 5, 5]], "turbo": 1})
        call("POST", f"/objects/{obj}/refine", 422, "invalid", "outside the slice",
             json={"points": [[1, 5, 500]], "labels": [1]})
        call("POST", f"/objects/{obj}/seed", 422, "invalid", "session's shape [4, 40, 48], got [4, 40, 47]",
             data=encode_mask(np.ones((4, 40, 47), bool)), headers={"Content-Type": MEDIA_TYPE})
        call("POST", f"/objects/{obj}/seed", 422, "invalid", "magic", data=b"not a mask")
        call("POST", f"/objects/{obj}/propagate", 422, "invalid", "nothing to propagate", json={})
        call("POST", f"/objects/{obj}/propagate", 422, "invalid", "outside", json={"first": 3, "last": 9})
        call("POST", "/text", 422, "invalid", "empty prompt", json={"prompts": [" "]})
        call("POST", "/prepare", 422, "invalid", "outside", json={"slices": [99]})
        call("GET", "/tasks/nope", 404, "unknown-task", "no task 'nope'")
        # through the client: the same mistakes raise InputError, as on a local session
        with pytest.raises(InvalidInteraction, match="one slice") as caught:
            remote.refine(obj, points=[(1, 5, 5), (2, 5, 5)], labels=[1, 1])
        assert isinstance(caught.value, InputError)
        with pytest.raises(InvalidInteraction, match="no object"):
            remote.refine(obj + 7, points=[(1, 5, 5)], labels=[1])
        with pytest.raises(InputError, match="shape"):
            remote.seed(obj, np.ones((4, 40, 47), bool))
        with pytest.raises(InvalidInteraction, match="nothing to propagate"):
            remote.propagate(obj)
        assert remote.undo() is not None and remote.undo() is None  # the refused requests changed nothing
    with pytest.raises(SessionNotFound):
        remote.add_object()


def test_sessions_of_different_volumes_at_once_stay_apart(server, visible):
    url, _ = server
    volumes = [_volume(6, seed=1), _volume(8, seed=2)]
    masks, errors = {}, []

    def work(index):
        try:
            with _open(url, volumes[index]) as remote:
                obj = remote.add_object()
                remote.refine(obj, points=[(2, 18, 22)], labels=[1])
                remote.propagate(obj)
                masks[index] = remote.mask(obj)
        except Exception as error:  # reported below
            errors.append(error)

    threads = [threading.Thread(target=work, args=(i,)) for i in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(120)
    assert not errors
    for index, volume in enumerate(volumes):
        local = Segmenter(visible).session(volume)
        obj = local.add_object()
        local.refine(obj, points=[(2, 18, 22)], labels=[1])
        local.propagate(obj)
        np.testing.assert_array_equal(masks[index], local.mask(obj))
        assert masks[index].any()


def test_info_lists_sessions_and_a_server_without_them_says_so(server, tiny_model):
    url, _ = server
    info = Client(url, token=TOKEN).info()
    assert info["sessions"]["enabled"] and info["sessions"]["capacity"] == 8 and info["sessions"]["ttl_s"] == 900
    with running_server(engine_runner(tiny_model), ServerConfig()) as (plain, _):
        response = requests.post(plain + "/v1/sessions", data=encode_request(_volume(2), []), timeout=30)
        assert response.status_code == 503 and "no interactive sessions" in response.json()["detail"]
        with pytest.raises(ServerBusy, match="no interactive sessions"):
            Client(plain).open_session(_volume(2))


@pytest.mark.parametrize("option, message", [(["--max-sessions", "-1"], "--max-sessions"),
                                             (["--session-ttl", "0"], "--session-ttl"),
                                             (["--session-ttl", "nan"], "--session-ttl"),
                                             (["--session-cache-mb", "-5"], "--session-cache-mb")])
def test_serve_refuses_bad_session_options_with_exit_2(option, message, tmp_path, capsys):
    from MedicalSAM3Core.cli import main

    assert main(["serve", "--model", str(tmp_path / "missing"), *option]) == 2
    assert message in capsys.readouterr().err
