"""Throughput of batch mode vs a shell loop over single runs (issue #29): the same cases, the same
model and prompts, once as ``medsam3 segment FOLDER --output-dir`` (one process, one model load)
and once as one ``medsam3 segment FILE`` process per case. Prints the wall time of each and their
ratio, and checks that both wrote the same label maps.

    python Testing/benchmarks/bench_batch.py [--model Resources/demo_model] [--cases N] [--device cpu]

Cases: the sample set's small scans (``make sample-data``), each copied under its own name, up to
``--cases`` (repeated if there are fewer). Uses ``--mode slices`` (what the demo model runs).
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import SimpleITK as sitk

REPO = Path(__file__).resolve().parents[2]
SAMPLES = ("example_ct_sm.nii.gz", "example_mr_sm.nii.gz")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default=str(REPO / "Resources" / "demo_model"))
    parser.add_argument("--cases", type=int, default=6)
    parser.add_argument("--prompts", default="liver, spleen, kidneys")
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()
    sys.path.insert(0, str(REPO / "Resources"))
    from fetch_sample_data import cache_dir, fetch

    data = fetch(cache_dir("sample"), "sample")
    with tempfile.TemporaryDirectory() as tmp:
        scans = Path(tmp) / "scans"
        scans.mkdir()
        for i in range(args.cases):
            shutil.copy(data / SAMPLES[i % len(SAMPLES)], scans / f"case{i:02d}.nii.gz")
        common = ["-p", args.prompts, "--model", args.model, "--mode", "slices", "--device", args.device, "-q"]
        env = {**os.environ, "PYTHONPATH": str(REPO)}
        start = time.perf_counter()
        subprocess.run([sys.executable, "-m", "MedicalSAM3Core", "segment", str(scans), "--output-dir",
                        str(Path(tmp) / "batch"), *common], check=True, env=env, capture_output=True)
        batch = time.perf_counter() - start
        loop_dir = Path(tmp) / "loop"
        loop_dir.mkdir()
        start = time.perf_counter()
        for scan in sorted(scans.iterdir()):
            subprocess.run([sys.executable, "-m", "MedicalSAM3Core", "segment", str(scan), "-o",
                            str(loop_dir / scan.name), *common], check=True, env=env, capture_output=True)
        loop = time.perf_counter() - start
        same = all(np.array_equal(sitk.GetArrayFromImage(sitk.ReadImage(str(loop_dir / s.name))),
                                  sitk.GetArrayFromImage(sitk.ReadImage(str(Path(tmp) / "batch" / s.name))))
                   for s in scans.iterdir())
    print(f"{args.cases} cases, prompts {args.prompts!r}, model {Path(args.model).name}, device {args.device}")
    print(f"batch (one process): {batch:.1f} s ({batch / args.cases:.2f} s/case)")
    print(f"shell loop (one process per case): {loop:.1f} s ({loop / args.cases:.2f} s/case)")
    print(f"batch throughput / loop throughput: {loop / batch:.2f}x; same label maps: {'yes' if same else 'NO'}")
    return 0 if same else 1


if __name__ == "__main__":
    sys.exit(main())
