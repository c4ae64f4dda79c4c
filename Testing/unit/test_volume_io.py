"""One reader, one writer: geometry is kept exactly; bad files give clear errors."""

import re

import numpy as np
import pytest
import SimpleITK as sitk

from MedicalSAM3Core.common.errors import InputError
from MedicalSAM3Core.common.volume import Geometry, Volume
from MedicalSAM3Core.imaging.io import read_volume, write_volume


def _rotation(ax, ay, az):
    cx, sx, cy, sy, cz, sz = np.cos(ax), np.sin(ax), np.cos(ay), np.sin(ay), np.cos(az), np.sin(az)
    rx = np.array([[1, 0, 0], [0, cx, -sx], [0, sx, cx]])
    ry = np.array([[cy, 0, sy], [0, 1, 0], [-sy, 0, cy]])
    rz = np.array([[cz, -sz, 0], [sz, cz, 0], [0, 0, 1]])
    return rz @ ry @ rx


GEOMETRIES = {
    "lps_identity": Geometry((0.7, 0.8, 2.5), (-120.0, -90.5, 33.0), tuple(np.eye(3).ravel())),
    "ras_stored": Geometry((0.9, 0.9, 3.0), (177.9, -11.3, 94.3), tuple(np.diag([-1.0, -1.0, 1.0]).ravel())),
    "oblique": Geometry((0.6, 0.75, 1.25), (10.0, -20.0, 30.0), tuple(_rotation(0.3, -0.2, 0.5).ravel())),
}


@pytest.mark.parametrize("name", GEOMETRIES)
@pytest.mark.parametrize("ext", [".nii.gz", ".nrrd", ".mha"])
def test_write_then_read_keeps_voxels_and_geometry(tmp_path, name, ext):
    geometry = GEOMETRIES[name]
    array = np.random.default_rng(1).integers(-1000, 1000, (5, 6, 7)).astype(np.int16)
    path = tmp_path / f"vol{ext}"
    write_volume(array, geometry, path)
    volume = read_volume(path)
    np.testing.assert_array_equal(volume.array, array)
    np.testing.assert_allclose(volume.geometry.spacing, geometry.spacing, atol=1e-5)
    np.testing.assert_allclose(volume.geometry.origin, geometry.origin, atol=1e-4)
    np.testing.assert_allclose(volume.geometry.direction, geometry.direction, atol=1e-5)
    assert not list(tmp_path.glob(".*partial*")), "temporary files left behind"


def test_ijk_to_ras_round_trips_through_slicer_convention():
    geometry = GEOMETRIES["oblique"]
    ras = geometry.ijk_to_ras()
    again = Geometry.from_ijk_to_ras(ras)
    np.testing.assert_allclose(again.ijk_to_lps(), geometry.ijk_to_lps(), atol=1e-9)
    # RAS = LPS with x and y negated
    lps_point = geometry.ijk_to_lps() @ [1, 2, 3, 1]
    ras_point = ras @ [1, 2, 3, 1]
    np.testing.assert_allclose(ras_point[:3], lps_point[:3] * [-1, -1, 1])


@pytest.mark.sample_data
def test_dicom_series_reads_in_hounsfield_units_and_lines_up_with_its_reference_segmentation(sample_data):
    from MedicalSAM3Core.imaging.io import image_from_array

    volume = read_volume(sample_data / "example_ct_dicom")
    assert volume.modality == "CT" and volume.shape == (20, 512, 512)
    # rescale slope/intercept applied: air is about -1000 HU, not raw stored values near 0
    assert volume.array.min() <= -900 and np.percentile(volume.array, 1) < -500
    # TotalSegmentator's label map of this series was stored with a flipped row axis (another
    # origin and direction, same voxel centres): resampling it through physical space onto our
    # grid must put its liver (label 5) on liver-density voxels and cover the same voxel count.
    reference = sitk.ReadImage(str(sample_data / "example_seg_dicom.nii.gz"))
    ours = image_from_array(volume.array, volume.geometry)
    liver_on_our_grid = sitk.GetArrayFromImage(
        sitk.Resample(reference, ours, sitk.Transform(), sitk.sitkNearestNeighbor, 0)) == 5
    liver_reference = sitk.GetArrayFromImage(reference) == 5
    assert liver_on_our_grid.sum() == liver_reference.sum() > 1000
    np.testing.assert_array_equal(liver_on_our_grid, liver_reference[:, ::-1, :])
    assert 20 < volume.array[liver_on_our_grid].mean() < 200  # liver parenchyma, HU


def test_missing_path_is_named(tmp_path):
    with pytest.raises(InputError, match="no such file"):
        read_volume(tmp_path / "nope.nii.gz")


def test_file_that_is_not_an_image(tmp_path):
    path = tmp_path / "notes.nii.gz"
    path.write_text("this is not an image")
    with pytest.raises(InputError, match="cannot be read as a medical image"):
        read_volume(path)


def test_empty_folder_is_not_a_dicom_series(tmp_path):
    with pytest.raises(InputError, match="no DICOM series"):
        read_volume(tmp_path)


def test_2d_image_is_refused(tmp_path):
    path = tmp_path / "slice.nrrd"
    sitk.WriteImage(sitk.Image(8, 9, sitk.sitkInt16), str(path))
    with pytest.raises(InputError, match="2D image"):
        read_volume(path)


def test_4d_image_is_refused(tmp_path):
    path = tmp_path / "series.nii.gz"
    sitk.WriteImage(sitk.Image([4, 5, 6, 3], sitk.sitkInt16), str(path))
    with pytest.raises(InputError, match="4D image"):
        read_volume(path)


def test_color_image_is_refused(tmp_path):
    path = tmp_path / "rgb.nrrd"
    sitk.WriteImage(sitk.Image([4, 5, 6], sitk.sitkVectorUInt8, 3), str(path))
    with pytest.raises(InputError, match="components per voxel"):
        read_volume(path)


def test_nan_voxels_are_refused(tmp_path):
    array = np.zeros((3, 4, 5), np.float32)
    array[1, 2, 3] = np.nan
    array[0, 0, 0] = np.inf
    with pytest.raises(InputError, match="2 NaN or infinite"):
        Volume(array)
    path = tmp_path / "nan.mha"
    sitk.WriteImage(sitk.GetImageFromArray(array), str(path))
    with pytest.raises(InputError, match="NaN"):
        read_volume(path)


@pytest.mark.parametrize("geometry, message", [
    (Geometry(spacing=(0.5, 1e4 + 1, 1.0)), r"voxel spacing \(0.5, 10001, 1\) mm \(at most 10000 mm"),
    (Geometry(origin=(0.0, -1.1e7, 0.0)), r"origin \(0, -1.1e\+07, 0\) mm \(each coordinate within 1e\+07 mm"),
    (Geometry(direction=(1, 0.01, 0, 0, 1, 0, 0, 0, 1)), "is not orthonormal"),  # |det| is 1: a shear
])
def test_implausible_geometries_are_refused(geometry, message):
    with pytest.raises(InputError, match=message):
        geometry.check_plausible()


def test_the_most_extreme_plausible_geometry_keeps_volumes_finite():
    from MedicalSAM3Core.common.wire import Limits

    geometry = Geometry(spacing=(1e4, 1e4, 1e4), origin=(-1e7, 1e7, 1e7))
    geometry.check_plausible()
    volume = Volume(np.zeros((1, 1, 1), np.uint8), geometry)
    assert np.isfinite(volume.voxel_volume_ml * Limits().max_voxels)  # every voxel of the largest volume labelled


def test_the_reader_and_the_server_refuse_an_implausible_geometry_alike(tmp_path):
    """Issue #30 item 4: one check (:meth:`Geometry.check_plausible`) for a file's header and a request's."""
    from MedicalSAM3Core.common.wire import decode_request, encode_request

    implausible = Geometry(spacing=(1e200, 1.0, 1.0))
    array = np.zeros((3, 4, 5), np.int16)
    with pytest.raises(InputError) as from_wire:
        decode_request(encode_request(Volume(array, implausible), ["liver"]))
    path = tmp_path / "huge.mha"
    write_volume(array, implausible, path)
    with pytest.raises(InputError) as from_file:
        read_volume(path)
    assert str(from_file.value) == f"{path}: {from_wire.value}"
    assert "implausible geometry: voxel spacing (1e+200, 1, 1) mm" in str(from_file.value)


def test_a_sheared_grid_is_refused_by_the_reader(tmp_path):
    """A NRRD's space directions at 89.4 degrees: each axis has unit length, |det| is almost 1, but a
    regular grid would misplace voxels and misstate volumes."""
    image = sitk.Image([4, 5, 6], sitk.sitkInt16)
    image.SetDirection((1, 0.01, 0, 0, 1, 0, 0, 0, 1))
    path = tmp_path / "sheared.nrrd"
    sitk.WriteImage(image, str(path))
    with pytest.raises(InputError, match=re.escape(f"{path}: direction matrix (") + ".* is not orthonormal"):
        read_volume(path)
