"""Scene logic of the Medical SAM3 Slicer module: volume node -> engine input; result -> segments.

Needs only MRML, numpy and vtk (no Qt, no torch), so it runs inside 3D Slicer and, for the tests,
on the PyPI ``slicer-core`` package. The engine is reached through a callable (the local server or
a remote one, via :class:`MedicalSAM3Core.common.client.Client`, or the engine itself in tests).

Rules:

* Geometry: the engine gets the volume's voxels ``(z, y, x)`` with the geometry of its IJK-to-RAS
  matrix; segments are written on exactly that grid. A volume under a linear parent transform is
  segmented in its own (local) space and the segmentation node is put under the same transform,
  so both line up in the views; a non-linear (warping) transform is refused ("harden it first").
* Segments the module writes carry the tag ``MedicalSAM3.prompt`` (the canonical concept). Running
  a prompt again replaces only the segment with that tag; segments drawn by the user (no tag) are
  never touched. The scene's undo state is saved first, so Slicer's Undo restores what was there.
* ``keep_overlapping``: each prompt's own mask (before merging); otherwise the merged,
  non-overlapping label map (per voxel the most confident prompt).
"""

from __future__ import annotations

from typing import Callable, Optional

import numpy as np

from MedicalSAM3Core.common.errors import InputError
from MedicalSAM3Core.common.prompts import normalize
from MedicalSAM3Core.common.result import SegmentationResult
from MedicalSAM3Core.common.terminology import terminology_string
from MedicalSAM3Core.common.volume import Geometry, Volume

PROMPT_TAG = "MedicalSAM3.prompt"
SEGMENT_ID_PREFIX = "MedicalSAM3_"


def _slicer():
    import slicer

    return slicer


def volume_from_node(volume_node) -> Volume:
    """The engine's :class:`Volume` of a scalar volume node (voxels ``(z, y, x)``, LPS geometry)."""
    slicer = _slicer()
    import vtk

    if volume_node is None or not volume_node.IsA("vtkMRMLScalarVolumeNode") or volume_node.IsA(
            "vtkMRMLLabelMapVolumeNode"):
        raise InputError("select a scalar (CT or MR) volume to segment")
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
    modality = None
    return Volume(np.asarray(array), Geometry.from_ijk_to_ras(ijk_to_ras), modality=modality,
                  source=volume_node.GetName())


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


def write_segments(result: SegmentationResult, volume_node, segmentation_node=None, keep_overlapping: bool = False,
                   segmentations_logic=None):
    """Write one segment per prompt of ``result`` into ``segmentation_node`` (created if None).

    Only segments this module wrote for the same concept are replaced; the scene's undo state is
    saved first. Returns the segmentation node.
    """
    slicer = _slicer()
    volume = volume_from_node(volume_node)
    if result.shape != volume.shape or not np.allclose(result.geometry.ijk_to_lps(), volume.geometry.ijk_to_lps(),
                                                       atol=1e-4):
        raise InputError("the segmentation result is not on this volume's grid; run it again on this volume")
    logic = segmentations_logic or slicer.modules.segmentations.logic()
    scene = volume_node.GetScene()
    if scene.GetUndoFlag():
        scene.SaveStateForUndo()
    if segmentation_node is None:
        segmentation_node = scene.AddNewNodeByClass("vtkMRMLSegmentationNode", f"{volume_node.GetName()} Medical SAM3")
        segmentation_node.CreateDefaultDisplayNodes()
    segmentation_node.SetReferenceImageGeometryParameterFromVolumeNode(volume_node)
    transform = volume_node.GetParentTransformNode()
    segmentation_node.SetAndObserveTransformNodeID(transform.GetID() if transform is not None else None)
    segmentation = segmentation_node.GetSegmentation()
    ijk_to_ras = volume.geometry.ijk_to_ras()
    for index, label in enumerate(result.labels):
        mask = result.mask(index) if keep_overlapping and result.packed_masks else result.label_map == label.value
        segment_id = segment_id_for(label.name)
        existing = segmentation.GetSegment(segment_id)
        if existing is not None and segment_tag(existing, PROMPT_TAG) is None:
            segment_id = segmentation.GenerateUniqueSegmentID(segment_id)  # someone else's: leave it alone
            existing = None
        if existing is None:
            color = tuple(c / 255.0 for c in label.color)
            segment_id = segmentation.AddEmptySegment(segment_id, label.name, color)
        segment = segmentation.GetSegment(segment_id)
        segment.SetName(label.name)
        segment.SetColor(*(c / 255.0 for c in label.color))
        segment.SetTag(PROMPT_TAG, label.name)
        segment.SetTag("MedicalSAM3.confidence", f"{label.confidence:.3f}")
        if label.terminology:
            segment.SetTerminology(terminology_string(label.terminology))
        image = _oriented_image(mask.astype(np.uint8), ijk_to_ras)
        if not logic.SetBinaryLabelmapToSegment(image, segmentation_node, segment_id,
                                                logic.MODE_REPLACE, image.GetExtent()):
            raise RuntimeError(f"could not write segment {label.name!r}")
    return segmentation_node


def _checked_prompts(prompts: list[str]) -> list[str]:
    if not prompts or any(not isinstance(p, str) or not p.strip() for p in prompts):
        raise InputError("type at least one structure name, e.g. 'liver'")
    return [p.strip() for p in prompts]


def start_segmentation(volume_node, prompts: list[str], options, backend):
    """Start segmenting ``volume_node`` on ``backend`` (a :mod:`.backends` backend) in a worker thread.

    The voxels are copied out of the scene here, on the calling (GUI) thread; the returned
    :class:`~.backends.BackgroundTask` never touches the scene. Bad input raises before anything starts.
    """
    from .backends import BackgroundTask, segment_with

    prompts = _checked_prompts(prompts)
    options.validate()
    volume = volume_from_node(volume_node)
    return BackgroundTask(lambda progress, cancel: segment_with(backend, volume, prompts, options, progress, cancel))


def finish_segmentation(task, volume_node, segmentation_node=None, keep_overlapping: bool = False,
                        segmentations_logic=None):
    """Write a finished task's result as segments (on the GUI thread). A task that failed or was
    cancelled raises its error and leaves the scene exactly as it was."""
    if not task.finished:
        raise RuntimeError("the segmentation is still running")
    if task.error is not None:
        raise task.error
    return write_segments(task.result, volume_node, segmentation_node, keep_overlapping, segmentations_logic)


def segment_volume(volume_node, prompts: list[str], run: Callable[[Volume, list[str]], SegmentationResult],
                   segmentation_node=None, keep_overlapping: bool = False, segmentations_logic=None):
    """Segment ``volume_node`` with ``run`` (the engine, local or remote) and write the segments.

    Nothing in the scene changes unless ``run`` returns a result (a cancel or an error raised by
    ``run`` leaves the scene as it was).
    """
    volume = volume_from_node(volume_node)
    result = run(volume, _checked_prompts(prompts))
    return write_segments(result, volume_node, segmentation_node, keep_overlapping, segmentations_logic)


def segment_mask(segmentation_node, segment_id: str, volume_node) -> np.ndarray:
    """A segment's binary labelmap resampled onto ``volume_node``'s grid, ``(z, y, x)`` bool (for tests
    and for the module's statistics)."""
    slicer = _slicer()
    from vtk.util import numpy_support

    image = slicer.vtkOrientedImageData()
    segmentation_node.GetBinaryLabelmapRepresentation(segment_id, image)
    reference = slicer.vtkOrientedImageData()
    reference_geometry = slicer.vtkSegmentationConverter.SerializeImageGeometry(_oriented_image(
        np.zeros(slicer.util.arrayFromVolume(volume_node).shape, np.uint8),
        volume_from_node(volume_node).geometry.ijk_to_ras()))
    slicer.vtkSegmentationConverter.DeserializeImageGeometry(reference_geometry, reference)
    resampled = slicer.vtkOrientedImageData()
    slicer.vtkOrientedImageDataResample.ResampleOrientedImageToReferenceOrientedImage(image, reference, resampled)
    z, y, x = slicer.util.arrayFromVolume(volume_node).shape
    scalars = resampled.GetPointData().GetScalars()
    if scalars is None:
        return np.zeros((z, y, x), bool)
    return numpy_support.vtk_to_numpy(scalars).reshape(z, y, x) != 0  # this segment alone, as 0/1
