"""Evaluate a model on the HOLD-OUT scan of the sample data, in both inference modes.

The hold-out is the 20-slice DICOM CT series of the TotalSegmentator 2.18.0 sample data
(`example_ct_dicom/`: another patient and scanner than the training scan), compared with
TotalSegmentator's own label map for it (`example_seg_dicom.nii.gz`: a prediction, not hand
contours). It is never used for training or model selection.

    python Training/examples/evaluate_demo.py --model Resources/demo_model --output eval_demo

Two prompt sets, each in both inference modes:
- ``demo``: "liver, spleen, aorta", what `make demo` asks for and what the issue's Dice targets are
  stated for (liver >= 0.85, spleen >= 0.75, aorta >= 0.60);
- ``all``: every concept the model was trained on at once (merged: the most confident prompt wins
  each voxel), which also asks for the organs this scan does not contain (kidneys, bladder,
  gallbladder: they must come out empty).

Writes OUTPUT/pred_<set>_<mode>/ (label maps + sidecars) and OUTPUT/metrics.csv, summary.md,
overlays.png (`medsam3 evaluate`; its model column is ``<set>_<mode>``).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
DATASET = REPO / "Training" / "examples" / "totalseg_sample.json"
DEMO_PROMPTS = ("liver", "spleen", "aorta")


def prompt_sets() -> dict[str, list[str]]:
    """``{set name: prompts}``: the demo's three and every concept of the training dataset."""
    return {"demo": list(DEMO_PROMPTS), "all": sorted(set(json.loads(DATASET.read_text())["labels"].values()))}


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
    preds = []
    for name, prompts in prompt_sets().items():
        for mode in args.modes.split(","):
            out = args.output / f"pred_{name}_{mode}" / "example_ct_dicom.nii.gz"
            code = medsam3(["segment", str(data / "example_ct_dicom"), "-p", ", ".join(prompts), "--model", args.model,
                            "--mode", mode, "--threshold", str(args.threshold), "-o", str(out), "--overwrite", "-q"])
            if code:
                return code
            preds += ["--pred", f"{name}_{mode}={out.parent}"]
    return medsam3(["evaluate", *preds, "--gt", str(data / "example_seg_dicom.nii.gz"), "--labels", str(DATASET),
                    "--image", str(data / "example_ct_dicom"), "-o", str(args.output), "--overwrite"])


if __name__ == "__main__":
    sys.exit(main())
