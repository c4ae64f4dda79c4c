#!/usr/bin/env python3
"""Fetch, verify (sha256) and extract the open sample scans into an ignored cache folder.

Source: the TotalSegmentator 2.18.0 source archive on PyPI (Apache-2.0), whose
``tests/reference_files/`` hold real abdominal CT/MR scans, a 20-slice DICOM CT series and
TotalSegmentator's predicted label maps (predictions, not hand contours).

    python Resources/fetch_sample_data.py            # -> Resources/.cache/sample_data/
    python Resources/fetch_sample_data.py --print-dir

Uses ``pip download`` (the package registry is the only network this needs). Idempotent:
a verified cache is reused.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

ARCHIVE = "totalsegmentator-2.18.0.tar.gz"
SHA256 = "5d4223ef93973bc36d710869d11e7742ead2c154c72f7f9edcaaadd5b6c4bd03"
MEMBER_PREFIX = "totalsegmentator-2.18.0/tests/reference_files/"
WANTED = ("example_ct.nii.gz", "example_ct_sm.nii.gz", "example_mr_sm.nii.gz", "example_seg.nii.gz",
          "example_seg_mr.nii.gz", "example_seg_fast_force_split.nii.gz", "example_seg_dicom.nii.gz",
          "example_ct_dicom/", "example_seg_roi_subset/", "LICENSE")


def cache_dir() -> Path:
    return Path(os.environ.get("MEDSAM3_DATA", Path(__file__).resolve().parent / ".cache" / "sample_data"))


def sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def fetch(target: Path) -> Path:
    marker = target / ".verified"
    if marker.is_file() and marker.read_text().strip() == SHA256:
        return target
    with tempfile.TemporaryDirectory() as tmp:
        subprocess.run([sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", "--no-binary", ":all:",
                        "totalsegmentator==2.18.0", "-d", tmp], check=True)
        archive = Path(tmp) / ARCHIVE
        actual = sha256(archive)
        if actual != SHA256:
            raise SystemExit(f"sha256 mismatch for {ARCHIVE}: expected {SHA256}, got {actual}; refusing to use it")
        target.parent.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix=".staging-", dir=target.parent))
        try:
            _extract(archive, staging)
        except BaseException:
            shutil.rmtree(staging, ignore_errors=True)
            raise
        (staging / ".verified").write_text(SHA256 + "\n")
        if target.exists():
            shutil.rmtree(target)
        os.replace(staging, target)
    return target


def _extract(archive: Path, staging: Path) -> None:
    with tarfile.open(archive) as tar:
        for member in tar.getmembers():
            name = member.name
            relative = name[len(MEMBER_PREFIX):] if name.startswith(MEMBER_PREFIX) else None
            if name.endswith("totalsegmentator-2.18.0/LICENSE"):
                relative = "LICENSE"
            if not relative or not member.isfile() or not relative.startswith(WANTED):
                continue
            destination = staging / relative
            destination.parent.mkdir(parents=True, exist_ok=True)
            with tar.extractfile(member) as source, open(destination, "wb") as out:
                shutil.copyfileobj(source, out)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--print-dir", action="store_true", help="only print the cache folder")
    args = parser.parse_args()
    if args.print_dir:
        print(cache_dir())
        return
    print(fetch(cache_dir()))


if __name__ == "__main__":
    main()
