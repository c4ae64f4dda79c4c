"""Writing results: nothing unreadable, nothing partial (issue #30, items 4 and 7)."""

import json

import numpy as np
import pytest
import SimpleITK as sitk

from MedicalSAM3Core.common.errors import OutputError
from MedicalSAM3Core.common.result import LabelInfo, SegmentationResult
from MedicalSAM3Core.common.volume import Geometry, Volume
from MedicalSAM3Core.imaging import io
from MedicalSAM3Core.imaging.outputs import OutputPaths, write_result


def _result(**label) -> SegmentationResult:
    info = LabelInfo(value=1, name="Liver", prompt="liver", model_text="liver", color=(200, 100, 50),
                     known_concept=True, **label)
    return SegmentationResult(np.zeros((3, 4, 5), np.uint8), Geometry(), [info])


def test_a_number_json_cannot_hold_is_named_and_nothing_is_written(tmp_path):
    """The sidecar is written with ``allow_nan=False``: a NaN (a bug upstream) is an error naming it,
    never ``NaN`` in a file that JSON readers reject."""
    paths = OutputPaths.beside(tmp_path / "seg.nii.gz", seg_nrrd=True)
    with pytest.raises(OutputError, match=r"sidecar\.labels\[0\]\.confidence = nan is a number JSON cannot store"):
        write_result(_result(confidence=float("nan")), paths)
    assert list(tmp_path.iterdir()) == []
    write_result(_result(confidence=0.5, volume_ml=1e21), paths)  # the largest plausible volume is finite
    assert json.loads(paths.sidecar.read_text())["labels"][0]["volume_ml"] == 1e21


@pytest.mark.parametrize("name", ["seg.nii.gz", "seg.nii"])
def test_a_nifti_file_cut_short_without_an_error_is_caught(tmp_path, monkeypatch, name):
    """SimpleITK's NIfTI writer only prints a line when the disk fills up, and its reader reads the
    truncated file back without a word: the written file is checked to hold every voxel."""
    write = sitk.WriteImage

    def cut_short(image, path, *args, **kwargs):
        write(image, path, *args, **kwargs)
        with open(path, "r+b") as file:
            file.truncate(file.seek(0, 2) - 100)

    monkeypatch.setattr(io.sitk, "WriteImage", cut_short)
    image = sitk.GetImageFromArray(np.random.default_rng(0).integers(0, 9, (3, 40, 50)).astype(np.uint8))
    with pytest.raises(OSError, match="cut short"):
        io.write_image(image, tmp_path / name)
    monkeypatch.setattr(io.sitk, "WriteImage", write)
    io.write_image(image, tmp_path / name)  # a whole file passes


def test_the_bound_on_the_outputs_covers_what_is_written(tmp_path, phantom):
    """:func:`output_bytes` is an upper bound: here on incompressible labels (255 of them), every output."""
    from MedicalSAM3Core.imaging.outputs import output_bytes

    labels = [LabelInfo(value=v, name=f"structure {v}", prompt=f"structure {v}", model_text=f"structure {v}",
                        color=(v, 255 - v, 7), known_concept=False) for v in range(1, 256)]
    label_map = np.random.default_rng(0).integers(0, 256, phantom.shape).astype(np.uint8)
    paths = OutputPaths.beside(tmp_path / "seg.nii.gz", seg_nrrd=True, overlay=True)
    write_result(SegmentationResult(label_map, Geometry(), labels), paths, Volume(phantom))
    written = sum(path.stat().st_size for path in paths.all())
    assert written <= output_bytes(paths, phantom.shape, np.uint8, len(labels))
