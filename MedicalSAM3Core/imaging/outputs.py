"""Write a :class:`SegmentationResult` as files: label map, JSON sidecar, Slicer .seg.nrrd, PNG overlay.

All outputs of one call are staged as temporary files and renamed into place only after every
one of them was written, so an error or Ctrl-C never leaves a partial set. Existing files are
never overwritten unless the caller says so. Before the work, :func:`check_writable` refuses what
could not be written (a file in the way, a read-only folder, too little free space), and a failure
while writing anyway is an :class:`~MedicalSAM3Core.common.errors.OutputError`.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Sequence

import numpy as np
import SimpleITK as sitk

from ..common.errors import InputError, OutputError
from ..common.result import SegmentationResult
from ..common.terminology import terminology_string
from ..common.volume import Volume
from .io import bytes_text, image_from_array, staged_file, write_image


#: Label-map formats that hold a volume in one file: written whole under a temporary name and renamed,
#: so an output appears complete or not at all (.mhd/.nhdr point at a second data file; .png and the
#: like hold one slice).
LABEL_MAP_FORMATS = (".nii.gz", ".nii", ".nrrd", ".mha")
#: Axial slices side by side in the PNG overlay.
OVERLAY_SLICES = 3
_FILE_ALLOWANCE = 64 * 1024  # one output's header, container framing and metadata, generously
_LABEL_JSON_BYTES = 4096  # one label's entry in the sidecar, generously


@dataclass
class OutputPaths:
    """Where the outputs of one segmentation go (``None`` = not written)."""

    label_map: Path
    sidecar: Optional[Path] = None
    seg_nrrd: Optional[Path] = None
    overlay_png: Optional[Path] = None
    dicom_seg: Optional[Path] = None

    @classmethod
    def beside(cls, label_map: Path, seg_nrrd: bool = False, overlay: bool = False,
               dicom_seg: bool = False) -> "OutputPaths":
        """Sidecar (and optionally .seg.nrrd / .png / DICOM SEG ``.seg.dcm``) named after the label map."""
        label_map = Path(label_map)
        name = label_map.name
        for ext in LABEL_MAP_FORMATS + (".mhd", ".nhdr"):
            if name.lower().endswith(ext):
                name = name[: -len(ext)]
                break
        stem = label_map.with_name(name)
        return cls(label_map, stem.with_name(name + ".json"),
                   stem.with_name(name + ".seg.nrrd") if seg_nrrd else None,
                   stem.with_name(name + "_overlay.png") if overlay else None,
                   stem.with_name(name + ".seg.dcm") if dicom_seg else None)

    def all(self) -> list[Path]:
        return [p for p in (self.label_map, self.sidecar, self.seg_nrrd, self.overlay_png, self.dicom_seg)
                if p is not None]


def _replaces_input(output: Path, source: Path) -> bool:
    """Whether writing ``output`` would replace the input ``source`` (the same file, through any
    spelling, symlink or hard link) or, for an input folder (a DICOM series), one of its files."""
    if source.is_dir():
        return output.exists() and output.resolve().is_relative_to(source.resolve())
    if output.resolve() == source.resolve():
        return True
    return output.exists() and source.exists() and os.path.samefile(output, source)


def check_writable(paths: OutputPaths, overwrite: bool, inputs: Sequence[Path] = (), needed_bytes: int = 0) -> None:
    """Refuse, before the work, outputs that must not or cannot be written: one that would replace an
    input (whatever ``overwrite`` says: the scan is never lost), a label map format that does not hold
    a volume in one file, existing outputs (unless ``overwrite``), or a folder that cannot take
    ``needed_bytes`` (:func:`check_output_folder`; each folder must hold them all, a bound).

    Call it with the names alone before the input is read, and again with ``needed_bytes`` (from
    :func:`output_bytes`) once the input's size is known, before the model loads.
    """
    for output in paths.all():
        for source in map(Path, inputs):
            if _replaces_input(output, source):
                what = "a file of the input folder" if source.is_dir() else "the input"
                raise InputError(f"output {output} would replace {what} {source}; choose another output name "
                                 f"(-o): the input is never overwritten, even with --overwrite")
    if not paths.label_map.name.lower().endswith(LABEL_MAP_FORMATS):
        raise InputError(f"cannot write the label map as {paths.label_map.name!r}: use one of "
                         f"{', '.join(LABEL_MAP_FORMATS)} (a format that holds the whole volume in one file)")
    existing = [str(p) for p in paths.all() if p.exists()]
    if existing and not overwrite:
        raise InputError(f"output file(s) already exist: {', '.join(existing)} (use --overwrite to replace them)")
    for folder in dict.fromkeys(path.parent for path in paths.all()):
        check_output_folder(folder, needed_bytes)


def check_output_folder(folder: Path, needed_bytes: int = 0) -> None:
    """Refuse, before any work, a folder that outputs cannot really be written into.

    The folder need not exist yet: the nearest existing folder above it, where it would be created,
    is checked. Refused: a file in the way; a folder where no file can be created (a read-only file
    system, permissions: probed by creating and removing a temporary file, as ``os.access`` says yes
    to root even on a read-only disk); less than ``needed_bytes`` free on its disk (unless its file
    system reports no size at all, as some network ones do).
    """
    folder = Path(folder)
    existing = _nearest_existing(folder)
    if not existing.is_dir():
        where = "" if existing == folder else f"cannot create folder {folder}: "
        raise OutputError(f"{where}{existing} is a file, not a folder; choose another output location")
    try:
        _probe(existing)
    except OSError as error:
        raise OutputError(f"cannot write to folder {existing}: {_reason(error)}") from None
    disk = shutil.disk_usage(existing)
    if disk.total and needed_bytes > disk.free:
        raise OutputError(f"not enough free space in {existing}: the outputs may need up to "
                          f"{bytes_text(needed_bytes)} and {bytes_text(disk.free)} is free; free some space "
                          "or write elsewhere")


def _nearest_existing(folder: Path) -> Path:
    """``folder``, else the nearest path above it that exists (``.`` at worst, for a relative path)."""
    while not folder.exists() and folder != folder.parent:
        folder = folder.parent
    return folder


def _probe(folder: Path) -> None:
    """Create and remove a temporary file in ``folder``; raises :class:`OSError` where that fails."""
    with tempfile.NamedTemporaryFile(dir=folder, prefix=".medsam3-probe-"):
        pass


def _reason(error: OSError) -> str:
    """What an :class:`OSError` says went wrong ("No space left on device"), without the file name."""
    return error.strerror or str(error)


def output_bytes(paths: OutputPaths, shape: Sequence[int], label_dtype: np.dtype, n_labels: int) -> int:
    """An upper bound of the bytes that the outputs ``paths`` of a ``(z, y, x)`` label map take.

    The label map and the .seg.nrrd count uncompressed (deflate can only shrink them, give or take
    0.1% of framing), the PNG overlay as its raw RGB rows, the sidecar a generous 4 KiB per label,
    the DICOM SEG one bit per voxel per label (binary frames) and 1 KiB per frame of per-frame
    headers; each file gets 64 KiB more for its header.
    """
    z, y, x = shape
    label_map = z * y * x * np.dtype(label_dtype).itemsize
    overlay = y * (1 + 3 * OVERLAY_SLICES * x)  # its rows of RGB pixels, each with a filter byte
    sizes = [(paths.label_map, label_map), (paths.sidecar, n_labels * _LABEL_JSON_BYTES),
             (paths.seg_nrrd, label_map), (paths.overlay_png, overlay),
             (paths.dicom_seg, n_labels * z * (y * x // 8 + 1 + 1024))]
    return sum(n + n // 1000 + _FILE_ALLOWANCE for path, n in sizes if path is not None)


def write_result(result: SegmentationResult, paths: OutputPaths, volume: Optional[Volume] = None) -> None:
    """Write every requested output of ``result``; all appear together or none does.

    ``volume`` (the input) is needed for the PNG overlay and the DICOM SEG (which references the
    input's DICOM series). A failure to write (a full disk, a folder made read-only meanwhile)
    removes whatever was staged and raises :class:`OutputError`.
    """
    if (paths.overlay_png is not None or paths.dicom_seg is not None) and volume is None:
        raise InputError("an overlay PNG or a DICOM SEG needs the input volume")
    sidecar = result.sidecar_json() if paths.sidecar is not None else None  # refused before any file is staged
    seg = None
    if paths.dicom_seg is not None:  # built (and refused) before any file is staged
        from .dicom_seg import dicom_seg

        seg = dicom_seg(result, volume.dicom_files)
    try:
        _write_staged(result, paths, volume, sidecar, seg)
    except OSError as error:
        raise OutputError(f"cannot write the outputs in {paths.label_map.parent}: {_reason(error)}; "
                          "nothing was written") from None


def _write_staged(result: SegmentationResult, paths: OutputPaths, volume: Optional[Volume],
                  sidecar: Optional[str], seg=None) -> None:
    """Write each output under a temporary name, then rename them all into place (see :func:`write_result`)."""
    with ExitStack() as stack:
        staged: list[tuple[Path, Path]] = []

        def stage(final: Path) -> Path:
            tmp = stack.enter_context(staged_file(final))
            staged.append((tmp, final))
            return tmp

        write_image(image_from_array(result.label_map, result.geometry), stage(paths.label_map))
        if sidecar is not None:
            stage(paths.sidecar).write_text(sidecar, encoding="utf-8")
        if paths.seg_nrrd is not None:
            write_image(seg_nrrd_image(result), stage(paths.seg_nrrd))
        if paths.overlay_png is not None:
            write_image(overlay_image(volume, result), stage(paths.overlay_png), compress=False)
        if seg is not None:
            from .dicom_seg import write_dicom_seg

            write_dicom_seg(seg, stage(paths.dicom_seg))
        for tmp, final in staged:
            os.replace(tmp, final)


def seg_nrrd_image(result: SegmentationResult) -> sitk.Image:
    """The merged label map as a 3D Slicer segmentation (``.seg.nrrd``, one labelmap layer).

    Slicer reads the ``Segment<N>_*`` fields written as NRRD key/value pairs; a known concept's
    terminology is the ``TerminologyEntry`` tag, Slicer's serialized entry
    (:func:`~MedicalSAM3Core.common.terminology.terminology_string`: SNOMED CT category, type,
    laterality modifier and region from the prompt dictionary, in the "Medical SAM3" contexts that
    ship in ``Resources/`` and that the Slicer module loads).
    """
    image = image_from_array(result.label_map, result.geometry)
    image.SetMetaData("Segmentation_MasterRepresentation", "Binary labelmap")
    image.SetMetaData("Segmentation_ContainedRepresentationNames", "Binary labelmap|")
    image.SetMetaData("Segmentation_ReferenceImageExtentOffset", "0 0 0")
    z, y, x = result.label_map.shape
    for index, label in enumerate(result.labels):
        prefix = f"Segment{index}_"
        present = np.nonzero(result.label_map == label.value)
        if present[0].size:
            extent = (f"{present[2].min()} {present[2].max()} {present[1].min()} {present[1].max()} "
                      f"{present[0].min()} {present[0].max()}")
        else:
            extent = f"0 {x - 1} 0 {y - 1} 0 {z - 1}"
        r, g, b = (c / 255.0 for c in label.color)
        fields = {
            "ID": f"Segment_{label.value}",
            "Name": label.name,
            "NameAutoGenerated": "0",
            "Color": f"{r:.6f} {g:.6f} {b:.6f}",
            "ColorAutoGenerated": "0",
            "LabelValue": str(label.value),
            "Layer": "0",
            "Extent": extent,
            "Tags": f"TerminologyEntry:{terminology_string(label.terminology)}|" if label.terminology else "|",
        }
        for key, value in fields.items():
            image.SetMetaData(prefix + key, value)
    return image


def overlay_image(volume: Volume, result: SegmentationResult, n_slices: int = OVERLAY_SLICES,
                  window: tuple[float, float] | None = None) -> sitk.Image:
    """An RGB PNG montage of ``n_slices`` axial (k) slices with the label map blended in color.

    Slices are spread over the labelled extent (or the whole volume if nothing was found).
    Meant for a quick visual check, not for measurement.
    """
    array = volume.array.astype(np.float32)
    if window is None:
        low, high = (-160.0, 240.0) if (volume.modality or "").upper() == "CT" or array.min() < -500 else \
            tuple(np.percentile(array[:: max(1, array.shape[0] // 16)], [1, 99]))
    else:
        low, high = window
    labelled = np.nonzero(result.label_map.any(axis=(1, 2)))[0]
    first, last = (labelled[0], labelled[-1]) if labelled.size else (0, array.shape[0] - 1)
    ks = np.unique(np.linspace(first, last, n_slices + 2)[1:-1].round().astype(int)) if last > first else [first]
    colors = np.zeros((max(l.value for l in result.labels) + 1 if result.labels else 1, 3), np.float32)
    for label in result.labels:
        colors[label.value] = label.color
    tiles = []
    for k in ks:
        gray = np.clip((array[k] - low) / max(high - low, 1e-6), 0, 1)[..., None] * 255.0
        labels = result.label_map[k]
        rgb = np.where(labels[..., None] > 0, 0.45 * gray + 0.55 * colors[labels], gray)
        tiles.append(rgb.astype(np.uint8))
    # Display in radiological convention (anterior up, patient's left on the right) for the
    # axis-aligned part of the direction matrix.
    direction = volume.geometry.direction_matrix
    flip_rows, flip_cols = direction[1, 1] < 0, direction[0, 0] < 0
    tiles = [tile[::-1 if flip_rows else 1, ::-1 if flip_cols else 1] for tile in tiles]
    montage = np.concatenate(tiles, axis=1)
    return sitk.GetImageFromArray(montage, isVector=True)
