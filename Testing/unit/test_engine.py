"""The engine is the transformers model (parity), encodes each slice once, keeps geometry."""

from dataclasses import replace

import numpy as np
import pytest
import torch

from MedicalSAM3Core.common.errors import Cancelled, InputError, ModelLoadError
from MedicalSAM3Core.common.progress import CancelToken
from MedicalSAM3Core.common.volume import Geometry, Volume
from MedicalSAM3Core.inference.engine import SegmentOptions
from MedicalSAM3Core.inference.models import load_model

# Random weights score about 0.25: thresholds low enough that the tiny model finds something.
LOW = dict(score_threshold=0.2, new_object_threshold=0.22)
OBLIQUE = Geometry((0.7, 0.8, 2.5), (10.0, -20.0, 30.0),
                   (0.936, -0.275, 0.218, 0.289, 0.956, -0.043, -0.196, 0.104, 0.975))


def _sam3_text_graph(detector, **inputs):
    """``Sam3Model.forward`` (no hooks) as SAM3 runs a text prompt: with the empty geometry prompt,
    i.e. one box labelled -10 (padding) per image."""
    batch = inputs["pixel_values"].shape[0]
    return detector.forward(**inputs, input_boxes=torch.zeros(batch, 1, 4),
                            input_boxes_labels=torch.full((batch, 1), -10, dtype=torch.long))


def _transformers_reference(model, raw_slice, text, score_threshold, mask_threshold):
    """The plain transformers path on one slice: Sam3Processor-equivalent preprocessing,
    Sam3Model.forward (SAM3's text-prompt graph, written out) and post_process_instance_segmentation."""
    from transformers import Sam3ImageProcessor

    low, high = -150.0, 250.0  # the abdomen window the engine chooses for 'liver' on CT
    unit = np.clip((raw_slice.astype(np.float32) - low) / (high - low), 0, 1)
    size = model.image_size
    processor = Sam3ImageProcessor(size={"height": size, "width": size}, do_rescale=False)
    pixel_values = processor(images=[torch.from_numpy(np.repeat(unit[None], 3, axis=0))],
                             return_tensors="pt")["pixel_values"]
    tokens = model.tokenizer(text, return_tensors="pt", padding="max_length", max_length=32)
    with torch.inference_mode():
        outputs = _sam3_text_graph(model.detector, pixel_values=pixel_values, input_ids=tokens["input_ids"],
                                   attention_mask=tokens["attention_mask"])
    return processor.post_process_instance_segmentation(outputs, threshold=score_threshold,
                                                        mask_threshold=mask_threshold,
                                                        target_sizes=[raw_slice.shape])[0]


@pytest.mark.parametrize("instances", ["best", "union"])
def test_slices_mode_equals_the_plain_transformers_path_slice_by_slice(segmenter, tiny_model, phantom, instances):
    volume = Volume(phantom, OBLIQUE, modality="CT")
    options = SegmentOptions(mode="slices", batch_size=1, instances=instances, **LOW)
    result = segmenter.segment(volume, ["liver"], options)
    mask = result.mask(0)
    references = [_transformers_reference(tiny_model, phantom[z], "Liver", 0.2, 0.5) for z in range(len(phantom))]
    for z, reference in enumerate(references):
        if len(reference["scores"]) == 0:
            assert not mask[z].any()
            continue
        if instances == "best":
            expected = reference["masks"][reference["scores"].argmax()].bool().numpy()
        else:
            expected = reference["masks"].bool().any(0).numpy()
        np.testing.assert_array_equal(mask[z], expected, err_msg=f"slice {z}")
    best_scores = [float(r["scores"].max()) for r in references if len(r["scores"])]
    assert best_scores, "the reference found nothing: the test would prove nothing"
    assert result.labels[0].max_score == pytest.approx(max(best_scores), abs=1e-5)


def test_by_default_every_instance_of_a_concept_is_kept(segmenter, tiny_model, phantom):
    """Paired and repeated structures (both lungs, every vertebra): without ``instances`` the label
    is every instance above the threshold, not the most confident one (issue #30)."""
    volume = Volume(phantom, OBLIQUE, modality="CT")
    mask = segmenter.segment(volume, ["liver"], SegmentOptions(mode="slices", batch_size=1, **LOW)).mask(0)
    references = [_transformers_reference(tiny_model, phantom[z], "Liver", 0.2, 0.5) for z in range(len(phantom))]
    several = [z for z, r in enumerate(references) if len(r["scores"]) >= 2
               and (r["masks"].bool().any(0) != r["masks"][r["scores"].argmax()].bool()).any()]
    assert several, "no slice with two different instances: the test would prove nothing"
    for z in several:
        np.testing.assert_array_equal(mask[z], references[z]["masks"].bool().any(0).numpy(), err_msg=f"slice {z}")


def test_batching_does_not_change_the_answer(segmenter, phantom):
    volume = Volume(phantom, modality="CT")
    one = segmenter.segment(volume, ["liver", "spleen"], SegmentOptions(mode="slices", batch_size=1, **LOW))
    four = segmenter.segment(volume, ["liver", "spleen"], SegmentOptions(mode="slices", batch_size=4, **LOW))
    assert (one.label_map != four.label_map).mean() < 1e-3


def test_several_prompts_equal_each_prompt_alone(segmenter, phantom):
    volume = Volume(phantom, modality="CT")
    options = SegmentOptions(mode="slices", batch_size=1, **LOW)
    together = segmenter.segment(volume, ["liver", "spleen", "aorta"], options)
    for k, prompt in enumerate(["liver", "spleen", "aorta"]):
        alone = segmenter.segment(volume, [prompt], options)
        np.testing.assert_array_equal(together.mask(k), alone.mask(0))
        assert together.labels[k].max_score == alone.labels[0].max_score
    # merged map: every labelled voxel belongs to a prompt that claims it
    for k in range(3):
        assert together.mask(k)[together.label_map == k + 1].all()
    assert (together.label_map > 0).sum() == np.logical_or.reduce([together.mask(k) for k in range(3)]).sum()


def test_vision_encoder_runs_once_per_slice_for_all_prompts(segmenter, phantom):
    calls = []
    encoder = segmenter.model.detector.vision_encoder
    handle = encoder.register_forward_hook(lambda module, args, out: calls.append(args[0].shape[0]))
    try:
        segmenter.segment(Volume(phantom, modality="CT"), ["liver", "spleen", "aorta", "pancreas"],
                          SegmentOptions(mode="slices", batch_size=4, **LOW))
    finally:
        handle.remove()
    assert sum(calls) == phantom.shape[0]


@pytest.mark.parametrize("mode", ["slices", "propagate", "clips"])
def test_result_is_on_the_input_grid(segmenter, phantom, mode):
    volume = Volume(phantom, OBLIQUE, modality="CT")
    result = segmenter.segment(volume, ["liver", "spleen"], SegmentOptions(mode=mode, **LOW))
    assert result.label_map.shape == phantom.shape and result.geometry == OBLIQUE
    assert result.mode == mode
    assert result.labels[0].voxel_count == int((result.label_map == 1).sum())
    assert result.labels[0].volume_ml == pytest.approx(result.labels[0].voxel_count * 0.7 * 0.8 * 2.5 / 1000, rel=1e-5)


def test_propagate_mode_finds_structures_and_tracks_them(segmenter, phantom):
    result = segmenter.segment(Volume(phantom, modality="CT"), ["liver"], SegmentOptions(mode="propagate", **LOW))
    assert result.labels[0].slices_found > 0 and (result.label_map == 1).any()


def test_slice_axis_j_keeps_voxel_correspondence(segmenter, phantom):
    volume = Volume(phantom, modality="CT")
    along_j = segmenter.segment(volume, ["liver"], SegmentOptions(mode="slices", slice_axis="j", batch_size=1, **LOW))
    assert along_j.label_map.shape == phantom.shape
    # slicing the transposed volume along k must give the same masks, transposed back
    transposed = Volume(np.ascontiguousarray(np.moveaxis(phantom, 1, 0)), modality="CT")
    along_k = segmenter.segment(transposed, ["liver"], SegmentOptions(mode="slices", batch_size=1, **LOW))
    np.testing.assert_array_equal(along_j.mask(0), np.moveaxis(along_k.mask(0), 0, 1))


def test_progress_is_reported_and_cancel_stops_within_a_batch(segmenter, phantom):
    events = []
    segmenter.segment(Volume(phantom, modality="CT"), ["liver"], SegmentOptions(mode="slices", batch_size=2, **LOW),
                      progress=events.append)
    # on a CPU the first batch is one slice, so the time left is known after one slice
    assert [e.done for e in events] == [1, 3, 5, 7, 9, 10] and events[-1].total == 10
    assert all(e.eta_s is not None for e in events) and events[-1].eta_s == 0

    token, seen = CancelToken(), []

    def cancel_after_first(event):
        seen.append(event.done)
        token.cancel()

    with pytest.raises(Cancelled):
        segmenter.segment(Volume(phantom, modality="CT"), ["liver"], SegmentOptions(mode="propagate", batch_size=2),
                          progress=cancel_after_first, cancel=token)
    assert seen == [1]


def test_more_prompts_than_the_label_type_holds_is_refused(segmenter, phantom):
    prompts = [f"structure {i}" for i in range(256)]
    with pytest.raises(InputError, match="256 prompts do not fit a uint8"):
        segmenter.segment(Volume(phantom), prompts, SegmentOptions(mode="slices"))


@pytest.mark.parametrize("bad, message", [
    (dict(mode="fast"), "unknown mode"), (dict(score_threshold=1.5), "score_threshold"),
    (dict(slice_axis="z"), "slice_axis"), (dict(batch_size=0), "batch_size"), (dict(window="muscle"), "CT window"),
    (dict(mode="clips", clip_length=0), "clip_length"),
])
def test_bad_options_are_named(segmenter, phantom, bad, message):
    with pytest.raises(InputError, match=message):
        segmenter.segment(Volume(phantom, modality="CT"), ["liver"], SegmentOptions(**bad))


def test_unknown_model_paths_and_ids_are_clear_errors(tmp_path):
    with pytest.raises(ModelLoadError, match="no such model folder"):
        load_model(str(tmp_path / "missing-model"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(ModelLoadError, match="no config.json"):
        load_model(str(tmp_path / "empty"))
    (tmp_path / "weights.pt").write_bytes(b"x")
    with pytest.raises(ModelLoadError, match="not a PyTorch checkpoint"):
        load_model(str(tmp_path / "weights.pt"))
    (tmp_path / "weights.bin").write_bytes(b"x")
    with pytest.raises(ModelLoadError, match="bare weights file"):
        load_model(str(tmp_path / "weights.bin"))
    with pytest.raises(ModelLoadError, match="not in the local Hugging Face cache and HF_HUB_OFFLINE"):
        load_model("someone/not-cached-model")


def _refuse_network_and_hub_kernels(monkeypatch) -> list:
    """No network and no hub kernels for the rest of a test, whether or not ``kernels`` is installed:
    every socket connection, name lookup and ``kernels`` loader raises, and is recorded (transformers
    catches a failing kernel load and carries on without it, so the raise alone would go unseen).
    The hub is *not* declared offline (no ``HF_HUB_OFFLINE``, hub kernels left at their default),
    as on a user's machine. Returns the list of what was attempted."""
    import importlib.util
    import socket

    import huggingface_hub.constants
    import transformers.modeling_utils
    from transformers.integrations import hub_kernels
    from transformers.models.sam3_video import modeling_sam3_video

    attempts = []

    def refuse(what):
        def raise_(*args, **kwargs):
            attempts.append(what)
            raise RuntimeError(f"no network in this test: {what} was called")
        return raise_

    monkeypatch.setattr(socket.socket, "connect", refuse("socket.connect"))
    monkeypatch.setattr(socket.socket, "connect_ex", refuse("socket.connect_ex"))
    monkeypatch.setattr(socket, "getaddrinfo", refuse("socket.getaddrinfo"))
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    monkeypatch.delenv("USE_HUB_KERNELS", raising=False)
    for module, name in [(hub_kernels, "get_kernel"), (hub_kernels, "get_kernel_hub"), (hub_kernels, "kernelize"),
                         (hub_kernels, "_kernels_kernelize"), (hub_kernels, "lazy_load_kernel"),
                         (transformers.modeling_utils, "kernelize"), (modeling_sam3_video, "get_kernel")]:
        monkeypatch.setattr(module, name, refuse(f"{module.__name__}.{name}"), raising=False)
    if importlib.util.find_spec("kernels") is not None:
        import kernels

        for name in ("get_kernel", "get_local_kernel", "load_kernel", "kernelize", "install_kernel"):
            monkeypatch.setattr(kernels, name, refuse(f"kernels.{name}"), raising=False)
    return attempts


def test_propagate_postprocessing_runs_offline_on_the_projects_ops_with_or_without_kernels(tiny_model_dir, phantom,
                                                                                          monkeypatch):
    """transformers' SAM3 video model fetches its mask NMS and hole filling from the hub through the
    ``kernels`` package (a dependency of transformers from 5.25), and from 5.25 ``from_pretrained``
    also swaps layers for hub kernels by default. With the network gone and every kernel loader
    raising, a model loaded as the product loads it must run ``propagate`` on the project's own
    torch/scipy ops, never attempting the hub. Passes with ``kernels`` installed and without it."""
    from transformers.models.sam3_video import modeling_sam3_video as m

    from MedicalSAM3Core.inference import cv_ops
    from MedicalSAM3Core.inference.engine import Segmenter

    attempts = _refuse_network_and_hub_kernels(monkeypatch)
    monkeypatch.setattr(m, "cv_utils_kernel", None)  # as in a new process: transformers has not tried the hub yet
    calls, failures = {"generic_nms": 0, "cc_2d": 0}, []

    def spy(name):
        original = getattr(cv_ops.OfflineCvUtils, name)

        def counted(*args, **kwargs):
            calls[name] += 1
            try:
                return original(*args, **kwargs)
            except Exception as error:  # transformers would swallow it and skip the step
                failures.append(f"{name}: {error!r}")
                raise
        return staticmethod(counted)

    for name in calls:
        monkeypatch.setattr(cv_ops.OfflineCvUtils, name, spy(name))

    model = load_model(str(tiny_model_dir), device="cpu")
    assert isinstance(m.cv_utils_kernel, cv_ops.OfflineCvUtils)
    assert not getattr(model.video, "use_kernels", False)  # no layer was swapped for a hub kernel
    # the two post-processing steps, run directly: a 1-pixel hole filled, a 1-pixel sprinkle removed,
    # and of two duplicate masks the less confident suppressed
    scores = torch.zeros(1, 1, 12, 12) - 1.0
    scores[0, 0, 2:10, 2:10] = 1.0
    scores[0, 0, 5, 5] = -1.0
    scores[0, 0, 0, 11] = 1.0
    filled = m.fill_holes_in_mask_scores(scores, max_area=4)
    assert filled[0, 0, 5, 5] > 0 and filled[0, 0, 0, 11] <= 0
    masks = torch.zeros(3, 8, 8)
    masks[0, :4, :4] = masks[1, :4, :4] = masks[2, 4:, 4:] = 1.0
    keep = m.nms_masks(torch.tensor([0.9, 0.8, 0.7]), masks, prob_threshold=0.5, iou_threshold=0.5)
    assert keep.tolist() == [True, False, True]
    direct = dict(calls)
    # the product's path: propagate mode over a volume
    result = Segmenter(model).segment(Volume(phantom, modality="CT"), ["liver"], SegmentOptions(mode="propagate", **LOW))
    assert (result.label_map == 1).any()
    assert calls["generic_nms"] > direct["generic_nms"] and calls["cc_2d"] > direct["cc_2d"], calls
    assert failures == [] and attempts == []


def test_tracking_starts_where_each_prompt_is_detected_most_confidently(segmenter, tiny_model, phantom):
    volume = Volume(phantom, modality="CT")
    options = SegmentOptions(mode="propagate", anchor_samples=len(phantom), batch_size=1, **LOW)
    groups = segmenter._intensity_groups(volume, segmenter.dictionary.resolve_all(["liver", "spleen"]), options)
    texts = segmenter.embed_text(["Liver", "Spleen"])
    from MedicalSAM3Core.common.progress import ProgressTracker

    probes = np.arange(len(phantom))
    tracks = segmenter._plan_tracks(phantom, probes, groups[0], texts, options, ProgressTracker(100))
    anchor_of = {k: anchor for track, anchor in tracks for k in track.prompt_indices}
    for k, text in enumerate(["Liver", "Spleen"]):
        best = [float(r["scores"].max()) if len(r["scores"]) else 0.0
                for r in (_transformers_reference(tiny_model, s, text, 0.2, 0.5) for s in phantom)]
        assert anchor_of[k] == int(np.argmax(best)), text
    shared = segmenter._plan_tracks(phantom, probes, groups[0], texts,
                                    SegmentOptions(mode="propagate", shared_anchor=True, **LOW), ProgressTracker(100))
    assert len(shared) == 1 and shared[0][0].prompt_indices == [0, 1]


def _record_video_calls(video, monkeypatch) -> list:
    """``(session, frame_idx, reverse, hotstart_delay)`` of every call of the video model's forward."""
    calls, forward = [], type(video).forward

    def recording(self, inference_session, frame_idx=None, reverse=False, **kwargs):
        calls.append((inference_session, frame_idx, reverse, self.hotstart_delay))
        return forward(self, inference_session=inference_session, frame_idx=frame_idx, reverse=reverse, **kwargs)

    monkeypatch.setattr(type(video), "forward", recording)
    return calls


@pytest.mark.parametrize("clip_length", [4, 3])
def test_clips_mode_tracks_each_clip_from_a_fresh_session_with_hotstart_off(segmenter, tiny_model, phantom,
                                                                             monkeypatch, clip_length):
    """Medical SAM3's protocol: clips of ``clip_length`` slices, each from a new session (text detected
    again, no memory of the clip before), every slice visited once, forward, with hotstart off; the
    model's own hotstart is back afterwards."""
    video = tiny_model.video
    delay = video.hotstart_delay
    calls = _record_video_calls(video, monkeypatch)
    result = segmenter.segment(Volume(phantom, modality="CT"), ["liver"],
                               SegmentOptions(mode="clips", clip_length=clip_length, **LOW))
    assert result.mode == "clips" and result.parameters["clip_length"] == clip_length
    assert [frame for _, frame, _, _ in calls] == list(range(len(phantom)))
    assert not any(reverse for _, _, reverse, _ in calls) and all(d == 0 for *_, d in calls)
    sessions = [id(session) for session, *_ in calls]
    starts = [f for f in range(len(phantom)) if f == 0 or sessions[f] != sessions[f - 1]]
    assert starts == list(range(0, len(phantom), clip_length))
    assert len(set(sessions)) == len(starts)  # a session is never reused
    assert video.hotstart_delay == delay


def test_clips_mode_fuses_prompts_by_mask_probability(segmenter, phantom, monkeypatch):
    """Where two prompts claim a pixel, clips mode gives it to the higher mask probability (Medical SAM3's
    pixel_score fusion); propagate mode to the higher score x probability."""
    from types import SimpleNamespace

    from MedicalSAM3Core.inference.engine import _Group, VolumeAccumulator
    from MedicalSAM3Core.preprocessing.intensity import ct_window
    from MedicalSAM3Core.preprocessing.layout import SliceLayout

    group = _Group(ct_window("abdomen"), SliceLayout.stretch((4, 4), 4), [0, 1])
    # prompt 0: score 0.9, mask probability sigmoid(1) = 0.73; prompt 1: score 0.6, sigmoid(3) = 0.95
    output = SimpleNamespace(frame_idx=0, suppressed_obj_ids=(), obj_id_to_score={0: 0.9, 1: 0.6},
                             obj_id_to_mask={0: torch.full((1, 4, 4), 1.0), 1: torch.full((1, 4, 4), 3.0)})
    session = SimpleNamespace(hotstart_removed_obj_ids=set(), obj_id_to_prompt_id={0: "a", 1: "b"})
    winners = {}
    for pixel_fusion in (False, True):
        accumulator = VolumeAccumulator(2, (1, 4, 4), np.dtype("uint8"), exact=True)
        segmenter._accumulate_frame(output, session, {"a": 0, "b": 1}, group, SegmentOptions(**LOW), accumulator,
                                    (4, 4), [0.5, 0.5], pixel_fusion)
        winners[pixel_fusion] = set(np.unique(accumulator.label_map).tolist())
    assert winners == {False: {1}, True: {2}}


def test_tracker_memory_and_frames_stay_bounded_on_long_volumes(tiny_model):
    from types import SimpleNamespace

    from MedicalSAM3Core.inference.engine import _Group, _LazyFrames, _prune_memory
    from MedicalSAM3Core.preprocessing.layout import SliceLayout
    from MedicalSAM3Core.preprocessing.intensity import ct_window

    per_object = {"non_cond_frame_outputs": {f: object() for f in range(100)},
                  "cond_frame_outputs": {f: object() for f in (0, 10, 50, 90, 95, 99)}}
    session = SimpleNamespace(output_dict_per_obj={0: per_object})
    _prune_memory(session, frame_idx=99, window=17, max_cond_frames=4)
    assert sorted(per_object["non_cond_frame_outputs"]) == list(range(82, 100))
    assert sorted(per_object["cond_frame_outputs"]) == [50, 90, 95, 99]  # the 4 closest conditioning frames
    group = _Group(ct_window("abdomen"), SliceLayout.stretch((8, 8), tiny_model.image_size))
    frames = _LazyFrames(np.zeros((1000, 8, 8), np.int16), group, tiny_model)
    assert len(frames) == 1000 and frames[999].shape == (3, tiny_model.image_size, tiny_model.image_size)
    frames[3]
    assert frames._cached[0] == 3  # only the current frame is held at model resolution


def test_mask_iou_replacement_equals_transformers_and_is_installed(tiny_model):
    from transformers.models.sam3_video import modeling_sam3_video as m

    from MedicalSAM3Core.inference.cv_ops import mask_iou

    assert m.mask_iou is mask_iou
    generator = torch.Generator().manual_seed(0)
    a = torch.rand(7, 16, 16, generator=generator) > 0.5
    b = torch.rand(5, 16, 16, generator=generator) > 0.7
    b[0] = False  # an empty mask: union 0 -> IoU 0
    reference_inter = (a[:, None] & b[None]).flatten(2).sum(2).float()
    reference_union = (a[:, None] | b[None]).flatten(2).sum(2).float()
    torch.testing.assert_close(mask_iou(a, b), reference_inter / reference_union.clamp(min=1))


# -- SAM3's text-prompt graph (Meta runs the geometry encoder on an empty prompt; see use_prompt_graph) --
def _inputs(model, texts=("liver", "spleen")):
    torch.manual_seed(0)
    size = model.image_size
    tokens = model.tokenizer(list(texts), return_tensors="pt", padding="max_length", max_length=32)
    return dict(pixel_values=torch.rand(len(texts), 3, size, size) * 2 - 1, input_ids=tokens["input_ids"],
                attention_mask=tokens["attention_mask"])


def test_a_text_prompt_runs_sam3s_graph_with_the_empty_geometry_prompt(tiny_model):
    inputs = _inputs(tiny_model)
    with torch.inference_mode():
        engine = tiny_model.detector(**inputs)
        sam3 = _sam3_text_graph(tiny_model.detector, **inputs)
        plain = tiny_model.detector.forward(**inputs)  # transformers' own text-only graph
    for name in ("pred_logits", "presence_logits", "pred_boxes", "pred_masks"):
        torch.testing.assert_close(getattr(engine, name), getattr(sam3, name), rtol=0, atol=0)
    # the two graphs are different networks for the same weights: the hook is not a no-op
    assert (engine.pred_logits - plain.pred_logits).abs().max() > 1e-3


def test_box_prompts_pass_through_the_graph_unchanged(tiny_model):
    inputs = _inputs(tiny_model)
    boxes = dict(input_boxes=torch.tensor([[[0.5, 0.5, 0.3, 0.2]], [[0.4, 0.6, 0.2, 0.2]]]),
                 input_boxes_labels=torch.ones(2, 1, dtype=torch.long))
    with torch.inference_mode():
        hooked = tiny_model.detector(**inputs, **boxes)
        plain = tiny_model.detector.forward(**inputs, **boxes)
    torch.testing.assert_close(hooked.pred_logits, plain.pred_logits, rtol=0, atol=0)
    torch.testing.assert_close(hooked.pred_masks, plain.pred_masks, rtol=0, atol=0)


@pytest.mark.parametrize("empty_prompt", [True, False])
def test_propagate_mode_runs_the_models_graph_in_the_video_models_own_detector_calls(tiny_model, phantom,
                                                                                     empty_prompt):
    from MedicalSAM3Core.inference.engine import Segmenter
    from MedicalSAM3Core.inference.models import use_prompt_graph

    calls = []
    handle = tiny_model.detector.geometry_encoder.register_forward_hook(lambda *_: calls.append(1))
    use_prompt_graph(tiny_model.detector, {"empty_geometry_prompt": empty_prompt})
    try:
        Segmenter(tiny_model).segment(Volume(phantom[:6], modality="CT"), ["liver"],
                                      SegmentOptions(mode="propagate", **LOW))
    finally:
        handle.remove()
        use_prompt_graph(tiny_model.detector, tiny_model.preprocessing)
    # Sam3VideoModel calls its detector with image and text embeddings only: the hook adds the prompt
    assert (len(calls) > 0) == empty_prompt


def test_the_graph_is_the_models_choice_and_validated(tiny_model_dir, tmp_path):
    import json
    import shutil

    folder = tmp_path / "model"
    shutil.copytree(tiny_model_dir, folder)
    (folder / "medsam3_preprocessing.json").write_text(json.dumps({"empty_geometry_prompt": False}))
    model = load_model(str(folder), device="cpu")
    inputs = _inputs(model)
    with torch.inference_mode():
        torch.testing.assert_close(model.detector(**inputs).pred_logits,
                                   model.detector.forward(**inputs).pred_logits, rtol=0, atol=0)
    (folder / "medsam3_preprocessing.json").write_text(json.dumps({"empty_geometry_prompt": "yes"}))
    with pytest.raises(ModelLoadError, match="empty_geometry_prompt must be true or false"):
        load_model(str(folder), device="cpu")


def test_largest_component_is_the_models_choice_unless_the_caller_decides(segmenter, phantom, monkeypatch):
    """The model's ``largest_component`` concepts (synonyms resolved) are cleaned by default; True / False
    from the caller apply to every prompt; the result records where it was applied; a bad type is named."""
    monkeypatch.setattr(segmenter.model, "preprocessing", {**segmenter.model.preprocessing,
                                                           "largest_component": ["hepar", "Aorta"]})
    prompts = segmenter.dictionary.resolve_all(["liver", "spleen", "aorta", "my structure"])
    assert segmenter.largest_component_flags(prompts, SegmentOptions()) == [True, False, True, False]
    assert segmenter.largest_component_flags(prompts, SegmentOptions(largest_component=True)) == [True] * 4
    assert segmenter.largest_component_flags(prompts, SegmentOptions(largest_component=False)) == [False] * 4
    result = segmenter.segment(Volume(phantom, modality="CT"), ["liver", "spleen"], SegmentOptions(mode="slices"))
    assert result.parameters["largest_component_applied"] == ["Liver"] and result.parameters["largest_component"] is None
    with pytest.raises(InputError, match="option largest_component has the wrong type"):
        SegmentOptions(largest_component="yes").validate()


def test_the_default_mode_is_the_models_unless_the_caller_chooses(segmenter, phantom, monkeypatch, tiny_model_dir,
                                                                   tmp_path):
    """No mode given: the model's ``default_mode`` (the one that measured best on its validation scans),
    else propagate; the sidecar records the mode that ran. A model folder's value is validated."""
    import json
    import shutil

    volume = Volume(phantom[:6], modality="CT")
    assert segmenter.segment(volume, ["liver"], SegmentOptions(**LOW)).mode == "propagate"
    monkeypatch.setattr(segmenter.model, "preprocessing", {**segmenter.model.preprocessing, "default_mode": "slices"})
    result = segmenter.segment(volume, ["liver"], SegmentOptions(**LOW))
    assert result.mode == result.parameters["mode"] == "slices"
    assert segmenter.segment(volume, ["liver"], SegmentOptions(mode="clips", **LOW)).mode == "clips"
    folder = tmp_path / "model"
    shutil.copytree(tiny_model_dir, folder)
    (folder / "medsam3_preprocessing.json").write_text(json.dumps({"default_mode": "clips"}))
    assert load_model(str(folder), device="cpu").preprocessing["default_mode"] == "clips"
    (folder / "medsam3_preprocessing.json").write_text(json.dumps({"default_mode": "video"}))
    with pytest.raises(ModelLoadError, match="default_mode 'video' is not one of propagate, slices, clips"):
        load_model(str(folder), device="cpu")


def test_largest_component_of_a_model_folder_is_validated(tiny_model_dir, tmp_path):
    import json
    import shutil

    folder = tmp_path / "model"
    shutil.copytree(tiny_model_dir, folder)
    (folder / "medsam3_preprocessing.json").write_text(json.dumps({"largest_component": ["liver", "aorta"]}))
    assert load_model(str(folder), device="cpu").preprocessing["largest_component"] == ["liver", "aorta"]
    (folder / "medsam3_preprocessing.json").write_text(json.dumps({"largest_component": "liver"}))
    with pytest.raises(ModelLoadError, match="largest_component must be a list of concept names"):
        load_model(str(folder), device="cpu")


@pytest.mark.parametrize("mode", ["slices", "propagate"])
def test_a_concepts_own_mask_threshold_draws_that_prompt_alone(segmenter, phantom, monkeypatch, mode):
    """``concept_mask_thresholds`` (synonyms resolved) changes only its concept's mask, exactly as the
    same threshold given for the whole run would; the caller's ``mask_threshold`` overrides it; the
    result records what each prompt was drawn at."""
    volume = Volume(phantom, modality="CT")
    prompts = ["liver", "spleen"]

    def masks(options):
        result = segmenter.segment(volume, prompts, replace(options, mode=mode, **LOW))
        return result, [result.mask(k) for k in range(len(prompts))]

    default = segmenter.model.preprocessing.get("mask_threshold", 0.5)
    _, plain = masks(SegmentOptions())
    _, low = masks(SegmentOptions(mask_threshold=0.2))
    assert low[0].sum() > plain[0].sum() > 0 and low[1].sum() > plain[1].sum() > 0  # thresholds tell apart
    monkeypatch.setattr(segmenter.model, "preprocessing", {**segmenter.model.preprocessing,
                                                           "concept_mask_thresholds": {"hepar": 0.2}})
    assert segmenter.mask_thresholds(segmenter.dictionary.resolve_all(prompts + ["my structure"]), SegmentOptions()) \
        == [0.2, default, default]
    result, own = masks(SegmentOptions())
    np.testing.assert_array_equal(own[0], low[0])  # liver drawn at its own 0.2
    np.testing.assert_array_equal(own[1], plain[1])  # spleen at the model's default
    assert result.parameters["mask_threshold_applied"] == {"Liver": 0.2, "Spleen": default}
    chosen, overridden = masks(SegmentOptions(mask_threshold=0.5))
    assert chosen.parameters["mask_threshold_applied"] == {"Liver": 0.5, "Spleen": 0.5}
    _, half = masks(SegmentOptions(mask_threshold=0.5))
    np.testing.assert_array_equal(overridden[0], half[0])


def test_concept_mask_thresholds_of_a_model_folder_are_validated(tiny_model_dir, tmp_path):
    import json
    import shutil

    folder = tmp_path / "model"
    shutil.copytree(tiny_model_dir, folder)
    (folder / "medsam3_preprocessing.json").write_text(json.dumps({"concept_mask_thresholds": {"aorta": 0.15}}))
    assert load_model(str(folder), device="cpu").preprocessing["concept_mask_thresholds"] == {"aorta": 0.15}
    for bad in ({"aorta": 1.5}, {"aorta": True}, ["aorta"], {"": 0.2}):
        (folder / "medsam3_preprocessing.json").write_text(json.dumps({"concept_mask_thresholds": bad}))
        with pytest.raises(ModelLoadError, match="concept_mask_thresholds must map concept names to numbers"):
            load_model(str(folder), device="cpu")


def test_progress_estimates_the_time_left_from_the_work_done():
    from MedicalSAM3Core.common.progress import ProgressTracker, eta_message, format_duration

    now = [100.0]
    events = []
    tracker = ProgressTracker(300, events.append, clock=lambda: now[0])
    now[0] += 37.0
    tracker.advance(1, "segmenting slices")
    assert events[-1].eta_s == pytest.approx(37.0 * 299)
    assert eta_message(events[-1].eta_s, "cpu").startswith("about 3 h 4 min on this computer; a GPU server")
    assert eta_message(120.0, "cuda:0") == "about 2 min on cuda:0"
    assert eta_message(700.0, "cpu", server="https://box:8765") .startswith("about 12 min on the server https://box:8765;")
    tracker.eta_total = 1000  # propagate: the sweeps are not counted yet
    now[0] += 37.0
    tracker.advance(1, "finding start slices")
    assert events[-1].eta_s == pytest.approx(37.0 * 998)
    assert [format_duration(s) for s in (3, 44, 600, 3600, 11400)] == ["3 s", "45 s", "10 min", "1 h", "3 h 10 min"]


def test_a_model_says_what_it_was_not_trained_on(segmenter, phantom, monkeypatch):
    """``trained_concepts`` / ``trained_modalities`` of a model folder: a prompt outside them (by any
    synonym) or a volume of another modality gets one sentence in the result's warnings; the result
    is still computed; a model that lists nothing (SAM3's open vocabulary) warns of nothing."""
    options = SegmentOptions(mode="slices", **LOW)
    plain = segmenter.segment(Volume(phantom, modality="CT"), ["liver", "spleen"], options)
    assert not [w for w in plain.warnings if "trained" in w]
    monkeypatch.setattr(segmenter.model, "preprocessing", {**segmenter.model.preprocessing,
                                                           "trained_concepts": ["hepar", "Aorta"],
                                                           "trained_modalities": ["CT"]})
    result = segmenter.segment(Volume(phantom, modality="CT"), ["liver", "spleen"], options)
    assert [w for w in result.warnings if "trained" in w] == [
        "this model was not trained on 'spleen': its result means little; it knows Aorta, hepar"]
    assert result.labels[1].name == "Spleen"  # computed all the same
    assert result.labels[0].model_text == "hepar"  # the model is sent the phrase it learnt
    # a paired structure the model knows neither as a whole nor by side: both sides, one sentence
    pair = segmenter.segment(Volume(phantom, modality="CT"), ["adrenal glands"], options)
    assert [label.name for label in pair.labels] == ["Left adrenal gland", "Right adrenal gland"]
    assert [w for w in pair.warnings if "trained" in w] == [
        "this model was not trained on 'adrenal glands' (sent as 'Left adrenal gland' and 'Right adrenal gland'): "
        "its result means little; it knows Aorta, hepar"]
    on_mr = segmenter.segment(Volume(phantom, modality="MR"), ["liver"], options)
    assert [w for w in on_mr.warnings if "trained" in w] == ["this model was trained on CT only; the volume is MR"]


def test_trained_concepts_of_a_model_folder_are_validated(tiny_model_dir, tmp_path):
    import json
    import shutil

    folder = tmp_path / "model"
    shutil.copytree(tiny_model_dir, folder)
    for key in ("trained_concepts", "trained_modalities"):
        (folder / "medsam3_preprocessing.json").write_text(json.dumps({key: "liver"}))
        with pytest.raises(ModelLoadError, match=f"{key} must be a list of names"):
            load_model(str(folder), device="cpu")
