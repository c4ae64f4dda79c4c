"""Training data: (image, text, masks) triplets from labelled 3D volumes, fed exactly like inference.

Dataset JSON (one file per dataset; paths relative to the JSON's folder unless absolute)::

    {
      "name": "TotalSegmentator sample",
      "modality": "CT",                          # optional: CT, MR, ... (default: detected)
      "labels": {"5": "liver", "1": "spleen",    # label value -> concept (name or synonym of the
                 "27": "vertebra", "28": "vertebra"},   prompt dictionary); several values may
                                                 # share a concept: each is one instance of it
      "instance_groups": [[10, 11], [12, 13, 14]],   # optional: values of one concept that together
                                                 # are ONE instance (lung lobes -> a left and a right
                                                 # lung: what a user asking "lung" means by one lung)
      "ignore_other_labels": false,              # true: values not in "labels" count as background
      "cases": [
        {"id": "ct01", "image": "imagesTr/ct01.nii.gz", "label": "labelsTr/ct01.nii.gz",
         "split": "train"},                      # split: train | val (default train)
        ...
      ]
    }

Images and label maps are read with :func:`MedicalSAM3Core.imaging.io.read_volume` (NIfTI, NRRD,
MHA, DICOM folders) and must share their voxel grid. 2D datasets work the same way: a case's image
and label may be 2D files (PNG, JPEG, 2D NIfTI...), read as one-slice volumes (color photos as
their luminance: the engine segments scalar images). An image folder and a mask folder can be
paired by file name: ``"folders": [{"images": "imgs/", "masks": "masks/", "split": "train"}]``.
COCO annotation files are another source::

      "coco": [{"annotations": "train.json", "images": "train_images/", "split": "train"}]

with categories named by concepts of the prompt dictionary and segmentations as polygons or RLE
(decoded with ``pycocotools``); each annotation is one instance. :func:`load_dataset` checks everything before
any training starts and raises ONE :class:`InputError` that lists every problem.

Each sample is one axial slice (array axis 0 = k), one concept of the dataset, its instances
(one per label value present; masks at the model canvas resolution) or none (a negative: the
concept is absent from this slice; target presence 0). Pixels go through the engine's own path:
:func:`spec_for` (CT window per concept, MR percentiles over the whole volume),
:class:`SliceLayout` (the model's field-of-view policy) and :func:`to_model_input`.
"""

from __future__ import annotations

import json
import math
from collections import OrderedDict
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Optional

import numpy as np
import torch
from torch.utils.data import Dataset, Sampler

from MedicalSAM3Core.common.errors import InputError
from MedicalSAM3Core.common.prompts import PromptDictionary, default_dictionary
from MedicalSAM3Core.common.volume import Volume
from MedicalSAM3Core.imaging.io import read_volume
from MedicalSAM3Core.preprocessing.body import AIR_HU, body_mask, uses_body_mask
from MedicalSAM3Core.preprocessing.intensity import (DEFAULT_PERCENTILES, IntensitySpec, detect_modality,
                                                     spec_for, to_model_input)
from MedicalSAM3Core.preprocessing.layout import SliceLayout, pixel_spacing
from MedicalSAM3Core.preprocessing.orientation import SliceOrientation


@dataclass(frozen=True)
class Case:
    """One image or volume. ``label`` is a label map; COCO cases have ``annotations`` instead:
    ``(concept, segmentation)`` pairs (RLE or polygons, COCO's format) of its one slice."""

    id: str
    image: Path
    label: Optional[Path]
    split: str = "train"
    annotations: tuple = ()


@dataclass
class DatasetSpec:
    """A validated dataset JSON: concepts are canonical names of the prompt dictionary."""

    name: str
    labels: dict[int, str]  # label value -> canonical concept name
    cases: list[Case]
    modality: Optional[str] = None
    coco_concepts: tuple[str, ...] = ()  # concepts of COCO categories
    instance_groups: tuple[tuple[int, ...], ...] = ()  # label values that together are one instance

    @property
    def concepts(self) -> list[str]:
        return sorted(set(self.labels.values()) | set(self.coco_concepts))

    def instances_of(self, concept: str) -> list[tuple[int, ...]]:
        """The label values of each instance of ``concept``: a group of ``instance_groups`` is one
        instance, every other value of the concept one of its own (sorted by their first value)."""
        values = sorted(v for v, name in self.labels.items() if name == concept)
        grouped = [g for g in self.instance_groups if g[0] in values]
        taken = {v for g in grouped for v in g}
        return sorted(grouped + [(v,) for v in values if v not in taken])


def load_dataset(path: Path | str, dictionary: Optional[PromptDictionary] = None,
                 check_images: bool = True) -> DatasetSpec:
    """Read and validate a dataset JSON; every problem is reported at once."""
    path = Path(path)
    dictionary = dictionary or default_dictionary()
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except OSError as error:
        raise InputError(f"cannot read dataset file {path}: {error}") from None
    except json.JSONDecodeError as error:
        raise InputError(f"{path} is not valid JSON: {error}") from None
    problems: list[str] = []
    if not isinstance(data, dict):
        raise InputError(f"{path}: the dataset must be a JSON object with 'labels' and 'cases'")
    labels: dict[int, str] = {}
    raw_labels = data.get("labels", {} if data.get("coco") else None)
    if not isinstance(raw_labels, dict) or (not raw_labels and not data.get("coco")):
        problems.append("'labels' must map label values to concept names, e.g. {\"1\": \"liver\"}")
        raw_labels = {}
    for key, name in raw_labels.items():
        try:
            value = int(key)
            if value <= 0:
                raise ValueError
        except ValueError:
            problems.append(f"label value {key!r} is not a positive integer")
            continue
        concept = dictionary.lookup(name) if isinstance(name, str) else None
        if concept is None:
            hint = dictionary.suggest(name) if isinstance(name, str) else ()
            problems.append(f"label {value}: {name!r} is not a concept of the prompt dictionary"
                            + (f" (did you mean {', '.join(hint)}?)" if hint else ""))
            continue
        labels[value] = concept.name
    groups = _instance_groups(data.get("instance_groups", []), labels, raw_labels, problems)
    cases, seen = [], set()
    coco_entries = data.get("coco", [])
    coco_entries = [coco_entries] if isinstance(coco_entries, dict) else coco_entries
    coco_concepts: set = set()
    for entry in coco_entries:
        coco_cases, concepts = load_coco(entry, path.parent, dictionary, problems)
        cases += coco_cases
        coco_concepts |= concepts
    folder_entries = data.get("folders", [])
    folder_entries = [folder_entries] if isinstance(folder_entries, dict) else folder_entries
    paired = [item for entry in folder_entries for item in pair_folders(entry, path.parent, problems)]
    raw_cases = data.get("cases", [] if (coco_entries or folder_entries) else None)
    if isinstance(raw_cases, list):
        raw_cases = raw_cases + paired
    if not isinstance(raw_cases, list) or (not raw_cases and not coco_entries):
        problems.append("'cases' must be a non-empty list of {id, image, label[, split]} (or give 'coco')")
        raw_cases = []
    for index, item in enumerate(raw_cases):
        if not isinstance(item, dict) or not all(isinstance(item.get(k), str) for k in ("id", "image", "label")):
            problems.append(f"case #{index}: needs string fields id, image and label")
            continue
        if item["id"] in seen:
            problems.append(f"case {item['id']!r} appears twice")
        seen.add(item["id"])
        split = item.get("split", "train")
        if split not in ("train", "val"):
            problems.append(f"case {item['id']!r}: split must be 'train' or 'val', got {split!r}")
        image, label = (Path(item[k]) if Path(item[k]).is_absolute() else path.parent / item[k]
                        for k in ("image", "label"))
        for kind, file in (("image", image), ("label map", label)):
            if not file.exists():
                problems.append(f"case {item['id']!r}: {kind} {file} does not exist")
        cases.append(Case(item["id"], image, label, split))
    modality = data.get("modality")
    if modality is not None and not isinstance(modality, str):
        problems.append("'modality' must be a string such as 'CT' or 'MR'")
    ignore_other = data.get("ignore_other_labels", False)
    if not isinstance(ignore_other, bool):
        problems.append("'ignore_other_labels' must be true or false")
    if check_images and not problems:
        for case in cases:
            if case.label is not None:
                problems.extend(_check_case(case, labels, ignore_other))
    if problems:
        raise InputError(f"dataset {path} has {len(problems)} problem(s):\n  - " + "\n  - ".join(problems))
    return DatasetSpec(str(data.get("name", path.stem)), labels, cases, modality, tuple(sorted(coco_concepts)), groups)


def _instance_groups(raw, labels: dict[int, str], raw_labels: dict, problems: list[str]) -> tuple[tuple[int, ...], ...]:
    """``instance_groups`` checked: lists of at least two label values of ``labels``, all of one
    concept, none in two groups. Problems are appended to ``problems``."""
    if not isinstance(raw, list):
        problems.append("'instance_groups' must be a list of lists of label values, e.g. [[10, 11], [12, 13, 14]]")
        return ()
    groups, seen = [], set()
    for index, group in enumerate(raw):
        if (not isinstance(group, list) or len(group) < 2
                or not all(isinstance(v, int) and not isinstance(v, bool) for v in group)):
            problems.append(f"instance group #{index} must list two or more integer label values, got {group!r}")
            continue
        unknown = [v for v in group if v not in labels and str(v) not in raw_labels]
        if unknown:
            problems.append(f"instance group #{index}: label values {unknown} are not in 'labels'")
            continue
        if any(v not in labels for v in group):
            continue  # the label itself is already reported
        concepts = sorted({labels[v] for v in group})
        if len(concepts) > 1:
            problems.append(f"instance group #{index} mixes concepts ({', '.join(concepts)}): "
                            "one instance is of one concept")
            continue
        again = sorted(seen & set(group))
        if again or len(set(group)) < len(group):
            problems.append(f"instance group #{index}: label values {again or group} are in more than one group")
            continue
        seen |= set(group)
        groups.append(tuple(sorted(group)))
    return tuple(groups)


def _check_case(case: Case, labels: dict[int, str], ignore_other: bool = False) -> list[str]:
    try:
        image, label = read_volume(case.image, allow_2d=True), read_volume(case.label, allow_2d=True)
    except InputError as error:
        return [f"case {case.id!r}: {error}"]
    problems = []
    if image.shape != label.shape:
        problems.append(f"case {case.id!r}: image shape {image.shape} != label shape {label.shape} (z, y, x)")
    g1, g2 = image.geometry, label.geometry
    if not (np.allclose(g1.spacing, g2.spacing, rtol=1e-4, atol=1e-4) and np.allclose(g1.origin, g2.origin, atol=1e-2)
            and np.allclose(g1.direction, g2.direction, atol=1e-4)):
        problems.append(f"case {case.id!r}: image and label map are not on the same grid "
                        f"(spacing {g1.spacing} vs {g2.spacing}, origin {g1.origin} vs {g2.origin})")
    if not np.issubdtype(label.array.dtype, np.integer) and not np.all(np.mod(label.array, 1) == 0):
        problems.append(f"case {case.id!r}: label map has non-integer values")
    unknown = sorted(set(np.unique(label.array).astype(int).tolist()) - set(labels) - {0})
    if unknown and not ignore_other:
        problems.append(f"case {case.id!r}: label values {unknown} are not in 'labels' (map them, or set "
                        "\"ignore_other_labels\": true to treat them as background)")
    return problems


# -- augmentation ----------------------------------------------------------------------------------
@dataclass
class Augment:
    """Training-time augmentation, seeded per sample. All default to off (``Augment()`` is identity)."""

    scale: tuple[float, float] = (1.0, 1.0)  # canvas zoom: <1 shows more around the body (table, arms)
    shift: float = 0.0  # random translation, fraction of the canvas
    window_jitter: float = 0.0  # CT: level and width moved by up to this fraction of the width
    noise: float = 0.0  # gaussian noise, fraction of the window width
    # CT contrast phases from the label map: {"probability": p, "offsets_hu": {concept: [low, high]}}.
    # With probability p a slice is "enhanced": each listed structure gets its own offset drawn
    # uniformly from [low, high] HU, softened at its edges (gaussian, sigma 1 pixel) as partial volume
    # does. Masks are unchanged. Teaches a model trained on a non-contrast scan what arterial and
    # portal-venous scans look like (vessels +100-300 HU, parenchyma +30-100 HU).
    contrast: Optional[dict] = None
    # Object removal for presence: {"probability": p, "concepts": [names]}. With probability p a sample
    # of a listed concept that shows it has the structure filled from its surroundings (each pixel of
    # the structure, dilated by 2 pixels, takes its nearest outside pixel's value, smoothed, plus noise
    # of the surroundings' own grain) and becomes a negative of that concept. The rest of the slice is
    # unchanged. Teaches presence from the structure's pixels rather than from the anatomy around it
    # (a scan whose kidneys always appear with liver and spleen otherwise teaches "kidney" = "upper
    # abdomen").
    remove: Optional[dict] = None

    def __post_init__(self) -> None:
        if self.remove is not None:
            _check_option(self.remove, "remove", "concepts", "[concept, ...]")
            names = self.remove.get("concepts")
            if not isinstance(names, (list, tuple)) or not names or not all(isinstance(n, str) and n.strip() for n in names):
                raise InputError(f"augment.remove.concepts must list at least one concept name, got {names!r}")
        if self.contrast is None:
            return
        _check_option(self.contrast, "contrast", "offsets_hu", "{concept: [low, high]}")
        offsets = self.contrast.get("offsets_hu")
        if not isinstance(offsets, dict) or not offsets:
            raise InputError("augment.contrast.offsets_hu must name at least one concept: {concept: [low, high]}")
        for concept, pair in offsets.items():
            ok = (isinstance(pair, (list, tuple)) and len(pair) == 2
                  and all(isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) for v in pair))
            if not ok or pair[0] > pair[1]:
                raise InputError(f"augment.contrast.offsets_hu[{concept!r}] must be [low, high] HU with "
                                 f"low <= high, got {pair!r}")

    @property
    def active(self) -> bool:
        return (self.scale != (1.0, 1.0) or self.shift > 0 or self.window_jitter > 0 or self.noise > 0
                or self.contrast is not None or self.remove is not None)


def fill_from_surroundings(raw: np.ndarray, region: np.ndarray, rng: np.random.Generator,
                           margin: int = 2, sigma: float = 1.5) -> np.ndarray:
    """``raw`` ``(rows, cols)`` with ``region`` (dilated by ``margin`` pixels) replaced by its surroundings.

    Each pixel of the dilated region takes the value of its nearest pixel outside it, smoothed
    (gaussian, ``sigma`` pixels, inside the region only) and given gaussian noise with the standard
    deviation of the surroundings' fine grain (``raw`` minus its own smoothing, in a 4-pixel ring,
    estimated robustly).
    Returns a new array; pixels outside the dilated region are unchanged.
    """
    from scipy.ndimage import binary_dilation, distance_transform_edt, gaussian_filter

    hole = binary_dilation(region, iterations=margin) if margin else region.copy()
    if not hole.any() or hole.all():
        return raw.copy()
    _, (rows, cols) = distance_transform_edt(hole, return_indices=True)
    filled = raw[rows, cols].astype(np.float32)
    weight = gaussian_filter(hole.astype(np.float32), sigma)
    smooth = gaussian_filter(np.where(hole, filled, 0.0).astype(np.float32), sigma)
    smooth = np.where(weight > 1e-3, smooth / np.maximum(weight, 1e-3), filled)  # the fill's own smoothing
    ring = binary_dilation(hole, iterations=4) & ~hole
    grain = raw.astype(np.float32) - gaussian_filter(raw.astype(np.float32), 1.0)
    # robust (median absolute deviation): edges between tissues in the ring are not grain
    spread = 1.4826 * float(np.median(np.abs(grain[ring] - np.median(grain[ring])))) if ring.any() else 0.0
    noise = rng.normal(0.0, spread, raw.shape).astype(np.float32) if spread > 0 else 0.0
    return np.where(hole, smooth + noise, raw).astype(np.float32)


def _check_option(value, name: str, key: str, form: str) -> None:
    """``augment.<name>`` is ``{probability: P, <key>: <form>}`` with P in [0, 1] (default 1)."""
    if not isinstance(value, dict) or set(value) - {"probability", key}:
        raise InputError(f"augment.{name} must be {{probability: P, {key}: {form}}}, got {value!r}")
    p = value.get("probability", 1.0)
    if isinstance(p, bool) or not isinstance(p, (int, float)) or not 0.0 <= p <= 1.0:
        raise InputError(f"augment.{name}.probability must be a number in [0, 1], got {p!r}")


def _jitter_layout(layout: SliceLayout, augment: Augment, rng: np.random.Generator) -> SliceLayout:
    s = math.exp(rng.uniform(math.log(augment.scale[0]), math.log(augment.scale[1])))
    resized = tuple(max(1, int(round(n * s))) for n in layout.resized)
    size = layout.image_size
    shift = [int(round(rng.uniform(-augment.shift, augment.shift) * size)) for _ in range(2)]
    offset = tuple((size - n) // 2 + d for n, d in zip(resized, shift))
    return replace(layout, resized=resized, offset=offset)


# -- datasets ----------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Triplet:
    case: int
    slice: int
    concept: str
    positive: bool


@dataclass
class SliceDataset(Dataset):
    """Every (slice, concept) pair of the cases of one split; see the module docstring.

    ``preprocess``: ``image_size``, ``mean``, ``std`` and the model's ``medsam3_preprocessing.json``
    keys (``window``, ``field_of_view_mm``, ``orientation``, ``body_mask``). ``seed`` + the item index seed the augmentation.
    """

    spec: DatasetSpec
    cases: list[Case]
    preprocess: dict
    augment: Augment = field(default_factory=Augment)
    min_area: int = 4  # instances smaller than this many canvas pixels are dropped
    seed: int = 0
    cache_size: int = 4
    dictionary: PromptDictionary = field(default_factory=default_dictionary)

    def __post_init__(self) -> None:
        self._cache: OrderedDict[int, tuple[Volume, np.ndarray, str]] = OrderedDict()
        self._values = {c: sorted(v for v, name in self.spec.labels.items() if name == c) for c in self.spec.concepts}
        self._instances = {c: self.spec.instances_of(c) for c in self.spec.concepts}
        self.triplets: list[Triplet] = []
        for index, case in enumerate(self.cases):
            if case.label is None:  # COCO: one slice, concepts from the annotations
                present_concepts = {concept for concept, _ in case.annotations}
                for concept in self._values:
                    self.triplets.append(Triplet(index, 0, concept, concept in present_concepts))
                continue
            label = read_volume(case.label, allow_2d=True).array
            for k in range(label.shape[0]):
                present = set(np.unique(label[k]).tolist())
                for concept, values in self._values.items():
                    self.triplets.append(Triplet(index, k, concept, bool(present & set(values))))
        self.epoch = 0
        self._contrast = self._contrast_structures()
        self._remove = self._removal_concepts()

    def _labelled_concepts(self, names, option: str) -> list[str]:
        """``names`` (dictionary names or synonyms) as this dataset's concept names; one error lists
        every name the label maps cannot locate."""
        resolved, problems = [], []
        for name in names:
            concept = self.dictionary.lookup(name)
            if concept is None or concept.name not in self._values:
                problems.append(f"{name!r} ({'not a concept of the prompt dictionary' if concept is None else 'no label of this dataset'})")
            else:
                resolved.append(concept.name)
        if problems:
            raise InputError(f"augment.{option} names structures the label maps cannot locate: "
                             + ", ".join(problems) + f"; labelled concepts: {', '.join(self._values)}")
        return resolved

    def _removal_concepts(self) -> set[str]:
        """``augment.remove.concepts`` resolved to this dataset's concept names."""
        if self.augment.remove is None:
            return set()
        return set(self._labelled_concepts(self.augment.remove["concepts"], "remove.concepts"))

    def _contrast_structures(self) -> list[tuple[list[int], float, float]]:
        """``augment.contrast`` resolved: (label values, low, high) per listed concept of this dataset."""
        if self.augment.contrast is None:
            return []
        offsets = self.augment.contrast["offsets_hu"]
        names = self._labelled_concepts(offsets, "contrast.offsets_hu")
        return [(self._values[name], float(low), float(high)) for name, (low, high) in zip(names, offsets.values())]

    def contrast_offsets(self, label_slice: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        """HU offsets of one enhanced slice, ``(rows, cols)`` float32 on the label slice's grid."""
        from scipy.ndimage import gaussian_filter

        offsets = np.zeros(label_slice.shape, dtype=np.float32)
        for values, low, high in self._contrast:
            offsets[np.isin(label_slice, values)] = rng.uniform(low, high)  # drawn even if absent: same stream
        return gaussian_filter(offsets, sigma=1.0)

    def __len__(self) -> int:
        return len(self.triplets)

    def _volume(self, index: int) -> tuple[Volume, np.ndarray, str]:
        if index not in self._cache:
            case = self.cases[index]
            image = read_volume(case.image, allow_2d=True)
            label = read_volume(case.label, allow_2d=True).array if case.label is not None else None
            modality = detect_modality(image.array, self.spec.modality or image.modality)
            self._cache[index] = (image, label, modality)
            while len(self._cache) > self.cache_size:
                self._cache.popitem(last=False)
        self._cache.move_to_end(index)
        return self._cache[index]

    def intensity(self, image: Volume, modality: str, concept: str) -> IntensitySpec:
        """The window the engine would use for this concept (same function, same arguments)."""
        resolved = self.dictionary.lookup(concept)
        fixed = self.preprocess.get("window")
        return spec_for(modality, image.array, fixed, resolved.ct_window if resolved else None,
                        self.preprocess.get("percentiles", DEFAULT_PERCENTILES))

    def __getitem__(self, item: int) -> dict:
        triplet = self.triplets[item]
        rng = np.random.default_rng([self.seed, self.epoch, item])
        return self.render(triplet.case, triplet.slice, triplet.concept, triplet.positive, rng)

    def render(self, case_index: int, slice_index: int, concept: str, positive: bool, rng: np.random.Generator,
               noise_rng: Optional[np.random.Generator] = None, removal: bool = True) -> dict:
        """One slice of one case, prepared for ``concept`` exactly as the engine prepares it, augmented.

        The augmentation draws from ``rng`` in a fixed order (zoom and shift, window, contrast phase,
        removal), then the noise from ``noise_rng`` (default: ``rng``). Slices of one clip share an
        ``rng`` seed, so they get the same zoom, window and contrast phase, and each its own noise.
        Besides the sample of :meth:`__getitem__`, ``instance_masks`` holds every instance of the
        concept on the canvas, empty ones included, in the order of the dataset's instances.
        """
        triplet = Triplet(case_index, slice_index, concept, positive)
        image, label, modality = self._volume(triplet.case)
        noise_rng = rng if noise_rng is None else noise_rng
        size = int(self.preprocess["image_size"])
        orientation = SliceOrientation.for_volume(image.geometry.direction, 0,
                                                  self.preprocess.get("orientation") or "stored")
        stored_shape = image.shape[1:]
        raw = np.ascontiguousarray(orientation.apply(np.asarray(image.array[triplet.slice], dtype=np.float32)))
        spacing = orientation.spacing(*pixel_spacing(image.geometry.spacing, 0))
        layout = SliceLayout.from_policy(self.preprocess, raw.shape, spacing, size)
        spec = self.intensity(image, modality, triplet.concept)
        # the model's body-mask policy, on the clean slice; applied after the noise, so that what lies
        # outside the body is exactly what the engine feeds (preprocessing.body.mask_outside_body)
        outside = ~body_mask(raw, spacing) if uses_body_mask(self.preprocess, modality) else None
        removed = False  # augment.remove: the structure was filled in, the sample is a negative
        if self.augment.active:
            layout = _jitter_layout(layout, self.augment, rng)
            width = spec.high - spec.low
            if self.augment.window_jitter and modality == "CT":
                j = self.augment.window_jitter * width
                spec = IntensitySpec(spec.name, spec.low + rng.uniform(-j, j), spec.high + rng.uniform(-j, j))
            if self._contrast and modality == "CT" and label is not None \
                    and rng.random() < self.augment.contrast.get("probability", 1.0):
                raw = raw + orientation.apply(self.contrast_offsets(label[triplet.slice], rng))
            if removal and triplet.concept in self._remove and triplet.positive and label is not None \
                    and rng.random() < self.augment.remove.get("probability", 1.0):
                region = orientation.apply(np.isin(label[triplet.slice], self._values[triplet.concept]))
                raw = fill_from_surroundings(raw, region, rng)
                removed = True
            if self.augment.noise:
                raw = raw + noise_rng.normal(0.0, self.augment.noise * width, raw.shape).astype(np.float32)
        if outside is not None:  # a new array: raw may still be a view of the cached volume
            raw = np.where(outside, np.float32(AIR_HU), raw)
        pixel_values = to_model_input(torch.from_numpy(raw)[None], spec, size, self.preprocess["mean"],
                                      self.preprocess["std"], layout)[0]
        masks = []
        case = self.cases[triplet.case]
        if label is None:
            instances = [coco_mask(seg, stored_shape) for concept, seg in case.annotations if concept == triplet.concept]
        else:
            instances = [np.isin(label[triplet.slice], values) for values in self._instances[triplet.concept]]
        instances = [] if removed else [np.ascontiguousarray(orientation.apply(instance)) for instance in instances]
        every = []
        for instance in instances:
            if not instance.any():
                every.append(torch.zeros((size, size), dtype=torch.bool))
                continue
            placed = layout.place(torch.from_numpy(instance.astype(np.float32))[None, None], antialias=False)[0, 0] > 0.5
            if int(placed.sum()) < self.min_area:
                placed = torch.zeros_like(placed)
            every.append(placed)
            if placed.any():
                masks.append(placed)
        masks_t = torch.stack(masks) if masks else torch.zeros((0, size, size), dtype=torch.bool)
        return {"pixel_values": pixel_values, "text": triplet.concept, "concept": triplet.concept,
                "masks": masks_t, "boxes": masks_to_boxes(masks_t), "case": self.cases[triplet.case].id,
                "slice_index": triplet.slice, "instance_masks": every}


def coco_mask(segmentation, shape: tuple[int, int]) -> np.ndarray:
    """One COCO segmentation (RLE, compressed or not, or polygons) as a ``(rows, cols)`` bool mask."""
    from pycocotools import mask as coco

    rows, cols = shape
    if isinstance(segmentation, list):  # polygons
        rle = coco.merge(coco.frPyObjects(segmentation, rows, cols))
    elif isinstance(segmentation.get("counts"), list):  # uncompressed RLE
        rle = coco.frPyObjects(segmentation, rows, cols)
    else:
        rle = segmentation
    return coco.decode(rle).astype(bool)


def load_coco(entry: dict, root: Path, dictionary: PromptDictionary, problems: list[str]) -> tuple[list[Case], set]:
    """Cases from one COCO annotation file: ``{"annotations": FILE, "images": FOLDER, "split": ...}``."""
    path = root / entry.get("annotations", "")
    folder = root / entry.get("images", "")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as error:
        problems.append(f"COCO file {path}: {error}")
        return [], {}
    categories = {}
    for category in data.get("categories", []):
        concept = dictionary.lookup(category.get("name", ""))
        if concept is None:
            hint = dictionary.suggest(category.get("name", ""))
            problems.append(f"COCO category {category.get('name')!r} is not a concept of the prompt dictionary"
                            + (f" (did you mean {', '.join(hint)}?)" if hint else ""))
            continue
        categories[category["id"]] = concept.name
    by_image: dict = {}
    for annotation in data.get("annotations", []):
        if annotation.get("category_id") in categories and "segmentation" in annotation:
            by_image.setdefault(annotation["image_id"], []).append(
                (categories[annotation["category_id"]], annotation["segmentation"]))
    cases = []
    for image in data.get("images", []):
        file = folder / image.get("file_name", "")
        if not file.is_file():
            problems.append(f"COCO image {file} does not exist")
            continue
        cases.append(Case(f"{path.stem}:{image['id']}", file, None, entry.get("split", "train"),
                          tuple(by_image.get(image["id"], ()))))
    return cases, set(categories.values())


def pair_folders(entry: dict, root: Path, problems: list[str]) -> list[dict]:
    """Cases from an image folder and a mask folder, paired by file name (extension aside):
    ``{"images": "imgs/", "masks": "masks/", "split": "train"}``."""
    images, masks = root / entry.get("images", ""), root / entry.get("masks", "")
    for kind, folder in (("image", images), ("mask", masks)):
        if not folder.is_dir():
            problems.append(f"{kind} folder {folder} does not exist")
            return []

    def stems(folder: Path) -> dict[str, Path]:
        found = {}
        for file in sorted(folder.iterdir()):
            if file.is_file() and not file.name.startswith("."):
                name = file.name[: -len(".nii.gz")] if file.name.endswith(".nii.gz") else file.stem
                found[name] = file
        return found

    by_image, by_mask = stems(images), stems(masks)
    for name in sorted(set(by_image) ^ set(by_mask)):
        problems.append(f"{name}: found in only one of {images} and {masks}")
    return [{"id": name, "image": str(by_image[name]), "label": str(by_mask[name]), "split": entry.get("split", "train")}
            for name in sorted(set(by_image) & set(by_mask))]


def masks_to_boxes(masks: torch.Tensor) -> torch.Tensor:
    """``(N, S, S)`` bool -> ``(N, 4)`` normalised ``(x1, y1, x2, y2)`` enclosing each mask's pixels."""
    size = masks.shape[-1]
    boxes = torch.zeros((masks.shape[0], 4), dtype=torch.float32)
    for n, mask in enumerate(masks):
        rows = torch.nonzero(mask.any(1)).flatten()
        cols = torch.nonzero(mask.any(0)).flatten()
        boxes[n] = torch.tensor([cols[0], rows[0], cols[-1] + 1, rows[-1] + 1], dtype=torch.float32) / size
    return boxes


def collate(items: list[dict]) -> dict:
    """Stack pixel values ``(B, 3, S, S)``; keep per-sample lists for the rest."""
    batch = {"pixel_values": torch.stack([i["pixel_values"] for i in items])}
    for key in items[0]:
        if key != "pixel_values":
            batch[key] = [i[key] for i in items]
    return batch


def _near(index: int, others: Optional[list[int]], margin: int) -> bool:
    """Whether slice ``index`` lies within ``margin`` slices of one of ``others`` (None: no such slice)."""
    return bool(others) and min(abs(index - k) for k in others) <= margin


class BalancedSampler(Sampler[int]):
    """Concepts drawn uniformly, or in proportion to ``concept_weights`` (concept -> positive
    weight, 1 for concepts not named); within a concept a positive slice with probability
    ``positive_fraction``, else a negative one. Deterministic for (seed, epoch); each rank draws
    its own disjoint share of one global stream, so ``world_size`` ranks x ``n`` samples equal one
    process drawing ``world_size * n``.

    ``concepts_per_slice`` K > 1 draws the stream in runs of K samples of ONE slice with K different
    concepts (each a concept the slice contains with probability ``positive_fraction``, else one it
    lacks), as SAM3 trains on several noun phrases per image, present and absent: the same pixels
    with different texts teach the presence head to read the text. The slice of a run is found by
    first drawing a (concept, positive) pair as above, so concepts stay balanced.

    ``hard_negative_fraction`` f > 0: a negative is drawn, with probability f, among the HARD negatives
    of its concept, the slices that lack it within ``hard_negative_slices`` slices of one that has it
    (same case): the kidney's absence just above its upper pole, beside the liver and spleen, teaches
    presence better than a pelvic slice does. Concepts without such slices draw from all their
    negatives. f = 0 (the default) draws the stream of earlier versions."""

    def __init__(self, dataset: SliceDataset, num_samples: int, seed: int = 0, positive_fraction: float = 0.7,
                 rank: int = 0, world_size: int = 1, concepts_per_slice: int = 1,
                 concept_weights: Optional[dict] = None, hard_negative_fraction: float = 0.0,
                 hard_negative_slices: int = 10) -> None:
        self.dataset, self.num_samples, self.seed = dataset, num_samples, seed
        self.positive_fraction, self.rank, self.world_size = positive_fraction, rank, world_size
        self.concepts_per_slice = int(concepts_per_slice)
        self.epoch = 0
        self.pools: dict[tuple[str, bool], np.ndarray] = {}
        self.by_slice: dict[tuple[int, int], dict[str, int]] = {}
        for index, t in enumerate(dataset.triplets):
            self.pools.setdefault((t.concept, t.positive), []).append(index)
            self.by_slice.setdefault((t.case, t.slice), {})[t.concept] = index
        self.pools = {k: np.asarray(v) for k, v in self.pools.items()}
        self.concepts = sorted({c for c, _ in self.pools})
        missing = [c for c in self.concepts if (c, True) not in self.pools]
        if missing:
            raise InputError(f"no training slice contains {', '.join(missing)}; remove the concept(s) or add data")
        if not 1 <= self.concepts_per_slice <= len(self.concepts):
            raise InputError(f"concepts_per_slice must be between 1 and the number of concepts ({len(self.concepts)}), "
                             f"got {concepts_per_slice}")
        weights = {}  # keyed by canonical name: "aorta" and the dictionary's synonyms name Aorta
        for name, weight in (concept_weights or {}).items():
            resolved = self.dataset.dictionary.lookup(name) if isinstance(name, str) else None
            weights[resolved.name if resolved is not None and resolved.name in self.concepts else name] = weight
        unknown = sorted(set(weights) - set(self.concepts), key=str)
        if unknown:
            raise InputError(f"concept_weights names {', '.join(map(repr, unknown))}, not a concept of the dataset; "
                             f"its concepts: {', '.join(self.concepts)}")
        bad = [c for c, w in weights.items()
               if isinstance(w, bool) or not isinstance(w, (int, float)) or not np.isfinite(w) or w <= 0]
        if bad:
            raise InputError(f"concept_weights must be positive numbers; got {', '.join(f'{c}: {weights[c]!r}' for c in bad)}")
        p = np.asarray([float(weights.get(c, 1.0)) for c in self.concepts])
        self.probabilities = p / p.sum() if weights else None  # None: uniform, the stream of earlier versions
        if isinstance(hard_negative_fraction, bool) or not isinstance(hard_negative_fraction, (int, float)) \
                or not 0.0 <= hard_negative_fraction <= 1.0:
            raise InputError(f"hard_negative_fraction must be a number in [0, 1], got {hard_negative_fraction!r}")
        if isinstance(hard_negative_slices, bool) or not isinstance(hard_negative_slices, int) or hard_negative_slices < 1:
            raise InputError(f"hard_negative_slices must be a whole number >= 1, got {hard_negative_slices!r}")
        self.hard_negative_fraction = float(hard_negative_fraction)
        self.hard_pools: dict[str, np.ndarray] = {}  # empty when f = 0: _draw then consumes no extra draw
        if self.hard_negative_fraction > 0:
            for concept in self.concepts:
                present: dict[int, list[int]] = {}  # case -> slices containing the concept
                for i in self.pools[(concept, True)]:
                    present.setdefault(dataset.triplets[i].case, []).append(dataset.triplets[i].slice)
                hard = [i for i in self.pools.get((concept, False), [])
                        if _near(dataset.triplets[i].slice, present.get(dataset.triplets[i].case), hard_negative_slices)]
                if hard:
                    self.hard_pools[concept] = np.asarray(hard)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def _draw(self, rng: np.random.Generator) -> int:
        concept = self.concepts[rng.integers(len(self.concepts)) if self.probabilities is None
                                else rng.choice(len(self.concepts), p=self.probabilities)]
        positive = rng.random() < self.positive_fraction or (concept, False) not in self.pools
        pool = self.pools[(concept, positive)]
        if not positive and concept in self.hard_pools and rng.random() < self.hard_negative_fraction:
            pool = self.hard_pools[concept]
        return int(pool[rng.integers(len(pool))])

    def _same_slice(self, first: int, rng: np.random.Generator) -> list[int]:
        t = self.dataset.triplets[first]
        others = self.by_slice[(t.case, t.slice)]
        present = [c for c, i in others.items() if c != t.concept and self.dataset.triplets[i].positive]
        absent = [c for c, i in others.items() if c != t.concept and not self.dataset.triplets[i].positive]
        run = [first]
        while len(run) < self.concepts_per_slice and (present or absent):
            pool = present if present and (rng.random() < self.positive_fraction or not absent) else absent
            run.append(others[pool.pop(int(rng.integers(len(pool))))])
        return run

    def global_stream(self) -> list[int]:
        rng = np.random.default_rng([self.seed, self.epoch])
        total = self.num_samples * self.world_size
        draws: list[int] = []
        while len(draws) < total:
            first = self._draw(rng)
            draws += [first] if self.concepts_per_slice == 1 else self._same_slice(first, rng)
        return draws[:total]

    def __iter__(self):
        return iter(self.global_stream()[self.rank::self.world_size])

    def __len__(self) -> int:
        return self.num_samples


def build_datasets(data_cfg: dict, preprocess: dict) -> tuple[SliceDataset, Optional[SliceDataset]]:
    """Train and validation datasets from the ``data:`` section of a training config."""
    spec = load_dataset(data_cfg["dataset"])
    augment = Augment(**data_cfg.get("augment", {}))
    common = dict(preprocess=preprocess, min_area=int(data_cfg.get("min_area", 4)), seed=int(data_cfg.get("seed", 0)))
    train_cases = [c for c in spec.cases if c.split == "train"]
    val_cases = [c for c in spec.cases if c.split == "val"]
    if not train_cases:
        raise InputError(f"dataset {data_cfg['dataset']} has no case with split 'train'")
    train = SliceDataset(spec, train_cases, augment=augment, **common)
    val = SliceDataset(spec, val_cases, **common) if val_cases else None
    return train, val
