"""DICOM series folders: one regular stack of slices is read on its true grid; gaps, duplicate
positions, mixed orientations and ambiguous folders are refused with a message that names the
problem; ``--series UID`` picks a series.

The series are written slice by slice with SimpleITK (GDCM), as in SimpleITK's "Dicom Series From
Array" example. Geometry is LPS; arrays are ``(z, y, x)``.
"""

import locale
import logging

import numpy as np
import pytest
import SimpleITK as sitk

from MedicalSAM3Core import cli
from MedicalSAM3Core.common.errors import InputError
from MedicalSAM3Core.imaging.io import read_volume

ROWS, COLUMNS = 6, 5
PIXEL_SPACING = (0.5, 0.75)  # x (between columns), y (between rows), mm
UID_A = "1.2.826.0.1.3680043.8.498.101"
UID_B = "1.2.826.0.1.3680043.8.498.102"
AXIAL = ((1, 0, 0), (0, 1, 0))
CORONAL = ((1, 0, 0), (0, 0, -1))


def _oblique():
    a, b = 0.3, 0.2
    row = np.array([np.cos(a), np.sin(a), 0.0])
    column = np.array([-np.sin(a) * np.cos(b), np.cos(a) * np.cos(b), np.sin(b)])
    return tuple(map(tuple, np.round([row, column], 6)))


def _normal(orientation):
    return np.cross(*np.asarray(orientation, float))


def _stack(n, spacing=3.33, orientation=AXIAL, origin=(-10.0, 20.0, 30.0)):
    """``n`` positions ``spacing`` mm apart along the normal of ``orientation``."""
    return [tuple(np.asarray(origin) + i * spacing * _normal(orientation)) for i in range(n)]


def _write_series(folder, positions, orientations=None, uid=UID_A, description="Abdomen 3.0", first_value=0,
                  rows=ROWS, columns=COLUMNS, pixels=None):
    """One file per position; slice ``i`` (in the given order) holds the value ``first_value + 10 i``
    unless ``pixels`` (``(n, rows, columns)``) gives them. File names follow the given order."""
    folder.mkdir(parents=True, exist_ok=True)
    orientations = orientations or [AXIAL] * len(positions)
    process_locale = locale.setlocale(locale.LC_ALL)
    try:
        for i, (position, orientation) in enumerate(zip(positions, orientations)):
            array = pixels[i] if pixels is not None else np.full((rows, columns), first_value + 10 * i, np.int16)
            _write_slice(folder / f"{uid}.{i:03d}.dcm", array, position, orientation, uid, i, description)
    finally:  # GDCM's writer leaves the process in the "C" locale: ASCII text I/O for the tests that follow
        locale.setlocale(locale.LC_ALL, process_locale)
    return folder


def _write_slice(path, array, position, orientation, uid, i, description):
    image = sitk.GetImageFromArray(array.astype(np.int16))
    image.SetSpacing(PIXEL_SPACING)
    tags = {
        "0008|0016": "1.2.840.10008.5.1.4.1.1.2",  # CT Image Storage
        "0008|0018": f"{uid}.{i + 1}",  # SOP Instance UID
        "0008|0060": "CT",
        "0008|103e": description,
        "0020|000d": "1.2.826.0.1.3680043.8.498.1",  # Study Instance UID
        "0020|000e": uid,
        "0020|0052": "1.2.826.0.1.3680043.8.498.2",  # Frame of Reference UID
        "0020|0013": str(i + 1),
        "0020|0032": "\\".join(f"{v:.6f}" for v in position),
        "0020|0037": "\\".join(f"{v:.6f}" for v in np.ravel(orientation)),
    }
    for tag, value in tags.items():
        image.SetMetaData(tag, value)
    writer = sitk.ImageFileWriter()
    writer.KeepOriginalImageUIDOn()
    writer.SetFileName(str(path))
    writer.Execute(image)


@pytest.mark.parametrize("orientation", [AXIAL, CORONAL, _oblique()], ids=["axial", "coronal", "oblique"])
def test_regular_series_reads_on_its_grid_in_slice_order(tmp_path, orientation):
    positions = _stack(6, spacing=3.33, orientation=orientation)
    folder = _write_series(tmp_path / "ct", positions[::-1], [orientation] * 6)  # files named against the normal
    volume = read_volume(folder)
    assert volume.shape == (6, ROWS, COLUMNS) and volume.modality == "CT"
    np.testing.assert_array_equal(volume.array[:, 0, 0], [50, 40, 30, 20, 10, 0])  # ordered along the normal
    np.testing.assert_allclose(volume.geometry.spacing, (*PIXEL_SPACING, 3.33), atol=1e-4)
    np.testing.assert_allclose(volume.geometry.origin, positions[0], atol=1e-4)
    axes = np.asarray(volume.geometry.direction).reshape(3, 3)  # columns: x, y, z directions
    np.testing.assert_allclose(axes.T, [*orientation, _normal(orientation)], atol=1e-5)


def test_series_with_a_gap_is_refused(tmp_path):
    positions = _stack(4) + [tuple(np.add(_stack(4)[-1], (0, 0, 10.0 + 3.33 * k))) for k in range(3)]
    folder = _write_series(tmp_path / "ct", positions)
    with pytest.raises(InputError) as error:
        read_volume(folder)
    assert str(error.value) == (
        f"{folder}: DICOM series {UID_A} is not equally spaced: slices 4 and 5 of 7 are 10.00 mm apart where the "
        "others are 3.33 mm (a gap, or missing slices), so a regular grid would misplace the segmentation and "
        "misstate its volume; export the complete series, or resample it onto a regular grid first (e.g. in "
        "3D Slicer) and pass the NIfTI/NRRD file")


def test_series_with_two_slices_at_one_position_is_refused(tmp_path):
    positions = _stack(5)
    folder = _write_series(tmp_path / "ct", positions + [positions[2]])
    with pytest.raises(InputError, match=rf"DICOM series {UID_A} has two slices at the same position \(36\.66 mm "
                                         rf"along the slice normal: {UID_A}\.00[25]\.dcm and {UID_A}\.00[25]\.dcm\)"):
        read_volume(folder)


def test_series_mixing_orientations_is_refused(tmp_path):
    positions = _stack(4) + _stack(4, orientation=CORONAL)
    folder = _write_series(tmp_path / "ct", positions, [AXIAL] * 4 + [CORONAL] * 4)
    with pytest.raises(InputError, match=rf"DICOM series {UID_A} mixes slice orientations: {UID_A}\.\d+\.dcm has "
                                         r"row/column directions \(1, 0, 0 / 0, [01], -?[01]\) and .* \(1, 0, 0 / 0, "
                                         r"[01], -?[01]\); .* export each stack as its own series"):
        read_volume(folder)


def test_two_series_of_equal_size_are_refused_and_listed(tmp_path):
    _write_series(tmp_path / "study", _stack(4), uid=UID_A, description="Abdomen 3.0")
    _write_series(tmp_path / "study", _stack(4, spacing=1.0), uid=UID_B, description="Abdomen 1.0")
    with pytest.raises(InputError) as error:
        read_volume(tmp_path / "study")
    message = str(error.value)
    assert message.startswith(f"{tmp_path / 'study'}: holds 2 DICOM series and more than one has the most slices "
                              "(4); choose one with --series UID: ")
    assert f'{UID_A} (4 slices, CT, "Abdomen 3.0")' in message and f'{UID_B} (4 slices, CT, "Abdomen 1.0")' in message


def test_series_option_picks_a_series(tmp_path):
    _write_series(tmp_path / "study", _stack(4), uid=UID_A)
    _write_series(tmp_path / "study", _stack(4, spacing=1.0), uid=UID_B, first_value=100)
    volume = read_volume(tmp_path / "study", series=UID_B)
    np.testing.assert_array_equal(volume.array[:, 0, 0], [100, 110, 120, 130])
    assert volume.geometry.spacing[2] == pytest.approx(1.0)
    assert read_volume(tmp_path / "study", series=UID_A).geometry.spacing[2] == pytest.approx(3.33)


def test_unknown_series_is_refused_with_what_the_folder_holds(tmp_path):
    _write_series(tmp_path / "study", _stack(4), uid=UID_A)
    _write_series(tmp_path / "study", _stack(3), uid=UID_B, description="Scout")
    with pytest.raises(InputError) as error:
        read_volume(tmp_path / "study", series="1.2.3")
    assert str(error.value) == (f'{tmp_path / "study"}: holds no DICOM series 1.2.3; it holds '
                                f'{UID_A} (4 slices, CT, "Abdomen 3.0"); {UID_B} (3 slices, CT, "Scout")')


def test_series_option_on_a_file_is_refused(tmp_path):
    path = tmp_path / "ct.nrrd"
    sitk.WriteImage(sitk.Image([4, 5, 6], sitk.sitkInt16), str(path))
    with pytest.raises(InputError, match="is a file; a series UID"):
        read_volume(path, series=UID_A)


def test_strictly_largest_series_is_read_and_named_with_the_others(tmp_path, caplog):
    _write_series(tmp_path / "study", _stack(5), uid=UID_A)
    _write_series(tmp_path / "study", _stack(3), uid=UID_B, description="Scout")
    with caplog.at_level(logging.WARNING, logger="MedicalSAM3Core.imaging.io"):
        volume = read_volume(tmp_path / "study")
    assert volume.shape == (5, ROWS, COLUMNS)
    assert (f"holds 2 DICOM series; reading {UID_A}, the largest (choose another with --series UID): "
            f'{UID_A} (5 slices, CT, "Abdomen 3.0"); {UID_B} (3 slices, CT, "Scout")') in caplog.text


def test_series_claiming_more_than_the_available_memory_is_refused(tmp_path, monkeypatch):
    from MedicalSAM3Core.imaging import io

    folder = _write_series(tmp_path / "ct", _stack(4))
    monkeypatch.setattr(io, "available_memory", lambda: 400)  # 4 slices of 6 x 5 int16 voxels, read twice: 480
    with pytest.raises(InputError, match=rf"DICOM series {UID_A} claims 4 slices \(240 bytes\); reading it needs "
                                         r"about 480 bytes of memory but only 400 bytes is available"):
        read_volume(folder)


def _bad_folders(root):
    _write_series(root / "gap", _stack(3) + [tuple(np.add(_stack(3)[-1], (0, 0, 10.0)))])
    _write_series(root / "duplicate", _stack(3) + [_stack(3)[1]])
    _write_series(root / "mixed", _stack(3) + _stack(3, orientation=CORONAL), [AXIAL] * 3 + [CORONAL] * 3)
    _write_series(root / "tie", _stack(3), uid=UID_A)
    _write_series(root / "tie", _stack(3, spacing=1.0), uid=UID_B)


@pytest.mark.parametrize("folder, extra, message", [
    ("gap", [], "is not equally spaced: slices 3 and 4 of 4 are 10.00 mm apart"),
    ("duplicate", [], "has two slices at the same position"),
    ("mixed", [], "mixes slice orientations"),
    ("tie", [], "more than one has the most slices (3); choose one with --series UID"),
    ("tie", ["--series", "1.2.3"], f"holds no DICOM series 1.2.3; it holds {UID_A} (3 slices"),
])
def test_cli_refuses_bad_series_with_exit_2_and_one_sentence(tmp_path, tiny_model_dir, capsys, folder, extra, message):
    _bad_folders(tmp_path)
    out = tmp_path / "result" / "seg.nii.gz"
    code = cli.main(["segment", str(tmp_path / folder), "-p", "liver", "--model", str(tiny_model_dir), "-o", str(out),
                     "--quiet", *extra])
    err = capsys.readouterr().err
    assert code == 2
    assert err.startswith(f"medsam3: error: {tmp_path / folder}: ") and message in err
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err
    assert not (tmp_path / "result").exists() or not any((tmp_path / "result").iterdir())


def test_cli_series_option_segments_the_chosen_series(tmp_path, tiny_model_dir, phantom):
    study, scan = tmp_path / "study", phantom[:4]
    _write_series(study, _stack(len(scan)), uid=UID_A, pixels=scan)
    _write_series(study, _stack(len(scan), spacing=1.5), uid=UID_B, pixels=scan, description="Abdomen 1.5")
    out = tmp_path / "seg.nii.gz"
    code = cli.main(["segment", str(study), "--series", UID_B, "-p", "liver", "--model", str(tiny_model_dir),
                     "-o", str(out), "--quiet", "--mode", "slices"])
    assert code == 0
    labels = read_volume(out)
    assert labels.shape == scan.shape
    assert labels.geometry.spacing[2] == pytest.approx(1.5)
