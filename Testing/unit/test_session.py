"""The volume session: clicks and boxes on one slice, seeds, re-propagation from every corrected slice and
undo, checked against transformers' tracker path (``Sam3TrackerVideoModel.forward``) on the same features,
with geometry kept (points and patches on the input grid, any storage order)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from MedicalSAM3Core.common.errors import Cancelled, InputError
from MedicalSAM3Core.common.progress import CancelToken
from MedicalSAM3Core.common.volume import Volume
from MedicalSAM3Core.inference.engine import Segmenter, SegmentOptions
from MedicalSAM3Core.inference.models import load_model
from phantoms import make_phantom, stored_ras_wise


@pytest.fixture(scope="module")
def visible(tiny_model_dir):
    """The tiny random-weight model with the tracker's object score pushed up, so that masks appear and
    real masks are compared (not the "no object" constant)."""
    model = load_model(str(tiny_model_dir), device="cpu")
    with torch.no_grad():
        model.video.tracker_model.mask_decoder.pred_obj_score_head.proj_out.bias.fill_(5.0)
    return Segmenter(model)


@pytest.fixture
def volume():
    return Volume(make_phantom(), modality="CT")


def _features(segmenter, volume, session, frame):
    """Tracker features of one slice, computed here the way ``Sam3VideoModel`` computes them."""
    from MedicalSAM3Core.preprocessing.intensity import to_model_input

    model = segmenter.model
    raw = torch.from_numpy(volume.array[frame:frame + 1].copy())
    pixels = to_model_input(raw, session.default_spec, model.image_size, model.mean, model.std, session.layout)
    vision = model.detector.get_vision_features(pixel_values=pixels)
    feats, pos = model.video.get_vision_features_for_tracker(vision)
    return {"vision_feats": list(feats), "vision_pos_embeds": list(pos)}


def _transformers_session(segmenter, volume, session, frames):
    from transformers.models.sam3_tracker_video.modeling_sam3_tracker_video import Sam3TrackerVideoInferenceSession

    size = segmenter.model.image_size
    reference = Sam3TrackerVideoInferenceSession(video=None, video_height=size, video_width=size, dtype=torch.float32,
                                                 max_vision_features_cache_size=volume.shape[0])
    reference.processed_frames = dict.fromkeys(range(volume.shape[0]))
    for f in frames:
        reference.cache.cache_vision_features(f, _features(segmenter, volume, session, f))
    return reference, reference.obj_id_to_idx(1)


def _canvas_xy(z_y_x, volume, size):
    """The stretch layout written out: slice pixel centre (y, x) -> canvas pixel (x, y)."""
    _, rows, cols = volume.shape
    _, y, x = z_y_x
    return [(x + 0.5) * size / cols - 0.5, (y + 0.5) * size / rows - 0.5]


def _slice_mask(logits, shape, threshold=0.5):
    probs = torch.sigmoid(F.interpolate(logits.float(), size=shape, mode="bilinear", align_corners=False))[0, 0]
    return (probs > threshold).numpy()


def test_a_click_runs_transformers_prompted_frame_on_the_cached_features(visible, volume):
    """A first click and a box on a new object equal ``Sam3TrackerVideoModel.forward`` with those points on
    that frame; a second click on the slice equals transformers' single-frame inference given the clicks
    and the slice's previous mask logits (SAM2's ``prev_sam_mask_logits``)."""
    session = visible.session(volume)
    obj = session.add_object("structure")
    size = visible.model.image_size
    click, corners = (4, 20.0, 30.0), [(4, 12.0, 20.0), (4, 30.0, 41.0)]
    patch = session.refine(obj, points=[click], labels=[1], box=corners)
    assert patch.slices == [4] and patch.stage == "refine"

    tracker = visible.model.video.tracker_model
    with torch.inference_mode():
        reference, idx = _transformers_session(visible, volume, session, [4])
        box = [_canvas_xy(c, volume, size) for c in corners]
        coords = torch.tensor([box[0], box[1], _canvas_xy(click, volume, size)])[None, None]
        reference.add_point_inputs(idx, 4, {"point_coords": coords, "point_labels": torch.tensor([[[2, 3, 1]]]).int()})
        reference.obj_with_new_inputs = [1]
        expected = tracker(reference, frame_idx=4).pred_masks
    ours = session.objects[obj].logits[4]
    torch.testing.assert_close(ours, expected[0, 0], rtol=0, atol=1e-5)
    expected_mask = _slice_mask(expected, volume.shape[1:])
    assert expected_mask.any() and not expected_mask.all()  # a real mask was compared
    np.testing.assert_array_equal(session.mask(obj)[4], expected_mask)
    full = np.zeros(volume.shape, bool)
    patch.apply(full)
    np.testing.assert_array_equal(full, session.mask(obj))

    negative = (4, 25.0, 35.0)
    session.refine(obj, points=[negative], labels=[0])
    with torch.inference_mode():
        coords = torch.tensor([box[0], box[1], _canvas_xy(click, volume, size), _canvas_xy(negative, volume, size)])
        fresh, idx = _transformers_session(visible, volume, session, [4])
        out = tracker._run_single_frame_inference(
            inference_session=fresh, frame_idx=4, obj_idx=idx, batch_size=1, is_init_cond_frame=True,
            point_inputs={"point_coords": coords[None, None], "point_labels": torch.tensor([[[2, 3, 1, 0]]]).int()},
            mask_inputs=None, reverse=False, prev_sam_mask_logits=ours[None, None])
    torch.testing.assert_close(session.objects[obj].logits[4], out["pred_masks"][0, 0], rtol=0, atol=1e-5)


def test_propagation_from_two_corrected_slices_equals_transformers_tracker(visible, volume):
    """A seed with two key slices enters as two mask prompts, both kept as conditioning frames; the forward
    sweep from the first and the backward sweep (from a memory holding only the conditioning frames) equal
    ``Sam3TrackerVideoModel.forward`` frame by frame; the key slices keep the seed's masks."""
    n = volume.shape[0]
    seed = np.zeros(volume.shape, bool)
    seed[2, 10:25, 12:30] = True
    seed[7, 14:28, 18:36] = True
    session = visible.session(volume)
    obj = session.add_object()
    session.seed(obj, seed, key_slices=[2, 7])
    events = []
    patch = session.propagate(obj, progress=events.append)
    assert events and events[-1].done == events[-1].total == n
    result = session.mask(obj)

    size = visible.model.image_size
    tracker = visible.model.video.tracker_model
    with torch.inference_mode():
        reference, idx = _transformers_session(visible, volume, session, range(n))
        canvas = {s: F.interpolate(torch.from_numpy(seed[s]).float()[None, None], size=(size, size), mode="bilinear",
                                   align_corners=False, antialias=True) > 0.5 for s in (2, 7)}
        expected = {}
        for s in (2, 7):
            reference.add_mask_inputs(idx, s, canvas[s].float())
            reference.obj_with_new_inputs = [1]
            tracker(reference, frame_idx=s)
        for f in (3, 4, 5, 6, 8, 9):
            expected[f] = tracker(reference, frame_idx=f).pred_masks
        fresh, idx2 = _transformers_session(visible, volume, session, range(n))
        for s in (2, 7):
            fresh.output_dict_per_obj[idx2]["cond_frame_outputs"][s] = reference.output_dict_per_obj[idx]["cond_frame_outputs"][s]
        for f in (1, 0):
            expected[f] = tracker(fresh, frame_idx=f, reverse=True).pred_masks
    compared = 0
    for f, logits in expected.items():
        want = _slice_mask(logits, volume.shape[1:])
        np.testing.assert_array_equal(result[f], want, err_msg=f"slice {f}")
        compared += int(want.any())
    assert compared >= 6  # masks, not the "no object" constant
    np.testing.assert_array_equal(result[[2, 7]], seed[[2, 7]])
    full = seed.copy()
    patch.apply(full)
    np.testing.assert_array_equal(full, result)


def test_patches_rebuild_the_mask_and_undo_takes_back_one_interaction_at_a_time(visible, volume):
    session = visible.session(volume)
    obj = session.add_object("x")
    mirror = np.zeros(volume.shape, bool)
    states = [mirror.copy()]
    for interact in (lambda: session.refine(obj, points=[(3, 20, 24)], labels=[1]),
                     lambda: session.refine(obj, points=[(3, 22, 30)], labels=[0]),
                     lambda: session.refine(obj, box=[(6, 10, 10), (6, 30, 40)]),
                     lambda: session.propagate(obj)):
        patch = interact()
        patch.apply(mirror)
        np.testing.assert_array_equal(mirror, session.mask(obj))
        states.append(mirror.copy())
        if patch.stage == "refine":  # a click changes its slice only, within a box around the change
            assert len(patch.slices) == 1 and patch.mask.shape[0] == 1
    assert len(states[-1].nonzero()[0]) and len({s.tobytes() for s in states}) == len(states)
    for expected in reversed(states[:-1]):
        patch = session.undo()
        assert patch.stage == "undo"
        patch.apply(mirror)
        np.testing.assert_array_equal(mirror, expected)
        np.testing.assert_array_equal(session.mask(obj), expected)
    assert session.undo() is not None and obj not in session.objects  # the object's creation itself
    assert session.undo() is None


def test_a_cancelled_propagation_changes_nothing(visible, volume):
    session = visible.session(volume)
    obj = session.add_object()
    session.refine(obj, points=[(5, 20, 24)], labels=[1])
    before = session.mask(obj)
    token = CancelToken()

    def cancel_midway(event):
        if event.done >= 4:
            token.cancel()

    with pytest.raises(Cancelled):
        session.propagate(obj, progress=cancel_midway, cancel=token)
    np.testing.assert_array_equal(session.mask(obj), before)
    assert session.undo().slices == [5]  # the last interaction is still the click


def test_text_results_become_objects_and_segment_is_the_sessions_text_pass(segmenter, volume):
    options = SegmentOptions(mode="slices", score_threshold=0.2)
    plain = segmenter.segment(volume, ["liver", "spleen"], options)
    assert "session_object_ids" not in plain.parameters
    session = segmenter.session(volume, options)
    result = session.text(["liver", "spleen"])
    np.testing.assert_array_equal(result.label_map, plain.label_map)
    ids = result.parameters["session_object_ids"]
    assert ids == [1, 2]
    for object_id, label in zip(ids, result.labels):
        mask = result.label_map == label.value
        np.testing.assert_array_equal(session.mask(object_id), mask)
        obj = session.objects[object_id]
        assert obj.name == label.name
        if mask.any():  # seeded from the slice where the text result is largest
            assert obj.conditioning == {int(np.argmax(mask.sum(axis=(1, 2))))}


def test_a_drawn_segment_seeds_an_object_and_key_slices_are_chosen(visible, volume):
    session = visible.session(volume)
    obj = session.add_object("drawn")
    drawn = np.zeros(volume.shape, bool)
    drawn[2, 5:10, 5:10] = True
    drawn[6, 5:20, 5:20] = True
    patch = session.seed(obj, drawn)
    assert patch.slices == [2, 6] and session.objects[obj].conditioning == {6}
    session.seed(obj, drawn, key_slices="all")
    assert session.objects[obj].conditioning == {2, 6}
    np.testing.assert_array_equal(session.mask(obj), drawn)
    for bad, message in (("middle", "key_slices"), ([99], "outside")):
        with pytest.raises(InputError, match=message):
            session.seed(obj, drawn, key_slices=bad)
    with pytest.raises(InputError, match="shape"):
        session.seed(obj, drawn[:3])


@pytest.mark.parametrize("axis", ["k", "j"])
def test_the_same_physical_click_gives_the_same_physical_mask_in_any_storage_order(visible, monkeypatch, axis):
    """A volume and its twin stored RAS-wise (in-plane axes reversed): with the radiological orientation
    policy and a field-of-view layout the model sees the same slices, so the same physical click must give
    the same physical mask on each input grid, and patches land on each input grid."""
    monkeypatch.setattr(visible.model, "preprocessing",
                        {**visible.model.preprocessing, "orientation": "radiological", "field_of_view_mm": 50.0})
    plain = Volume(make_phantom(shape=(8, 30, 36)), modality="CT")
    twin = stored_ras_wise(plain)
    _, rows, cols = plain.shape
    masks = []
    for vol, flip in ((plain, False), (twin, True)):
        session = visible.session(vol, SegmentOptions(slice_axis=axis))
        obj = session.add_object()
        z, y, x = 4.0, 12.3, 20.6
        if flip:
            y, x = rows - 1 - y, cols - 1 - x
        corner_a, corner_b = (z, 6.0, 9.0), (z, 22.0, 30.0)
        if flip:
            corner_a, corner_b = ((z, rows - 1 - c[1], cols - 1 - c[2]) for c in (corner_a, corner_b))
        if axis == "j":  # a coronal slice through row y: points keep that row
            y = round(y)
            corner_a, corner_b = (z - 3, y, corner_a[2]), (z + 3, y, corner_b[2])
        patch = session.refine(obj, points=[(z, y, x)], labels=[1], box=[corner_a, corner_b])
        full = np.zeros(vol.shape, bool)
        patch.apply(full)
        np.testing.assert_array_equal(full, session.mask(obj))
        masks.append(full[:, ::-1, ::-1] if flip else full)
    assert masks[0].any()
    np.testing.assert_array_equal(masks[0], masks[1])


def test_clicks_on_a_cached_slice_do_not_run_the_vision_encoder_and_the_cache_is_bounded(visible, volume,
                                                                                          monkeypatch):
    session = visible.session(volume, cache_mb=0.001)  # smaller than one slice: keeps only the last one
    calls = []
    original = visible.model.detector.get_vision_features

    def counted(*args, **kwargs):
        calls.append(1)
        return original(*args, **kwargs)

    monkeypatch.setattr(visible.model.detector, "get_vision_features", counted)
    obj = session.add_object()
    session.prepare([3])
    assert len(calls) == 1
    for point in ((3, 20, 24), (3, 25, 30), (3, 10, 10)):
        session.refine(obj, points=[point], labels=[1])
    assert len(calls) == 1 and session.cache.hits == 3
    session.refine(obj, points=[(4, 20, 24)], labels=[1])
    assert len(calls) == 2 and len(session.cache) == 1


@pytest.mark.parametrize("call, message", [
    (lambda s, o: s.refine(o, points=[(1, 5, 5), (2, 5, 5)], labels=[1, 1]), "one slice"),
    (lambda s, o: s.refine(o, points=[(1, 5, 500)], labels=[1]), "outside the slice"),
    (lambda s, o: s.refine(o, points=[(99, 5, 5)], labels=[1]), "outside the volume"),
    (lambda s, o: s.refine(o, points=[(1, 5, 5)], labels=[1, 0]), "one label"),
    (lambda s, o: s.refine(o, points=[(1, 5, 5)], labels=[3]), "1 \\(positive\\) or 0"),
    (lambda s, o: s.refine(o, points=[(1, np.nan, 5)], labels=[1]), "finite"),
    (lambda s, o: s.refine(o), "at least one point"),
    (lambda s, o: s.refine(o, box=[(1, 2, 3)]), "two corners"),
    (lambda s, o: s.refine(o + 7, points=[(1, 5, 5)], labels=[1]), "no object"),
    (lambda s, o: s.propagate(o), "nothing to propagate"),
    (lambda s, o: s.propagate(o, first=5, last=2), "outside"),
])
def test_bad_interactions_are_named(visible, volume, call, message):
    session = visible.session(volume)
    obj = session.add_object()
    with pytest.raises(InputError, match=message):
        call(session, obj)


def test_a_model_without_tracker_says_clicks_need_one(visible, volume, monkeypatch):
    monkeypatch.setattr(visible.model, "video", None)
    session = visible.session(volume)
    obj = session.add_object()
    with pytest.raises(InputError, match="no tracker"):
        session.refine(obj, points=[(1, 5, 5)], labels=[1])
