"""Training SAM3's tracker (the memory bank) on clips of consecutive slices, as SAM2 trains on video clips.

A *clip* is ``tracker.clip_length`` consecutive slices of one case (8 by default, as Medical SAM3's
training configs; 1 trains the answers to prompts and clicks alone, without tracking) and one *object*:
one instance of one concept (a label value, or a group of them).
Every slice is prepared by :meth:`Training.data.SliceDataset.render`, the engine's own preprocessing,
with one augmentation draw for the whole clip (zoom, shift, window, contrast phase) and its own noise.

One frame of the clip, chosen at random among those that show the object, is prompted with, in
proportions ``tracker.prompts``:

* ``mask``: the ground-truth mask (what the engine does: the detector's mask starts each track);
* ``box``: the ground-truth box, each side moved by up to 10% of its length (at most 20 px), as SAM2;
* ``points``: one positive click drawn uniformly inside the object, as SAM2;
* ``refine``: what an annotator correcting a text result does. An imperfect mask of the object
  (:func:`corrupt_mask`: the ground truth grown or shrunk, shifted, a part cut off or a false blob
  added, as a detector's mask may be) is the frame's current mask, given to the mask decoder as
  previous-mask logits exactly as the engine's ``VolumeSession.refine`` gives a text result
  (:func:`MedicalSAM3Core.inference.tracking.mask_as_logits`), with one click on its largest error.

A box, a click or a refine prompt is followed by ``tracker.correction_clicks`` corrective clicks on
the same frame, each at the centre of the largest error region (a positive click in a missed region,
a negative one in a false one: the simulated annotator of the SAM and nnInteractive evaluations),
each given with the previous output's mask logits (SAM2's iterative training; the engine does the
same with every click). Then the
object is tracked with the memory bank forward to the clip's end and, from a fresh memory holding the
prompted frame (as the engine sweeps), backward to its start. On ``tracker.corrected_frames`` tracked
frames a corrective click is added after the frame was tracked; that frame becomes a conditioning
frame for the rest of the sweep, as a user's correction does before re-propagation.

Losses (SAM2's, on every frame the tracker predicts, prompted frames included; weights
``tracker.weights``): focal (x 20) + Dice (x 1) on the mask logits, upsampled to the canvas; with
multimask output only the candidate with the lowest loss is trained on, and the predicted IoU of
every candidate regresses its actual IoU (L1, x 1); object-present score (BCE, x 1). Mask and IoU
terms count only where the object is on the frame. The decoder's raw logits are used (SAM2 trains on
the logits after the hard "no object" replacement, which gives a missed object no mask gradient).

The network is transformers' own (:class:`MedicalSAM3Core.inference.tracking.ObjectTrack` drives it),
with gradients through the memory: the features, object pointers and memories of earlier frames.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

import numpy as np
import torch
import torch.nn.functional as F

from MedicalSAM3Core.common.errors import InputError

from .losses import dice_loss, sigmoid_focal_loss

TRACKER_DEFAULTS = {"clip_length": 8, "clips_per_step": 2,
                    "prompts": {"mask": 1.0, "box": 1.0, "points": 1.0, "refine": 0.0},
                    "correction_clicks": 2, "corrected_frames": 1, "box_noise": 0.1, "refine_severity": 1.0,
                    "lr": None,
                    "weights": {"mask": 20.0, "dice": 1.0, "iou": 1.0, "object": 1.0}, "loss_weight": 1.0}
PROMPT_KINDS = ("mask", "box", "points", "refine")
FROM_STEP = object()  # corrective clicks: the previous mask logits are the last output's


@dataclass
class Anchor:
    """A slice where one instance of a concept shows: a possible prompted frame."""

    case: int
    concept: str
    instance: int
    slice: int


@dataclass
class Clip:
    """``pixel_values`` ``(T, 3, S, S)``; ``masks`` ``(T, S, S)`` bool (the object, per frame); ``prompt``:
    index of the prompted frame in the clip; ``kind``: mask, box, points or refine; ``corrected``: frames that
    get a corrective click after being tracked."""

    pixel_values: torch.Tensor
    masks: torch.Tensor
    prompt: int
    kind: str
    corrected: list[int] = field(default_factory=list)
    concept: str = ""
    case: str = ""
    start: int = 0


def tracker_settings(raw: Optional[dict], where: str = "tracker") -> dict:
    """The ``tracker:`` section of a training config merged over :data:`TRACKER_DEFAULTS`, checked."""
    settings = {k: (dict(v) if isinstance(v, dict) else v) for k, v in TRACKER_DEFAULTS.items()}
    for key, value in (raw or {}).items():
        if key not in settings:
            raise InputError(f"{where}: unknown key {key!r}; keys: {', '.join(settings)}")
        if isinstance(settings[key], dict):
            if not isinstance(value, dict) or set(value) - set(settings[key]):
                raise InputError(f"{where}.{key} must be a mapping with keys among {', '.join(settings[key])}, "
                                 f"got {value!r}")
            settings[key].update(value)
        else:
            settings[key] = value
    if not isinstance(settings["clip_length"], int) or settings["clip_length"] < 1:
        raise InputError(f"{where}.clip_length must be an integer >= 1 (slices per clip; 1: the prompted slice "
                         f"alone, prompts and corrections without tracking), got {settings['clip_length']!r}")
    for key in ("clips_per_step", "correction_clicks", "corrected_frames"):
        least = 1 if key == "clips_per_step" else 0
        if not isinstance(settings[key], int) or settings[key] < least:
            raise InputError(f"{where}.{key} must be an integer >= {least}, got {settings[key]!r}")
    severity = settings["refine_severity"]
    if isinstance(severity, bool) or not isinstance(severity, (int, float)) or not 0 < severity <= 1:
        raise InputError(f"{where}.refine_severity must be a number in (0, 1] (how wrong a refine prompt's mask "
                         f"is; 1: the default errors), got {severity!r}")
    shares = settings["prompts"]
    if any(not isinstance(v, (int, float)) or v < 0 for v in shares.values()) or sum(shares.values()) <= 0:
        raise InputError(f"{where}.prompts: proportions of {', '.join(PROMPT_KINDS)} must be >= 0 and not all 0, "
                         f"got {shares!r}")
    return settings


class ClipSource:
    """Draws clips from the cases of a :class:`~Training.data.SliceDataset` (label volumes only).

    Each draw depends only on its ``numpy`` generator, so that a resumed run draws the same clips.
    Concepts are drawn uniformly, then one of their anchors (a slice showing one instance).
    """

    def __init__(self, slices, settings: dict) -> None:
        from MedicalSAM3Core.imaging.io import read_volume

        self.slices, self.settings = slices, settings
        self.anchors: dict[str, list[Anchor]] = {}
        self.depth: dict[int, int] = {}
        instances = {c: slices.spec.instances_of(c) for c in slices.spec.concepts}
        for index, case in enumerate(slices.cases):
            if case.label is None:
                continue
            label = read_volume(case.label, allow_2d=True).array
            if label.shape[0] < 2:
                continue
            self.depth[index] = label.shape[0]
            for concept, groups in instances.items():
                for k, values in enumerate(groups):
                    shows = np.isin(label, values).reshape(label.shape[0], -1).any(1)
                    self.anchors.setdefault(concept, []).extend(
                        Anchor(index, concept, k, int(s)) for s in np.flatnonzero(shows))
        self.anchors = {c: a for c, a in self.anchors.items() if a}
        if not self.anchors:
            raise InputError("tracker training needs volumes (cases with two slices or more) in which a labelled "
                             "structure shows; this dataset has none")
        self.concepts = sorted(self.anchors)
        shares = settings["prompts"]
        total = float(sum(shares.values()))
        self.kinds = [k for k in PROMPT_KINDS if shares.get(k, 0) > 0]
        self.kind_p = [shares[k] / total for k in self.kinds]

    def draw(self, rng: np.random.Generator, attempts: int = 20) -> Clip:
        for _ in range(attempts):
            concept = self.concepts[int(rng.integers(len(self.concepts)))]
            anchor = self.anchors[concept][int(rng.integers(len(self.anchors[concept])))]
            clip = self.render(anchor, rng)
            if clip is not None:
                return clip
        raise InputError("no clip with a visible object could be drawn in 20 attempts: the objects are smaller than "
                         "data.min_area on the model's canvas")

    def render(self, anchor: Anchor, rng: np.random.Generator) -> Optional[Clip]:
        """The clip around ``anchor``: its slice at a random position of the clip; None when the object
        is below ``min_area`` on the canvas of the prompted frame."""
        length = min(self.settings["clip_length"], self.depth[anchor.case])
        n = self.depth[anchor.case]
        start = int(rng.integers(max(0, anchor.slice - length + 1), min(anchor.slice, n - length) + 1))
        seed = int(rng.integers(2 ** 63))
        frames, masks = [], []
        for k in range(start, start + length):
            item = self.slices.render(anchor.case, k, anchor.concept, True, np.random.default_rng(seed),
                                      noise_rng=np.random.default_rng([seed, k]), removal=False)
            frames.append(item["pixel_values"])
            masks.append(item["instance_masks"][anchor.instance])
        prompt = anchor.slice - start
        if not masks[prompt].any():
            return None
        kind = self.kinds[int(rng.choice(len(self.kinds), p=self.kind_p))]
        others = [f for f in range(length) if f != prompt]
        count = min(self.settings["corrected_frames"], len(others))
        corrected = sorted(int(f) for f in rng.choice(others, size=count, replace=False)) if count else []
        return Clip(torch.stack(frames), torch.stack(masks), prompt, kind, corrected, anchor.concept,
                    self.slices.cases[anchor.case].id, start)


# -- simulated prompts ---------------------------------------------------------------------------
def click_on_error(predicted: np.ndarray, truth: np.ndarray) -> Optional[tuple[float, float, int]]:
    """The simulated annotator's next click (``MedicalSAM3Core.evaluation.annotator.next_click``: the centre
    of the largest error region, positive when it is missed object, negative when it is false object).

    ``predicted``, ``truth``: ``(S, S)`` bool on the canvas. Returns canvas ``(x, y, label)`` or None
    when there is no error."""
    from MedicalSAM3Core.evaluation.annotator import next_click

    click = next_click(predicted, truth)
    if click is None:
        return None
    (y, x), label = click
    return float(x), float(y), label


def initial_prompt(kind: str, mask: np.ndarray, rng: np.random.Generator, box_noise: float = 0.1,
                   max_noise_px: float = 20.0) -> tuple[np.ndarray, np.ndarray]:
    """Points ``(N, 2)`` canvas ``(x, y)`` and labels ``(N,)`` of a box (labels 2, 3) or one click (1)."""
    rows, cols = np.nonzero(mask)
    if kind == "points":
        i = int(rng.integers(len(rows)))
        return np.array([[cols[i], rows[i]]], dtype=np.float32), np.array([1])
    x1, y1, x2, y2 = float(cols.min()), float(rows.min()), float(cols.max()), float(rows.max())
    size = mask.shape[0] - 1
    w, h = x2 - x1 + 1, y2 - y1 + 1
    noise = [min(box_noise * side, max_noise_px) for side in (w, h, w, h)]
    box = np.array([x1, y1, x2, y2]) + np.array([rng.uniform(-n, n) for n in noise])
    box = np.clip(box, 0, size)
    box = np.array([min(box[0], box[2]), min(box[1], box[3]), max(box[0], box[2]), max(box[1], box[3])])
    return box.reshape(2, 2).astype(np.float32), np.array([2, 3])


def corrupt_mask(mask: np.ndarray, rng: np.random.Generator, severity: float = 1.0) -> np.ndarray:
    """An imperfect copy of ``mask`` (``(S, S)`` bool, not empty), as a text result may be wrong: one or two
    of grown or shrunk by 1 to 6 px, shifted by up to a fifth of the object's size (at most 12 px), the
    part beyond a random line through the object cut off, a false blob (a disc up to the object's size)
    added beside it. The simulated current mask of a ``refine`` prompt.

    ``severity`` (0 < s <= 1, ``tracker.refine_severity``) scales every error: the radius of growing or
    shrinking, the shift, the depth of the cut (measured from the object's far edge along the cut's
    direction) and the blob's radius. On 60 training clips of the demo (``score_clicks.py``) the copy has
    Dice 0.57 with the truth on average at 1 (the default; it draws exactly what this function drew
    before it had the setting), 0.80 at 0.5."""
    from scipy import ndimage

    out = mask.copy()
    rows, cols = np.nonzero(mask)
    extent = max(2.0, float(max(np.ptp(rows), np.ptp(cols)) + 1))
    for op in rng.choice(4, size=int(rng.integers(1, 3)), replace=False):
        if op == 0:
            radius = max(1, int(round(int(rng.integers(1, 7)) * severity)))
            grown = rng.random() < 0.5
            structure = ndimage.generate_binary_structure(2, 1)
            morph = ndimage.binary_dilation if grown else ndimage.binary_erosion
            out = morph(out, structure, iterations=radius)
        elif op == 1:
            limit = min(12.0, extent / 5) * severity
            dy, dx = (int(round(rng.uniform(-limit, limit))) for _ in range(2))
            out = np.roll(out, (dy, dx), axis=(0, 1))
        elif op == 2:
            i = int(rng.integers(len(rows)))
            angle = rng.uniform(0, 2 * np.pi)
            yy, xx = np.mgrid[:mask.shape[0], :mask.shape[1]]
            direction = (np.sin(angle), np.cos(angle))
            along = (rows - rows[i]) * direction[0] + (cols - cols[i]) * direction[1]
            keep = (1.0 - severity) * float(along.max())  # the cut's line, moved toward the far edge
            out &= (yy - rows[i]) * direction[0] + (xx - cols[i]) * direction[1] < keep
        else:
            radius = max(1.5, rng.uniform(2, max(3.0, extent / 2)) * severity)
            angle = rng.uniform(0, 2 * np.pi)
            distance = extent / 2 + radius * rng.uniform(0.2, 1.0)
            cy, cx = rows.mean() + distance * np.sin(angle), cols.mean() + distance * np.cos(angle)
            yy, xx = np.mgrid[:mask.shape[0], :mask.shape[1]]
            out |= (yy - cy) ** 2 + (xx - cx) ** 2 <= radius ** 2
    return out


# -- loss ----------------------------------------------------------------------------------------
def canvas_logits(low_res: torch.Tensor, size: int) -> torch.Tensor:
    """``(..., h, w)`` tracker mask logits to the ``size`` canvas (bilinear, as the tracker upsamples)."""
    shape = low_res.shape
    flat = low_res.reshape(-1, 1, *shape[-2:]).float()
    return F.interpolate(flat, size=(size, size), mode="bilinear", align_corners=False).reshape(*shape[:-2], size, size)


def step_loss(step, truth: torch.Tensor, weights: dict) -> tuple[torch.Tensor, dict]:
    """SAM2's loss of one predicted frame (see the module docstring). ``truth``: ``(S, S)`` bool."""
    size = truth.shape[-1]
    present = truth.any()
    target_obj = present.float().reshape(1)
    terms = {"object": F.binary_cross_entropy_with_logits(step.object_score.reshape(1).float(), target_obj)}
    logits = canvas_logits(step.multimask.reshape(-1, *step.multimask.shape[-2:]), size)  # (M, S, S)
    target = truth.float().expand_as(logits)
    focal = sigmoid_focal_loss(logits, target).flatten(1).mean(-1)
    dice = dice_loss(logits, target)
    combined = weights["mask"] * focal + weights["dice"] * dice
    best = int(torch.argmin(combined.detach()))
    with torch.no_grad():
        binary = logits > 0
        inter = (binary & truth).flatten(1).sum(-1).float()
        union = (binary | truth).flatten(1).sum(-1).float()
        actual = torch.where(union > 0, inter / union.clamp(min=1), torch.ones_like(union))
    iou = F.l1_loss(step.iou.reshape(-1).float(), actual, reduction="sum") / logits.shape[0]
    scale = target_obj[0]
    terms.update(mask=focal[best] * scale, dice=dice[best] * scale, iou=iou * scale)
    total = (weights["mask"] * terms["mask"] + weights["dice"] * terms["dice"] + weights["iou"] * terms["iou"]
             + weights["object"] * terms["object"])
    return total, terms


def track_clip(video, detector, clip: Clip, settings: dict, rng: np.random.Generator, device,
               backbone_grad: bool) -> tuple[torch.Tensor, dict]:
    """Prompt, correct and track one clip with gradients; returns the mean loss over predicted frames
    and the mean of each term (floats), plus ``frames``: how many frames were predicted."""
    from MedicalSAM3Core.inference.tracking import ObjectTrack

    pixel_values = clip.pixel_values.to(device)
    with torch.set_grad_enabled(backbone_grad and torch.is_grad_enabled()):
        vision = detector.get_vision_features(pixel_values=pixel_values)
    feats, pos = video.get_vision_features_for_tracker(vision)
    frames = [([f[:, t:t + 1] for f in feats], [p[:, t:t + 1] for p in pos]) for t in range(len(pixel_values))]
    truth = clip.masks.to(device)
    size = truth.shape[-1]
    track = ObjectTrack(video, frames, device=device)
    losses, sums = [], {}

    def record(step, frame: int) -> None:
        if step.multimask is None:  # a mask prompt is the output itself
            return
        total, terms = step_loss(step, truth[frame], settings["weights"])
        losses.append(total)
        for key, value in terms.items():
            sums[key] = sums.get(key, 0.0) + float(value.detach())

    def predicted(step) -> np.ndarray:
        return (canvas_logits(step.low_res, size)[0, 0] > 0).detach().cpu().numpy()

    def corrected(track_, frame: int, step, points=None, labels=None, rounds: int = 1, conditioning=None,
                  current=None, previous=FROM_STEP):
        """``rounds`` clicks on the errors of ``current`` (canvas bool; default: ``step``'s mask), each with
        the previous mask logits (``previous`` for the first, None for none; then each output's own), as the
        engine's refine."""
        points = np.zeros((0, 2), np.float32) if points is None else points
        labels = np.zeros((0,), np.int64) if labels is None else labels
        gt = truth[frame].cpu().numpy()
        for _ in range(rounds):
            shown = predicted(step) if current is None else current
            click = click_on_error(shown, gt)
            if click is None:
                break
            if previous is FROM_STEP:
                previous = step.low_res.detach()[0, 0]
            points = np.concatenate([points, np.array([click[:2]], np.float32)])
            labels = np.concatenate([labels, [click[2]]])
            step = track_.step(frame, points=torch.from_numpy(points), labels=torch.from_numpy(labels),
                               conditioning=conditioning, previous_logits=previous)
            record(step, frame)
            current, previous = None, FROM_STEP
        return step

    p = clip.prompt
    if clip.kind == "mask":
        track.step(p, mask=truth[p])
    elif clip.kind == "refine":
        from MedicalSAM3Core.inference.tracking import mask_as_logits

        start = corrupt_mask(truth[p].cpu().numpy(), rng, settings["refine_severity"])
        # an empty slice has no current mask: the engine gives no previous logits there either
        previous = mask_as_logits(torch.from_numpy(start).to(device), track.tracker) if start.any() else None
        step = corrected(track, p, None, rounds=1 + settings["correction_clicks"], current=start,
                         previous=previous)
        if step is None:  # the imperfect mask came out perfect: the frame is a mask prompt
            track.step(p, mask=truth[p])
    else:
        points, labels = initial_prompt(clip.kind, truth[p].cpu().numpy(), rng, settings["box_noise"])
        step = track.step(p, points=torch.from_numpy(points), labels=torch.from_numpy(labels))
        record(step, p)
        corrected(track, p, step, points, labels, settings["correction_clicks"])
    n = len(clip.masks)
    for current, order, reverse in ((track, range(p + 1, n), False), (None, range(p - 1, -1, -1), True)):
        current = current or track.branch()
        for f in order:
            step = current.step(f, reverse=reverse)
            record(step, f)
            if f in clip.corrected:
                corrected(current, f, step, conditioning=True)
    loss = torch.stack(losses).mean() if losses else pixel_values.sum() * 0.0
    terms = {k: v / max(1, len(losses)) for k, v in sums.items()}
    terms["frames"] = len(losses)
    return loss, terms
