"""Tracker training (Training/tracker.py): the trained step is transformers' inference path, prompts and
clicks, a tiny tracker that learns to follow one of two identical moving discs, exact resume, DDP
equivalence, and an export that the engine runs in propagate mode."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from MedicalSAM3Core.common.errors import InputError
from movingdata import write_moving_discs
from toydata import tiny_config

REPO = Path(__file__).resolve().parents[2]
MASK_ONLY = {"prompts": {"mask": 1.0, "box": 0.0, "points": 0.0}, "corrected_frames": 0}


@pytest.fixture(scope="module")
def discs(tmp_path_factory):
    return write_moving_discs(tmp_path_factory.mktemp("discs"))


def _features(video, detector, pixel_values):
    vision = detector.get_vision_features(pixel_values=pixel_values)
    feats, pos = video.get_vision_features_for_tracker(vision)
    return [([f[:, t:t + 1] for f in feats], [p[:, t:t + 1] for p in pos]) for t in range(len(pixel_values))]


def _transformers_session(frames, size):
    from transformers.models.sam3_tracker_video.modeling_sam3_tracker_video import Sam3TrackerVideoInferenceSession

    session = Sam3TrackerVideoInferenceSession(video=None, video_height=size, video_width=size, dtype=torch.float32,
                                               max_vision_features_cache_size=len(frames))
    session.processed_frames = dict.fromkeys(range(len(frames)))
    for t, (feats, pos) in enumerate(frames):
        session.cache.cache_vision_features(t, {"vision_feats": feats, "vision_pos_embeds": pos})
    return session, session.obj_id_to_idx(1)


@pytest.mark.parametrize("prompt", ["mask", "points"])
def test_the_trained_step_computes_what_transformers_inference_path_computes(discs, tmp_path, prompt):
    """ObjectTrack with gradients on, in the state the trainer puts the tracker in (dropout 0 here), equals
    transformers' ``Sam3TrackerVideoModel.forward`` (inference mode) frame by frame: a prompt on frame 2,
    tracking to the end, a negative click on a tracked frame and, from a fresh memory holding the prompted
    frame, tracking backwards; mask logits, object scores and the memory written to the bank."""
    from Training.train import Trainer
    from MedicalSAM3Core.inference.tracking import ObjectTrack

    config = tiny_config(discs, tmp_path, tasks=["tracker"], steps=1)
    config["model"]["dropout"] = 0.0
    trainer = Trainer(config)
    video, detector = trainer.bundle.full, trainer.detector
    with torch.no_grad():  # random weights: make the object appear, so masks are not all "no object"
        video.tracker_model.mask_decoder.pred_obj_score_head.proj_out.bias.fill_(5.0)
    clip = trainer.clips.render(trainer.clips.anchors["Lesion"][3], np.random.default_rng(0))
    size, n = clip.masks.shape[-1], len(clip.masks)
    p = 2
    points, labels = torch.tensor([[20.0, 14.0]]), torch.tensor([1])
    click, click_label = torch.tensor([[30.0, 30.0]]), torch.tensor([0])

    frames = _features(video, detector, clip.pixel_values)
    ours = ObjectTrack(video, frames)
    steps = [ours.step(p, mask=clip.masks[p]) if prompt == "mask" else ours.step(p, points=points, labels=labels)]
    steps += [ours.step(f) for f in range(p + 1, n)]
    steps.append(ours.step(4, points=click, labels=click_label))
    steps.append(ours.step(5))
    back = ours.branch()
    steps += [back.step(f, reverse=True) for f in range(p - 1, -1, -1)]
    assert any(s.low_res.requires_grad for s in steps)  # the training graph
    memory = [ours.session.output_dict_per_obj[0]["non_cond_frame_outputs"][f]["maskmem_features"] for f in (3, 5)]

    tracker = video.tracker_model
    with torch.inference_mode():
        frames_ref = _features(video, detector, clip.pixel_values)
        session, obj = _transformers_session(frames_ref, size)
        if prompt == "mask":
            session.add_mask_inputs(obj, p, clip.masks[p][None, None].float())
        else:
            session.add_point_inputs(obj, p, {"point_coords": points[None, None], "point_labels": labels[None, None].int()})
        session.obj_with_new_inputs = [1]
        reference = [tracker(session, frame_idx=p)] + [tracker(session, frame_idx=f) for f in range(p + 1, n)]
        session.add_point_inputs(obj, 4, {"point_coords": click[None, None], "point_labels": click_label[None, None].int()})
        session.obj_with_new_inputs = [1]
        reference += [tracker(session, frame_idx=4), tracker(session, frame_idx=5)]
        fresh, obj2 = _transformers_session(frames_ref, size)
        fresh.output_dict_per_obj[obj2]["cond_frame_outputs"][p] = session.output_dict_per_obj[obj]["cond_frame_outputs"][p]
        reference += [tracker(fresh, frame_idx=f, reverse=True) for f in range(p - 1, -1, -1)]
        memory_ref = [session.output_dict_per_obj[0]["non_cond_frame_outputs"][f]["maskmem_features"] for f in (3, 5)]

    assert len(steps) == len(reference) == n + 2
    appeared = 0
    for ours_step, ref in zip(steps, reference):
        torch.testing.assert_close(ours_step.low_res.detach(), ref.pred_masks, rtol=0, atol=1e-5)
        torch.testing.assert_close(ours_step.object_score.detach().reshape(-1), ref.object_score_logits.reshape(-1),
                                   rtol=0, atol=1e-5)
        appeared += int((ref.pred_masks > 0).any())
    assert appeared >= n  # real masks were compared, not the "no object" constant
    for a, b in zip(memory, memory_ref):
        torch.testing.assert_close(a.detach().float(), b.float(), rtol=0, atol=1e-2)  # stored in bfloat16 by both


def test_clicks_go_to_the_centre_of_the_largest_error():
    from Training.tracker import click_on_error, initial_prompt

    truth = np.zeros((20, 20), bool)
    truth[2:12, 2:12] = True
    predicted = np.zeros_like(truth)
    predicted[2:12, 2:6] = True  # the right part of the object is missed: a positive click in it
    x, y, label = click_on_error(predicted, truth)
    assert label == 1 and 6 <= x <= 11 and 2 <= y <= 11 and truth[int(y), int(x)] and not predicted[int(y), int(x)]
    predicted = truth.copy()
    predicted[14:20, 14:20] = True  # a false region larger than any miss: a negative click
    x, y, label = click_on_error(predicted, truth)
    assert label == 0 and x >= 14 and y >= 14
    assert click_on_error(truth, truth) is None
    rng = np.random.default_rng(0)
    points, labels = initial_prompt("box", truth, rng)
    assert labels.tolist() == [2, 3] and points.shape == (2, 2)
    assert np.all(np.abs(points - np.array([[2, 2], [11, 11]])) <= 1.0 + 1e-6)  # 10% of a 10-pixel side
    points, labels = initial_prompt("points", truth, rng)
    assert labels.tolist() == [1] and truth[int(points[0, 1]), int(points[0, 0])]


def test_an_imperfect_mask_is_wrong_the_ways_a_text_result_can_be():
    """``refine`` prompts start from the ground truth grown, shrunk, shifted, cut or with a false blob:
    a mask that overlaps the object but differs from it, drawn from the generator alone."""
    from Training.tracker import corrupt_mask

    yy, xx = np.mgrid[:64, :64]
    truth = (yy - 30) ** 2 + (xx - 34) ** 2 <= 12 ** 2
    kept = truth.copy()
    dice = []
    for seed in range(40):
        out = corrupt_mask(truth, np.random.default_rng(seed))
        assert out.dtype == bool and out.shape == truth.shape
        np.testing.assert_array_equal(out, corrupt_mask(truth, np.random.default_rng(seed)))
        dice.append(2 * (out & truth).sum() / (out.sum() + truth.sum()))
    np.testing.assert_array_equal(truth, kept)  # the truth itself is untouched
    assert sum(d < 0.99 for d in dice) >= 36  # nearly always wrong somewhere
    assert np.median(dice) > 0.5 and sum(d == 0 for d in dice) <= 2  # a mask of the object (rarely missed), not noise


def test_a_milder_severity_makes_milder_errors():
    """``tracker.refine_severity`` scales every error of :func:`corrupt_mask`: the same draws at a lower
    severity give masks closer to the truth, and severity 1 draws what the function drew before it had
    the setting (the default's masks are unchanged)."""
    from Training.tracker import corrupt_mask

    yy, xx = np.mgrid[:64, :64]
    truth = (yy - 30) ** 2 + (xx - 34) ** 2 <= 12 ** 2

    def dice(a):
        return 2 * (a & truth).sum() / max(1, a.sum() + truth.sum())

    mean = {s: np.mean([dice(corrupt_mask(truth, np.random.default_rng(seed), s)) for seed in range(40)])
            for s in (1.0, 0.5, 0.25)}
    assert mean[1.0] < mean[0.5] < mean[0.25] < 1.0
    for seed in range(10):
        np.testing.assert_array_equal(corrupt_mask(truth, np.random.default_rng(seed)),
                                      corrupt_mask(truth, np.random.default_rng(seed), 1.0))


def test_single_slice_clips_train_the_answers_to_clicks_without_tracking(discs, tmp_path, monkeypatch):
    """``clip_length: 1``: the prompted slice alone; its refine prompt and corrective clicks are trained,
    no frame is tracked."""
    from MedicalSAM3Core.inference import tracking
    from Training.tracker import track_clip
    from Training.train import Trainer

    config = tiny_config(discs, tmp_path, tasks=["tracker"], steps=1)
    config["tracker"] = {"prompts": {"mask": 0.0, "box": 0.0, "points": 0.0, "refine": 1.0}, "correction_clicks": 1,
                         "corrected_frames": 0, "clip_length": 1, "refine_severity": 0.5}
    trainer = Trainer(config)
    clip = trainer.clips.draw(np.random.default_rng(5))
    assert clip.kind == "refine" and len(clip.masks) == 1 and clip.prompt == 0 and clip.masks[0].any()
    calls, step = [], tracking.ObjectTrack.step

    def recording(self, frame, **kwargs):
        calls.append((frame, kwargs))
        return step(self, frame, **kwargs)

    monkeypatch.setattr(tracking.ObjectTrack, "step", recording)
    loss, terms = track_clip(trainer.bundle.full, trainer.detector, clip, trainer.tracker_cfg,
                             np.random.default_rng(9), "cpu", False)
    assert loss.requires_grad and 1 <= terms["frames"] <= 2
    assert calls and all(frame == 0 and kw.get("points") is not None for frame, kw in calls)  # no tracked frame


def test_a_refine_prompt_corrects_an_imperfect_mask_as_the_engine_does(discs, tmp_path, monkeypatch):
    """A ``refine`` clip: the prompted frame's first step gets the imperfect mask as previous-mask logits
    (the engine's conversion, ``mask_as_logits``) and one click on its largest error; each corrective
    click after it gets the previous output's logits (SAM2's iterative training)."""
    from MedicalSAM3Core.inference import tracking
    from MedicalSAM3Core.inference.tracking import mask_as_logits
    from Training.tracker import click_on_error, corrupt_mask, track_clip
    from Training.train import Trainer

    config = tiny_config(discs, tmp_path, tasks=["tracker"], steps=1)
    config["tracker"] = {"prompts": {"mask": 0.0, "box": 0.0, "points": 0.0, "refine": 1.0}, "correction_clicks": 2,
                         "corrected_frames": 0}
    trainer = Trainer(config)
    clip = trainer.clips.draw(np.random.default_rng(5))
    assert clip.kind == "refine"
    calls, step = [], tracking.ObjectTrack.step

    def recording(self, frame, **kwargs):
        out = step(self, frame, **kwargs)
        calls.append((frame, kwargs, out))
        return out

    monkeypatch.setattr(tracking.ObjectTrack, "step", recording)
    loss, terms = track_clip(trainer.bundle.full, trainer.detector, clip, trainer.tracker_cfg,
                             np.random.default_rng(9), "cpu", False)
    assert loss.requires_grad and terms["frames"] >= 2
    truth = clip.masks[clip.prompt].numpy()
    start = corrupt_mask(truth, np.random.default_rng(9))  # the generator's first draw
    prompted = [(kw, out) for f, kw, out in calls if f == clip.prompt and kw.get("points") is not None]
    assert 1 <= len(prompted) <= 3
    first = prompted[0][0]
    tracker = trainer.bundle.full.tracker_model
    torch.testing.assert_close(first["previous_logits"], mask_as_logits(torch.from_numpy(start), tracker))
    assert tuple(first["previous_logits"].shape) == tuple(tracker.prompt_encoder.mask_input_size)
    x, y, label = click_on_error(start, truth)
    assert first["points"].tolist() == [[x, y]] and first["labels"].tolist() == [label]
    for (kw, _), (earlier, before) in zip(prompted[1:], prompted):  # later clicks: the last output's logits
        torch.testing.assert_close(kw["previous_logits"], before.low_res.detach()[0, 0])
        assert len(kw["points"]) == len(earlier["points"]) + 1  # the frame's clicks accumulate


def test_a_clip_shares_its_augmentation_and_holds_the_object_on_every_frame(discs, tmp_path):
    from Training.train import Trainer

    config = tiny_config(discs, tmp_path, tasks=["tracker"], steps=1)
    config["data"]["augment"] = {"scale": [0.8, 1.2], "shift": 0.1, "noise": 0.05}
    trainer = Trainer(config)
    clip = trainer.clips.draw(np.random.default_rng(3))
    assert clip.pixel_values.shape[0] == clip.masks.shape[0] == 8
    assert clip.masks[clip.prompt].any() and clip.kind in ("mask", "box", "points")
    # the disc keeps its size on every frame (one zoom for the clip) and moves the same way
    areas = clip.masks.flatten(1).sum(1).float()
    assert float(areas.max() - areas.min()) <= 0.25 * float(areas.mean())
    xs = [float(torch.nonzero(m)[:, 1].float().mean()) for m in clip.masks]
    steps = np.diff(xs)
    assert np.all(np.sign(steps) == np.sign(steps[0])) and np.ptp(steps) < 2.0
    # each frame has its own noise: two frames differ away from the discs too
    background = ~(clip.masks[0] | clip.masks[1])
    assert not torch.equal(clip.pixel_values[0][:, background], clip.pixel_values[1][:, background])


def _follow(trainer, instance: int) -> list[float]:
    """Dice of the tracked disc on every frame after a mask prompt on the first (inference mode)."""
    from MedicalSAM3Core.inference.tracking import ObjectTrack
    from Training.tracker import Anchor, canvas_logits

    clip = trainer.clips.render(Anchor(1, "Lesion", instance, 0), np.random.default_rng(0))
    video = trainer.bundle.full
    with torch.inference_mode():
        track = ObjectTrack(video, _features(video, trainer.detector, clip.pixel_values))
        track.step(0, mask=clip.masks[0])
        dice = []
        for f in range(1, len(clip.masks)):
            predicted = canvas_logits(track.step(f).low_res, clip.masks.shape[-1])[0, 0] > 0
            truth = clip.masks[f]
            dice.append(float(2 * (predicted & truth).sum() / max(1, int(predicted.sum() + truth.sum()))))
    return dice


@pytest.mark.slow
def test_a_tiny_tracker_learns_to_follow_a_moving_disc(tmp_path):
    """Overfit: a disc crosses the volume, 3 pixels per slice; after 100 steps (about 30 s on 2 cores) a mask
    prompt on the first slice is followed through the clip by the memory bank alone.

    Two identical discs moving apart (the ``discs`` fixture, which needs the memory to know WHICH disc was
    prompted) are not learnt in a few hundred steps of this tiny model: it draws both. Left to the real
    tracker training (Training/configs), not to a unit test."""
    from Training.train import Trainer

    dataset = write_moving_discs(tmp_path / "data", discs=1)
    config = tiny_config(dataset, tmp_path / "run", tasks=["tracker"], steps=100, warmup_steps=5)
    config["tracker"] = {**MASK_ONLY, "lr": 3e-3, "clip_length": 6}
    trainer = Trainer(config)
    before = _follow(trainer, 0)
    trainer.run()
    after = _follow(trainer, 0)
    assert np.mean(before) < 0.3, before
    assert np.mean(after) > 0.9 and min(after) > 0.8, (before, after)


def test_resume_reproduces_the_uninterrupted_detector_and_tracker_run(discs, tmp_path):
    """Detector and tracker in one run (dropout on): stopping after 2 steps and resuming gives the same
    weights of the whole video model as running 4 steps at once."""
    from Training.train import Trainer

    config = tiny_config(discs, tmp_path / "a", tasks=["detector", "tracker"], steps=4, epoch_steps=3)
    config["tracker"] = {"clip_length": 4, "correction_clicks": 1}
    straight = Trainer(config)
    straight.run()
    config_b = tiny_config(discs, tmp_path / "b", tasks=["detector", "tracker"], steps=4, epoch_steps=3)
    config_b["tracker"] = dict(config["tracker"])
    Trainer(config_b).run(stop_after=2)
    resumed = Trainer(config_b)
    resumed.run(resume=True)
    assert resumed.step == 4
    initial = Trainer(tiny_config(discs, tmp_path / "c", tasks=["detector", "tracker"])).bundle.full.state_dict()
    a, b = straight.bundle.full.state_dict(), resumed.bundle.full.state_dict()
    moved = {"detector": 0, "tracker": 0}
    for name in a:
        assert torch.equal(a[name], b[name]), name
        if a[name].is_floating_point() and not torch.equal(a[name], initial[name]):
            moved["tracker" if name.startswith(("tracker_model.", "tracker_neck.")) else "detector"] += 1
    assert moved["detector"] > 20 and moved["tracker"] > 20, moved  # both were trained


def test_a_tracker_stage_leaves_the_detector_as_it_was(discs, tmp_path):
    from Training.train import Trainer

    config = tiny_config(discs, tmp_path, tasks=["tracker"], steps=2)
    trainer = Trainer(config)
    before = {k: v.clone() for k, v in trainer.bundle.full.state_dict().items()}
    trainer.run()
    after = trainer.bundle.full.state_dict()
    tracker = [k for k in after if k.startswith(("tracker_model.", "tracker_neck."))]
    assert all(torch.equal(before[k], after[k]) for k in after if k not in tracker)
    assert sum(not torch.equal(before[k], after[k]) for k in tracker) > 20


@pytest.mark.slow
def test_two_processes_equal_one_process_with_the_tracker(discs, tmp_path):
    """torchrun, 2 gloo processes x (1 slice + 1 clip) == 1 process x (2 slices + 2 clips): gradients are
    averaged across processes by hand when the tracker is trained.

    One step: the tracker stores its memories in bfloat16 (transformers' ``_encode_new_memory``, as Meta's),
    so after the first update a float32 round-off difference between the two runs (a batch of 2 slices vs
    2 batches of 1 in the detector) can move a memory feature by one bfloat16 step (0.4%), and later steps
    grow that into differences no tolerance separates from a bug. The first step compares the mechanics:
    which clips each process draws, the averaging of gradients, the clipping and the optimizer."""
    from safetensors.torch import load_file

    config = tiny_config(discs, tmp_path / "unused", tasks=["detector", "tracker"], steps=1, batch_size=2)
    config["model"]["dropout"] = 0.0
    config["model"]["preprocessing"] = {"empty_geometry_prompt": False}  # see test_train.py's DDP test
    config["tracker"] = {"clip_length": 4, "clips_per_step": 2}
    path = tmp_path / "ddp.yaml"
    path.write_text(yaml.safe_dump(config))
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    single = subprocess.run([sys.executable, "-m", "Training.train", "--config", str(path), "--output",
                             str(tmp_path / "one")], cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert single.returncode == 0, single.stderr[-3000:]
    double = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                             "-m", "Training.train", "--config", str(path), "--output", str(tmp_path / "two")],
                            cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert double.returncode == 0, double.stderr[-3000:]
    one = load_file(str(tmp_path / "one" / "model" / "model.safetensors"))
    two = load_file(str(tmp_path / "two" / "model" / "model.safetensors"))
    assert one.keys() == two.keys()
    from Training.train import build_model

    build_model(config["model"]).full.save_pretrained(tmp_path / "initial")  # the same key names as the exports
    initial = load_file(str(tmp_path / "initial" / "model.safetensors"))
    changed = 0
    for key in one:
        torch.testing.assert_close(one[key], two[key], rtol=1e-4, atol=1e-5, msg=key)
        changed += key.startswith("tracker_model.") and not torch.equal(one[key], initial[key])
    assert changed > 20


def test_the_exported_tracker_runs_propagate_mode_in_the_engine(discs, tmp_path):
    from MedicalSAM3Core.common.options import SegmentOptions
    from MedicalSAM3Core.imaging.io import read_volume
    from MedicalSAM3Core.inference.engine import Segmenter
    from MedicalSAM3Core.inference.models import load_model
    from Training.train import Trainer

    config = tiny_config(discs, tmp_path, tasks=["tracker"], steps=2)
    trainer = Trainer(config)
    trainer.run()
    stored = json.loads((tmp_path / "model" / "training.json").read_text())
    assert stored["config"]["train"]["tasks"] == ["tracker"] and "tracker_loss" in stored["metrics"]
    model = load_model(str(tmp_path / "model"), device="cpu")
    assert model.video is not None
    trained = trainer.bundle.full.tracker_model.memory_attention.layers[0].self_attn.q_proj.weight
    torch.testing.assert_close(model.video.tracker_model.memory_attention.layers[0].self_attn.q_proj.weight, trained)
    volume = read_volume(discs.parent / "disc0.nii.gz")
    result = Segmenter(model).segment(volume, ["lesion"], SegmentOptions(mode="propagate"))
    assert result.mode == "propagate" and not any("tracker" in w for w in result.warnings)
    assert result.shape == volume.shape and result.geometry == volume.geometry


def test_tracker_config_errors_name_the_problem(discs, tmp_path):
    from Training.train import Trainer, load_config

    def written(**sections):
        config = {"model": {"from_config": {"image_size": 56}}, "data": {"dataset": str(discs)}, **sections}
        path = tmp_path / "c.yaml"
        path.write_text(yaml.safe_dump(config))
        return path

    with pytest.raises(InputError, match="train.tasks must list detector and/or tracker"):
        load_config(written(train={"tasks": ["tracking"]}))
    with pytest.raises(InputError, match="unknown key 'clips'"):
        load_config(written(train={"tasks": ["tracker"]}, tracker={"clips": 2}))
    with pytest.raises(InputError, match="clip_length must be an integer >= 1"):
        load_config(written(tracker={"clip_length": 0}))
    for severity in (0, 1.5, "mild", True):
        with pytest.raises(InputError, match="refine_severity must be a number in"):
            load_config(written(tracker={"refine_severity": severity}))
    with pytest.raises(InputError, match="prompts: proportions"):
        load_config(written(tracker={"prompts": {"mask": 0, "box": 0, "points": 0}}))
    with pytest.raises(InputError, match="fsdp does not shard the tracker"):
        load_config(written(train={"tasks": ["tracker"], "fsdp": True}))
    with pytest.raises(InputError, match="export_tracker: false would not export it"):
        load_config(written(train={"tasks": ["detector", "tracker"], "export_tracker": False}))
    config = load_config(written(train={"tasks": ["tracker"]}, tracker={"clip_length": 4, "weights": {"iou": 2}}))
    assert config["tracker"]["clip_length"] == 4 and config["tracker"]["weights"] == {
        "mask": 20.0, "dice": 1.0, "iou": 2, "object": 1.0}
    # a checkpoint of a detector-only run cannot be resumed as a tracker run
    detector_run = tiny_config(discs, tmp_path / "det", steps=1)
    Trainer(detector_run).run()
    tracker_run = tiny_config(discs, tmp_path / "det", tasks=["detector", "tracker"], steps=2)
    with pytest.raises(InputError, match="holds the detector of a run with other train.tasks"):
        Trainer(tracker_run).run(resume=True)


def test_a_tracker_is_added_to_a_detector_only_model_and_trained(discs, tmp_path):
    """``model.add_tracker`` (the demo model's fourth stage): a new tracker, sized to the detector, around a
    detector-only model (``Sam3Model``); a tracker stage trains it, and the export is a detector-tracker
    whose detector is exactly the one it started from."""
    from safetensors.torch import load_file

    from MedicalSAM3Core.inference.models import load_model
    from Training.train import Trainer, load_config

    detector_run = tiny_config(discs, tmp_path / "det", steps=1, export_tracker=False)
    Trainer(detector_run).run()
    assert json.loads((tmp_path / "det" / "model" / "config.json").read_text())["model_type"] == "sam3"
    preprocessing = tmp_path / "det" / "model" / "medsam3_preprocessing.json"  # as if its text had been taught "Liver"
    preprocessing.write_text(json.dumps({**json.loads(preprocessing.read_text()), "trained_concepts": ["Liver"]}))
    config = tiny_config(discs, tmp_path / "trk", tasks=["tracker"], steps=2)
    config["model"] = {**config["model"], "from_config": None, "init": str(tmp_path / "det" / "model"),
                       "add_tracker": {"heads": 2, "ffn": 64, "memory_layers": 1}}
    trainer = Trainer(config)
    tracker = trainer.bundle.full.tracker_model
    assert len(tracker.memory_attention.layers) == 1
    assert tracker.config.memory_attention_hidden_size == trainer.detector.config.vision_config.fpn_hidden_size
    # clicks and boxes are encoded in the image's own positional basis, as in Meta's SAM3 (not two random ones)
    torch.testing.assert_close(tracker.prompt_encoder.shared_embedding.positional_embedding,
                               tracker.shared_image_embedding.positional_embedding, rtol=0, atol=0)
    # its FPN neck starts as the detector's trained one (Meta's deepcopy), then trains on its own
    neck = trainer.detector.vision_encoder.neck.state_dict()
    for key, value in trainer.bundle.full.tracker_neck.state_dict().items():
        assert torch.equal(value, neck[key]) and value.data_ptr() != neck[key].data_ptr(), key
    trainer.run()
    folder = tmp_path / "trk" / "model"
    assert json.loads((folder / "config.json").read_text())["model_type"] == "sam3_video"
    started, exported = load_file(str(tmp_path / "det" / "model" / "model.safetensors")), load_file(
        str(folder / "model.safetensors"))
    for key, value in started.items():  # the detector is the one it started from, bit for bit
        assert torch.equal(exported["detector_model." + key], value), key
    assert load_model(str(folder), device="cpu").video is not None
    # a tracker stage teaches no text: the model says it knows what its detector knew, no more
    assert json.loads((folder / "medsam3_preprocessing.json").read_text())["trained_concepts"] == ["Liver"]

    def written(model):
        path = tmp_path / "c.yaml"
        path.write_text(yaml.safe_dump({"model": model, "data": {"dataset": str(discs)}}))
        return path

    with pytest.raises(InputError, match="add_tracker puts a tracker around the detector of model.init"):
        load_config(written({"from_config": {"image_size": 56}, "add_tracker": {}}))
    with pytest.raises(InputError, match="add_tracker must be a mapping of positive integers"):
        load_config(written({"init": str(folder), "add_tracker": {"layers": 2}}))
    with pytest.raises(InputError, match="add_tracker.multimask must be true or false"):
        load_config(written({"init": str(folder), "add_tracker": {"multimask": "no"}}))
    config["model"]["init"] = str(folder)
    with pytest.raises(InputError, match="already holds a tracker"):
        Trainer(config)


def test_a_single_mask_tracker_answers_a_click_with_one_mask(discs, tmp_path):
    """``add_tracker: {multimask: false}`` (the demo tracker): a lone click, a tracked frame and the engine's
    refine each get the decoder's single-mask output (no candidates picked by a predicted IoU), and the
    saved model keeps it."""
    from transformers import Sam3VideoModel

    from MedicalSAM3Core.inference.tiny import add_tracker
    from MedicalSAM3Core.inference.tracking import ObjectTrack
    from Training.train import Trainer

    config = tiny_config(discs, tmp_path, tasks=["tracker"], steps=1)
    trainer = Trainer(config)
    single = add_tracker(trainer.detector, heads=2, ffn=64, memory_layers=1, multimask=False).eval()
    clip = trainer.clips.render(trainer.clips.anchors["Lesion"][3], np.random.default_rng(0))
    with torch.inference_mode():
        for video, candidates in ((single, 1), (add_tracker(trainer.detector, heads=2, ffn=64, memory_layers=1).eval(), 3)):
            track = ObjectTrack(video, _features(video, trainer.detector, clip.pixel_values[:2]))
            click = track.step(0, points=torch.tensor([[20.0, 14.0]]), labels=torch.tensor([1]))
            tracked = track.step(1)
            assert click.multimask.shape[2] == tracked.multimask.shape[2] == candidates
    single.save_pretrained(tmp_path / "single")
    loaded = Sam3VideoModel.from_pretrained(tmp_path / "single")
    assert loaded.tracker_model.config.multimask_output_in_sam is False
    assert loaded.tracker_model.mask_decoder.dynamic_multimask_via_stability is False


def test_score_clicks_scores_one_click_on_the_configs_clips(discs, tmp_path, capsys):
    """``Training/examples/score_clicks.py`` (how the tracker runs were judged on training clips): the
    given masks are :func:`corrupt_mask`'s draws on the config's own clips, the answers come from the
    checkpoint's weights, ``--lone`` gives no mask, and a bad ``--model`` is a clear error."""
    import copy

    sys.path.insert(0, str(REPO / "Training" / "examples"))
    import score_clicks
    from Training.tracker import click_on_error, corrupt_mask
    from Training.train import Trainer

    config = tiny_config(discs, tmp_path / "run", tasks=["tracker"], steps=1)
    config["tracker"] = {"prompts": {"mask": 0.0, "box": 0.0, "points": 0.0, "refine": 1.0}, "clip_length": 1,
                         "refine_severity": 0.5}
    trainer = Trainer(copy.deepcopy(config))
    state = trainer.bundle.full.state_dict()
    torch.save({"model": state, "step": 0}, tmp_path / "random.pt")
    rows = score_clicks.score(copy.deepcopy(config), tmp_path / "random.pt", 4, 0.5, False)
    expected = []
    for i in range(4):
        rng = np.random.default_rng([7, i])
        clip = trainer.clips.draw(rng)
        truth = clip.masks[clip.prompt].numpy()
        given = corrupt_mask(truth, rng, 0.5)
        if click_on_error(given, truth) is not None:
            expected.append((clip.concept, round(score_clicks.dice(given, truth), 6)))
    assert expected and [(r[0], round(r[1], 6)) for r in rows] == expected
    assert all(0 <= r[2] <= 1 and r[3] > 0.5 for r in rows)  # the discs survive the decoder's mask grid
    silent = {k: torch.zeros_like(v) if ".mask_decoder." in k and v.is_floating_point() else v for k, v in state.items()}
    torch.save({"model": silent, "step": 0}, tmp_path / "silent.pt")
    assert any(r[2] > 0 for r in rows)  # the random decoder draws something; a silenced one nothing
    assert all(r[2] == 0 for r in score_clicks.score(copy.deepcopy(config), tmp_path / "silent.pt", 4, 0.5, False))
    assert all(r[1] == 0 for r in score_clicks.score(copy.deepcopy(config), tmp_path / "random.pt", 2, 0.5, True))
    print(score_clicks.report(rows))
    assert f"{len(rows)} clips: given" in capsys.readouterr().out
    written = tmp_path / "c.yaml"
    written.write_text(yaml.safe_dump(config))
    assert score_clicks.main(["--config", str(written), "--model", str(tmp_path / "missing")]) == 2
    assert "neither an exported model folder nor a checkpoint" in capsys.readouterr().err
