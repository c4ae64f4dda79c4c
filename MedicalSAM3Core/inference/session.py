"""One volume, many questions: text prompts, then corrections with clicks and boxes, and re-propagation.

A :class:`VolumeSession` reads as SAM2's video predictor with slices as frames (``init_state`` once,
``add_new_points_or_box`` / ``add_new_mask`` on any frame, ``propagate_in_video`` both ways), and as
segment-anything's ``SamPredictor`` (the image encoder runs once per slice, prompts are cheap):

>>> session = segmenter.session(volume)            # preprocessing decided once
>>> result = session.text(["liver", "aorta"])      # today's modes; each prompt becomes an object
>>> patch = session.refine(2, points=[(40, 120.5, 98)], labels=[0])   # a negative click on slice z=40
>>> patch = session.propagate(2)                   # re-track from every corrected slice, both ways
>>> patch = session.undo()                         # one interaction back

Coordinates are the input volume's voxel grid: arrays ``(z, y, x)``, points and box corners as
continuous voxel indices ``(z, y, x)`` (see ``common.interaction``). Inside, slices are taken along the
session's slice axis and oriented as the model sees them (``preprocessing.orientation``), exactly as in
the text modes; masks come back as :class:`MaskPatch` es on the input grid (only the slices that changed).

What each call runs
-------------------
``refine(object, points, labels, box)``
    SAM3's tracker (``Sam3VideoModel.tracker_model``) on ONE slice, as a prompted frame: its prompt
    encoder and mask decoder on the slice's cached vision features, given every click of that slice so
    far and the slice's current mask logits (SAM2's ``prev_sam_mask_logits``: a click corrects the mask
    that is there). No memory is read: a correction depends only on its slice, its clicks and the mask
    that was there, so undo and redo give the same masks. The slice becomes a *conditioning* slice.
``seed(object, mask, key_slices)``
    An existing 3D mask (a text result, a segment the user drew) becomes the object's mask; its key
    slices (by default the slice of largest area; ``"all"`` for a drawing on a few slices) become
    conditioning slices. Each text result is seeded so.
``propagate(object)``
    The tracker with its memory bank: every conditioning slice enters as a mask prompt (the mask the
    user accepted there), all kept as conditioning frames (SAM2's ``add_all_frames_to_correct_as_cond``);
    then one sweep forward from the first conditioning slice to the end and one backward to the start,
    as SAM2's ``propagate_in_video``. Conditioning slices keep their masks; every other slice in range
    gets the tracker's mask. Reports progress; cancelling leaves the object as it was.

Vision features of slices (detector ViT + the tracker's neck) are kept in a bounded least-recently-used
cache (``cache_mb``), so clicks on a slice seen before cost only the prompt encoder and mask decoder.
All public methods hold one lock: a server may call them from worker threads.
"""

from __future__ import annotations

import copy
import threading
from collections import OrderedDict
from dataclasses import dataclass, field, replace
from typing import Optional, Sequence, Union

import numpy as np
import torch

from ..common.errors import InputError
from ..common.interaction import MaskPatch, check_points
from ..common.options import SLICE_AXES, SegmentOptions
from ..common.progress import CancelToken, ProgressCallback, ProgressTracker
from ..common.result import SegmentationResult
from ..common.volume import Volume
from ..preprocessing.body import BodyMaskedSlices, uses_body_mask
from ..preprocessing.intensity import IntensitySpec, spec_for, to_model_input
from ..preprocessing.layout import SliceLayout, pixel_spacing
from ..preprocessing.orientation import SliceOrientation

_HISTORY = 100  # interactions kept for undo


@dataclass
class SessionObject:
    """One structure being segmented. Per slice (index along the slice axis) in the model's view
    orientation: ``masks`` bool ``(rows, cols)`` (only slices where the object is present), ``logits``
    ``(h, w)`` low-resolution canvas logits of a tracker output (for the next click on that slice),
    ``prompts`` the clicks ``(points (N, 2) canvas x, y; labels (N,); box (2, 2) or None)`` and
    ``conditioning`` the slices that steer propagation."""

    object_id: int
    name: str
    spec: IntensitySpec
    masks: dict = field(default_factory=dict)
    logits: dict = field(default_factory=dict)
    prompts: dict = field(default_factory=dict)
    conditioning: set = field(default_factory=set)

    def snapshot(self) -> "SessionObject":
        """A copy whose dicts can be restored (arrays are never modified in place, so they are shared)."""
        return replace(self, masks=dict(self.masks), logits=dict(self.logits), prompts=copy.deepcopy(self.prompts),
                       conditioning=set(self.conditioning))

    def summary(self) -> dict:
        return {"object_id": self.object_id, "name": self.name, "slices": sorted(int(s) for s in self.masks),
                "conditioning_slices": sorted(int(s) for s in self.conditioning)}


class FeatureCache:
    """Tracker vision features per ``(intensity spec, slice)``, least recently used dropped first once
    their size passes ``max_bytes``."""

    def __init__(self, max_bytes: int) -> None:
        self.max_bytes = max(0, int(max_bytes))
        self._items: OrderedDict = OrderedDict()
        self.bytes = 0
        self.hits = self.misses = 0

    def get(self, key, compute) -> dict:
        if key in self._items:
            self._items.move_to_end(key)
            self.hits += 1
            return self._items[key][0]
        self.misses += 1
        value = compute()
        size = sum(t.numel() * t.element_size() for part in value.values() for t in part)
        self._items[key] = (value, size)
        self.bytes += size
        while self.bytes > self.max_bytes and len(self._items) > 1:
            _, (_, dropped) = self._items.popitem(last=False)
            self.bytes -= dropped
        return value

    def __contains__(self, key) -> bool:
        return key in self._items

    def __len__(self) -> int:
        return len(self._items)


class _SliceFeatures:
    """The session's slices as a frame source for :class:`ObjectTrack` (transformers' session-cache protocol)."""

    def __init__(self, session: "VolumeSession", spec: IntensitySpec) -> None:
        self._session, self._spec = session, spec

    def __len__(self) -> int:
        return self._session.n_slices

    def get_vision_features(self, frame_idx: int) -> dict:
        return self._session._features(self._spec, int(frame_idx))

    def cache_vision_features(self, frame_idx: int, features: dict) -> None:  # never asked: get never misses
        pass

    def clear_all(self) -> None:
        pass


class VolumeSession:
    """One volume held for many prompts and corrections (see the module docstring)."""

    def __init__(self, segmenter, volume: Volume, options: Optional[SegmentOptions] = None,
                 cache_mb: float = 1024.0) -> None:
        options = options or SegmentOptions()
        options.validate()
        self.segmenter, self.model, self.volume, self.options = segmenter, segmenter.model, volume, options
        self.axis = SLICE_AXES[options.slice_axis]
        self.orientation = SliceOrientation.for_volume(volume.geometry.direction, self.axis,
                                                       self.model.preprocessing.get("orientation") or "stored")
        view = self.orientation.apply(np.moveaxis(volume.array, self.axis, 0))  # (s, rows, cols) as the model sees them
        self.modality = segmenter._modality(volume, options)
        spacing = self.orientation.spacing(*pixel_spacing(volume.geometry.spacing, self.axis))
        if uses_body_mask(self.model.preprocessing, self.modality):
            # the model's policy: arms and table become air, slice by slice as they are read
            view = BodyMaskedSlices(view, spacing)
        self.view = view
        self.layout = SliceLayout.from_policy(self.model.preprocessing, tuple(view.shape[1:]), spacing,
                                              self.model.image_size)
        self.objects: dict[int, SessionObject] = {}
        self.cache = FeatureCache(int(cache_mb * 2 ** 20))
        self._history: list[tuple[int, str, Optional[SessionObject]]] = []
        self._lock = threading.RLock()
        self._default_spec: Optional[IntensitySpec] = None

    # -- properties ----------------------------------------------------------------------------------
    @property
    def n_slices(self) -> int:
        return int(self.view.shape[0])

    @property
    def default_spec(self) -> IntensitySpec:
        """The intensity mapping of objects that did not come from a text prompt: the model's fixed window,
        else the session's ``window`` option, else the modality's default (CT: a wide window; MR:
        percentiles), as the text modes choose for a prompt without its own window."""
        if self._default_spec is None:
            window = self.model.preprocessing.get("window") or self.options.window
            self._default_spec = spec_for(self.modality, self.volume.array, window, None, self.options.percentiles)
        return self._default_spec

    # -- text prompts ----------------------------------------------------------------------------------
    def text(self, prompts: Sequence[str], progress: Optional[ProgressCallback] = None,
             cancel: Optional[CancelToken] = None, keep_objects: bool = True) -> SegmentationResult:
        """Segment ``prompts`` with the session's options (the text modes of ``engine``); with
        ``keep_objects`` each prompt becomes an object seeded with its mask in the label map (object ids in
        ``result.parameters["session_object_ids"]``, in prompt order). A text pass is not an interaction:
        :meth:`undo` does not take it back (delete its objects with :meth:`remove_object`)."""
        with self._lock:
            result, groups = self.segmenter._segment_view(self, prompts, progress, cancel)
            if keep_objects:
                spec_of = {k: g.spec for g in groups for k in g.prompt_indices}
                ids = []
                for k, label in enumerate(result.labels):
                    object_id = self._next_id()
                    self.objects[object_id] = SessionObject(object_id, label.name, spec_of[k])
                    self._set_masks(self.objects[object_id], result.label_map == label.value, "largest")
                    ids.append(object_id)
                result.parameters["session_object_ids"] = ids
            return result

    # -- objects -----------------------------------------------------------------------------------------
    def add_object(self, name: str = "") -> int:
        """A new, empty object (its mask grows with clicks or a seed); returns its id."""
        with self._lock:
            object_id = self._next_id()
            self.objects[object_id] = SessionObject(object_id, name or f"object {object_id}", self.default_spec)
            self._history.append((object_id, "add", None))
            self._trim_history()
            return object_id

    def remove_object(self, object_id: int) -> None:
        with self._lock:
            self._object(object_id)
            del self.objects[object_id]
            self._history = [h for h in self._history if h[0] != object_id]

    def mask(self, object_id: int) -> np.ndarray:
        """The object's mask on the input grid, bool ``(z, y, x)``."""
        with self._lock:
            obj = self._object(object_id)
            stack = np.zeros(self.view.shape, dtype=bool)
            for s, m in obj.masks.items():
                stack[s] = m
            return np.ascontiguousarray(self._to_input(stack))

    # -- interactions ----------------------------------------------------------------------------------
    def seed(self, object_id: int, mask: np.ndarray, key_slices: Union[str, Sequence[int]] = "largest") -> MaskPatch:
        """Replace the object's mask with ``mask`` (bool ``(z, y, x)`` on the input grid), forgetting its
        clicks. ``key_slices`` (indices along the slice axis) become its conditioning slices: ``"largest"``
        (the slice where the mask is largest), ``"all"`` (every slice where it is present: a drawing on a
        few slices), or a list."""
        mask = np.asarray(mask)
        if mask.shape != self.volume.shape:
            raise InputError(f"a seed mask must have the volume's shape {self.volume.shape}, got {mask.shape}")
        with self._lock:
            obj = self._object(object_id)
            before = obj.snapshot()
            self._set_masks(obj, mask.astype(bool, copy=False), key_slices)
            return self._commit(obj, before, "seed")

    @torch.inference_mode()
    def refine(self, object_id: int, points: Optional[Sequence] = None, labels: Optional[Sequence] = None,
               box: Optional[Sequence] = None, replace_prompts: bool = False) -> MaskPatch:
        """Correct one slice of the object with clicks and/or a box; returns that slice's new mask.

        ``points`` ``(N, 3)`` continuous voxel indices ``(z, y, x)`` with ``labels`` ``(N,)`` (1 positive,
        0 negative); ``box`` two opposite corners ``(z, y, x)``. All must lie on one slice along the slice
        axis. The slice's earlier clicks are kept (``replace_prompts`` forgets them); a new box replaces
        the slice's box."""
        pts, lab, corners = check_points(points, labels, box)
        self._require_tracker()
        with self._lock:
            obj = self._object(object_id)
            everything = pts if corners is None else np.concatenate([pts, corners])
            view = self._to_view(everything)
            slice_index = self._one_slice(view[:, 0])
            canvas = self._to_canvas(view[:, 1:])
            old = None if replace_prompts else obj.prompts.get(slice_index)
            old_points = old["points"] if old else np.zeros((0, 2), np.float32)
            old_labels = old["labels"] if old else np.zeros((0,), np.int64)
            new_box = canvas[len(pts):] if corners is not None else (old["box"] if old else None)
            prompt = {"points": np.concatenate([old_points, canvas[:len(pts)]]).astype(np.float32),
                      "labels": np.concatenate([old_labels, lab]).astype(np.int64),
                      "box": None if new_box is None else np.stack([new_box.min(axis=0), new_box.max(axis=0)])}
            coords, codes = prompt["points"], prompt["labels"]
            if prompt["box"] is not None:  # SAM: the box first, as its two corners labelled 2 and 3
                coords, codes = np.concatenate([prompt["box"], coords]), np.concatenate([[2, 3], codes])
            previous = None if replace_prompts else self._previous_logits(obj, slice_index)
            from .tracking import ObjectTrack

            track = ObjectTrack(self.model.video, _SliceFeatures(self, obj.spec), device=self.model.device)
            with self.model.autocast():
                step = track.step(slice_index, points=torch.from_numpy(coords), labels=torch.from_numpy(codes),
                                  conditioning=True, previous_logits=previous, memory=False,
                                  decoder_outputs=False)
            before = obj.snapshot()
            self._store(obj, slice_index, self._slice_mask(step.low_res))
            obj.logits[slice_index] = step.low_res.detach().float().clamp(-32.0, 32.0)[0, 0].cpu()
            obj.prompts[slice_index] = prompt
            obj.conditioning.add(slice_index)
            return self._commit(obj, before, "refine")

    @torch.inference_mode()
    def propagate(self, object_id: int, progress: Optional[ProgressCallback] = None,
                  cancel: Optional[CancelToken] = None, first: Optional[int] = None,
                  last: Optional[int] = None) -> MaskPatch:
        """Re-track the object from every conditioning slice through slices ``first..last`` (default: all),
        both directions (see the module docstring); returns the slices that changed."""
        self._require_tracker()
        with self._lock:
            obj = self._object(object_id)
            first, last, start = self.check_propagation(object_id, first, last)
            frames = [f for f in range(first, last + 1) if f not in obj.conditioning]
            tracker = ProgressTracker(len(frames) + len(obj.conditioning), progress, cancel)
            from .tracking import ObjectTrack

            model, video = self.model, self.model.video
            track = ObjectTrack(video, _SliceFeatures(self, obj.spec), device=model.device)
            for s in sorted(obj.conditioning):
                tracker.check()
                with model.autocast():
                    track.step(s, mask=self._canvas_mask(obj.masks.get(s)), conditioning=True,
                               decoder_outputs=False)
                tracker.advance(1, "reading corrected slices")
            window = max(video.tracker_model.config.num_maskmem,
                         video.tracker_model.config.max_object_pointers_in_encoder) + 1
            new_masks: dict[int, Optional[np.ndarray]] = {}
            for current, order, reverse in ((track, range(start + 1, last + 1), False),
                                            (None, range(start - 1, first - 1, -1), True)):
                current = current or track.branch()
                for f in order:
                    if f in obj.conditioning:
                        continue
                    tracker.check()
                    with model.autocast():
                        step = current.step(f, reverse=reverse, decoder_outputs=False)
                    new_masks[f] = self._slice_mask(step.low_res)
                    _forget_far_memory(current.session, f, window)
                    tracker.advance(1, "propagating")
            before = obj.snapshot()  # nothing changes before this line: a cancelled propagation leaves no trace
            for f, m in new_masks.items():
                self._store(obj, f, m)
                obj.logits.pop(f, None)
            return self._commit(obj, before, "propagate")

    def check_propagation(self, object_id: int, first: Optional[int] = None,
                          last: Optional[int] = None) -> tuple[int, int, int]:
        """``(first, last, start)`` of a propagation of the object (``start``: its first conditioning slice in
        range), or an :class:`InputError` saying why it cannot run. Reads without the session's lock (a server
        answers at once while a task holds it); :meth:`propagate` checks again under the lock."""
        obj = self._object(object_id)
        n = self.n_slices
        first = 0 if first is None else int(first)
        last = n - 1 if last is None else int(last)
        if not 0 <= first <= last < n:
            raise InputError(f"propagation range {first}..{last} is outside the volume's slices 0..{n - 1}")
        conditioning = set(obj.conditioning)
        if not conditioning:
            raise InputError(f"object {object_id} has nothing to propagate from: correct or seed a slice first")
        inside = sorted(s for s in conditioning if first <= s <= last)
        if not inside:
            raise InputError(f"no corrected slice of object {object_id} lies in {first}..{last}")
        return first, last, inside[0]

    def mask_patch(self, object_id: int) -> MaskPatch:
        """The object's whole mask as one patch (stage ``mask``): its bounding box, every slice of it listed."""
        with self._lock:
            obj = self._object(object_id)
            return self._patch(obj, {}, set(obj.masks), "mask")

    def undo(self) -> Optional[MaskPatch]:
        """Take back the last interaction (refine, seed, propagate, add_object); None when there is none.
        Returns the patch that restores the object's previous masks."""
        with self._lock:
            if not self._history:
                return None
            object_id, stage, before = self._history.pop()
            if before is None:  # the object was added
                obj = self.objects.pop(object_id)
                emptied = replace(obj.snapshot(), masks={})
                return self._patch(emptied, obj.masks, set(obj.masks), "undo")
            current = self.objects[object_id]
            self.objects[object_id] = before
            changed = {s for s in set(current.masks) | set(before.masks)
                       if current.masks.get(s) is not before.masks.get(s)}
            return self._patch(before, current.masks, changed, "undo")

    def prepare(self, slices: Sequence[int], object_id: Optional[int] = None) -> None:
        """Compute (and cache) the vision features of ``slices`` ahead of clicks (e.g. the slice on screen)."""
        with self._lock, torch.inference_mode():
            spec = self._object(object_id).spec if object_id is not None else self.default_spec
            for s in slices:
                if not 0 <= int(s) < self.n_slices:
                    raise InputError(f"slice {s} is outside 0..{self.n_slices - 1}")
                self._features(spec, int(s))

    # -- internals -------------------------------------------------------------------------------------
    def _next_id(self) -> int:
        return max(self.objects, default=0) + 1

    def _object(self, object_id) -> SessionObject:
        try:
            return self.objects[int(object_id)]
        except (KeyError, TypeError, ValueError):
            raise InputError(f"no object {object_id!r} in this session (objects: {sorted(self.objects)})") from None

    def _features(self, spec: IntensitySpec, s: int) -> dict:
        def compute() -> dict:
            model = self.model
            raw = torch.from_numpy(np.array(self.view[s:s + 1], copy=True, order="C")).to(model.device)
            pixels = to_model_input(raw, spec, model.image_size, model.mean, model.std, self.layout)
            with model.autocast():
                vision = model.detector.get_vision_features(pixel_values=pixels)
                feats, pos = model.video.get_vision_features_for_tracker(vision)
            return {"vision_feats": list(feats), "vision_pos_embeds": list(pos)}

        self._require_tracker()
        return self.cache.get((spec, s), compute)

    def _require_tracker(self) -> None:
        if self.model.video is None:
            raise InputError("this model has no tracker (an image-only SAM3 checkpoint): clicks, boxes and "
                             "propagation need a checkpoint with SAM3's tracker")

    def _to_view(self, points: np.ndarray) -> np.ndarray:
        """``(N, 3)`` continuous voxel indices ``(z, y, x)`` -> ``(N, 3)`` ``(slice, row, col)`` as the model sees them."""
        rest = [a for a in range(3) if a != self.axis]
        s, r, c = points[:, self.axis], points[:, rest[0]], points[:, rest[1]]
        if self.orientation.transpose:
            r, c = c, r
        rows, cols = self.view.shape[1:]
        if self.orientation.flip_rows:
            r = rows - 1 - r
        if self.orientation.flip_cols:
            c = cols - 1 - c
        inside = (r >= -0.5) & (r <= rows - 0.5) & (c >= -0.5) & (c <= cols - 0.5)
        if not inside.all():
            raise InputError(f"a point or box corner lies outside the slice ({rows} x {cols} voxels)")
        return np.stack([s, r, c], axis=1)

    def _one_slice(self, positions: np.ndarray) -> int:
        indices = np.unique(np.round(positions).astype(int))
        if len(indices) != 1:
            raise InputError(f"the points and box of one interaction must lie on one slice; they lie on "
                             f"slices {indices.tolist()} along axis {self.options.slice_axis}")
        s = int(indices[0])
        if not 0 <= s < self.n_slices:
            raise InputError(f"slice {s} is outside the volume's slices 0..{self.n_slices - 1}")
        return s

    def _to_canvas(self, rc: np.ndarray) -> np.ndarray:
        """``(N, 2)`` slice ``(row, col)`` -> canvas pixel ``(x, y)`` (SAM's convention: pixel centres at integers)."""
        (top, left), (h, w), (rows, cols) = self.layout.offset, self.layout.resized, self.layout.slice_shape
        y = top + (rc[:, 0] + 0.5) * h / rows - 0.5
        x = left + (rc[:, 1] + 0.5) * w / cols - 0.5
        return np.stack([x, y], axis=1).astype(np.float32)

    def _canvas_probability(self, mask: Optional[np.ndarray]) -> torch.Tensor:
        size = self.model.image_size
        if mask is None:
            return torch.zeros((size, size), device=self.model.device)
        m = torch.from_numpy(np.ascontiguousarray(mask, dtype=np.float32))[None, None].to(self.model.device)
        return self.layout.place(m)[0, 0]

    def _canvas_mask(self, mask: Optional[np.ndarray]) -> torch.Tensor:
        """A slice mask ``(rows, cols)`` as a mask prompt on the model's canvas ``(S, S)`` bool."""
        return self._canvas_probability(mask) > 0.5

    def _previous_logits(self, obj: SessionObject, s: int) -> Optional[torch.Tensor]:
        """Low-resolution logits of the slice's current mask: the tracker's own, else the mask as +-10
        (:func:`.tracking.mask_as_logits`)."""
        from .tracking import mask_as_logits

        if s in obj.logits:
            return obj.logits[s]
        if s not in obj.masks:
            return None
        return mask_as_logits(self._canvas_probability(obj.masks[s]), self.model.video.tracker_model)

    def _slice_mask(self, low_res: torch.Tensor) -> Optional[np.ndarray]:
        """Tracker logits ``(1, 1, h, w)`` -> the slice's mask ``(rows, cols)`` (None when empty): the
        session's mask threshold (the caller's, else the model's, else 0.5) on the probability."""
        threshold = self.segmenter._mask_threshold(self.options)
        logits = self.layout.to_slice(low_res.float(), fill=-1.0e4)[0, 0]
        mask = (torch.sigmoid(logits) > threshold).cpu().numpy()
        return mask if mask.any() else None

    def _store(self, obj: SessionObject, s: int, mask: Optional[np.ndarray]) -> None:
        if mask is None or not mask.any():
            obj.masks.pop(s, None)
        else:
            obj.masks[s] = mask

    def _set_masks(self, obj: SessionObject, mask: np.ndarray, key_slices) -> None:
        """``mask`` ``(z, y, x)`` on the input grid -> the object's per-slice masks, conditioning slices, no clicks."""
        stack = self.orientation.apply(np.moveaxis(mask, self.axis, 0))
        present = np.flatnonzero(stack.any(axis=(1, 2)))
        obj.masks = {int(s): np.ascontiguousarray(stack[s]) for s in present}
        obj.logits, obj.prompts = {}, {}
        if isinstance(key_slices, str):
            if key_slices not in ("largest", "all"):
                raise InputError(f"key_slices must be 'largest', 'all' or slice indices, got {key_slices!r}")
            if key_slices == "all":
                obj.conditioning = set(obj.masks)
            else:
                areas = {s: int(m.sum()) for s, m in obj.masks.items()}
                obj.conditioning = {max(areas, key=areas.get)} if areas else set()
        else:
            chosen = {int(s) for s in key_slices}
            outside = sorted(s for s in chosen if not 0 <= s < self.n_slices)
            if outside:
                raise InputError(f"key slices {outside} are outside 0..{self.n_slices - 1}")
            obj.conditioning = chosen

    def _commit(self, obj: SessionObject, before: SessionObject, stage: str) -> MaskPatch:
        changed = {s for s in set(obj.masks) | set(before.masks) if obj.masks.get(s) is not before.masks.get(s)}
        self._history.append((obj.object_id, stage, before))
        self._trim_history()
        return self._patch(obj, before.masks, changed, stage)

    def _trim_history(self) -> None:
        del self._history[:-_HISTORY]

    def _patch(self, obj: SessionObject, old_masks: dict, changed: set, stage: str) -> MaskPatch:
        """The object's current masks on slices ``min(changed)..max(changed)``, cropped to where the old or
        new mask of a changed slice lies, on the input grid."""
        if not changed:
            return MaskPatch(obj.object_id, (0, 0, 0), np.zeros((0, 0, 0), dtype=bool), [], stage)
        lo, hi = min(changed), max(changed)
        rows, cols = self.view.shape[1:]
        new = np.zeros((hi - lo + 1, rows, cols), dtype=bool)
        touched = np.zeros_like(new)
        for s in range(lo, hi + 1):
            if s in obj.masks:
                new[s - lo] = obj.masks[s]
            if s in changed:  # every voxel that may differ: the old mask or the new one
                for m in (old_masks.get(s), obj.masks.get(s)):
                    if m is not None:
                        touched[s - lo] |= m
        new_in, touched_in = self._to_input(new), self._to_input(touched)
        start, stop = [], []
        for a in range(3):
            if a == self.axis:
                start.append(lo), stop.append(hi + 1)
                continue
            other = tuple(b for b in range(3) if b != a)
            hit = np.flatnonzero(touched_in.any(axis=other))
            start.append(int(hit[0])), stop.append(int(hit[-1]) + 1)
        crop = tuple(slice(a - (lo if d == self.axis else 0), b - (lo if d == self.axis else 0))
                     for d, (a, b) in enumerate(zip(start, stop)))
        return MaskPatch(obj.object_id, tuple(start), np.ascontiguousarray(new_in[crop]), sorted(changed), stage)

    def _to_input(self, stack: np.ndarray) -> np.ndarray:
        """``(s, rows, cols)`` in view orientation -> the input grid's axis order (a view)."""
        return np.moveaxis(self.orientation.restore(stack), 0, self.axis)


def _forget_far_memory(session, frame_idx: int, window: int) -> None:
    """Drop ordinary (non-conditioning) memory frames the tracker can no longer attend to; conditioning
    frames are all kept (a corrected slice far ahead becomes near later in the sweep)."""
    for per_object in session.output_dict_per_obj.values():
        non_cond = per_object["non_cond_frame_outputs"]
        for old in [f for f in non_cond if abs(f - frame_idx) > window]:
            del non_cond[old]
