"""The project's one volume reader and one image writer (SimpleITK).

Arrays are ``(z, y, x)``; geometry is LPS (see :mod:`MedicalSAM3Core.common.volume`).
Writes are atomic: a file appears complete under its final name or not at all.
"""

from __future__ import annotations

import errno
import gzip
import logging
import math
import os
import tempfile
import zlib
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Optional, Sequence, Union

import numpy as np
import SimpleITK as sitk

from ..common.errors import InputError
from ..common.volume import Geometry, Volume

log = logging.getLogger(__name__)

SUPPORTED = "NIfTI (.nii/.nii.gz), NRRD (.nrrd/.nhdr), MetaImage (.mha/.mhd) or a DICOM series folder"
PathLike = Union[str, os.PathLike]

ORIENTATION_TOLERANCE = 1e-4  # direction cosines that differ less are one orientation
SPACING_TOLERANCE_MM = 1e-2  # slice positions and spacings that differ less are equal (as in 3D Slicer)
_BYTE_UNITS = ("bytes", "KiB", "MiB", "GiB", "TiB", "PiB", "EiB")
_MAX_EXPANSION = 1100  # deflate expands at most 1032-fold: a compressed file holds at most this many times its size
_READ_COPIES = 2  # a read holds the voxels twice at its peak: the SimpleITK image and its NumPy copy
_NIFTI_VOXEL_OFFSET = 352  # where ITK's single-file NIfTI-1 puts the voxels: 348-byte header + extension flag


def _geometry_of(image: sitk.Image, source: str) -> Geometry:
    """The LPS geometry of ``image``, refused (naming ``source``) unless finite and plausible
    (:meth:`Geometry.check_plausible`: a damaged header must not reach a job)."""
    try:
        geometry = Geometry(image.GetSpacing(), image.GetOrigin(), image.GetDirection())
        geometry.check_plausible()
    except InputError as error:
        raise InputError(f"{source}: {error}") from None
    return geometry


def _apply_geometry(image: sitk.Image, geometry: Geometry) -> sitk.Image:
    image.SetSpacing(geometry.spacing)
    image.SetOrigin(geometry.origin)
    image.SetDirection(geometry.direction)
    return image


def _to_volume(image: sitk.Image, source: str, modality: Optional[str], allow_2d: bool = False,
               dicom_files: tuple[str, ...] = ()) -> Volume:
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
    return Volume(sitk.GetArrayFromImage(image), _geometry_of(image, source), modality=modality, source=source,
                  dicom_files=dicom_files)


def read_volume(path: PathLike, allow_2d: bool = False, series: Optional[str] = None) -> Volume:
    """Read a 3D scalar volume from a file or a DICOM series folder.

    The array comes back ``(z, y, x)`` with its LPS geometry. Before any voxel is read, the size the
    header claims is checked against the memory available (:func:`_check_memory`), so a damaged or
    hostile header is an :class:`InputError`, not a crash. A DICOM folder is read as one series
    (GDCM applies rescale slope/intercept, so CT comes out in Hounsfield units): ``series`` names
    it by its SeriesInstanceUID; without it a folder's only series, else its strictly largest, is
    read (a tie is refused with the list of series). The series must be one stack of parallel,
    distinct, equally spaced slices (:func:`_check_slice_geometry`). ``allow_2d`` (training on 2D
    datasets): a 2D image (PNG, JPEG, 2D NIfTI...) becomes a one-slice volume ``(1, rows, cols)``;
    a color photo is turned into its luminance.
    """
    path = Path(path)
    if not path.exists():
        raise InputError(f"{path}: no such file or folder")
    if path.is_dir():
        return _read_dicom_series(path, series)
    if series is not None:
        raise InputError(f"{path}: is a file; a series UID (--series) chooses among the DICOM series of a folder")
    try:
        reader = _header_reader(path)
        claim = (f"{path}: its header claims a {_size_text(reader.GetSize())} image of "
                 f"{sitk.GetPixelIDValueAsString(reader.GetPixelID())} voxels")
        claimed = _claimed_bytes(reader)
        _check_memory(claim, claimed)
        _check_file_holds(path, claim, claimed)
        modality = reader.GetMetaData("0008|0060").strip() if reader.HasMetaDataKey("0008|0060") else None
        image = reader.Execute()
    except RuntimeError as error:
        first_line = str(error).strip().splitlines()[-1] if str(error).strip() else ""
        raise InputError(f"{path}: cannot be read as a medical image ({SUPPORTED}). {first_line}") from None
    return _to_volume(image, str(path), modality or None, allow_2d)


def _header_reader(path: Union[Path, str]) -> sitk.ImageFileReader:
    """A reader of ``path`` that has read the header (size, pixel type, geometry, tags), no voxels."""
    reader = sitk.ImageFileReader()
    reader.SetFileName(str(path))
    reader.ReadImageInformation()
    return reader


def _claimed_bytes(reader: sitk.ImageFileReader) -> int:
    """Bytes of the voxel buffer that the header read by ``reader`` announces."""
    component_bytes = sitk.Image([1, 1], reader.GetPixelID()).GetSizeOfPixelComponent()
    return math.prod(reader.GetSize()) * reader.GetNumberOfComponents() * component_bytes


def _size_text(size: Sequence[int]) -> str:
    return " x ".join(str(n) for n in size)


def bytes_text(n_bytes: int) -> str:
    """``"240 bytes"``, ``"4.0 GiB"``, ``"2.0 PiB"``..."""
    power = min((n_bytes.bit_length() - 1) // 10, len(_BYTE_UNITS) - 1)
    return f"{n_bytes} bytes" if power < 1 else f"{n_bytes / 1024 ** power:.1f} {_BYTE_UNITS[power]}"


def available_memory() -> Optional[int]:
    """Bytes of memory that can still be allocated without swapping, or ``None`` where unknown.

    Linux: ``MemAvailable`` of ``/proc/meminfo`` (free memory plus the cache the kernel can drop).
    Other Unix systems that have it: the free physical pages (``os.sysconf``). Elsewhere ``None``.
    """
    try:
        with open("/proc/meminfo") as meminfo:
            for line in meminfo:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024  # the file counts kB
    except (OSError, ValueError, IndexError):
        pass
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (AttributeError, ValueError, OSError):
        return None


def _check_file_holds(path: Path, claim: str, claimed_bytes: int) -> None:
    """Refuse a one-file volume whose header claims more voxel bytes than the file can hold.

    Deflate (gzip, zlib: NIfTI ``.nii.gz``, NRRD's gzip encoding, MetaImage's compression) expands at
    most 1032-fold, so a file of ``n`` bytes holds at most ``_MAX_EXPANSION * n`` bytes of voxels
    whatever its encoding; a plain ``.nii`` holds them uncompressed. A truncated or forged header
    (a few hundred bytes claiming gigabytes) is refused before anything is allocated, whatever
    memory is free. Not checked: headers whose voxels lie in another file (``.nhdr``, ``.mhd``) and
    NRRD's bzip2 encoding (no such bound).
    """
    name = path.name.lower()
    if name.endswith(".nii"):
        limit = path.stat().st_size
    elif name.endswith((".nii.gz", ".mha", ".nrrd")):
        with open(path, "rb") as file:
            header = file.read(4096).split(b"\n\n", 1)[0].lower()
        if name.endswith(".nrrd") and (b"encoding: bz" in header or b"data file:" in header
                                        or b"datafile:" in header):
            return
        limit = _MAX_EXPANSION * path.stat().st_size
    else:
        return
    if claimed_bytes > limit:
        raise InputError(f"{claim} ({bytes_text(claimed_bytes)}) but the file has only "
                         f"{bytes_text(path.stat().st_size)}: a truncated or damaged file, not read")


def _check_memory(claim: str, claimed_bytes: int) -> None:
    """Refuse a read whose voxels would not fit the memory available.

    Reading holds the voxels twice at its peak (the SimpleITK image and its NumPy copy), so
    ``2 * claimed_bytes`` must fit :func:`available_memory`; where that is unknown, nothing is checked.
    ``claim`` names the input and what its header claims, to begin the message.
    """
    needed = _READ_COPIES * claimed_bytes
    available = available_memory()
    if available is not None and needed > available:
        raise InputError(f"{claim} ({bytes_text(claimed_bytes)}); reading it needs about "
                         f"{bytes_text(needed)} of memory but only {bytes_text(available)} is available, so it "
                         "was not read (a damaged header, or a scan too large for this computer: crop or "
                         "downsample it first, or free memory)")


@dataclass(frozen=True)
class _Slice:
    """One DICOM file's header: where its slice lies (LPS, mm) and what its voxels take."""

    file: str
    position: np.ndarray  # ImagePositionPatient: the centre of the first voxel
    axes: np.ndarray      # 3 x 3, columns: row direction (x), column direction (y), slice normal (z)
    n_bytes: int


def _read_slice(file: str) -> _Slice:
    """The header of one file of a series (its voxels are not read)."""
    reader = _header_reader(file)
    axes = np.asarray(reader.GetDirection(), float).reshape(3, 3)
    return _Slice(file, np.asarray(reader.GetOrigin(), float), axes, _claimed_bytes(reader))


def _check_slice_geometry(label: str, slices: Sequence[_Slice]) -> None:
    """Refuse a series that is not one regular stack of slices, naming the problem.

    A regular grid, whose z spacing is the mean one, would put voxels where they were not acquired:
    so all slices must share one orientation, and their positions along the slice normal must be
    distinct and equally spaced. ``label`` names the series in the messages.
    """
    if len(slices) > 1:
        _check_one_orientation(label, slices)
        _check_even_spacing(label, slices)


def _check_one_orientation(label: str, slices: Sequence[_Slice]) -> None:
    """Row and column directions of every slice within ``ORIENTATION_TOLERANCE`` of the first's."""
    first = slices[0]
    for other in slices[1:]:
        if np.abs(other.axes[:, :2] - first.axes[:, :2]).max() > ORIENTATION_TOLERANCE:
            raise InputError(f"{label} mixes slice orientations: {Path(first.file).name} has row/column directions "
                             f"{_axes_text(first.axes)} and {Path(other.file).name} {_axes_text(other.axes)}; a volume "
                             "needs one stack of parallel slices, so export each stack as its own series")


def _check_even_spacing(label: str, slices: Sequence[_Slice]) -> None:
    """Positions along the slice normal distinct and equally spaced within ``SPACING_TOLERANCE_MM``
    (the 0.01 mm of 3D Slicer's DICOM reader); slices are counted from 1 along the normal."""
    depths = np.array([s.position @ slices[0].axes[:, 2] for s in slices])
    order = np.argsort(depths, kind="stable")
    steps = np.diff(depths[order])
    same = np.flatnonzero(steps < SPACING_TOLERANCE_MM)
    if same.size:
        i = same[0]
        raise InputError(f"{label} has two slices at the same position ({depths[order[i]]:.2f} mm along the slice "
                         f"normal: {Path(slices[order[i]].file).name} and {Path(slices[order[i + 1]].file).name}), "
                         "e.g. two acquisitions, echoes or phases under one series UID; export each as its own series")
    typical = float(np.median(steps))
    uneven = np.flatnonzero(np.abs(steps - typical) > SPACING_TOLERANCE_MM)
    if uneven.size:
        i = uneven[0]
        raise InputError(f"{label} is not equally spaced: slices {i + 1} and {i + 2} of {len(slices)} are "
                         f"{steps[i]:.2f} mm apart where the others are {typical:.2f} mm (a gap, or missing slices), "
                         "so a regular grid would misplace the segmentation and misstate its volume; export the "
                         "complete series, or resample it onto a regular grid first (e.g. in 3D Slicer) and pass "
                         "the NIfTI/NRRD file")


def _axes_text(axes: np.ndarray) -> str:
    """``(row direction / column direction)`` in LPS, as in ImageOrientationPatient."""
    row, column = (", ".join(f"{v:g}" for v in np.round(axes[:, k], 4) + 0.0) for k in (0, 1))
    return f"({row} / {column})"


def _read_dicom_series(folder: Path, series: Optional[str]) -> Volume:
    series_ids = sitk.ImageSeriesReader.GetGDCMSeriesIDs(str(folder))
    if not series_ids:
        raise InputError(f"{folder}: folder contains no DICOM series ({SUPPORTED})")
    files_by_series = {sid: sitk.ImageSeriesReader.GetGDCMSeriesFileNames(str(folder), sid) for sid in series_ids}
    series_id = _choose_series(folder, files_by_series, series)
    files = files_by_series[series_id]
    label = f"{folder}: DICOM series {_uid_text(series_id)}"
    try:
        slices = [_read_slice(file) for file in files]
    except RuntimeError as error:
        raise InputError(f"{label} cannot be read: {str(error).strip()[-200:]}") from None
    _check_slice_geometry(label, slices)
    _check_memory(f"{label} claims {len(slices)} slices", sum(s.n_bytes for s in slices))
    reader = sitk.ImageSeriesReader()
    reader.SetFileNames(files)
    reader.MetaDataDictionaryArrayUpdateOn()
    try:
        image = reader.Execute()
    except RuntimeError as error:
        raise InputError(f"{label} cannot be read: {str(error).strip()[-200:]}") from None
    modality = None
    if reader.HasMetaDataKey(0, "0008|0060"):
        modality = reader.GetMetaData(0, "0008|0060").strip() or None
    return _to_volume(image, str(folder), modality, dicom_files=tuple(files))


def _choose_series(folder: Path, files_by_series: dict[str, Sequence[str]], series: Optional[str]) -> str:
    """The SeriesInstanceUID to read: ``series`` if the folder holds it, else the only or the strictly
    largest series (said in a warning); a tie for the largest is refused with the list of series."""
    if series is not None:
        if series not in files_by_series:
            raise InputError(f"{folder}: holds no DICOM series {_uid_text(series)}; it holds "
                             f"{_series_list(files_by_series)}")
        return series
    by_size = _largest_first(files_by_series)
    if len(by_size) == 1:
        return by_size[0]
    largest = len(files_by_series[by_size[0]])
    if len(files_by_series[by_size[1]]) == largest:
        raise InputError(f"{folder}: holds {len(by_size)} DICOM series and more than one has the most slices "
                         f"({largest}); choose one with --series UID: {_series_list(files_by_series)}")
    log.warning("%s holds %d DICOM series; reading %s, the largest (choose another with --series UID): %s",
                folder, len(by_size), _uid_text(by_size[0]), _series_list(files_by_series))
    return by_size[0]


def _largest_first(files_by_series: dict[str, Sequence[str]]) -> list[str]:
    return sorted(files_by_series, key=lambda sid: len(files_by_series[sid]), reverse=True)


def _series_list(files_by_series: dict[str, Sequence[str]]) -> str:
    """``UID (N slices, modality, "description")`` for each series, the largest first."""
    return "; ".join(_series_summary(sid, files_by_series[sid]) for sid in _largest_first(files_by_series))


def _series_summary(series_id: str, files: Sequence[str]) -> str:
    try:
        reader = _header_reader(files[0])
    except RuntimeError:  # the UID and the slice count still identify the series
        return f"{_uid_text(series_id)} ({len(files)} slices)"
    modality, description = (reader.GetMetaData(tag).strip() if reader.HasMetaDataKey(tag) else ""
                             for tag in ("0008|0060", "0008|103e"))
    details = [f"{len(files)} slices", modality, f'"{description}"' if description else ""]
    return f"{_uid_text(series_id)} ({', '.join(d for d in details if d)})"


def _uid_text(series_id: str) -> str:
    return series_id or '"" (no series UID)'


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

    The caller writes the temporary file and renames it into place (``os.replace``). If the
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
    """Write ``image`` to ``path`` (format from the extension). The caller handles atomicity.

    Raises :class:`OSError` naming ``path`` when the file could not be written whole. SimpleITK
    reports most failures (a full disk...) as a ``RuntimeError``, but its NIfTI writer only prints a
    line and leaves a truncated file (which its reader reads back without a word), so a NIfTI file
    is checked to hold every voxel (:func:`_holds_voxels`).
    """
    try:
        sitk.WriteImage(image, str(path), useCompression=compress)
    except RuntimeError as error:
        raise OSError(errno.EIO, f"SimpleITK could not write it ({_itk_reason(error)})", str(path)) from None
    voxel_bytes = image.GetNumberOfPixels() * image.GetNumberOfComponentsPerPixel() * image.GetSizeOfPixelComponent()
    if _suffix(Path(path)) in (".nii", ".nii.gz") and not _holds_voxels(Path(path), voxel_bytes):
        raise OSError(errno.EIO, "the file was cut short while writing (a full disk?)", str(path))


def _itk_reason(error: RuntimeError) -> str:
    """The last line of an ITK exception, where it says what went wrong ("No space left on device")."""
    lines = str(error).strip().splitlines()
    return lines[-1].strip().removeprefix("Reason: ") if lines else "no reason given"


def _holds_voxels(path: Path, voxel_bytes: int) -> bool:
    """Whether the NIfTI file at ``path`` holds ``voxel_bytes`` of voxels after its header; a
    ``.nii.gz`` must be one whole gzip stream (read through: its CRC and length are verified)."""
    if not path.name.lower().endswith(".gz"):
        return path.stat().st_size >= _NIFTI_VOXEL_OFFSET + voxel_bytes
    try:
        with gzip.open(path, "rb") as stream:
            size = sum(len(chunk) for chunk in iter(lambda: stream.read(1 << 20), b""))
    except (EOFError, zlib.error, gzip.BadGzipFile):
        return False
    return size >= _NIFTI_VOXEL_OFFSET + voxel_bytes


def write_volume(volume_array: np.ndarray, geometry: Geometry, path: PathLike) -> None:
    """Atomically write a ``(z, y, x)`` array with its geometry."""
    path = Path(path)
    with staged_file(path) as tmp:
        write_image(image_from_array(volume_array, geometry), tmp)
        os.replace(tmp, path)
