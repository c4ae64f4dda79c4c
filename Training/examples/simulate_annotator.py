"""A simulated annotator corrects a model's text results on the HOLD-OUT scan (issue #27, part 5).

    python Training/examples/simulate_annotator.py --model Resources/demo_model --output runs/annotator
    python Training/examples/simulate_annotator.py --case chest --output runs/annotator_val   # validation

``--case chest`` runs it on the VALIDATION scan of ``evaluate_demo.py`` (the chest CT angiogram, aorta and
both lungs): the one to choose models and settings on.

The scan and reference are those of ``evaluate_demo.py`` (the 20-slice DICOM CT series of the
TotalSegmentator 2.18.0 sample data, compared with TotalSegmentator's label map for it). For each organ of
the demo prompts present in the reference, one :class:`~MedicalSAM3Core.inference.session.VolumeSession`
(the class behind the CLI, the server and Slicer), in the model's default settings:

1. the text prompt alone (0 clicks);
2. then up to 5 clicks, each at the centre of the largest 3D error region (voxel farthest from its border,
   in mm), positive where the organ was missed, negative where it was wrongly claimed
   (``MedicalSAM3Core.evaluation.annotator.next_click``, the rule of the SAM and nnInteractive
   evaluations and of our tracker training), given to ``session.refine`` on the slice it lies on.

Two annotators, each from the same text result:

* ``propagate``: after every click the object is re-propagated (``session.propagate``: every clicked slice
  and the text result's largest slice as conditioning frames, both directions), and the next click is
  placed on that 3D result. Reported: Dice of the clicked slice right after the click, and 3D Dice after
  propagation;
* ``no propagation``: clicks only change their slices (the rest stays the text result). Reported: 3D Dice.

Writes OUTPUT/annotator.csv (every click), OUTPUT/annotator.md (the table after 0, 1, 3 and 5 clicks) and
OUTPUT/correction.png (per organ, on the first clicked slice: text alone | 5 clicks, no propagation | 5
clicks + propagation, cropped around the organ; reference green, result magenta, overlap white, positive
clicks yellow, negative clicks cyan). Deterministic: no random numbers; the same model and data give the same table.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "Training" / "examples"))

CLICKS = 5
REPORTED = (0, 1, 3, 5)


def dice(pred: np.ndarray, truth: np.ndarray) -> float:
    total = int(pred.sum()) + int(truth.sum())
    return 1.0 if total == 0 else 2.0 * int((pred & truth).sum()) / total


def run_organ(segmenter, volume, truth: np.ndarray, organ: str, propagate: bool) -> dict:
    """One annotator on one organ: per click count, the clicks so far and the Dice values."""
    from MedicalSAM3Core.evaluation.annotator import next_click

    spacing_zyx = tuple(reversed(volume.geometry.spacing))
    session = segmenter.session(volume)
    started = time.perf_counter()
    result = session.text([organ])
    text_s = time.perf_counter() - started
    obj = result.parameters["session_object_ids"][0]
    current = session.mask(obj)
    steps = [{"clicks": 0, "dice_3d": dice(current, truth), "slice": None, "dice_slice": None, "label": None,
              "seconds": round(text_s, 3), "mask": current}]
    points = []
    for k in range(1, CLICKS + 1):
        click = next_click(current, truth, sampling=spacing_zyx)
        if click is None:
            break
        (z, y, x), label = click
        points.append((z, y, x, label))
        started = time.perf_counter()
        session.refine(obj, points=[(z, y, x)], labels=[label])
        clicked = session.mask(obj)
        if propagate:
            session.propagate(obj)
        seconds = time.perf_counter() - started
        current = session.mask(obj)
        steps.append({"clicks": k, "dice_3d": dice(current, truth), "slice": z,
                      "dice_slice": dice(clicked[z], truth[z]), "label": label, "seconds": round(seconds, 3),
                      "mask": current})
    return {"steps": steps, "points": points}


def window(truth: np.ndarray, size: int = 224) -> tuple[slice, slice]:
    """A ``size`` square (at most the slice) centred on the reference's centroid: the tile's crop."""
    centre = np.argwhere(truth).mean(axis=0) if truth.any() else np.array(truth.shape) / 2
    crop = []
    for c, n in zip(centre, truth.shape):
        side = min(size, n)
        start = int(np.clip(round(c - side / 2), 0, n - side))
        crop.append(slice(start, start + side))
    return tuple(crop)


def tile(image: np.ndarray, truth: np.ndarray, pred: np.ndarray, points, z: int, crop, scale: int = 1) -> np.ndarray:
    out = np.repeat(image[..., None], 3, axis=-1)
    out[truth] = (0, 200, 0)
    out[pred] = (220, 0, 220)
    out[truth & pred] = (255, 255, 255)
    for pz, py, px, label in points:
        if pz == z:
            out[max(0, py - 2):py + 3, max(0, px - 2):px + 3] = (255, 230, 0) if label else (0, 220, 255)
    out = np.repeat(np.repeat(out[crop], scale, axis=0), scale, axis=1)
    return np.pad(out, ((3, 3), (3, 3), (0, 0)), constant_values=60)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default=str(REPO / "Resources" / "demo_model"))
    parser.add_argument("--output", type=Path, required=True)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--case", choices=["holdout", "chest"], default="holdout",
                        help="holdout (default): the DICOM series, liver, spleen and aorta; chest: the VALIDATION scan "
                             "of evaluate_demo.py, aorta and lung (for choosing models and settings)")
    args = parser.parse_args(argv)

    import SimpleITK as sitk

    from evaluate_demo import CHEST_SCORED, DATASET, DEMO_PROMPTS, _fetched, chest_case
    from MedicalSAM3Core.evaluation.evaluate import _display, align_to
    from MedicalSAM3Core.imaging.io import read_volume, write_image
    from MedicalSAM3Core.inference.engine import Segmenter
    from MedicalSAM3Core.inference.models import load_model

    data = _fetched("sample")
    args.output.mkdir(parents=True, exist_ok=True)
    if args.case == "holdout":
        scan, truth_path, organs = data / "example_ct_dicom", data / "example_seg_dicom.nii.gz", DEMO_PROMPTS
    else:
        scan = data / "aorta_report" / "example_ct.nii.gz"
        truth_path = chest_case(scan, data / "aorta_report" / "test_result" / "models" / "aorta.nii.gz",
                                args.output / "case")
        organs = CHEST_SCORED
    volume = read_volume(scan)
    reference = align_to(read_volume(truth_path), volume)
    values: dict[str, list[int]] = {}  # a concept may have several label values (the lung's lobes)
    for value, name in json.loads(DATASET.read_text())["labels"].items():
        values.setdefault(name, []).append(int(value))
    segmenter = Segmenter(load_model(args.model, device=args.device))
    display = _display(volume.array, "CT")

    csv = ["organ,annotator,clicks,click_slice,click_label,dice_clicked_slice,dice_3d,seconds"]
    table = ["| organ | clicks | clicked slice Dice | 3D Dice, propagated | 3D Dice, no propagation |",
             "|---|---|---|---|---|"]
    rows = []
    for organ in organs:
        truth = np.isin(reference, values[organ])
        if not truth.any():
            print(f"{organ}: not in the reference, skipped")
            continue
        runs = {name: run_organ(segmenter, volume, truth, organ, propagate=name == "propagate")
                for name in ("propagate", "no propagation")}
        for name, run in runs.items():
            for s in run["steps"]:
                csv.append(",".join(str(v) for v in (
                    organ, name, s["clicks"], "" if s["slice"] is None else s["slice"],
                    "" if s["label"] is None else s["label"],
                    "" if s["dice_slice"] is None else f"{s['dice_slice']:.4f}", f"{s['dice_3d']:.4f}", s["seconds"])))
        for k in REPORTED:
            with_prop = next((s for s in runs["propagate"]["steps"] if s["clicks"] == k), None)
            without = next((s for s in runs["no propagation"]["steps"] if s["clicks"] == k), None)
            if with_prop is None and without is None:
                continue
            fmt = (lambda v: "-" if v is None else f"{v:.3f}")
            table.append(f"| {organ} | {k} | {fmt(with_prop and with_prop['dice_slice'])} | "
                         f"{fmt(with_prop and with_prop['dice_3d'])} | {fmt(without and without['dice_3d'])} |")
            print(table[-1])
        first = runs["propagate"]["points"][0][0] if runs["propagate"]["points"] else int(
            np.argmax(truth.sum(axis=(1, 2))))
        last_prop, last_plain = runs["propagate"]["steps"][-1], runs["no propagation"]["steps"][-1]
        crop = window(truth[first])
        row = [tile(display[first], truth[first], m["mask"][first], pts, first, crop)
               for m, pts in ((runs["propagate"]["steps"][0], []),
                              (last_plain, runs["no propagation"]["points"]),
                              (last_prop, runs["propagate"]["points"]))]
        rows.append(np.concatenate(row, axis=1))
    (args.output / "annotator.csv").write_text("\n".join(csv) + "\n", encoding="utf-8")
    note = (f"# Simulated annotator: {Path(args.model).name} on the {args.case} scan\n\n"
            "Each click at the centre of the largest 3D error region (positive on a miss, negative on a false "
            "region); `Training/examples/simulate_annotator.py`. Clicked slice Dice: right after the click, "
            "before propagation. 0 clicks: the text prompt alone (the model's default mode).\n\n"
            + "\n".join(table) + "\n\n`correction.png`: rows " + ", ".join(
                o for o in organs if np.isin(reference, values[o]).any())
            + "; columns text alone | 5 clicks, no propagation | 5 clicks + propagation, on the first clicked slice. "
            "Reference green, result magenta, overlap white; positive clicks yellow, negative cyan.\n")
    (args.output / "annotator.md").write_text(note, encoding="utf-8")
    if rows:
        width = max(r.shape[1] for r in rows)
        montage = np.concatenate([np.pad(r, ((0, 0), (0, width - r.shape[1]), (0, 0))) for r in rows], axis=0)
        write_image(sitk.GetImageFromArray(montage, isVector=True), args.output / "correction.png", compress=False)
    print(f"wrote {args.output / 'annotator.md'}, annotator.csv and correction.png")
    return 0


if __name__ == "__main__":
    sys.exit(main())
