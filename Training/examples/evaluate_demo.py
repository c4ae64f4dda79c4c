"""Evaluate a model on the HOLD-OUT scan of the sample data, in both inference modes.

The hold-out is the 20-slice DICOM CT series of the TotalSegmentator 2.18.0 sample data
(`example_ct_dicom/`: another patient and scanner than the training scan), compared with
TotalSegmentator's own label map for it (`example_seg_dicom.nii.gz`: a prediction, not hand
contours). It is never used for training or model selection.

    python Training/examples/evaluate_demo.py --model Resources/demo_model --output eval_demo

Writes OUTPUT/pred_<mode>/ (label maps + sidecars) and OUTPUT/metrics.csv, summary.md, overlays.png
(`medsam3 evaluate`).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
DATASET = REPO / "Training" / "examples" / "totalseg_sample.json"


def main(argv=None) -> int:
    from MedicalSAM3Core.cli import main as medsam3

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", required=True)
    parser.add_argument("--output", type=Path, required=True)
    parser.add_argument("--modes", default="slices,propagate")
    parser.add_argument("--threshold", type=float, default=0.5)
    args = parser.parse_args(argv)
    fetch = [sys.executable, str(REPO / "Resources" / "fetch_sample_data.py")]
    subprocess.run(fetch, check=True, stdout=subprocess.DEVNULL)
    data = Path(subprocess.run(fetch + ["--print-dir"], check=True, capture_output=True, text=True).stdout.strip())
    concepts = sorted(set(json.loads(DATASET.read_text())["labels"].values()))
    preds = []
    for mode in args.modes.split(","):
        out = args.output / f"pred_{mode}" / "example_ct_dicom.nii.gz"
        code = medsam3(["segment", str(data / "example_ct_dicom"), "-p", ", ".join(concepts), "--model", args.model,
                        "--mode", mode, "--threshold", str(args.threshold), "-o", str(out), "--overwrite", "-q"])
        if code:
            return code
        preds += ["--pred", f"{mode}={out.parent}"]
    return medsam3(["evaluate", *preds, "--gt", str(data / "example_seg_dicom.nii.gz"), "--labels", str(DATASET),
                    "--image", str(data / "example_ct_dicom"), "-o", str(args.output), "--overwrite"])


if __name__ == "__main__":
    sys.exit(main())
