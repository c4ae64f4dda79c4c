"""DICOM Segmentation (SEG) objects of a result, for results that go back to PACS (highdicom).

A SEG references the DICOM series it was computed on: its study, series, frame of reference and
the SOP instance of every slice a frame lies on. So it is written for a DICOM series input only;
:func:`dicom_seg` checks that the result's grid is the series' grid, slice for slice (the label
map is ``(z, y, x)``, slice ``k`` on the series' ``k``-th file as the reader ordered them).

One segment per label (a prompt, or one side of a paired structure), in label order: segment
number = label value. Each carries its SNOMED CT category, type (with its laterality modifier) and
anatomic region (with its modifier) from the prompt dictionary, the dictionary's display color, and
the algorithm identification DICOM asks of AI results (family "Artificial Intelligence", the model
and this package's version). A prompt outside the dictionary gets a private code (scheme
``99MEDSAM3``) whose meaning is the prompt's text. Binary segmentation, empty frames omitted.

highdicom is an optional dependency (``pip install medical-sam3[dicom]``); without it, asking for a
SEG is an :class:`~MedicalSAM3Core.common.errors.InputError` that says how to install it.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Sequence

import numpy as np

from .. import __version__
from ..common.errors import InputError
from ..common.result import LabelInfo, SegmentationResult

if TYPE_CHECKING:
    from ..common.volume import Volume

#: Private coding scheme of the concepts SNOMED CT has no code for (see Resources/prompts.json).
PRIVATE_SCHEME = "99MEDSAM3"
#: How far a slice's ImagePositionPatient may lie from the result's slice origin.
_TOLERANCE_MM = 0.01


def require_highdicom() -> None:
    """Refuse a DICOM SEG request early (before any heavy work) when highdicom is missing."""
    _import()


def _import():
    try:
        import highdicom
        import pydicom
    except ImportError:
        raise InputError("DICOM SEG output needs highdicom: pip install 'medical-sam3[dicom]' "
                         "(or pip install highdicom)") from None
    return highdicom, pydicom


def _cielab(rgb: Sequence[int]):
    """sRGB (0-255) as CIE L*a*b* (D65), what DICOM's RecommendedDisplayCIELabValue holds."""
    import highdicom

    c = np.asarray(rgb, float) / 255.0
    linear = np.where(c <= 0.04045, c / 12.92, ((c + 0.055) / 1.055) ** 2.4)
    xyz = np.array([[0.4124564, 0.3575761, 0.1804375], [0.2126729, 0.7151522, 0.0721750],
                    [0.0193339, 0.1191920, 0.9503041]]) @ linear
    xyz /= np.array([0.95047, 1.0, 1.08883])
    f = np.where(xyz > (6 / 29) ** 3, np.cbrt(xyz), xyz / (3 * (6 / 29) ** 2) + 4 / 29)
    lab = (116 * f[1] - 16, 500 * (f[0] - f[1]), 200 * (f[1] - f[2]))
    return highdicom.color.CIELabColor(float(np.clip(lab[0], 0, 100)), float(np.clip(lab[1], -128, 127)),
                                       float(np.clip(lab[2], -128, 127)))


def _coded(item: dict):
    from highdicom.sr import CodedConcept

    return CodedConcept(value=item["code"], scheme_designator=item.get("scheme", "SCT"), meaning=item["meaning"][:64])


def _with_modifier(sequence, item: dict, keyword: str) -> None:
    """Put ``item``'s modifier (a laterality) inside the first item of ``sequence``, as DICOM nests
    SegmentedPropertyTypeModifierCodeSequence / AnatomicRegionModifierSequence."""
    modifier = item.get("modifier")
    if modifier:
        setattr(sequence[0], keyword, [_coded(modifier)])


def segment_description(label: LabelInfo, model_name: str):
    """The SEG segment of one label (its number is the label value)."""
    highdicom, _ = _import()
    from pydicom.sr.codedict import codes

    terminology = label.terminology
    if terminology:
        category, kind, region = terminology["category"], terminology["type"], terminology.get("region")
    else:  # free text: a private code naming the prompt
        category = {"scheme": "SCT", "code": "123037004", "meaning": "Anatomical Structure"}
        kind, region = {"scheme": PRIVATE_SCHEME, "code": "99MEDSAM3-FREE", "meaning": label.model_text}, None
    algorithm = highdicom.AlgorithmIdentificationSequence(
        name=f"Medical SAM3 {model_name}"[:64], family=codes.cid7162.ArtificialIntelligence, version=__version__)
    description = highdicom.seg.SegmentDescription(
        segment_number=label.value, segment_label=label.name[:64], segmented_property_category=_coded(category),
        segmented_property_type=_coded(kind), algorithm_type=highdicom.seg.SegmentAlgorithmTypeValues.AUTOMATIC,
        algorithm_identification=algorithm, anatomic_regions=[_coded(region)] if region else None,
        display_color=_cielab(label.color))
    _with_modifier(description.SegmentedPropertyTypeCodeSequence, kind, "SegmentedPropertyTypeModifierCodeSequence")
    if region:
        _with_modifier(description.AnatomicRegionSequence, region, "AnatomicRegionModifierSequence")
    return description


#: What a SEG copies from or references in its source: without them it cannot point at its images.
_REFERENCED = ("StudyInstanceUID", "SeriesInstanceUID", "SOPClassUID", "SOPInstanceUID", "FrameOfReferenceUID")


def read_series_headers(files: Sequence[str]) -> list:
    """The source slices' headers (no pixel data), in the reader's slice order.

    An empty SOP Class or Instance UID (some de-identification tools blank them) is taken from the
    file's meta information (Media Storage SOP Class / Instance UID, equal by definition), in the
    copy in memory. Any identifier still missing is refused: a SEG that cannot name its study,
    series, frame of reference or images is of no use to a PACS.
    """
    _, pydicom = _import()
    headers = [pydicom.dcmread(f, stop_before_pixels=True) for f in files]
    for header in headers:
        meta = getattr(header, "file_meta", None) or {}
        for keyword, meta_keyword in (("SOPClassUID", "MediaStorageSOPClassUID"),
                                      ("SOPInstanceUID", "MediaStorageSOPInstanceUID")):
            if not header.get(keyword) and meta.get(meta_keyword):
                setattr(header, keyword, meta[meta_keyword].value)
    missing = [k for k in _REFERENCED if not all(header.get(k) for header in headers)]
    if missing:
        raise InputError(f"the DICOM series has no {', '.join(missing)} in some or all of its files (de-identified "
                         "without keeping its UIDs?): a DICOM SEG must reference them, so none can be made for it")
    return headers


def check_same_grid(result: SegmentationResult, headers: Sequence) -> None:
    """Refuse a result that is not on the series' grid, slice ``k`` on header ``k``."""
    if len(headers) != result.shape[0]:
        raise InputError(f"the DICOM series has {len(headers)} slices and the result {result.shape[0]}: "
                         "a DICOM SEG needs the result on the series' own grid")
    ijk_to_lps = result.geometry.ijk_to_lps()
    for k, header in enumerate(headers):
        rows, columns = int(header.Rows), int(header.Columns)
        if (rows, columns) != tuple(result.shape[1:]):
            raise InputError(f"slice {k + 1} of the DICOM series is {rows}x{columns} and the result "
                             f"{result.shape[1]}x{result.shape[2]}")
        expected = (ijk_to_lps @ np.array([0.0, 0.0, float(k), 1.0]))[:3]
        position = np.asarray([float(v) for v in header.ImagePositionPatient])
        if np.abs(position - expected).max() > _TOLERANCE_MM:
            raise InputError(f"slice {k + 1} of the DICOM series lies at {np.round(position, 3).tolist()} mm and the "
                             f"result's slice {k + 1} at {np.round(expected, 3).tolist()} mm: not the same grid")


def dicom_seg(result: SegmentationResult, source_files: Sequence[str], series_number: int = 300):
    """A DICOM SEG (a ``highdicom.seg.Segmentation``, a pydicom Dataset) of ``result``, computed on
    the DICOM series whose files, in slice order, are ``source_files``."""
    highdicom, pydicom = _import()
    if not source_files:
        raise InputError("a DICOM SEG needs a DICOM series as input (a folder of slices); this input is not one")
    headers = read_series_headers(source_files)
    check_same_grid(result, headers)
    model_name = Path(result.model_id).name if result.model_id else "model"
    descriptions = [segment_description(label, model_name) for label in result.labels]
    try:
        return _segmentation(highdicom, result, headers, descriptions, model_name, series_number)
    except (ValueError, TypeError, AttributeError, KeyError) as error:  # highdicom on a series it cannot reference
        raise InputError(f"cannot make a DICOM SEG of this DICOM series: {error}") from None


def _segmentation(highdicom, result: SegmentationResult, headers: Sequence, descriptions: list, model_name: str,
                  series_number: int):
    pixels = result.label_map
    omit_empty = bool(np.any(pixels))  # a label map with no voxel at all still needs its frames
    column_spacing, row_spacing, slice_spacing = (float(v) for v in result.geometry.spacing)
    for header in headers:  # Slice Thickness is type 2 (may be empty); the SEG's needs a value: the spacing
        if not header.get("SliceThickness"):
            header.SliceThickness = slice_spacing  # the copy in memory only
    measures = highdicom.PixelMeasuresSequence(pixel_spacing=(row_spacing, column_spacing),
                                               slice_thickness=float(headers[0].SliceThickness),
                                               spacing_between_slices=slice_spacing)
    return highdicom.seg.Segmentation(
        source_images=headers, pixel_array=pixels.astype(np.uint16 if pixels.max(initial=0) > 255 else np.uint8),
        segmentation_type=highdicom.seg.SegmentationTypeValues.BINARY, segment_descriptions=descriptions,
        series_instance_uid=highdicom.UID(), series_number=series_number, sop_instance_uid=highdicom.UID(),
        instance_number=1, manufacturer="Medical SAM3", manufacturer_model_name=model_name[:64],
        software_versions=__version__, device_serial_number="none", omit_empty_frames=omit_empty,
        series_description=f"Medical SAM3 segmentation ({model_name})"[:64], content_label="MEDSAM3",
        content_description="Automatic segmentation from text prompts; not reviewed"[:64],
        pixel_measures=measures)


def write_dicom_seg(dataset, path: Path) -> None:
    """Write ``dataset`` as a DICOM file (Part 10, with its file meta information)."""
    _, pydicom = _import()
    pydicom.dcmwrite(str(path), dataset, enforce_file_format=True)


def is_dicom_seg(path: Path) -> bool:
    """Is ``path`` a DICOM Segmentation file (by name ``*.seg.dcm``, else by its Modality)?"""
    path = Path(path)
    if not path.is_file():
        return False
    if path.name.lower().endswith(".seg.dcm"):
        return True
    if not path.name.lower().endswith(".dcm"):
        return False
    try:
        import pydicom
    except ImportError:
        return False
    try:
        return pydicom.dcmread(path, stop_before_pixels=True, specific_tags=["Modality"]).get("Modality") == "SEG"
    except Exception:  # not DICOM at all: the reader says what it is
        return False


def read_dicom_seg(path: Path, reference: "Volume") -> tuple[np.ndarray, dict[str, int]]:
    """A DICOM SEG's segments as a label map ``(z, y, x)`` on ``reference``'s grid (value = segment
    number; where segments overlap, the higher number), and ``{segment label: number}``.

    Every frame must lie on the reference grid: its pixels' LPS positions (frame position, row and
    column directions and spacings) on voxel centres, with its rows and columns along grid axes
    (flipped or permuted axes are fine), else an :class:`InputError` names the frame. Frames the
    SEG omits (empty ones) stay 0. Read with pydicom, independently of highdicom.
    """
    _, pydicom = _import()
    try:
        seg = pydicom.dcmread(path)
    except Exception as error:
        raise InputError(f"{path}: not a readable DICOM file ({error})") from None
    if seg.get("Modality") != "SEG" or "SegmentSequence" not in seg:
        raise InputError(f"{path}: not a DICOM Segmentation (Modality {seg.get('Modality')!r})")
    names = {str(item.SegmentLabel): int(item.SegmentNumber) for item in seg.SegmentSequence}
    shared = seg.SharedFunctionalGroupsSequence[0]
    frames = seg.pixel_array.reshape(int(seg.get("NumberOfFrames", 1)), int(seg.Rows), int(seg.Columns))
    if seg.get("SegmentationType") == "FRACTIONAL":
        frames = frames > int(seg.get("MaximumFractionalValue", 255)) // 2
    lps_to_ijk = np.linalg.inv(reference.geometry.ijk_to_lps())
    out = np.zeros(reference.shape, np.uint16 if max(names.values(), default=0) > 255 else np.uint8)
    rows, columns = np.meshgrid(np.arange(frames.shape[1]), np.arange(frames.shape[2]), indexing="ij")
    for index, (frame, group) in enumerate(zip(frames, seg.PerFrameFunctionalGroupsSequence)):
        def item(sequence):  # a functional group of this frame, else the shared one
            return getattr(group, sequence)[0] if sequence in group else getattr(shared, sequence)[0]

        orientation = np.asarray(item("PlaneOrientationSequence").ImageOrientationPatient, float)
        row_spacing, column_spacing = (float(v) for v in item("PixelMeasuresSequence").PixelSpacing)
        position = np.asarray(group.PlanePositionSequence[0].ImagePositionPatient, float)
        along_row, along_column = orientation[:3] * column_spacing, orientation[3:] * row_spacing
        origin = lps_to_ijk[:3, :3] @ position + lps_to_ijk[:3, 3]
        step_column, step_row = lps_to_ijk[:3, :3] @ along_row, lps_to_ijk[:3, :3] @ along_column
        steps = np.stack([step_column, step_row])
        if not (np.allclose(steps, steps.round(), atol=1e-3) and np.allclose(origin, origin.round(), atol=1e-3)
                and np.all(np.abs(steps.round()).sum(1) == 1)):
            raise InputError(f"{path}: frame {index + 1} does not lie on the voxel grid of {reference.source or 'the image'}"
                             " (another grid, spacing or orientation)")
        ijk = (origin.round()[:, None, None] + step_column.round()[:, None, None] * columns
               + step_row.round()[:, None, None] * rows).astype(int)
        if (ijk.min(axis=(1, 2)) < 0).any() or (ijk.max(axis=(1, 2)) >= np.array(reference.shape[::-1])).any():
            raise InputError(f"{path}: frame {index + 1} lies outside the image {reference.source or ''}".rstrip())
        number = int(group.SegmentIdentificationSequence[0].ReferencedSegmentNumber)
        hit = frame.astype(bool)
        target = out[ijk[2][hit], ijk[1][hit], ijk[0][hit]]
        out[ijk[2][hit], ijk[1][hit], ijk[0][hit]] = np.maximum(target, number)
    return out, names
