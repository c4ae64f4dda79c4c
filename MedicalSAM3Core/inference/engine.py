"""Volume inference: text prompts -> 3D segmentation, slice by slice.

The cost structure of SAM3 is visible in the API, as in segment-anything's predictor: the vision
encoder (most of the work) runs ONCE per slice and its features are reused for every prompt;
each prompt's text embedding is computed once per volume.

Modes
-----
``slices``
    SAM3's detector (``Sam3Model``) on every slice. Per prompt and slice every instance above the
    score threshold is kept, merged into the prompt's one label (``instances="union"``, the default:
    both lungs, every vertebra), or only the most confident one (``"best"``). Score = sigmoid(class logit) x sigmoid(presence
    logit), exactly transformers' ``post_process_instance_segmentation``.
``propagate`` (the default, unless the model names another: ``default_mode`` in its medsam3_preprocessing.json)
    SAM3's detector-tracker (``Sam3VideoModel``) with its memory bank, the slices as video frames.
    A quick detection pass over a few evenly spaced slices finds, for each prompt, the slice where
    it is detected most confidently; tracking starts there and runs to both ends of the volume in
    two sweeps (prompts with the same start slice share the sweeps and the vision encoding). The
    detector keeps running on every frame inside the video model, so structures in several
    disconnected places are re-detected and added as new objects.

``clips``
    Medical SAM3's own 3D protocol (``medical/inference_3d.py``): the slices are cut into independent
    clips of ``clip_length`` (4); each clip starts from a fresh video session, so the text is detected
    again on its first slice and no memory crosses clips; hotstart is off; prompts are fused per pixel
    by mask probability.

Slices are taken along the acquisition axis ``k`` by default (``slice_axis`` may choose ``j`` or
``i``). Memory stays bounded: slices are preprocessed on the fly, in batches, so a 1000-slice
volume never holds more than a batch of model-resolution tensors; the output label map and the
bit-packed per-prompt masks are the only volume-sized arrays.
"""

from __future__ import annotations

import logging
from collections import deque
from collections.abc import Mapping
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field, replace
from typing import Iterator, Optional, Sequence

import numpy as np
import torch

from ..common.errors import InputError
from ..common.options import DEFAULT_MODE, SLICE_AXES, SegmentOptions
from ..common.progress import CancelToken, ProgressCallback, ProgressTracker
from ..common.prompts import PromptDictionary, ResolvedPrompt, default_dictionary
from ..common.result import LabelInfo, SegmentationResult, pack_mask
from ..common.volume import Volume
from ..preprocessing.intensity import IntensitySpec, detect_modality, spec_for, to_model_input
from ..preprocessing.layout import SliceLayout, pixel_spacing
from ..preprocessing.orientation import SliceOrientation
from .merging import VolumeAccumulator, clean_up, label_capacity
from .models import LoadedModel

log = logging.getLogger(__name__)

@dataclass
class _Group:
    """Prompts that share one intensity mapping, hence one vision encoding per slice."""

    spec: IntensitySpec
    layout: SliceLayout
    prompt_indices: list[int] = field(default_factory=list)


@dataclass
class _TextEmbedding:
    input_ids: torch.Tensor  # (1, 32)
    attention_mask: torch.Tensor  # (1, 32)
    features: object  # BaseModelOutputWithPooling; .pooler_output (1, 32, D)
    mask_threshold: float = 0.5  # the mask probability above which this prompt's pixels are drawn

    def for_batch(self, batch: int):
        from transformers.modeling_outputs import BaseModelOutputWithPooling

        return (BaseModelOutputWithPooling(pooler_output=self.features.pooler_output.expand(batch, -1, -1)),
                self.attention_mask.expand(batch, -1))


def _slices_tensor(slices: np.ndarray) -> torch.Tensor:
    """A batch of ``(s, rows, cols)`` slices as a CPU tensor (a copy: the volume may be read-only,
    e.g. decoded from the server's wire format, and it is never written to)."""
    return torch.from_numpy(np.array(slices, copy=True, order="C"))


class _LazyFrames(Mapping):
    """Slices as model-ready frames, computed on demand (what the video session indexes).

    Replaces the session's dict of preprocessed frames so a long volume is never held at model
    resolution; keeps only the most recent frame.
    """

    def __init__(self, view: np.ndarray, group: "_Group", model: LoadedModel) -> None:
        self._view, self._group, self._model = view, group, model
        self._cached: tuple[int, torch.Tensor] | None = None

    def __getitem__(self, index: int) -> torch.Tensor:
        if self._cached is None or self._cached[0] != index:
            raw = _slices_tensor(self._view[index:index + 1]).to(self._model.device)
            frame = to_model_input(raw, self._group.spec, self._model.image_size, self._model.mean, self._model.std,
                                   self._group.layout)[0]
            self._cached = (index, frame)
        return self._cached[1]

    def __len__(self) -> int:
        return self._view.shape[0]

    def __iter__(self) -> Iterator[int]:
        return iter(range(len(self)))


class Segmenter:
    """Segments volumes from text prompts with one loaded model.

    >>> segmenter = Segmenter(load_model("path/or/hub-id"))
    >>> result = segmenter.segment(read_volume("ct.nii.gz"), ["liver", "spleen"])
    """

    def __init__(self, model: LoadedModel, dictionary: Optional[PromptDictionary] = None) -> None:
        self.model = model
        self.dictionary = dictionary or default_dictionary()

    # -- prompts -------------------------------------------------------------------------------
    @torch.inference_mode()
    def embed_text(self, texts: Sequence[str]) -> list[_TextEmbedding]:
        """Text embeddings, one per prompt (SAM3 tokenises to 32 tokens, padded)."""
        embeddings = []
        for text in texts:
            tokens = self.model.tokenizer(text, return_tensors="pt", padding="max_length", max_length=32,
                                          truncation=True)
            ids = tokens["input_ids"].to(self.model.device)
            mask = tokens["attention_mask"].to(self.model.device)
            with self.model.autocast():
                features = self.model.detector.get_text_features(input_ids=ids, attention_mask=mask, return_dict=True)
            embeddings.append(_TextEmbedding(ids, mask, features))
        return embeddings

    # -- public entry point ----------------------------------------------------------------------
    def segment(self, volume: Volume, prompts: Sequence[str], options: Optional[SegmentOptions] = None,
                progress: Optional[ProgressCallback] = None, cancel: Optional[CancelToken] = None) -> SegmentationResult:
        """Segment every prompt through ``volume``; returns a result on exactly the input grid.

        A one-question :class:`~.session.VolumeSession` (``session(volume).text(prompts)``, keeping no
        objects). Raises :class:`InputError` for unusable prompts/options and :class:`Cancelled` when
        ``cancel`` fires (checked before every batch of slices; nothing is returned then).
        """
        return self.session(volume, options, cache_mb=0).text(prompts, progress, cancel, keep_objects=False)

    def session(self, volume: Volume, options: Optional[SegmentOptions] = None, cache_mb: float = 1024.0):
        """A :class:`~.session.VolumeSession` on ``volume``: text prompts, then clicks, boxes, seeds and
        re-propagation, with slice features cached (at most ``cache_mb``)."""
        from .session import VolumeSession

        return VolumeSession(self, volume, options, cache_mb=cache_mb)

    def _segment_view(self, session, prompts: Sequence[str], progress: Optional[ProgressCallback],
                      cancel: Optional[CancelToken]) -> tuple[SegmentationResult, list[_Group]]:
        """The text modes on a session's prepared slices (its orientation, body mask, modality)."""
        volume, options = session.volume, session.options
        resolved = self.dictionary.resolve_all(list(prompts), self.model.preprocessing.get("trained_concepts"))
        thresholds = self.mask_thresholds(resolved, options)
        # recorded in the sidecar: the mode and mask threshold the caller, else the model, chose
        options = replace(options, mask_threshold=self._mask_threshold(options), mode=self.default_mode(options))
        warnings = [p.warning for p in resolved if p.warning]
        for message in warnings:
            log.warning(message)
        label_dtype = np.dtype(options.label_dtype)
        if len(resolved) > label_capacity(label_dtype):
            raise InputError(f"{len(resolved)} prompts do not fit a {label_dtype} label map "
                             f"(at most {label_capacity(label_dtype)}); use label_dtype uint16")
        mode = options.mode
        if mode in ("propagate", "clips") and self.model.video is None:
            mode = "slices"
            warnings.append("the model has no tracker (image-only SAM3 checkpoint): used 'slices' mode")
            log.warning(warnings[-1])

        axis, orientation, view, modality = session.axis, session.orientation, session.view, session.modality
        knowledge = self.knowledge_warnings(resolved, modality)
        for message in knowledge:
            log.warning(message)
        warnings += knowledge
        groups = self._intensity_groups(volume, resolved, options, orientation, modality)
        texts = [replace(text, mask_threshold=threshold)
                 for text, threshold in zip(self.embed_text([p.model_text for p in resolved]), thresholds)]

        n_slices = view.shape[0]
        if mode == "slices":
            tracker = ProgressTracker(n_slices, progress, cancel)
            accumulator = VolumeAccumulator(len(resolved), view.shape, label_dtype, exact=True)
            self._run_slices(view, groups, texts, options, accumulator, tracker)
        elif mode == "clips":
            tracker = ProgressTracker(len(groups) * n_slices, progress, cancel)
            accumulator = VolumeAccumulator(len(resolved), view.shape, label_dtype, exact=len(groups) == 1)
            for group in groups:
                self._run_clips(view, group, texts, options, accumulator, tracker)
        else:
            probes = _probe_slices(n_slices, options.anchor_samples)
            # each track sweeps n_slices + 1 frames (its start slice twice); the count of tracks is
            # known after probing, so the total grows then
            tracker = ProgressTracker(len(groups) * len(probes), progress, cancel)
            # until the probes say how many sweeps there are, estimate the time left with the most (one per prompt)
            tracker.eta_total = tracker.total + len(resolved) * (n_slices + 1)
            tracks = [t for group in groups for t in self._plan_tracks(view, probes, group, texts, options, tracker)]
            tracker.total += len(tracks) * (n_slices + 1)
            tracker.eta_total = None
            accumulator = VolumeAccumulator(len(resolved), view.shape, label_dtype, exact=len(tracks) == 1)
            for track, anchor in tracks:
                self._run_propagate(view, track, anchor, texts, options, accumulator, tracker)

        result = self._finish(volume, resolved, accumulator, axis, orientation, mode, options, groups, warnings,
                              thresholds)
        return result, groups

    def default_mode(self, options: SegmentOptions) -> str:
        """The caller's mode, else the model's own (``default_mode`` of its medsam3_preprocessing.json: the
        mode that measured best on its validation scans), else :data:`DEFAULT_MODE` (propagate)."""
        return options.mode or self.model.preprocessing.get("default_mode") or DEFAULT_MODE

    def largest_component_flags(self, prompts: Sequence[ResolvedPrompt], options: SegmentOptions) -> list[bool]:
        """Per prompt: keep only its largest 3D component? The caller's choice (True / False for every
        prompt), else the model's own: prompts whose concept its medsam3_preprocessing.json lists under
        ``largest_component`` (names or synonyms of the prompt dictionary)."""
        if options.largest_component is not None:
            return [bool(options.largest_component)] * len(prompts)
        chosen = {self._concept_key(name) for name in self.model.preprocessing.get("largest_component") or ()}
        return [p.concept is not None and p.concept.name in chosen for p in prompts]

    def mask_thresholds(self, prompts: Sequence[ResolvedPrompt], options: SegmentOptions) -> list[float]:
        """Per prompt, the mask probability above which its pixels are drawn: the caller's
        ``mask_threshold`` for every prompt when given; else the model's own for that concept
        (``concept_mask_thresholds`` of its medsam3_preprocessing.json, names or synonyms of the
        prompt dictionary), else the model's ``mask_threshold``, else SAM3's 0.5."""
        default = self._mask_threshold(options)
        if options.mask_threshold is not None:
            return [default] * len(prompts)
        chosen = {self._concept_key(name): float(value)
                  for name, value in (self.model.preprocessing.get("concept_mask_thresholds") or {}).items()}
        return [chosen.get(p.concept.name, default) if p.concept is not None else default for p in prompts]

    def knowledge_warnings(self, prompts: Sequence[ResolvedPrompt], modality: str) -> list[str]:
        """One sentence per prompt outside the concepts the model was trained on (``trained`` of the
        prompts, resolved against the model's list), and one if the volume's
        modality is outside its training modalities (``trained_concepts`` / ``trained_modalities`` of its
        medsam3_preprocessing.json; a model that lists none, such as SAM3's open-vocabulary weights,
        gets no warning). The result is still computed: the user decides what it is worth."""
        preprocessing = self.model.preprocessing
        warnings = []
        trained = preprocessing.get("trained_concepts")
        unknown: dict[str, list[ResolvedPrompt]] = {}  # one sentence per prompt typed, whatever its parts
        for prompt in prompts:
            if prompt.trained is False:
                unknown.setdefault(prompt.user_text, []).append(prompt)
        for user_text, parts in unknown.items():
            sent = " and ".join(repr(p.model_text) for p in parts)
            what = repr(user_text) if parts[0].part_of is None else f"{user_text!r} (sent as {sent})"
            warnings.append(f"this model was not trained on {what}: its result means little; "
                            f"it knows {', '.join(sorted(trained or (), key=str.lower))}")
        modalities = preprocessing.get("trained_modalities")
        if modalities and modality.upper() not in {m.upper() for m in modalities}:
            warnings.append(f"this model was trained on {' and '.join(modalities)} only; the volume is {modality}")
        return warnings

    def _concept_key(self, name: str) -> str:
        """A concept named in the model's medsam3_preprocessing.json (a name or synonym of the prompt
        dictionary) as the canonical name a resolved prompt carries; unknown names lower-cased."""
        concept = self.dictionary.lookup(name)
        return concept.name if concept is not None else name.lower()

    def _mask_threshold(self, options: SegmentOptions) -> float:
        """The caller's mask threshold, else the model's own (its medsam3_preprocessing.json), else SAM3's 0.5."""
        if options.mask_threshold is not None:
            return float(options.mask_threshold)
        return float(self.model.preprocessing.get("mask_threshold", 0.5))

    # -- grouping by intensity mapping -----------------------------------------------------------
    @staticmethod
    def _modality(volume: Volume, options: SegmentOptions) -> str:
        declared = volume.modality if options.modality == "auto" else options.modality
        return detect_modality(volume.array, declared)

    def _intensity_groups(self, volume: Volume, prompts: list[ResolvedPrompt], options: SegmentOptions,
                          orientation: SliceOrientation = SliceOrientation(),
                          modality: Optional[str] = None) -> list[_Group]:
        fixed = self.model.preprocessing.get("window")  # a model trained on one window is always fed it
        axis = SLICE_AXES[options.slice_axis]
        rows, cols = (n for a, n in enumerate(volume.shape) if a != axis)
        slice_shape = (cols, rows) if orientation.transpose else (rows, cols)
        layout = SliceLayout.from_policy(self.model.preprocessing, slice_shape,
                                         orientation.spacing(*pixel_spacing(volume.geometry.spacing, axis)),
                                         self.model.image_size)
        modality = modality or self._modality(volume, options)
        groups: dict[IntensitySpec, _Group] = {}
        percentile_cache: dict[tuple, IntensitySpec] = {}
        for index, prompt in enumerate(prompts):
            window = fixed or options.window
            prompt_window = prompt.concept.ct_window if prompt.concept else None
            if (not window or window == "auto") and modality != "CT":
                key = tuple(options.percentiles)
                if key not in percentile_cache:
                    percentile_cache[key] = spec_for(modality, volume.array, None, None, options.percentiles)
                spec = percentile_cache[key]
            else:
                spec = spec_for(modality, volume.array, window, prompt_window, options.percentiles)
            groups.setdefault(spec, _Group(spec, layout)).prompt_indices.append(index)
        return list(groups.values())

    # -- slices mode -----------------------------------------------------------------------------
    @torch.inference_mode()
    def _run_slices(self, view: np.ndarray, groups: list[_Group], texts: list[_TextEmbedding],
                    options: SegmentOptions, accumulator: VolumeAccumulator, tracker: ProgressTracker) -> None:
        n_prompts = len(texts)
        n_slices, rows, cols = view.shape
        all_prompts = list(range(n_prompts))
        for start, stop in self._batches(n_slices, options.batch_size):
            tracker.check()
            raw = _slices_tensor(view[start:stop]).to(self.model.device)
            confidences = np.zeros((n_prompts, stop - start, rows, cols), dtype=np.float32)
            scores = np.zeros((n_prompts, stop - start), dtype=np.float32)
            for group in groups:
                for k, conf, score in self._detect_batch(raw, group, texts, options):
                    confidences[k], scores[k] = conf, score
            accumulator.add(start, all_prompts, confidences, scores)
            tracker.advance(stop - start, "segmenting slices")

    def _batches(self, n: int, batch_size: int) -> list[tuple[int, int]]:
        """``(start, stop)`` of the batches of ``n`` slices. On a CPU the first batch is one slice, so
        the time left can be estimated (and shown) after one slice instead of a whole batch."""
        first = 1 if self.model.device.type == "cpu" else batch_size
        starts = [0] + list(range(min(first, n), n, batch_size)) if n else []
        return [(start, min(n, start + (first if start == 0 else batch_size))) for start in starts]

    def _detect_batch(self, raw: torch.Tensor, group: _Group, texts: list[_TextEmbedding],
                      options: SegmentOptions) -> Iterator[tuple[int, np.ndarray, np.ndarray]]:
        """Encode a batch of raw slices once, then run the detector for each prompt of ``group``.

        Yields ``(prompt_index, confidence (b, rows, cols), score (b,))``.
        """
        model = self.model
        pixel_values = to_model_input(raw, group.spec, model.image_size, model.mean, model.std, group.layout)
        with model.autocast():
            vision = model.detector.get_vision_features(pixel_values=pixel_values)
        for k in group.prompt_indices:
            text_features, attention_mask = texts[k].for_batch(raw.shape[0])
            with model.autocast():
                outputs = model.detector(vision_embeds=vision, text_embeds=text_features, attention_mask=attention_mask)
            conf, score = instance_confidence(outputs, group.layout, options.score_threshold,
                                              texts[k].mask_threshold, options.instances)
            yield k, conf.cpu().numpy(), score.cpu().numpy()

    # -- propagate mode --------------------------------------------------------------------------
    @torch.inference_mode()
    def _plan_tracks(self, view: np.ndarray, probes: np.ndarray, group: _Group, texts: list[_TextEmbedding],
                     options: SegmentOptions, tracker: ProgressTracker) -> list[tuple[_Group, int]]:
        """Where tracking starts: for each prompt, the probed slice where it is detected most confidently.

        Prompts of ``group`` that share a start slice share one tracking session (one vision
        encoding per slice); with ``shared_anchor`` all prompts of the group start together at the
        slice with the highest summed score (fewer sweeps, for many prompts).
        """
        scores = np.zeros((len(group.prompt_indices), len(probes)))
        for start, stop in self._batches(len(probes), options.batch_size):
            tracker.check()
            batch = probes[start:stop]
            raw = _slices_tensor(view[batch]).to(self.model.device)
            for j, (_, _, score) in enumerate(self._detect_batch(raw, group, texts, options)):
                scores[j, start:start + len(batch)] = score
            tracker.advance(len(batch), "finding start slices")
        if options.shared_anchor:
            return [(group, int(probes[int(np.argmax(scores.sum(axis=0)))]))]
        by_anchor: dict[int, _Group] = {}
        for j, k in enumerate(group.prompt_indices):
            anchor = int(probes[int(np.argmax(scores[j]))])
            by_anchor.setdefault(anchor, _Group(group.spec, group.layout)).prompt_indices.append(k)
        return [(track, anchor) for anchor, track in sorted(by_anchor.items())]

    @contextmanager
    def _video_settings(self, options: SegmentOptions, **fixed) -> Iterator[None]:
        """The video model's detection thresholds from ``options``, and the attributes ``fixed`` (e.g. its
        hotstart), for the duration of one pass; the model's own values are restored afterwards."""
        video = self.model.video
        values = {"score_threshold_detection": options.score_threshold, **fixed}
        if options.new_object_threshold is not None:
            values["new_det_thresh"] = options.new_object_threshold
        saved = {name: getattr(video, name) for name in values}
        try:
            for name, value in values.items():
                setattr(video, name, value)
            yield
        finally:
            for name, value in saved.items():
                setattr(video, name, value)

    def _run_propagate(self, view: np.ndarray, group: _Group, anchor: int, texts: list[_TextEmbedding],
                       options: SegmentOptions, accumulator: VolumeAccumulator, tracker: ProgressTracker) -> None:
        log.info("propagating prompts %s from slice %d", group.prompt_indices, anchor)
        with self._video_settings(options):
            n_slices = view.shape[0]
            for reverse in (False, True):
                order = range(anchor, -1, -1) if reverse else range(anchor, n_slices)
                self._sweep(view, group, texts, options, accumulator, tracker, order, reverse,
                            skip_frame=anchor if reverse else None)

    def _run_clips(self, view: np.ndarray, group: _Group, texts: list[_TextEmbedding], options: SegmentOptions,
                   accumulator: VolumeAccumulator, tracker: ProgressTracker) -> None:
        """Medical SAM3's 3D protocol (``medical/inference_3d.py``, its released defaults): the slices are
        cut into independent clips of ``options.clip_length``; each clip starts from a fresh session (no
        memory of the previous clip), the text prompt detected on its first slice and tracked through the
        clip, hotstart off (every output final at once: delay, unmatched and duplicate counts 0). Prompts
        are fused per pixel by mask probability (their ``pixel_score`` fusion), not score x probability."""
        with self._video_settings(options, hotstart_delay=0, hotstart_unmatch_thresh=0, hotstart_dup_thresh=0):
            n_slices = view.shape[0]
            for start in range(0, n_slices, options.clip_length):
                order = range(start, min(n_slices, start + options.clip_length))
                self._sweep(view, group, texts, options, accumulator, tracker, order, False, skip_frame=None,
                            pixel_fusion=True)

    @torch.inference_mode()
    def _sweep(self, view, group, texts, options, accumulator, tracker, order, reverse, skip_frame,
               pixel_fusion: bool = False) -> None:
        from transformers.models.sam3_video.modeling_sam3_video import Sam3VideoInferenceSession

        model, video = self.model, self.model.video
        rows, cols = view.shape[1:]
        session = Sam3VideoInferenceSession(
            video=None, video_height=rows, video_width=cols, inference_device=model.device,
            inference_state_device=model.device, video_storage_device=model.device, dtype=torch.float32)
        session.processed_frames = _LazyFrames(view, group, model)
        prompt_of_id = {}
        for k in group.prompt_indices:
            prompt_id = session.add_prompt(f"prompt {k}")  # text is given as embeddings below
            session.prompt_input_ids[prompt_id] = texts[k].input_ids
            session.prompt_attention_masks[prompt_id] = texts[k].attention_mask
            session.prompt_embeddings[prompt_id] = texts[k].features
            prompt_of_id[prompt_id] = k
        window = max(video.tracker_model.config.num_maskmem, video.tracker_model.config.max_object_pointers_in_encoder) + 1
        buffer: deque = deque()

        def emit(output) -> None:
            if output.frame_idx == skip_frame:
                return
            self._accumulate_frame(output, session, prompt_of_id, group, options, accumulator, (rows, cols),
                                   [text.mask_threshold for text in texts], pixel_fusion)

        for frame_idx in order:
            tracker.check()
            with model.autocast():
                output = video(inference_session=session, frame_idx=frame_idx, reverse=reverse)
            session.hotstart_removed_obj_ids.update(output.removed_obj_ids)
            buffer.append(output)
            if len(buffer) > video.hotstart_delay:  # hotstart: outputs are final only after this delay
                emit(buffer.popleft())
            _prune_memory(session, frame_idx, window, video.tracker_model.config.max_cond_frame_num)
            tracker.advance(1, "propagating")
        while buffer:
            emit(buffer.popleft())

    def _accumulate_frame(self, output, session, prompt_of_id: dict, group: _Group, options: SegmentOptions,
                          accumulator: VolumeAccumulator, size: tuple[int, int], thresholds: list[float],
                          pixel_fusion: bool = False) -> None:
        """One tracked frame into ``accumulator``: each prompt's objects above the score threshold, a
        pixel's confidence score x mask probability (``pixel_fusion``: the mask probability alone)."""
        hidden = set(output.suppressed_obj_ids or ()) | set(session.hotstart_removed_obj_ids)
        n = len(group.prompt_indices)
        position = {k: j for j, k in enumerate(group.prompt_indices)}
        conf = torch.zeros((n, *size))
        scores = np.zeros((n, 1), dtype=np.float32)
        best_score = np.zeros(n)
        for obj_id, low_res in output.obj_id_to_mask.items():
            if obj_id in hidden or obj_id not in session.obj_id_to_prompt_id:
                continue
            k = prompt_of_id[session.obj_id_to_prompt_id[obj_id]]
            j = position[k]
            score = float(output.obj_id_to_score.get(obj_id, 0.0))
            if score <= options.score_threshold:
                continue
            logits = group.layout.to_slice(low_res[None], fill=_NOTHING_LOGIT)[0, 0].cpu()
            probs = torch.sigmoid(logits)
            claimed = probs > thresholds[k]
            if not claimed.any():
                continue
            obj_conf = torch.where(claimed, probs if pixel_fusion else score * probs, torch.zeros(()))
            if options.instances == "best":
                if score > best_score[j]:
                    conf[j], best_score[j] = obj_conf, score
            else:
                conf[j] = torch.maximum(conf[j], obj_conf)
                best_score[j] = max(best_score[j], score)
        scores[:, 0] = best_score
        accumulator.add(output.frame_idx, group.prompt_indices, conf.numpy()[:, None], scores)

    # -- result ----------------------------------------------------------------------------------
    def _finish(self, volume: Volume, prompts: list[ResolvedPrompt], accumulator: VolumeAccumulator, axis: int,
                orientation: SliceOrientation, mode: str, options: SegmentOptions, groups: list[_Group],
                warnings: list[str], thresholds: list[float]) -> SegmentationResult:
        # back from (s, rows, cols) as the model saw them to the input's (z, y, x) grid
        label_map = np.ascontiguousarray(np.moveaxis(orientation.restore(accumulator.label_map), 0, axis))
        if axis == 0 and orientation.identity:
            packed = accumulator.packed
        else:
            cols = accumulator.shape[2]
            packed = [pack_mask(np.moveaxis(orientation.restore(np.unpackbits(p, axis=-1, count=cols).astype(bool)),
                                            0, axis)) for p in accumulator.packed]
        largest = self.largest_component_flags(prompts, options)
        if options.min_component_voxels > 0 or options.fill_holes or any(largest):
            masks = [np.unpackbits(p, axis=-1, count=label_map.shape[2]).astype(bool) for p in packed]
            label_map, masks = clean_up(label_map, masks, options.min_component_voxels, options.fill_holes, largest)
            packed = [pack_mask(m) for m in masks]
        counts = _label_counts(label_map, len(prompts) + 1)
        labels = []
        for k, prompt in enumerate(prompts):
            found = int(accumulator.slices_found[k])
            concept = prompt.concept
            terminology = None
            if concept is not None:
                terminology = {"category": concept.category.to_dict(), "type": concept.type.to_dict(),
                               "region": concept.region.to_dict() if concept.region else None}
            labels.append(LabelInfo(
                value=k + 1, name=prompt.name, prompt=prompt.user_text, model_text=prompt.model_text,
                color=prompt.color, known_concept=prompt.known,
                confidence=round(float(accumulator.score_sum[k] / found), 6) if found else 0.0,
                max_score=round(float(accumulator.max_score[k]), 6), voxel_count=int(counts[k + 1]),
                volume_ml=round(float(counts[k + 1]) * volume.voxel_volume_ml, 6), slices_found=found,
                terminology=terminology))
        parameters = asdict(options)
        parameters["percentiles"] = list(options.percentiles)
        parameters["intensity"] = {prompts[k].name: g.spec.to_dict() for g in groups for k in g.prompt_indices}
        parameters["device"] = str(self.model.device)
        parameters["largest_component_applied"] = [p.name for p, flag in zip(prompts, largest) if flag]
        parameters["mask_threshold_applied"] = {p.name: threshold for p, threshold in zip(prompts, thresholds)}
        return SegmentationResult(label_map=label_map, geometry=volume.geometry, labels=labels, packed_masks=packed,
                                  mode=mode, model_id=self.model.model_id, slice_axis=options.slice_axis,
                                  warnings=warnings, parameters=parameters)


_NOTHING_LOGIT = -1.0e4  # mask logit for canvas padding: probability 0


def instance_confidence(outputs, layout: SliceLayout, score_threshold: float, mask_threshold: float,
                        instances: str = "best") -> tuple[torch.Tensor, torch.Tensor]:
    """Per-pixel confidence of one prompt from ``Sam3Model`` outputs for a batch of slices.

    Same arithmetic as transformers' ``post_process_instance_segmentation``: score =
    sigmoid(logit) x sigmoid(presence); mask probabilities are mapped (bilinear) from the model
    canvas onto the slice grid by ``layout`` and thresholded. Returns ``confidence (b, rows, cols)``
    (score x mask probability where the pixel
    is claimed, else 0) and the slice score ``(b,)`` (0 where nothing passed the threshold).
    """
    scores = outputs.pred_logits.float().sigmoid()
    if outputs.presence_logits is not None:
        scores = scores * outputs.presence_logits.float().sigmoid()
    masks = outputs.pred_masks.float()
    batch = scores.shape[0]
    size = layout.slice_shape
    confidence = torch.zeros((batch, *size), device=scores.device)
    slice_scores = torch.zeros(batch, device=scores.device)
    for b in range(batch):
        keep = torch.nonzero(scores[b] > score_threshold).flatten()
        if keep.numel() == 0:
            continue
        if instances == "best":
            keep = keep[scores[b, keep].argmax()].reshape(1)
        probs = layout.to_slice(masks[b, keep][None].sigmoid())[0]
        claimed = probs > mask_threshold
        weighted = torch.where(claimed, scores[b, keep][:, None, None] * probs, torch.zeros((), device=probs.device))
        confidence[b] = weighted.max(dim=0).values
        if claimed.any():
            slice_scores[b] = scores[b, keep].max()
    return confidence, slice_scores


def _label_counts(label_map: np.ndarray, n_values: int) -> np.ndarray:
    """Voxels per label value, one slice at a time (``np.bincount`` on the whole map would
    allocate an int64 copy, 8 bytes per voxel)."""
    counts = np.zeros(n_values, dtype=np.int64)
    for plane in label_map:
        counts += np.bincount(plane.ravel(), minlength=n_values)[:n_values]
    return counts


def _probe_slices(n_slices: int, samples: int) -> np.ndarray:
    """Up to ``samples`` evenly spaced slice indices covering the whole volume."""
    return np.unique(np.linspace(0, n_slices - 1, min(samples, n_slices)).round().astype(int))


def _prune_memory(session, frame_idx: int, window: int, max_cond_frames: int) -> None:
    """Drop tracker memory that can no longer be attended to, so memory does not grow with depth.

    SAM3's tracker reads the last ``num_maskmem`` frames and ``max_object_pointers_in_encoder``
    object pointers, plus the ``max_cond_frame_num`` closest conditioning frames.
    """
    for per_object in session.output_dict_per_obj.values():
        non_cond = per_object["non_cond_frame_outputs"]
        for old in [f for f in non_cond if abs(f - frame_idx) > window]:
            del non_cond[old]
        cond = per_object["cond_frame_outputs"]
        if len(cond) > max_cond_frames:
            by_distance = sorted(cond, key=lambda f: abs(f - frame_idx))
            for old in by_distance[max_cond_frames:]:
                if abs(old - frame_idx) > window:
                    del cond[old]
