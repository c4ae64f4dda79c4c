"""Scene logic of the Medical SAM3 Slicer module: volume node -> engine input; result -> segments.

Needs only MRML, numpy and vtk (no Qt, no torch), so it runs inside 3D Slicer and, for the tests,
on the PyPI ``slicer-core`` package. The engine is reached through a callable (the local server or
a remote one, via :class:`MedicalSAM3Core.common.client.Client`, or the engine itself in tests).

Rules:

* Geometry: the engine gets the volume's voxels ``(z, y, x)`` with the geometry of its IJK-to-RAS
  matrix; segments are written on exactly that grid. A volume under a linear parent transform is
  segmented in its own (local) space and the segmentation node is put under the same transform,
  so both line up in the views; a non-linear (warping) transform is refused ("harden it first").
* Segments the module writes carry the tag ``MedicalSAM3.prompt`` (the canonical concept) and
  ``MedicalSAM3.checksum``, a fingerprint of the segment's name and voxels as written. A rerun
  replaces a segment only when it is the module's own *and unchanged since*: a segment the user
  edited (painted, erased, renamed) after the module wrote it no longer matches its fingerprint
  and is never overwritten; the rerun writes a new segment next to it ("Liver (new)"). Segments
  drawn by the user (no tag) are never touched.
* Restore previous: :func:`write_segments` returns a :class:`RunRecord` of what the run replaced
  or added; :func:`restore_previous` puts the replaced segments back and removes the added ones,
  again skipping any segment the user edited since. (Slicer's scene undo is not used: it is hidden
  in Slicer's UI, and switched on it would copy the segmentation on every node change.)
* ``keep_overlapping``: each prompt's own mask (before merging); otherwise the merged,
  non-overlapping label map (per voxel the most confident prompt).
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from typing import Callable, Optional

import numpy as np

from MedicalSAM3Core.common.errors import InputError
from MedicalSAM3Core.common.prompts import normalize
from MedicalSAM3Core.common.result import SegmentationResult
from MedicalSAM3Core.common.terminology import terminology_string
from MedicalSAM3Core.common.volume import Geometry, Volume

PROMPT_TAG = "MedicalSAM3.prompt"
CHECKSUM_TAG = "MedicalSAM3.checksum"
CONFIDENCE_TAG = "MedicalSAM3.confidence"
SEGMENT_ID_PREFIX = "MedicalSAM3_"
#: A result is marked for checking in the panel's table when its mean detection score is below this
#: or it was found on fewer than :data:`FEW_SLICES` slices (a stray detection rather than an organ).
LOW_CONFIDENCE = 0.6
FEW_SLICES = 3


def _slicer():
    import slicer

    return slicer


def _checked_voxels(volume_node) -> tuple[np.ndarray, Geometry]:
    """The node's voxels ``(z, y, x)`` as ``slicer.util.arrayFromVolume`` gives them (a view, not a
    copy) and their LPS geometry, after checking the node can be segmented."""
    slicer = _slicer()
    import vtk

    if volume_node is None or not volume_node.IsA("vtkMRMLScalarVolumeNode") or volume_node.IsA(
            "vtkMRMLLabelMapVolumeNode"):
        raise InputError("select a scalar (CT or MR) volume to segment")
    if volume_node.GetScene() is None:
        raise InputError(f"volume {volume_node.GetName()!r} is no longer in the scene")
    if volume_node.GetImageData() is None:
        raise InputError(f"volume {volume_node.GetName()!r} has no voxels")
    transform = volume_node.GetParentTransformNode()
    if transform is not None and not transform.IsTransformToWorldLinear():
        raise InputError(f"volume {volume_node.GetName()!r} is under a non-linear transform "
                         f"({transform.GetName()}); harden the transform first (Data module, right-click)")
    matrix = vtk.vtkMatrix4x4()
    volume_node.GetIJKToRASMatrix(matrix)
    ijk_to_ras = np.array([[matrix.GetElement(r, c) for c in range(4)] for r in range(4)])
    array = slicer.util.arrayFromVolume(volume_node)
    if array.ndim != 3:
        raise InputError(f"volume {volume_node.GetName()!r} has {array.ndim} dimensions; a scalar 3D volume is needed")
    return array, Geometry.from_ijk_to_ras(ijk_to_ras)


def volume_grid(volume_node) -> tuple[tuple, Geometry]:
    """The node's grid: shape ``(z, y, x)`` and LPS geometry (no copy of the voxels)."""
    array, geometry = _checked_voxels(volume_node)
    return tuple(array.shape), geometry


def volume_from_node(volume_node) -> Volume:
    """The engine's :class:`Volume` of a scalar volume node (voxels ``(z, y, x)``, LPS geometry).
    The voxels are a copy: the user may go on editing the volume while a run uses them."""
    array, geometry = _checked_voxels(volume_node)
    return Volume(np.array(array, copy=True), geometry, modality=None, source=volume_node.GetName())


def _oriented_image(mask: np.ndarray, ijk_to_ras: np.ndarray):
    """A ``vtkOrientedImageData`` (what segments store) of a ``(z, y, x)`` 0/1 mask on the volume grid."""
    slicer = _slicer()
    import vtk
    from vtk.util import numpy_support

    z, y, x = mask.shape
    image = slicer.vtkOrientedImageData()
    image.SetDimensions(x, y, z)
    image.AllocateScalars(vtk.VTK_UNSIGNED_CHAR, 1)
    numpy_support.vtk_to_numpy(image.GetPointData().GetScalars()).reshape(z, y, x)[:] = mask
    matrix = vtk.vtkMatrix4x4()
    for r in range(4):
        for c in range(4):
            matrix.SetElement(r, c, float(ijk_to_ras[r, c]))
    image.SetImageToWorldMatrix(matrix)
    return image


def segment_tag(segment, key: str) -> Optional[str]:
    """A segment's tag value, or None when it has no such tag."""
    import vtk

    value = vtk.reference("")
    return str(value) if segment.GetTag(key, value) else None


def segment_id_for(name: str) -> str:
    return SEGMENT_ID_PREFIX + normalize(name).replace(" ", "_")


def _mask_on_grid(segmentation_node, segment_id: str, shape: tuple, ijk_to_ras: np.ndarray) -> np.ndarray:
    """A segment's binary labelmap resampled onto the grid ``shape``/``ijk_to_ras``, ``(z, y, x)`` bool."""
    slicer = _slicer()
    from vtk.util import numpy_support

    image = slicer.vtkOrientedImageData()
    segmentation_node.GetBinaryLabelmapRepresentation(segment_id, image)
    reference = _oriented_image(np.zeros(shape, np.uint8), ijk_to_ras)
    resampled = slicer.vtkOrientedImageData()
    slicer.vtkOrientedImageDataResample.ResampleOrientedImageToReferenceOrientedImage(image, reference, resampled)
    scalars = resampled.GetPointData().GetScalars()
    if scalars is None:
        return np.zeros(shape, bool)
    return numpy_support.vtk_to_numpy(scalars).reshape(shape) != 0  # this segment alone, as 0/1


def segment_mask(segmentation_node, segment_id: str, volume_node) -> np.ndarray:
    """A segment's binary labelmap resampled onto ``volume_node``'s grid, ``(z, y, x)`` bool."""
    shape, geometry = volume_grid(volume_node)
    return _mask_on_grid(segmentation_node, segment_id, shape, geometry.ijk_to_ras())


def _fingerprint(name: str, mask: np.ndarray) -> str:
    digest = hashlib.sha256(name.encode("utf-8"))
    digest.update(str(mask.shape).encode("ascii"))
    digest.update(np.packbits(mask, axis=None).tobytes())
    return digest.hexdigest()[:32]


def _current_fingerprint(segmentation_node, segment_id: str, shape, ijk_to_ras) -> str:
    segment = segmentation_node.GetSegmentation().GetSegment(segment_id)
    return _fingerprint(segment.GetName(), _mask_on_grid(segmentation_node, segment_id, shape, ijk_to_ras))


def unchanged_since_written(segmentation_node, segment_id: str, shape, ijk_to_ras) -> bool:
    """Whether ``segment_id`` is a segment this module wrote and nobody changed since (its name and
    voxels still match the fingerprint written with it). A segment without the fingerprint (drawn
    by the user, or written by an older version of the module) counts as the user's."""
    segment = segmentation_node.GetSegmentation().GetSegment(segment_id)
    if segment is None or segment_tag(segment, PROMPT_TAG) is None:
        return False
    written = segment_tag(segment, CHECKSUM_TAG)
    return written is not None and written == _current_fingerprint(segmentation_node, segment_id, shape, ijk_to_ras)


@dataclass
class SegmentState:
    """A segment as it was before a run replaced it (mask bit-packed on the volume grid)."""

    name: str
    color: tuple
    tags: dict
    terminology: Optional[str]
    packed: np.ndarray
    shape: tuple

    @classmethod
    def of(cls, segmentation_node, segment_id: str, shape, ijk_to_ras) -> "SegmentState":
        segment = segmentation_node.GetSegmentation().GetSegment(segment_id)
        tags = {key: segment_tag(segment, key) for key in (PROMPT_TAG, CHECKSUM_TAG, CONFIDENCE_TAG)}
        mask = _mask_on_grid(segmentation_node, segment_id, shape, ijk_to_ras)
        return cls(segment.GetName(), tuple(segment.GetColor()), {k: v for k, v in tags.items() if v is not None},
                   segment.GetTerminology() or None, np.packbits(mask, axis=None), tuple(shape))

    def mask(self) -> np.ndarray:
        return np.unpackbits(self.packed, count=int(np.prod(self.shape))).reshape(self.shape).astype(bool)


@dataclass
class RunRecord:
    """What one run did to one segmentation node, for :func:`restore_previous`: per segment id, the
    fingerprint the run wrote and the segment's state before (None: the run added the segment)."""

    segmentation_node_id: str
    volume_node_id: str
    written: dict = field(default_factory=dict)
    previous: dict = field(default_factory=dict)


@dataclass
class ResultRow:
    """One line of the panel's results table."""

    segment_id: str
    name: str
    confidence: float
    volume_ml: float
    slices: int
    found: bool

    @property
    def needs_check(self) -> bool:
        return not self.found or self.confidence < LOW_CONFIDENCE or self.slices < FEW_SLICES


@dataclass
class WriteReport:
    """What :func:`write_segments` did: the node, the record for Restore previous, one row per
    prompt, and the module's segments the user had changed, which were kept while the result went
    into a new segment (``{kept segment's name: new segment's name}``)."""

    node: object
    record: RunRecord
    rows: list = field(default_factory=list)
    kept_edited: dict = field(default_factory=dict)


def _require_terminology_api(segment_class) -> None:
    # vtkSegment.SetTerminology/GetTerminology arrived in Slicer 5.10 (Slicer#8296); the module
    # supports 5.10 and newer, and checks this before it adds a node or a segment.
    if not hasattr(segment_class, "SetTerminology"):
        raise InputError("this 3D Slicer is too old for Medical SAM3: it needs Slicer 5.10 or newer")


def _own_segments(segmentation_node, name: str, shape, ijk_to_ras) -> tuple[Optional[str], list[str]]:
    """The module's segments of concept ``name``: the first one unchanged since written (or None),
    and the names of those the user changed since."""
    segmentation = segmentation_node.GetSegmentation()
    unchanged, edited = None, []
    for index in range(segmentation.GetNumberOfSegments()):
        segment_id = segmentation.GetNthSegmentID(index)
        segment = segmentation.GetSegment(segment_id)
        if segment_tag(segment, PROMPT_TAG) != name:
            continue
        if unchanged is None and unchanged_since_written(segmentation_node, segment_id, shape, ijk_to_ras):
            unchanged = segment_id
        else:
            edited.append(segment.GetName())
    return unchanged, edited


def _free_name(segmentation, name: str) -> str:
    taken = {segmentation.GetNthSegment(i).GetName() for i in range(segmentation.GetNumberOfSegments())}
    if name not in taken:
        return name
    candidate, n = f"{name} (new)", 2
    while candidate in taken:
        candidate, n = f"{name} (new {n})", n + 1
    return candidate


def _set_segment(segmentation_node, segment_id, mask, name, color, tags, terminology, logic, ijk_to_ras) -> None:
    segment = segmentation_node.GetSegmentation().GetSegment(segment_id)
    segment.SetName(name)
    segment.SetColor(*color)
    for key, value in tags.items():
        segment.SetTag(key, value)
    if terminology:
        segment.SetTerminology(terminology)
    image = _oriented_image(mask.astype(np.uint8), ijk_to_ras)
    if not logic.SetBinaryLabelmapToSegment(image, segmentation_node, segment_id, logic.MODE_REPLACE, image.GetExtent()):
        raise RuntimeError(f"could not write segment {name!r}")


def write_segments(result: SegmentationResult, volume_node, segmentation_node=None, keep_overlapping: bool = False,
                   segmentations_logic=None) -> WriteReport:
    """Write one segment per prompt of ``result`` into ``segmentation_node`` (created if None).

    A prompt's segment replaces the module's own unchanged segment of the same concept; otherwise it
    is added (next to a segment the user edited, which stays as it is). Returns a :class:`WriteReport`.
    """
    slicer = _slicer()
    _require_terminology_api(slicer.vtkSegment)
    shape, geometry = volume_grid(volume_node)
    if result.shape != shape or not np.allclose(result.geometry.ijk_to_lps(), geometry.ijk_to_lps(), atol=1e-4):
        raise InputError("the segmentation result is not on this volume's grid; run it again on this volume")
    if segmentation_node is not None and segmentation_node.GetScene() is None:
        segmentation_node = None  # removed from the scene while the run went on: write to a new one
    logic = segmentations_logic or slicer.modules.segmentations.logic()
    ijk_to_ras = geometry.ijk_to_ras()
    voxel_ml = float(np.prod(geometry.spacing)) / 1000.0
    masks = [result.mask(index) if keep_overlapping and result.packed_masks else result.label_map == label.value
             for index, label in enumerate(result.labels)]
    scene = volume_node.GetScene()
    if segmentation_node is None:
        segmentation_node = scene.AddNewNodeByClass("vtkMRMLSegmentationNode", f"{volume_node.GetName()} Medical SAM3")
        segmentation_node.CreateDefaultDisplayNodes()
    segmentation_node.SetReferenceImageGeometryParameterFromVolumeNode(volume_node)
    transform = volume_node.GetParentTransformNode()
    segmentation_node.SetAndObserveTransformNodeID(transform.GetID() if transform is not None else None)
    segmentation = segmentation_node.GetSegmentation()
    report = WriteReport(segmentation_node, RunRecord(segmentation_node.GetID(), volume_node.GetID()))
    for label, mask in zip(result.labels, masks):
        segment_id, edited = _own_segments(segmentation_node, label.name, shape, ijk_to_ras)
        color = tuple(c / 255.0 for c in label.color)
        if segment_id is not None:
            report.record.previous[segment_id] = SegmentState.of(segmentation_node, segment_id, shape, ijk_to_ras)
            name = segmentation.GetSegment(segment_id).GetName()  # "Liver", or "Liver (new)" next to an edited one
        else:
            wanted = segment_id_for(label.name)
            segment_id = wanted if segmentation.GetSegment(wanted) is None else segmentation.GenerateUniqueSegmentID(
                wanted)
            name = _free_name(segmentation, label.name)
            report.kept_edited.update({kept: name for kept in edited})
            segment_id = segmentation.AddEmptySegment(segment_id, name, color)
            report.record.previous[segment_id] = None
        fingerprint = _fingerprint(name, mask)
        tags = {PROMPT_TAG: label.name, CONFIDENCE_TAG: f"{label.confidence:.3f}", CHECKSUM_TAG: fingerprint}
        terminology = terminology_string(label.terminology) if label.terminology else None
        _set_segment(segmentation_node, segment_id, mask, name, color, tags, terminology, logic, ijk_to_ras)
        report.record.written[segment_id] = fingerprint
        report.rows.append(ResultRow(segment_id, name, float(label.confidence),
                                     float(mask.sum()) * voxel_ml,
                                     int(np.count_nonzero(mask.any(axis=(1, 2)))), bool(mask.any())))
    return report


@dataclass
class RestoreReport:
    restored: list = field(default_factory=list)
    removed: list = field(default_factory=list)
    kept_edited: list = field(default_factory=list)


def restore_previous(record: RunRecord, scene, segmentations_logic=None) -> RestoreReport:
    """Undo the run ``record`` describes: segments it replaced get their previous name, color, tags and
    voxels back; segments it added are removed. A segment the user changed after that run (or
    removed) is left as it is and reported in ``kept_edited``."""
    slicer = _slicer()
    segmentation_node = scene.GetNodeByID(record.segmentation_node_id)
    volume_node = scene.GetNodeByID(record.volume_node_id)
    if segmentation_node is None or volume_node is None:
        raise InputError("the segmentation or the volume of that run is no longer in the scene")
    logic = segmentations_logic or slicer.modules.segmentations.logic()
    shape, geometry = volume_grid(volume_node)
    ijk_to_ras = geometry.ijk_to_ras()
    segmentation = segmentation_node.GetSegmentation()
    report = RestoreReport()
    for segment_id, fingerprint in record.written.items():
        segment = segmentation.GetSegment(segment_id)
        if segment is None:
            continue
        if _current_fingerprint(segmentation_node, segment_id, shape, ijk_to_ras) != fingerprint:
            report.kept_edited.append(segment.GetName())
            continue
        previous = record.previous.get(segment_id)
        if previous is None:
            report.removed.append(segment.GetName())
            segmentation.RemoveSegment(segment_id)
            continue
        if previous.shape != shape:
            report.kept_edited.append(segment.GetName())
            continue
        _set_segment(segmentation_node, segment_id, previous.mask(), previous.name, previous.color, previous.tags,
                     previous.terminology, logic, ijk_to_ras)
        report.restored.append(previous.name)
    return report


def segment_center_ras(segmentation_node, segment_id: str) -> Optional[tuple]:
    """The world (RAS) position of a segment's center, parent transform included
    (``vtkMRMLSegmentationNode::GetSegmentCenterRAS``, Slicer 5.10 and 5.12); None when the segment is
    missing or empty."""
    segmentation = segmentation_node.GetSegmentation()
    if segmentation.GetSegment(segment_id) is None:
        return None
    center = segmentation_node.GetSegmentCenterRAS(segment_id)
    return None if center is None else tuple(float(c) for c in center)


def _checked_prompts(prompts: list[str]) -> list[str]:
    if not prompts or any(not isinstance(p, str) or not p.strip() for p in prompts):
        raise InputError("type at least one structure name, e.g. 'liver'")
    return [p.strip() for p in prompts]


def start_segmentation(volume_node, prompts: list[str], options, backend):
    """Start segmenting ``volume_node`` on ``backend`` (a :mod:`.backends` backend) in a job process.

    The voxels are copied out of the scene here, on the calling (GUI) thread; the returned
    :class:`~.backends.ProcessTask` never touches the scene. Bad input raises before anything starts.
    """
    from .backends import start_job

    prompts = _checked_prompts(prompts)
    options.validate()
    volume = volume_from_node(volume_node)
    return start_job(backend, "segment", volume, prompts, options)


def finish_segmentation(task, volume_node, segmentation_node=None, keep_overlapping: bool = False,
                        segmentations_logic=None) -> WriteReport:
    """Write a finished task's result as segments (on the GUI thread). A task that failed or was
    cancelled raises its error and leaves the scene exactly as it was."""
    if not task.finished:
        raise RuntimeError("the segmentation is still running")
    if task.error is not None:
        raise task.error
    if volume_node is None or volume_node.GetScene() is None:
        raise InputError("the volume was removed from the scene while it was being segmented; nothing was written")
    return write_segments(task.result, volume_node, segmentation_node, keep_overlapping, segmentations_logic)


def segment_volume(volume_node, prompts: list[str], run: Callable[[Volume, list[str]], SegmentationResult],
                   segmentation_node=None, keep_overlapping: bool = False, segmentations_logic=None) -> WriteReport:
    """Segment ``volume_node`` with ``run`` (the engine, local or remote) and write the segments.

    Nothing in the scene changes unless ``run`` returns a result (a cancel or an error raised by
    ``run`` leaves the scene as it was).
    """
    volume = volume_from_node(volume_node)
    result = run(volume, _checked_prompts(prompts))
    return write_segments(result, volume_node, segmentation_node, keep_overlapping, segmentations_logic)
