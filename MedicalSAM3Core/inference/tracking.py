"""SAM3's tracker (the memory bank) driven one frame at a time, for one object, with or without gradients.

transformers' ``Sam3TrackerVideoModel.forward`` runs under ``torch.inference_mode``, so it cannot be
trained through. :class:`ObjectTrack` calls the same methods that ``forward`` calls, in the same
order, with the same arguments (``_run_single_frame_inference``, ``InferenceSession.store_output``,
``_batch_encode_memories``), on vision features computed outside (for training: with gradients,
from the detector's ViT and the video model's tracker neck, as ``Sam3VideoModel`` does). Nothing of
the network is re-implemented; ``Testing/training/test_tracker.py`` proves that a clip tracked by
this class equals the clip tracked by transformers' ``forward`` on the same inputs.

Frames are the model's input canvas (``image_size`` squared, see ``preprocessing.layout``);
coordinates of points and boxes are canvas pixels ``(x, y)``; masks are ``(image_size, image_size)``.

What it adds for training: the mask decoder's raw outputs of each step (all multimask candidates,
their predicted IoUs, the object score), captured with a forward hook, for SAM2's losses.

One departure, chosen: :meth:`ObjectTrack.step` with ``conditioning=True`` keeps a corrected frame
as a *conditioning* frame (SAM2's ``add_all_frames_to_correct_as_cond``), which re-propagation from
several corrected slices needs; transformers' ``forward`` keeps a click on an already tracked frame
as an ordinary memory frame (``conditioning=None`` follows that rule).
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F

MASK_LOGIT = 10.0  # a mask given as logits: +-10, as SAM's mask-as-output does (sigmoid(-10) ~ 4.5e-5)


def mask_as_logits(probability: torch.Tensor, tracker) -> torch.Tensor:
    """A mask on the canvas as the mask decoder's previous-mask input (SAM2's ``prev_sam_mask_logits``).

    ``probability``: ``(S, S)`` canvas, 0..1 (a binary mask, or its resampling); returns ``(h, w)`` logits at
    the prompt encoder's mask-input size (area-averaged, then mapped to ``+-MASK_LOGIT``). The engine's
    volume session gives a slice's current mask this way with a user's click, and tracker training its
    simulated imperfect masks: one conversion for both."""
    size = tuple(tracker.prompt_encoder.mask_input_size)
    low = F.interpolate(probability.float()[None, None], size=size, mode="area")[0, 0]
    return (low * 2.0 - 1.0) * MASK_LOGIT


@dataclass
class TrackStep:
    """One frame's output for the tracked object.

    ``low_res``: ``(1, 1, h, w)`` mask logits as the tracker stores them (``image_size / 4``);
    ``object_score``: ``(1, 1)`` logit that the object is on this frame; ``multimask``: ``(1, 1, M, h, w)``
    the decoder's raw mask logits (``M`` = 3 with multimask output, else 1) and ``iou``: ``(1, 1, M)``
    their predicted IoUs, or None when the frame's mask was a mask prompt (used as the output);
    ``conditioning``: stored as a conditioning frame; ``prompted``: the step had points or a mask.
    """

    frame: int
    low_res: torch.Tensor
    object_score: torch.Tensor
    multimask: Optional[torch.Tensor]
    iou: Optional[torch.Tensor]
    conditioning: bool
    prompted: bool


class ObjectTrack:
    """One object tracked through ``num_frames`` frames by ``video.tracker_model`` (a ``Sam3VideoModel``).

    ``features``: per frame ``(vision_feats, vision_pos_embeds)`` as ``Sam3VideoModel.
    get_vision_features_for_tracker`` returns them for a batch of one frame (lists of ``(HW, 1, C)``).
    The tracker module's ``training`` flag must be False (its inference protocol: past conditioning
    frames only, binarised prompted masks in memory); dropout modules may be in training mode.
    """

    def __init__(self, video, features, device: torch.device | str = "cpu",
                 dtype: torch.dtype = torch.float32) -> None:
        """``features``: a sequence of per-frame ``(vision_feats, vision_pos_embeds)``, or a feature source
        computed on demand (an object with ``__len__`` = the number of frames and ``get_vision_features(frame)``
        returning ``{"vision_feats": [...], "vision_pos_embeds": [...]}``, as transformers' session cache does;
        the engine's volume session passes its bounded cache of slice features)."""
        from transformers.models.sam3_tracker_video.modeling_sam3_tracker_video import (
            Sam3TrackerVideoInferenceSession)

        self.tracker = video.tracker_model
        if self.tracker.training:
            raise ValueError("ObjectTrack needs the tracker's inference protocol: call tracker_model.eval() "
                             "(dropout modules may be set to train() afterwards)")
        size = int(self.tracker.image_size)
        self.num_frames = len(features)
        lazy = hasattr(features, "get_vision_features")
        self.session = Sam3TrackerVideoInferenceSession(
            video=None, video_height=size, video_width=size, inference_device=device,
            inference_state_device=device, video_storage_device=device, dtype=dtype,
            max_vision_features_cache_size=1 if lazy else max(1, self.num_frames))
        self.session.processed_frames = dict.fromkeys(range(self.num_frames))  # frames come as features
        if lazy:
            self.session.cache = features
        else:
            for frame, (feats, pos) in enumerate(features):
                self.session.cache.cache_vision_features(frame, {"vision_feats": list(feats),
                                                                 "vision_pos_embeds": list(pos)})
        self.obj_idx = self.session.obj_id_to_idx(1)

    def branch(self) -> "ObjectTrack":
        """A new track on the same frames that keeps only the conditioning frames (prompts and corrections):
        the engine sweeps each direction from a fresh memory."""
        other = ObjectTrack.__new__(ObjectTrack)
        other.tracker, other.num_frames = self.tracker, self.num_frames
        session = copy.copy(self.session)
        mine = self.session
        session._obj_id_to_idx, session._obj_idx_to_id = copy.copy(mine._obj_id_to_idx), copy.copy(mine._obj_idx_to_id)
        session.obj_ids = list(mine.obj_ids)
        session.point_inputs_per_obj = {k: dict(v) for k, v in mine.point_inputs_per_obj.items()}
        session.mask_inputs_per_obj = {k: dict(v) for k, v in mine.mask_inputs_per_obj.items()}
        session.output_dict_per_obj = {k: {"cond_frame_outputs": dict(v["cond_frame_outputs"]),
                                           "non_cond_frame_outputs": {}}
                                       for k, v in mine.output_dict_per_obj.items()}
        session.frames_tracked_per_obj = {k: {} for k in mine.frames_tracked_per_obj}
        session.obj_with_new_inputs = []
        other.session, other.obj_idx = session, self.obj_idx
        return other

    def step(self, frame: int, reverse: bool = False, points: Optional[torch.Tensor] = None,
             labels: Optional[torch.Tensor] = None, mask: Optional[torch.Tensor] = None,
             conditioning: Optional[bool] = None, previous_logits: Optional[torch.Tensor] = None,
             memory: bool = True, decoder_outputs: bool = True) -> TrackStep:
        """Track (no prompt) or prompt ``frame``, then write its memory; as ``Sam3TrackerVideoModel.forward``.

        ``points``: ``(N, 2)`` canvas ``(x, y)`` with ``labels`` ``(N,)`` (1 positive, 0 negative, 2 and 3
        a box's top-left and bottom-right corners, first); ``mask``: ``(size, size)`` bool, a mask prompt.
        ``conditioning``: keep the frame as a conditioning frame; None: transformers' rule (only a
        frame prompted before it was tracked). ``previous_logits``: ``(h, w)`` low-resolution mask logits
        of the frame's current mask, given to the mask decoder with the points (SAM2's
        ``prev_sam_mask_logits``: a click corrects the mask that is there instead of starting anew).
        ``memory=False`` skips writing the frame into the memory bank (a one-slice correction that is
        not tracked from). ``decoder_outputs=False``: ``multimask`` and ``iou`` are not captured (no hook
        on the shared mask decoder: sessions that share one model step in parallel threads).
        """
        session, tracker, obj_idx = self.session, self.tracker, self.obj_idx
        point_inputs = mask_inputs = None
        if points is not None:
            device = session.inference_device
            point_inputs = {"point_coords": points.reshape(1, 1, -1, 2).to(device, torch.float32),
                            "point_labels": labels.reshape(1, 1, -1).to(device, torch.int32)}
        if mask is not None:
            mask_inputs = mask.reshape(1, 1, *mask.shape[-2:]).to(session.inference_device, session.dtype)
        prompted = point_inputs is not None or mask_inputs is not None
        previous = None
        if previous_logits is not None:
            if mask_inputs is not None:
                raise ValueError("previous_logits go with points, not with a mask prompt")
            previous = previous_logits.reshape(1, 1, *previous_logits.shape[-2:]).to(session.inference_device,
                                                                                     torch.float32)
        is_init_cond_frame = prompted and frame not in session.frames_tracked_per_obj[obj_idx]
        if is_init_cond_frame:
            reverse = False
        keep_as_cond = is_init_cond_frame if conditioning is None else bool(conditioning and prompted)
        if keep_as_cond and frame in session.output_dict_per_obj[obj_idx]["non_cond_frame_outputs"]:
            del session.output_dict_per_obj[obj_idx]["non_cond_frame_outputs"][frame]
        captured: dict = {}

        def on_decoder(_module, _inputs, output):
            captured["multimask"], captured["iou"] = output[0], output[1]

        handle = tracker.mask_decoder.register_forward_hook(on_decoder) if decoder_outputs else None
        try:
            current = tracker._run_single_frame_inference(
                inference_session=session, obj_idx=obj_idx, frame_idx=frame, batch_size=1,
                is_init_cond_frame=is_init_cond_frame, point_inputs=point_inputs, mask_inputs=mask_inputs,
                reverse=reverse, prev_sam_mask_logits=previous, streaming=False)
        finally:
            if handle is not None:
                handle.remove()
        session.store_output(obj_idx, frame, output_value=current, is_conditioning_frame=keep_as_cond)
        if not is_init_cond_frame:
            session.frames_tracked_per_obj[obj_idx][frame] = {"reverse": reverse}
        if memory and tracker.num_maskmem > 0:
            tracker._batch_encode_memories(
                inference_session=session, frame_idx=frame, objects_needing_memory_encoding=[obj_idx],
                high_res_masks_for_memory=[current["high_res_masks"]],
                object_score_logits_for_memory=[current["object_score_logits"]],
                is_mask_from_pts_per_obj=[prompted])
        from_mask = mask_inputs is not None  # the mask prompt is the output; the decoder ran for the pointer only
        return TrackStep(frame=frame, low_res=current["pred_masks"], object_score=current["object_score_logits"],
                         multimask=None if from_mask else captured.get("multimask"),
                         iou=None if from_mask else captured.get("iou"),
                         conditioning=keep_as_cond, prompted=prompted)
