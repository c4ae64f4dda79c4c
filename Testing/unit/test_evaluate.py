"""``medsam3 evaluate`` end to end on files: CSV, summary, overlay, model comparison, errors."""

from __future__ import annotations

import csv
import json

import numpy as np
import pytest
import SimpleITK as sitk

from MedicalSAM3Core.cli import main
from MedicalSAM3Core.common.volume import Geometry
from MedicalSAM3Core.imaging.io import image_from_array

GEOMETRY = Geometry(spacing=(0.8, 0.8, 2.5), origin=(10.0, -20.0, 30.0))


def _write(path, array, geometry=GEOMETRY):
    sitk.WriteImage(image_from_array(array.astype(np.uint8), geometry), str(path))


@pytest.fixture
def files(tmp_path):
    truth = np.zeros((8, 30, 30), np.uint8)
    truth[2:6, 5:15, 5:15] = 5  # liver
    truth[3:5, 18:25, 18:25] = 1  # spleen
    truth[1:7, 20:24, 2:6] = 26  # two vertebra labels
    truth[1:7, 24:28, 2:6] = 27
    good = np.zeros_like(truth)
    good[truth == 5], good[truth == 1], good[np.isin(truth, [26, 27])] = 1, 2, 3
    worse = good.copy()
    worse[:, :, 5:9][worse[:, :, 5:9] == 1] = 0  # cut part of the liver away
    (tmp_path / "gt").mkdir(), (tmp_path / "a").mkdir(), (tmp_path / "b").mkdir()
    _write(tmp_path / "gt" / "ct1.nii.gz", truth)
    _write(tmp_path / "a" / "ct1.nii.gz", good)
    _write(tmp_path / "b" / "ct1.nii.gz", worse)
    sidecar = {"labels": [{"value": 1, "name": "Liver"}, {"value": 2, "name": "Spleen"}, {"value": 3, "name": "Vertebra"}]}
    (tmp_path / "b" / "ct1.json").write_text(json.dumps(sidecar))
    return tmp_path


def test_two_models_side_by_side(files, capsys):
    out = files / "eval"
    code = main(["evaluate", "--pred", f"perfect={files / 'a'}", "--pred", f"cut={files / 'b'}", "--gt",
                 str(files / "gt"), "--labels", "liver=1:5,spleen=2:1,vertebra=3:26+27", "-o", str(out)])
    assert code == 0
    rows = list(csv.DictReader((out / "metrics.csv").open()))
    assert len(rows) == 6
    perfect = {r["structure"]: r for r in rows if r["model"] == "perfect"}
    assert all(float(r["dice"]) == 1.0 and float(r["hd95_mm"]) == 0.0 for r in perfect.values())
    cut = {r["structure"]: r for r in rows if r["model"] == "cut"}
    assert float(cut["liver"]["dice"]) < 0.9 and float(cut["spleen"]["dice"]) == 1.0
    assert float(cut["liver"]["hd95_mm"]) == pytest.approx(3.2, abs=0.01)  # 4 voxels x 0.8 mm
    summary = (out / "summary.md").read_text()
    assert "| cut | liver | 1 |" in summary and "both empty" in summary
    assert (out / "overlays.png").stat().st_size > 100
    assert "perfect" in capsys.readouterr().out
    assert main(["evaluate", "--pred", str(files / "a"), "--gt", str(files / "gt"), "--labels", "liver=1:5",
                 "-o", str(out)]) == 2  # never overwritten silently


def test_prediction_values_from_the_sidecar_and_dataset_json(files, tmp_path):
    dataset = tmp_path / "dataset.json"
    dataset.write_text(json.dumps({"labels": {"5": "liver", "1": "spleen", "26": "vertebra", "27": "vertebra"}}))
    assert main(["evaluate", "--pred", str(files / "b" / "ct1.nii.gz"), "--gt", str(files / "gt" / "ct1.nii.gz"),
                 "--labels", str(dataset), "-o", str(tmp_path / "e")]) == 0
    rows = {r["structure"]: r for r in csv.DictReader((tmp_path / "e" / "metrics.csv").open())}
    # the sidecar says "Vertebra", the concept's name before it became Medical SAM3's "Vertebrae"
    assert set(rows) == {"Liver", "Spleen", "Vertebrae"} and float(rows["Vertebrae"]["dice"]) == 1.0


def test_flipped_ground_truth_is_reindexed_exactly(files, tmp_path):
    truth = sitk.ReadImage(str(files / "gt" / "ct1.nii.gz"))
    flipped = sitk.Flip(truth, [False, True, False])  # rows stored the other way round, same voxel centres
    assert flipped.GetDirection() != truth.GetDirection()
    sitk.WriteImage(flipped, str(tmp_path / "flipped.nii.gz"))
    assert main(["evaluate", "--pred", str(files / "a" / "ct1.nii.gz"), "--gt", str(tmp_path / "flipped.nii.gz"),
                 "--labels", "liver=1:5", "-o", str(tmp_path / "f")]) == 0
    rows = list(csv.DictReader((tmp_path / "f" / "metrics.csv").open()))
    assert float(rows[0]["dice"]) == 1.0


def test_errors_name_the_problem(files, tmp_path, capsys):
    other = np.zeros((8, 30, 30), np.uint8)
    _write(tmp_path / "shifted.nii.gz", other, Geometry(spacing=(1.0, 0.8, 2.5)))
    cases = [(["--labels", "liver=1:5", "--gt", str(tmp_path / "shifted.nii.gz")], "different voxel grids"),
             (["--labels", "liver 1 5", "--gt", str(files / "gt")], "NAME=PRED:GT"),
             (["--labels", "liver=:5", "--gt", str(files / "gt")], "no label value for 'liver'"),
             (["--labels", "liver=1:5", "--gt", str(tmp_path / "nowhere")], "no such file")]
    for extra, message in cases:
        assert main(["evaluate", "--pred", str(files / "a" / "ct1.nii.gz"), "-o", str(tmp_path / "x"), *extra]) == 2
        assert message in capsys.readouterr().err


def test_overlays_show_the_scan_under_the_contours(files):
    """``--image``: each tile is the scan's central slice of the structure (CT soft-tissue window)
    with truth green, prediction magenta, overlap white; summary.md names the rows."""
    scan = np.full((8, 30, 30), -1000, np.int16)  # air ...
    scan[:, 3:28, 3:28] = 40  # ... around soft tissue at 40 HU
    sitk.WriteImage(image_from_array(scan, GEOMETRY), str(files / "ct1_image.nii.gz"))
    out = files / "eval_image"
    assert main(["evaluate", "--pred", f"cut={files / 'b'}", "--gt", str(files / "gt"), "--labels", "liver=1:5",
                 "--image", str(files / "ct1_image.nii.gz"), "-o", str(out)]) == 0
    tile = sitk.GetArrayFromImage(sitk.ReadImage(str(out / "overlays.png")))[2:32, 2:32]  # inside the frame
    grey = round((40 + 160) / 400 * 255)
    np.testing.assert_array_equal(tile[0, 0], (0, 0, 0))  # air: black
    np.testing.assert_array_equal(tile[20, 20], (grey, grey, grey))  # tissue, no label
    np.testing.assert_array_equal(tile[10, 12], (255, 255, 255))  # liver found
    np.testing.assert_array_equal(tile[10, 6], (0, 200, 0))  # liver missed (the cut part)
    assert "rows, top to bottom: ct1 / liver" in (out / "summary.md").read_text()
    assert main(["evaluate", "--pred", f"cut={files / 'b'}", "--gt", str(files / "gt"), "--labels", "liver=1:5",
                 "--image", str(files / "none.nii.gz"), "-o", str(files / "e2")]) == 2


@pytest.mark.sample_data
def test_a_dicom_series_folder_is_one_case(sample_data):
    """DICOM files often have no extension (the sample series: ``CT.1.3.12...``): the folder is one case."""
    from MedicalSAM3Core.evaluation.evaluate import _cases

    folder = sample_data / "example_ct_dicom"
    assert _cases(folder) == {"example_ct_dicom": folder}
