"""``medsam3 evaluate``: per case and per structure Dice, IoU, NSD and HD95 of one or more models.

    medsam3 evaluate --pred out/ct01_medsam3.nii.gz --gt labels/ct01.nii.gz --labels liver=1:5,spleen=2:1
    medsam3 evaluate --pred base=preds_base/ --pred tuned=preds_tuned/ --gt labels/ \\
                     --labels Training/examples/totalseg_sample.json -o eval/

``--pred``/``--gt`` are files or folders (cases matched by file name; a prediction's ``NAME.json``
sidecar written by ``medsam3 segment`` is found next to it). ``--labels`` says which values to
compare: ``name=PRED:GT`` entries (``GT`` may join several values with ``+``, e.g.
``vertebra=3:26+27+28``; ``PRED`` may be left out, ``name=:5``, to take it from the sidecar by
name), or a JSON file: ``{"liver": {"pred": 1, "gt": [5]}}``, or a dataset JSON of the training
pipeline (``"labels": {"5": "liver", ...}``: ground-truth values per concept, prediction values
from the sidecars). Prediction and truth must be on the same voxel grid; a truth stored with its
axes flipped or permuted over the same voxel centres (as some exporters do) is re-indexed exactly.
Either side may be a DICOM SEG (``.seg.dcm``): its frames are placed on the other side's grid, and
a SEG prediction's values by name come from its segment labels.

Writes (never over existing files without ``--overwrite``): ``metrics.csv`` (model, case,
structure, metrics, voxel counts, case type), ``summary.md`` (mean and median per model and
structure; N; HD95 cases excluded) and ``overlays.png`` (ground truth in green, prediction in
magenta, overlap white; one row per case and structure, on the central slice of its ground truth,
one column per model; ``--image`` draws the scan underneath: a file, or a folder matched by case
name). ``summary.md`` lists the montage's rows.
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Optional

import numpy as np

from ..common.errors import InputError
from ..common.prompts import default_dictionary, normalize
from ..common.volume import Volume

if TYPE_CHECKING:  # metrics (scipy) is imported when evaluating, not when the CLI starts
    from .metrics import Scores

_EXTENSIONS = (".nii.gz", ".nii", ".nrrd", ".mha", ".mhd", ".seg.nrrd", ".seg.dcm")


@dataclass
class LabelRule:
    name: str
    pred: Optional[int]  # None: look the value up in the prediction's sidecar by name
    gt: tuple[int, ...]


def _case_id(path: Path) -> str:
    name = path.name
    for ext in sorted(_EXTENSIONS, key=len, reverse=True):
        if name.lower().endswith(ext):
            return name[: -len(ext)]
    return name


def _cases(path: Path) -> dict[str, Path]:
    if not path.exists():
        raise InputError(f"{path}: no such file or folder")
    if path.is_file() or any(not p.name.lower().endswith(".seg.dcm") for p in path.glob("*.dcm")):
        return {_case_id(path): path}  # a file, or a DICOM series folder
    found = {_case_id(p): p for p in sorted(path.iterdir()) if p.is_file() and p.name.lower().endswith(_EXTENSIONS)
             and not p.name.lower().endswith(".seg.nrrd")}
    if not found:
        import SimpleITK as sitk

        if sitk.ImageSeriesReader.GetGDCMSeriesIDs(str(path)):  # a DICOM series, whatever its file names
            return {_case_id(path): path}
        raise InputError(f"{path}: no NIfTI/NRRD/MHA files or DICOM series in this folder")
    return found


def parse_labels(text: str) -> list[LabelRule]:
    """``name=PRED:GT[+GT...]`` entries or a JSON file (see module docstring)."""
    path = Path(text)
    if path.suffix.lower() == ".json" and path.is_file():
        data = json.loads(path.read_text(encoding="utf-8"))
        if "labels" in data and isinstance(data["labels"], dict):  # a training dataset JSON
            by_concept: dict[str, list[int]] = {}
            dictionary = default_dictionary()
            for value, concept in data["labels"].items():
                resolved = dictionary.lookup(concept)
                by_concept.setdefault(resolved.name if resolved else concept, []).append(int(value))
            return [LabelRule(name, None, tuple(sorted(values))) for name, values in by_concept.items()]
        rules = []
        for name, item in data.items():
            gt = item["gt"] if isinstance(item["gt"], list) else [item["gt"]]
            rules.append(LabelRule(name, item.get("pred"), tuple(int(v) for v in gt)))
        return rules
    rules = []
    for entry in filter(None, (e.strip() for e in text.split(","))):
        try:
            name, values = entry.split("=", 1)
            pred, gt = values.split(":", 1)
            rules.append(LabelRule(name.strip(), int(pred) if pred.strip() else None,
                                   tuple(int(v) for v in gt.split("+"))))
        except ValueError:
            raise InputError(f"--labels entry {entry!r} is not NAME=PRED:GT (e.g. liver=1:5, vertebra=3:26+27)") from None
    if not rules:
        raise InputError("--labels is empty")
    return rules


def _read_pair(pred_path: Path, gt_path: Path) -> tuple[Volume, Volume, Optional[dict[str, int]]]:
    """Prediction and truth volumes; a DICOM SEG on either side is placed on the other side's grid.
    Returns the prediction's values by structure name too when it is a SEG (its segment labels
    and numbers, what a sidecar says otherwise)."""
    from ..imaging.dicom_seg import is_dicom_seg, read_dicom_seg
    from ..imaging.io import read_volume

    pred_seg, gt_seg = is_dicom_seg(pred_path), is_dicom_seg(gt_path)
    if pred_seg and gt_seg:
        raise InputError(f"{pred_path} and {gt_path} are both DICOM SEGs: one side must be an image (a label map "
                         "or a DICOM series) to give the voxel grid the SEG is placed on")
    if pred_seg:
        truth = read_volume(gt_path)
        array, names = read_dicom_seg(pred_path, truth)
        return Volume(array, truth.geometry, source=str(pred_path)), truth, {_label_key(k): v for k, v in names.items()}
    prediction = read_volume(pred_path)
    if gt_seg:
        array, _ = read_dicom_seg(gt_path, prediction)
        return prediction, Volume(array, prediction.geometry, source=str(gt_path)), None
    return prediction, read_volume(gt_path), None


def _sidecar_values(pred_path: Path) -> dict[str, int]:
    sidecar = pred_path.with_name(_case_id(pred_path) + ".json")
    if not sidecar.is_file():
        return {}
    data = json.loads(sidecar.read_text(encoding="utf-8"))
    return {_label_key(label["name"]): int(label["value"]) for label in data.get("labels", [])}


def _label_key(name: str) -> str:
    """A structure name as sidecars and rules are matched: its concept's canonical name when the
    prompt dictionary knows it (a sidecar written before a concept was renamed, "Vertebra", still
    matches "Vertebrae"), else the name as :func:`normalize` writes it."""
    concept = default_dictionary().lookup(name)
    return concept.name if concept is not None else normalize(name)


def align_to(truth: Volume, reference: Volume) -> np.ndarray:
    """``truth``'s voxels on ``reference``'s grid when both grids have the same voxel centres (possibly
    with flipped or permuted axes); otherwise an :class:`InputError` naming the mismatch."""
    if truth.shape == reference.shape and np.allclose(truth.geometry.ijk_to_lps(), reference.geometry.ijk_to_lps(),
                                                      atol=1e-3):
        return truth.array
    # reference ijk -> truth ijk; exact re-indexing needs a signed permutation with integer offsets
    mapping = np.linalg.inv(truth.geometry.ijk_to_lps()) @ reference.geometry.ijk_to_lps()
    linear, offset = mapping[:3, :3], mapping[:3, 3]
    rounded = np.round(linear)
    is_permutation = (np.allclose(linear, rounded, atol=1e-3) and np.all(np.abs(rounded).sum(0) == 1)
                      and np.all(np.abs(rounded).sum(1) == 1))
    if not (is_permutation and np.allclose(offset, np.round(offset), atol=1e-3)):
        raise InputError(f"prediction and ground truth are on different voxel grids (pred {reference.shape} "
                         f"spacing {reference.geometry.spacing}, truth {truth.shape} spacing {truth.geometry.spacing}); "
                         "resample one onto the other first")
    ref_shape_xyz = reference.shape[::-1]
    corners = np.array([[0, 0, 0, 1], [ref_shape_xyz[0] - 1, ref_shape_xyz[1] - 1, ref_shape_xyz[2] - 1, 1]], float)
    mapped = (mapping @ corners.T).T[:, :3].round().astype(int)
    truth_xyz = truth.shape[::-1]
    if mapped.min() < 0 or np.any(mapped.max(0) >= np.array(truth_xyz)):
        raise InputError("the ground truth does not cover the prediction's grid")
    # build index arrays: for each reference (i, j, k) the truth (i', j', k')
    grids = np.meshgrid(*[np.arange(n) for n in ref_shape_xyz], indexing="ij")
    points = np.stack([g.ravel() for g in grids] + [np.ones(grids[0].size)], axis=0)
    truth_ijk = (mapping @ points)[:3].round().astype(int)
    values = truth.array[truth_ijk[2], truth_ijk[1], truth_ijk[0]]  # array is (k, j, i)
    return values.reshape(ref_shape_xyz).transpose(2, 1, 0)


@dataclass
class Row:
    model: str
    case: str
    structure: str
    scores: Scores


def evaluate(preds: dict[str, Path], gt: Path, rules: list[LabelRule], tolerance_mm: float = 2.0,
             images: Optional[Path] = None) -> tuple[list[Row], dict]:
    """Score every model's predictions against ``gt``; returns rows and overlay material
    (``images``: the scans, for the montage's background)."""
    from ..imaging.io import read_volume
    from .metrics import score

    gt_cases = _cases(gt)
    image_cases = _cases(images) if images is not None else {}
    backgrounds: dict = {}
    rows: list[Row] = []
    overlays: dict = {}
    for model, pred_root in preds.items():
        pred_cases = _cases(pred_root)
        if len(gt_cases) == 1 and len(pred_cases) == 1:
            pairs = [(next(iter(pred_cases)), next(iter(pred_cases.values())), next(iter(gt_cases.values())))]
        else:
            missing = sorted(set(pred_cases) - set(gt_cases))
            if missing:
                raise InputError(f"{model}: no ground truth for case(s) {', '.join(missing)} in {gt}")
            pairs = [(case, path, gt_cases[case]) for case, path in pred_cases.items()]
        for case, pred_path, gt_path in pairs:
            prediction, truth, segment_numbers = _read_pair(pred_path, gt_path)
            truth_array = align_to(truth, prediction)
            spacing_zyx = prediction.geometry.spacing[::-1]
            from_sidecar = segment_numbers if segment_numbers is not None else _sidecar_values(pred_path)
            if image_cases and case not in backgrounds:
                source = image_cases.get(case) or (next(iter(image_cases.values())) if len(image_cases) == 1 else None)
                if source is None:
                    raise InputError(f"--image: no scan for case {case!r} in {images}")
                scan = read_volume(source)
                backgrounds[case] = _display(align_to(scan, prediction), scan.modality)
            for rule in rules:
                value = rule.pred if rule.pred is not None else from_sidecar.get(_label_key(rule.name))
                if value is None:
                    raise InputError(f"{pred_path}: no label value for {rule.name!r} (give it as {rule.name}=VALUE:GT, "
                                     "or keep the sidecar JSON next to the prediction)")
                pred_mask = prediction.array == value
                true_mask = np.isin(truth_array, rule.gt)
                rows.append(Row(model, case, rule.name, score(pred_mask, true_mask, spacing_zyx, tolerance_mm)))
                overlays.setdefault((case, rule.name), {"image": backgrounds.get(case), "truth": true_mask, "preds": {}})
                overlays[(case, rule.name)]["preds"][model] = pred_mask
    return rows, overlays


def summary_table(rows: list[Row]) -> str:
    lines = ["| model | structure | N | Dice mean | Dice median | IoU mean | NSD mean | HD95 mean (mm) | HD95 excluded |",
             "|---|---|---|---|---|---|---|---|---|"]
    keys = sorted({(r.model, r.structure) for r in rows}, key=lambda k: (k[0], k[1]))
    for model, structure in keys:
        group = [r.scores for r in rows if r.model == model and r.structure == structure]
        finite = [s.hd95 for s in group if math.isfinite(s.hd95)]
        hd = f"{np.mean(finite):.2f}" if finite else "n/a"
        lines.append(f"| {model} | {structure} | {len(group)} | {np.mean([s.dice for s in group]):.3f} | "
                     f"{np.median([s.dice for s in group]):.3f} | {np.mean([s.iou for s in group]):.3f} | "
                     f"{np.mean([s.nsd for s in group]):.3f} | {hd} | {len(group) - len(finite)} |")
    return "\n".join(lines) + "\n"


def _csv_text(rows: list[Row], tolerance_mm: float) -> str:
    buffer = io.StringIO()
    writer = csv.writer(buffer)
    writer.writerow(["model", "case", "structure", "dice", "iou", f"nsd_{tolerance_mm:g}mm", "hd95_mm",
                     "pred_voxels", "true_voxels", "case_type"])
    for r in rows:
        s = r.scores
        writer.writerow([r.model, r.case, r.structure, f"{s.dice:.6f}", f"{s.iou:.6f}", f"{s.nsd:.6f}",
                         "inf" if math.isinf(s.hd95) else f"{s.hd95:.4f}", s.pred_voxels, s.true_voxels, s.case_type])
    return buffer.getvalue()


def _display(image: np.ndarray, modality: Optional[str]) -> np.ndarray:
    """A scan ``(z, y, x)`` as uint8 grey levels, windowed as the engine windows it by default (CT:
    soft tissue; other modalities: the volume's 0.5-99.5 percentiles)."""
    from ..preprocessing.intensity import detect_modality, spec_for

    spec = spec_for(detect_modality(image, modality), image, None, None)
    scaled = (image.astype(np.float32) - spec.low) / (spec.high - spec.low)
    return np.round(np.clip(scaled, 0, 1) * 255).astype(np.uint8)


def montage_rows(overlays: dict) -> list[str]:
    """The montage's rows, top to bottom: ``case / structure``."""
    return [f"{case} / {structure}" for case, structure in sorted(overlays)]


def _montage(overlays: dict, models: list[str]) -> np.ndarray:
    """RGB tiles (truth green, prediction magenta, overlap white, over the scan when given) on each
    structure's central slice; one row per (case, structure), one column per model."""
    tiles = []
    for (case, structure), item in sorted(overlays.items()):
        truth = item["truth"]
        present = np.nonzero(truth.any(axis=(1, 2)))[0]
        k = int(present[len(present) // 2]) if present.size else truth.shape[0] // 2
        row = []
        for model in models:
            pred = item["preds"].get(model, np.zeros_like(truth))
            tile = np.zeros(truth.shape[1:] + (3,), np.uint8)
            if item.get("image") is not None:
                tile[:] = item["image"][k][..., None]
            tile[truth[k]] = (0, 200, 0)
            tile[pred[k]] = (220, 0, 220)
            tile[truth[k] & pred[k]] = (255, 255, 255)
            row.append(np.pad(tile, ((2, 2), (2, 2), (0, 0)), constant_values=60))
        tiles.append(np.concatenate(row, axis=1))
    width = max(t.shape[1] for t in tiles)
    tiles = [np.pad(t, ((0, 0), (0, width - t.shape[1]), (0, 0))) for t in tiles]
    return np.concatenate(tiles, axis=0)


def add_evaluate_parser(sub) -> None:
    p = sub.add_parser("evaluate", help="Dice, IoU, NSD and HD95 of predictions against ground truth",
                       description="Per case and per structure Dice, IoU, normalised surface Dice and HD95 "
                                   "(spacing-aware) of one or more models; writes metrics.csv, summary.md and "
                                   "overlays.png. --labels: name=PRED:GT[+GT],... (PRED empty: from the "
                                   "prediction's sidecar by name), or a JSON file.",
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--pred", action="append", required=True,
                   help="prediction file or folder; NAME=PATH to name a model (repeat to compare models)")
    p.add_argument("--gt", required=True, type=Path, help="ground-truth file or folder")
    p.add_argument("--labels", required=True, help="name=PRED:GT[,...] or a JSON file (see --help text above)")
    p.add_argument("--image", type=Path, help="the scan(s), file or folder (matched by case name): drawn under "
                                               "the contours in overlays.png")
    p.add_argument("--tolerance", type=float, default=2.0, help="NSD tolerance in mm (default 2)")
    p.add_argument("-o", "--output", type=Path, default=Path("evaluation"), help="output folder (default ./evaluation)")
    p.add_argument("--overwrite", action="store_true", help="replace existing outputs")


def _model_paths(items: list[str]) -> dict[str, Path]:
    """``NAME=PATH`` or ``PATH`` entries -> {model name: path}."""
    preds: dict[str, Path] = {}
    for index, item in enumerate(items, start=1):
        name, sep, path = item.partition("=")
        if not sep:
            name, path = ("prediction" if len(items) == 1 else f"model{index}"), item
        if name in preds:
            raise InputError(f"model name {name!r} is given twice in --pred")
        preds[name] = Path(path)
    return preds


def run_evaluate(args) -> int:
    """The ``evaluate`` command; all three outputs are written together or not at all."""
    import os
    from contextlib import ExitStack

    import SimpleITK as sitk

    from ..imaging.io import staged_file, write_image

    preds = _model_paths(args.pred)
    rules = parse_labels(args.labels)
    out = Path(args.output)
    targets = [out / "metrics.csv", out / "summary.md", out / "overlays.png"]
    existing = [str(t) for t in targets if t.exists()]
    if existing and not args.overwrite:
        raise InputError(f"output file(s) already exist: {', '.join(existing)} (use --overwrite)")
    rows, overlays = evaluate(preds, args.gt, rules, args.tolerance, args.image)
    table = summary_table(rows)
    header = (f"# Evaluation\n\nGround truth: `{args.gt}`. NSD tolerance {args.tolerance:g} mm. Empty-mask rules: "
              "both empty -> Dice/IoU/NSD 1, HD95 0; one empty -> 0 and HD95 undefined (excluded from its mean).\n\n")
    legend = (f"\n`overlays.png`: columns {', '.join(preds)}; rows, top to bottom: "
              + "; ".join(montage_rows(overlays)) + ". Ground truth green, prediction magenta, overlap white.\n")
    with ExitStack() as stack:
        staged = [stack.enter_context(staged_file(t)) for t in targets]
        staged[0].write_text(_csv_text(rows, args.tolerance), encoding="utf-8")
        staged[1].write_text(header + table + legend, encoding="utf-8")
        write_image(sitk.GetImageFromArray(_montage(overlays, list(preds)), isVector=True), staged[2], compress=False)
        for tmp, final in zip(staged, targets):
            os.replace(tmp, final)
    print(table, end="")
    for path in targets:
        print(f"wrote {path}")
    return 0
