"""The project's one volume reader and one image writer (SimpleITK).

Arrays are ``(z, y, x)``; geometry is LPS (see :mod:`MedicalSAM3Core.common.volume`).
Writes are atomic: a file appears complete under its final name or not at all.
"""

from __future__ import annotations

import logging
import os
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator, Optional, Union

import numpy as np
import SimpleITK as sitk

from ..common.errors import InputError
from ..common.volume import Geometry, Volume

log = logging.getLogger(__name__)

SUPPORTED = "NIfTI (.nii/.nii.gz), NRRD (.nrrd/.nhdr), MetaImage (.mha/.mhd) or a DICOM series folder"
PathLike = Union[str, os.PathLike]


def _geometry_of(image: sitk.Image) -> Geometry:
    return Geometry(image.GetSpacing(), image.GetOrigin(), image.GetDirection())


def _apply_geometry(image: sitk.Image, geometry: Geometry) -> sitk.Image:
    image.SetSpacing(geometry.spacing)
    image.SetOrigin(geometry.origin)
    image.SetDirection(geometry.direction)
    return image


def _to_volume(image: sitk.Image, source: str, modality: Optional[str], allow_2d: bool = False) -> Volume:
    if allow_2d and image.GetDimension() == 2:
        if image.GetNumberOfComponentsPerPixel() in (3, 4):  # RGB(A) photo: luminance (ITU-R BT.601)
            channels = [sitk.VectorIndexSelectionCast(image, c, sitk.sitkFloat32) for c in range(3)]
            image = channels[0] * 0.299 + channels[1] * 0.587 + channels[2] * 0.114
        image = sitk.JoinSeries(image)  # one slice: (1, rows, cols)
    if image.GetNumberOfComponentsPerPixel() != 1:
        raise InputError(f"{source}: has {image.GetNumberOfComponentsPerPixel()} components per voxel "
                         "(color or vector image); a grayscale CT/MR volume is needed")
    dim = image.GetDimension()
    if dim == 4 and image.GetSize()[3] == 1:
        image = image[:, :, :, 0]
        dim = 3
    if dim != 3:
        size = "x".join(str(s) for s in image.GetSize())
        kind = "a 2D image" if dim == 2 else f"a {dim}D image (e.g. a time series)"
        raise InputError(f"{source}: is {kind} of size {size}; a 3D volume is needed")
    return Volume(sitk.GetArrayFromImage(image), _geometry_of(image), modality=modality, source=source)


def read_volume(path: PathLike, allow_2d: bool = False) -> Volume:
    """Read a 3D scalar volume from a file or a DICOM series folder.

    A DICOM folder is read as one series (GDCM applies rescale slope/intercept, so CT comes out in
    Hounsfield units). A folder with several series uses the one with the most slices and says so.
    ``allow_2d`` (training on 2D datasets): a 2D image (PNG, JPEG, 2D NIfTI...) becomes a one-slice
    volume ``(1, rows, cols)``; a color photo is turned into its luminance.
    """
    path = Path(path)
    if not path.exists():
        raise InputError(f"{path}: no such file or folder")
    if path.is_dir():
        return _read_dicom_series(path)
    try:
        reader = sitk.ImageFileReader()
        reader.SetFileName(str(path))
        reader.ReadImageInformation()
        modality = reader.GetMetaData("0008|0060").strip() if reader.HasMetaDataKey("0008|0060") else None
        image = reader.Execute()
    except RuntimeError as error:
        first_line = str(error).strip().splitlines()[-1] if str(error).strip() else ""
        raise InputError(f"{path}: cannot be read as a medical image ({SUPPORTED}). {first_line}") from None
    return _to_volume(image, str(path), modality or None, allow_2d)


def _read_dicom_series(folder: Path) -> Volume:
    series_ids = sitk.ImageSeriesReader.GetGDCMSeriesIDs(str(folder))
    if not series_ids:
        raise InputError(f"{folder}: folder contains no DICOM series ({SUPPORTED})")
    files_by_series = {sid: sitk.ImageSeriesReader.GetGDCMSeriesFileNames(str(folder), sid) for sid in series_ids}
    series_id = max(files_by_series, key=lambda sid: len(files_by_series[sid]))
    if len(series_ids) > 1:
        log.warning("%s holds %d DICOM series; reading %s (%d files), the largest",
                    folder, len(series_ids), series_id, len(files_by_series[series_id]))
    reader = sitk.ImageSeriesReader()
    reader.SetFileNames(files_by_series[series_id])
    reader.MetaDataDictionaryArrayUpdateOn()
    try:
        image = reader.Execute()
    except RuntimeError as error:
        raise InputError(f"{folder}: DICOM series {series_id} cannot be read: {str(error).strip()[-200:]}") from None
    modality = None
    if reader.HasMetaDataKey(0, "0008|0060"):
        modality = reader.GetMetaData(0, "0008|0060").strip() or None
    return _to_volume(image, str(folder), modality)


def image_from_array(array: np.ndarray, geometry: Geometry) -> sitk.Image:
    """SimpleITK image of a ``(z, y, x)`` array with the given LPS geometry."""
    return _apply_geometry(sitk.GetImageFromArray(np.ascontiguousarray(array)), geometry)


def _suffix(path: Path) -> str:
    name = path.name.lower()
    for double in (".nii.gz", ".seg.nrrd"):
        if name.endswith(double):
            return double
    return path.suffix


@contextmanager
def staged_file(final_path: PathLike) -> Iterator[Path]:
    """Yield a temporary path beside ``final_path`` with the same extension.

    The caller writes the temporary file; :func:`commit_staged` renames it into place. If the
    block raises, the temporary file is removed, so no partial output is ever left behind.
    """
    final_path = Path(final_path)
    final_path.parent.mkdir(parents=True, exist_ok=True)
    handle, tmp_name = tempfile.mkstemp(prefix=f".{final_path.name}.", suffix=f".partial{_suffix(final_path)}",
                                        dir=final_path.parent)
    os.close(handle)
    tmp = Path(tmp_name)
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o666 & ~umask)  # mkstemp creates 0600; outputs get the usual permissions
    try:
        yield tmp
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def write_image(image: sitk.Image, path: PathLike, compress: bool = True) -> None:
    """Write ``image`` to ``path`` (format from the extension). The caller handles atomicity."""
    sitk.WriteImage(image, str(path), useCompression=compress)


def write_volume(volume_array: np.ndarray, geometry: Geometry, path: PathLike) -> None:
    """Atomically write a ``(z, y, x)`` array with its geometry."""
    path = Path(path)
    with staged_file(path) as tmp:
        write_image(image_from_array(volume_array, geometry), tmp)
        os.replace(tmp, path)
