"""Interactive correction in the Segment Editor: clicks and boxes -> engine session -> the selected segment.

Qt-free scene logic (MRML, VTK, numpy), so it runs inside 3D Slicer and, for the tests, on the PyPI
``slicer-core`` package. The Segment Editor effect (``SegmentEditorMedicalSAM3Lib/SegmentEditorEffect.py``)
only turns mouse events into calls of :class:`InteractionQueue` and polls it.

The engine is reached through a *session*: anything with the methods of the engine's
``VolumeSession`` (``MedicalSAM3Core.inference.session``) that this module uses, i.e. ``add_object``,
``seed``, ``refine``, ``propagate``, ``undo`` (and ``axis``, the slice axis, when it has one). In Slicer
it is a :class:`~MedicalSAM3Core.common.remote_session.RemoteSession` of the local engine process or of
a remote server (Slicer's main thread never releases the GIL, so the engine never runs in Slicer's own
process); in the tests it is the engine's ``VolumeSession`` itself.

Rules:

* **Coordinates.** A click is a world (RAS) position in a slice view. It is taken into the volume's own
  space through the inverse of the volume's (linear) parent transform, then to continuous IJK by the
  volume's RAS-to-IJK matrix; the engine wants ``(z, y, x) = (k, j, i)``. Clicks outside the volume
  (beyond the outer voxels' edges) are refused here, with the float IJK (Slicer's ``XyzToIjk``
  rounds with ``int(x + 0.5)``, wrong below zero).
* **Seeding.** The first interaction on a segment adds an engine object and, when the segment has
  voxels (a segment the user drew, or this module's text result), seeds it with them. Key slices
  (the conditioning slices that propagation keeps and tracks from): ``"all"`` when the segment lies on
  at most :data:`FEW_SLICES` slices along the session's slice axis, or on slices with gaps between
  them (both mean a user who drew key slices, each of them deliberate, for propagation to fill in);
  otherwise (a contiguous 3D segment, e.g. from a threshold or a text run) ``"largest"``, the slice of
  largest area, as the engine seeds its own text results, so that Propagate re-tracks the rest.
* **Writing: the Segment Editor's masking.** Every change goes through
  ``vtkSlicerSegmentEditorLogic::ModifySegmentByLabelmap`` with the user's Segment Editor node (in
  Slicer: the effect's ``modifySegmentByLabelmap``, which calls it), never around it, so the editable
  area, the intensity range and the overwrite mode (other segments: all / visible / none) apply
  exactly as for Paint or Draw. It is one ``Set`` per interaction with a modifier that holds the
  segment's new content over the union of its old and new bounding boxes (a ``Set`` clears the
  segment first, so the modifier must carry every voxel that stays; on the slices the engine changed
  the whole slice is replaced by the engine's mask). ``bypassMasking`` is never used. The modifier
  is on the segmentation's reference geometry (resampled, nearest neighbour, when the segmentation's
  grid is not the volume's: otherwise the logic skips the editable-area mask, and with an intensity
  range writes nothing).
* **Undo.** ``saveStateForUndo`` is called once per interaction, right before its one write: one
  Ctrl+Z (the editor's Undo) takes back one click, box or propagation. The editor's history cannot be
  observed from an effect (no getter of its logic or history in Slicer 5.10/5.12), so the engine is
  kept in step by **fingerprints**: each interaction is recorded (:class:`_Step`) with a fingerprint of
  its segment before and after the write and how many engine steps it took. Before the next
  interaction, steps whose segment is back at its *before* fingerprint were undone in the editor:
  ``session.undo()`` is called as many times as they took engine steps (the editor's history and
  the session's are both one stack across segments, so they pop in the same order). A segment that
  matches neither (painted with another effect, or redone with Ctrl+Y: the engine cannot redo) is
  re-seeded from its current voxels, its clicks forgotten. Engine steps of an interaction that wrote
  nothing (refused, cancelled, failed) are undone at once, so the two stacks stay aligned.
* **Never blocking the GUI.** Every engine call runs in a :class:`BackgroundCall` (a Python thread that the
  GUI thread's timer lets run, see its docstring); the GUI thread reads the scene before (segment, seed
  mask) and writes the answer after (:meth:`Workspace.finish`). :class:`InteractionQueue` runs the
  interactions one after another, each prepared only once the one before it is written; undos the
  editor's Ctrl+Z made due are noted at once (:meth:`Workspace.note_undo`) and sent before the next
  engine call. An answer for a segment that changed while the engine worked (Ctrl+Z, painting) is not
  written, and its engine steps are taken back.
* **Prompts** (:class:`Prompt`, the markers on the slice views) mirror what the engine holds for each
  object: a slice's clicks accumulate, a new box replaces the slice's box, a seed forgets them all,
  propagation keeps them, and an interaction undone in the editor restores the ones before it. A segment
  that no longer matches the engine's object (painted, redone) shows none.
* The engine's object keeps the mask it computed where masking refused a voxel; the segment holds
  what the editor allowed. The next click on that slice starts from the engine's mask and the masking
  applies again.
"""

from __future__ import annotations

import hashlib
import threading
import time
from dataclasses import dataclass, field, replace
from typing import Callable, Optional, Sequence

import numpy as np

from MedicalSAM3Core.common.errors import Cancelled, InputError
from MedicalSAM3Core.common.interaction import MaskPatch, check_points
from MedicalSAM3Core.common.progress import CancelToken, ProgressEvent

#: A drawn segment on at most this many slices seeds every one of them as a key slice.
FEW_SLICES = 5
#: Interactions remembered for undo (the Segment Editor module keeps 10 undo states; the engine 100 steps).
MAX_STEPS = 30


def _slicer():
    import slicer

    return slicer


# ------------------------------------------------------------------------------------------ geometry
def _to_numpy(matrix) -> np.ndarray:
    return np.array([[matrix.GetElement(r, c) for c in range(4)] for r in range(4)])


def _to_vtk(array: np.ndarray):
    import vtk

    matrix = vtk.vtkMatrix4x4()
    for r in range(4):
        for c in range(4):
            matrix.SetElement(r, c, float(array[r, c]))
    return matrix


def node_to_world(node) -> np.ndarray:
    """4x4 from the node's own coordinates to world RAS (its parent transforms); identity when it has
    none. A non-linear transform is refused, as the module's text mode does."""
    import vtk

    transform = node.GetParentTransformNode()
    if transform is None:
        return np.eye(4)
    if not transform.IsTransformToWorldLinear():
        raise InputError(f"{node.GetName()!r} is under a non-linear transform ({transform.GetName()}); harden "
                         "the transform first (Data module, right-click)")
    matrix = vtk.vtkMatrix4x4()
    transform.GetMatrixTransformToWorld(matrix)
    return _to_numpy(matrix)


def volume_ijk_to_world(volume_node) -> np.ndarray:
    """4x4 from the volume's IJK to world RAS (its IJK-to-RAS, then its parent transforms)."""
    import vtk

    matrix = vtk.vtkMatrix4x4()
    volume_node.GetIJKToRASMatrix(matrix)
    return node_to_world(volume_node) @ _to_numpy(matrix)


def world_to_zyx(volume_node, ras: Sequence[float]) -> np.ndarray:
    """A world (RAS) position -> continuous voxel indices ``(z, y, x)`` of the volume's array
    (``(k, j, i)``: the centre of voxel ``[k, j, i]`` is ``(k, j, i)``)."""
    ijk = np.linalg.solve(volume_ijk_to_world(volume_node), np.array([*map(float, ras), 1.0]))
    return ijk[2::-1].copy()


def zyx_to_world(volume_node, zyx: Sequence[float]) -> np.ndarray:
    """Continuous voxel indices ``(z, y, x)`` -> world RAS (the inverse of :func:`world_to_zyx`)."""
    return (volume_ijk_to_world(volume_node) @ np.array([zyx[2], zyx[1], zyx[0], 1.0]))[:3]


def inside(zyx: Sequence[float], shape: Sequence[int]) -> bool:
    """Whether a continuous ``(z, y, x)`` lies in the volume (voxel centres at integers, edges at +-0.5)."""
    return all(-0.5 <= float(c) <= n - 0.5 for c, n in zip(zyx, shape))


@dataclass
class VolumeGrid:
    """The source volume's voxel grid: ``shape`` ``(z, y, x)`` and ``ijk_to_segmentation``, 4x4 from its
    IJK to the segmentation node's own coordinates (where the segments' labelmaps live)."""

    shape: tuple
    ijk_to_segmentation: np.ndarray

    @classmethod
    def of(cls, volume_node, segmentation_node) -> "VolumeGrid":
        from .scene import volume_grid

        shape, _ = volume_grid(volume_node)  # checks the volume (scalar, 3D, linear transform)
        to_segmentation = np.linalg.inv(node_to_world(segmentation_node)) @ volume_ijk_to_world(volume_node)
        return cls(tuple(int(n) for n in shape), to_segmentation)


def _box(mask: np.ndarray) -> Optional[tuple]:
    """``(start, stop)`` of the non-zero voxels of a ``(z, y, x)`` mask, None when there are none."""
    hits = [np.flatnonzero(mask.any(axis=tuple(b for b in range(3) if b != a))) for a in range(3)]
    if any(len(h) == 0 for h in hits):
        return None
    return tuple(int(h[0]) for h in hits), tuple(int(h[-1]) + 1 for h in hits)


@dataclass
class Region:
    """A ``(z, y, x)`` bool mask placed at ``start`` on the volume grid (a bounding box of a segment)."""

    start: tuple
    mask: np.ndarray

    @property
    def stop(self) -> tuple:
        return tuple(a + n for a, n in zip(self.start, self.mask.shape))

    @property
    def empty(self) -> bool:
        return self.mask.size == 0 or not self.mask.any()

    def full(self, shape) -> np.ndarray:
        out = np.zeros(shape, dtype=bool)
        if self.mask.size:
            out[tuple(slice(a, b) for a, b in zip(self.start, self.stop))] = self.mask
        return out

    def fingerprint(self) -> str:
        digest = hashlib.sha256(str((tuple(self.start), tuple(self.mask.shape))).encode("ascii"))
        digest.update(np.packbits(self.mask, axis=None).tobytes())
        return digest.hexdigest()[:32]

    @classmethod
    def of(cls, mask: np.ndarray, offset=(0, 0, 0)) -> "Region":
        box = _box(mask)
        if box is None:
            return cls((0, 0, 0), np.zeros((0, 0, 0), bool))
        start, stop = box
        crop = mask[tuple(slice(a, b) for a, b in zip(start, stop))]
        return cls(tuple(int(a + o) for a, o in zip(start, offset)), np.ascontiguousarray(crop, dtype=bool))


def _oriented_image(region_start, mask: np.ndarray, image_to_world: np.ndarray):
    """A ``vtkOrientedImageData`` holding ``mask`` (z, y, x) at IJK extent ``region_start`` onwards."""
    slicer = _slicer()
    import vtk
    from vtk.util import numpy_support

    z0, y0, x0 = (int(v) for v in region_start)
    nz, ny, nx = mask.shape
    image = slicer.vtkOrientedImageData()
    image.SetExtent(x0, x0 + nx - 1, y0, y0 + ny - 1, z0, z0 + nz - 1)
    image.AllocateScalars(vtk.VTK_UNSIGNED_CHAR, 1)
    if mask.size:
        numpy_support.vtk_to_numpy(image.GetPointData().GetScalars())[:] = mask.astype(np.uint8).ravel()
    image.SetImageToWorldMatrix(_to_vtk(image_to_world))
    return image


def _image_array(image) -> Optional[tuple]:
    """``(start (z, y, x), array (z, y, x))`` of a ``vtkOrientedImageData``; None when it holds no voxels."""
    from vtk.util import numpy_support

    x0, x1, y0, y1, z0, z1 = image.GetExtent()
    scalars = image.GetPointData().GetScalars()
    if scalars is None or x1 < x0 or y1 < y0 or z1 < z0:
        return None
    return (z0, y0, x0), numpy_support.vtk_to_numpy(scalars).reshape(z1 - z0 + 1, y1 - y0 + 1, x1 - x0 + 1)


def segment_region(segmentation_node, segment_id: str, grid: VolumeGrid) -> Region:
    """The segment's voxels on the volume grid, cropped to their bounding box.

    When the segment's labelmap is on the volume grid (the usual case: the editor's reference geometry
    is the source volume's) its voxels are read directly; otherwise it is resampled onto the grid."""
    slicer = _slicer()
    import vtk

    if segmentation_node.GetSegmentation().GetSegment(segment_id) is None:
        raise InputError(f"segment {segment_id!r} is no longer in {segmentation_node.GetName()!r}")
    image = slicer.vtkOrientedImageData()
    segmentation_node.GetBinaryLabelmapRepresentation(segment_id, image)
    matrix = vtk.vtkMatrix4x4()
    image.GetImageToWorldMatrix(matrix)
    if np.allclose(_to_numpy(matrix), grid.ijk_to_segmentation, atol=1e-6):
        found = _image_array(image)
        if found is None:
            return Region.of(np.zeros((0, 0, 0), bool))
        start, array = found
        lo = [max(0, s) for s in start]
        hi = [min(n, s + m) for n, s, m in zip(grid.shape, start, array.shape)]
        if any(b <= a for a, b in zip(lo, hi)):
            return Region.of(np.zeros((0, 0, 0), bool))
        crop = array[tuple(slice(a - s, b - s) for a, b, s in zip(lo, hi, start))] != 0
        return Region.of(crop, lo)
    reference = _oriented_image((0, 0, 0), np.zeros(grid.shape, np.uint8), grid.ijk_to_segmentation)
    resampled = slicer.vtkOrientedImageData()
    slicer.vtkOrientedImageDataResample.ResampleOrientedImageToReferenceOrientedImage(image, reference, resampled)
    found = _image_array(resampled)
    if found is None:
        return Region.of(np.zeros((0, 0, 0), bool))
    start, array = found
    return Region.of(array != 0, start)


def reference_geometry(segmentation_node):
    """The segmentation's reference geometry as an (unallocated) ``vtkOrientedImageData``, or None."""
    slicer = _slicer()
    converter = slicer.vtkSegmentationConverter
    text = segmentation_node.GetSegmentation().GetConversionParameter(
        converter.GetReferenceImageGeometryParameterName())
    if not text:
        return None
    image = slicer.vtkOrientedImageData()
    converter.DeserializeImageGeometry(text, image, False)
    return image


def modifier_labelmap(region: Region, grid: VolumeGrid, reference=None):
    """The ``Set`` modifier of a segment's new content ``region``: on the volume grid, or resampled onto
    ``reference`` (the segmentation's reference geometry) when that is another grid."""
    slicer = _slicer()
    image = _oriented_image(region.start, region.mask, grid.ijk_to_segmentation)
    resample = slicer.vtkOrientedImageDataResample
    if reference is None or resample.DoGeometriesMatch(image, reference):
        return image
    out = slicer.vtkOrientedImageData()
    resample.ResampleOrientedImageToReferenceOrientedImage(image, reference, out, False, True)
    return out


def key_slices_for(mask: np.ndarray, axis: int = 0):
    """Key slices to seed a drawn segment with: ``"all"`` for a drawing on few or gapped slices, else
    ``"largest"`` (see the module docstring)."""
    present = np.flatnonzero(mask.any(axis=tuple(a for a in range(3) if a != axis)))
    if len(present) == 0:
        return "largest"
    gapped = present[-1] - present[0] + 1 > len(present)
    return "all" if len(present) <= FEW_SLICES or gapped else "largest"


def new_content(old: Region, patch: MaskPatch, axis: int) -> Region:
    """The segment after ``patch``: ``old`` with the patch's slices replaced by the engine's masks there,
    over the union of both boxes (so that a ``Set`` modifier carries every voxel that stays)."""
    if patch.empty:
        return old
    boxes = [b for b in ((old.start, old.stop) if not old.empty else None, (patch.start, patch.stop)) if b]
    start = tuple(min(b[0][a] for b in boxes) for a in range(3))
    stop = tuple(max(b[1][a] for b in boxes) for a in range(3))
    out = np.zeros(tuple(b - a for a, b in zip(start, stop)), dtype=bool)
    if not old.empty:
        out[tuple(slice(a - s, b - s) for a, b, s in zip(old.start, old.stop, start))] = old.mask
    index = [slice(None)] * 3
    for s in patch.slices:  # the engine's mask of a changed slice is that slice's whole content
        if start[axis] <= s < stop[axis]:
            index[axis] = s - start[axis]
            out[tuple(index)] = False
    if patch.mask.size:
        region = tuple(slice(a - s, b - s) for a, b, s in zip(patch.start, patch.stop, start))
        out[region] = patch.mask
    return Region(start, out)


# ------------------------------------------------------------------------------------------ writing
class EditorLogicWriter:
    """Writes through a ``vtkSlicerSegmentEditorLogic`` (scripts, tests; the effect writes through its own
    ``modifySegmentByLabelmap``, which ends in the same call). ``save_state`` is the editor's
    ``SaveStateForUndo``."""

    def __init__(self, logic, editor_node) -> None:
        self.logic, self.editor_node = logic, editor_node

    def selected(self) -> tuple:
        return self.editor_node.GetSegmentationNode(), self.editor_node.GetSelectedSegmentID()

    def save_state(self) -> None:
        self.logic.SaveStateForUndo()

    def modify(self, segmentation_node, segment_id: str, modifier) -> None:
        logic = self.logic
        logic.ModifySegmentByLabelmap(segmentation_node, segment_id, modifier, logic.ModificationModeSet,
                                      list(modifier.GetExtent()), True, False)


@dataclass
class _Tracked:
    """A segment being corrected: its engine object and the fingerprint the engine's mask matches."""

    object_id: Optional[int]  # None until the engine has added it (the first interaction's job)
    fingerprint: str
    stale: bool = False  # the engine no longer matches the segment: re-seed before the next interaction


@dataclass(frozen=True)
class Prompt:
    """One click (``kind`` ``"point"``, ``zyx`` one position) or box (``"box"``, ``zyx`` its two corners) that
    the engine holds for a segment's object, on ``slice`` (an index along the session's slice axis).
    ``pending``: asked for, not answered yet (not in the engine's state)."""

    kind: str
    slice: int
    zyx: tuple
    positive: bool = True
    pending: bool = False


def _prompts_of(axis: int, points=None, labels=None, box=None) -> tuple:
    """The :class:`Prompt` s of one refine request (continuous ``(z, y, x)``)."""
    out = []
    for point, label in zip(points if points is not None else (), labels if labels is not None else ()):
        zyx = tuple(float(c) for c in point)
        out.append(Prompt("point", int(round(zyx[axis])), zyx, bool(label)))
    if box is not None:
        corners = tuple(tuple(float(c) for c in corner) for corner in box)
        out.append(Prompt("box", int(round(corners[0][axis])), corners))
    return tuple(out)


def _merge_prompts(held: tuple, new: tuple) -> tuple:
    """The engine's rule: a slice's clicks accumulate; a new box replaces that slice's box."""
    boxes = {p.slice for p in new if p.kind == "box"}
    return tuple(p for p in held if not (p.kind == "box" and p.slice in boxes)) + new


@dataclass
class _Step:
    """One interaction written to a segment: one undo state of the editor, ``engine_steps`` in the session."""

    key: tuple
    before: str
    after: str
    engine_steps: int
    created: bool  # the interaction added the engine object (undoing it removes the object)
    reseeded: bool
    prompts_before: tuple = ()  # the segment's prompts before it (restored when it is undone)


@dataclass
class Outcome:
    """What one interaction did: the engine's patch, whether the segment was written, the slices it
    changed, and the voxels the segment gained and lost (after the editor's masking)."""

    patch: Optional[MaskPatch]
    written: bool
    slices: list = field(default_factory=list)
    added: int = 0
    removed: int = 0

    def summary(self) -> str:
        if not self.written:
            return "nothing changed"
        where = f"slice {self.slices[0]}" if len(self.slices) == 1 else f"{len(self.slices)} slices"
        return f"{where}: +{self.added} / -{self.removed} voxels"


@dataclass
class _Pending:
    """An interaction whose engine job was started and whose result is not written yet."""

    key: tuple
    tracked: _Tracked
    kind: str  # "refine" or "propagate"
    created: bool
    reseeded: bool
    before: Region
    prompts_before: tuple
    seeded: bool  # the job seeds the object (the engine forgets its prompts)
    new_prompts: tuple
    engine_steps: int = 0  # known once the job has run
    call: Optional["BackgroundCall"] = None
    previous: tuple = ()  # the tracked segment's (fingerprint, stale) before it


@dataclass
class _JobResult:
    object_id: int
    engine_steps: int
    patch: Optional[MaskPatch]


class EngineOutOfStep(RuntimeError):
    """An undo the engine owed failed (the server went away, ...): what it holds is no longer known."""


class Workspace:
    """One engine session on one source volume and the segments corrected with it (see the module
    docstring). ``writer``: :class:`EditorLogicWriter` or the effect's equivalent (``selected()``,
    ``save_state()``, ``modify(segmentation node, segment id, modifier)``).

    Every engine call of an interaction runs in a :class:`BackgroundCall` (``start_refine``,
    ``start_propagation``; the GUI thread only reads and writes the scene): the undos the editor's Ctrl+Z
    made due, then ``add_object`` / ``seed`` when needed, then the refine or propagate. :meth:`finish`
    writes the answer on the GUI thread. One interaction at a time (:attr:`busy`); :class:`InteractionQueue`
    keeps the order. ``refine``/``propagate`` do both and wait (scripts, tests)."""

    def __init__(self, session, volume_node, writer) -> None:
        self.session, self.volume_node, self.writer = session, volume_node, writer
        self.axis = int(getattr(session, "axis", 0))
        self._tracked: dict[tuple, _Tracked] = {}
        self._steps: list[_Step] = []
        self._pending: Optional[_Pending] = None
        self._prompts: dict[tuple, tuple] = {}
        self._owed = 0  # engine undos due (the editor's Ctrl+Z, abandoned interactions), not sent yet
        self._seen: dict[tuple, Optional[str]] = {}  # fingerprints at the latest check (marker visibility)

    def segment(self, segmentation_node, segment_id: str) -> "InteractiveSegment":
        return InteractiveSegment(self, segmentation_node, segment_id)

    @property
    def busy(self) -> bool:
        """An interaction is under way: the next one waits for it."""
        return self._pending is not None

    @property
    def owed_undos(self) -> int:
        return self._owed

    # -- keeping the engine in step with the editor's undo ----------------------------------------
    def _key(self, segmentation_node, segment_id) -> tuple:
        return segmentation_node.GetID(), segment_id

    def _node(self, key):
        return self.volume_node.GetScene().GetNodeByID(key[0])

    def _fingerprint(self, key) -> Optional[str]:
        node = self._node(key)
        if node is None or node.GetSegmentation().GetSegment(key[1]) is None:
            return None
        return segment_region(node, key[1], VolumeGrid.of(self.volume_node, node)).fingerprint()

    def _undone(self, current: dict) -> int:
        """How many of the latest interactions the editor's Undo took back (see :meth:`sync`)."""
        if not self._steps:
            return 0

        def fingerprint(key):
            if key not in current:
                current[key] = self._fingerprint(key)
            return current[key]

        if fingerprint(self._steps[-1].key) == self._steps[-1].after:
            return 0
        keys = list(dict.fromkeys(step.key for step in self._steps))
        best, best_matches = 0, -1
        for n in range(len(self._steps) + 1):
            expected = {}
            for step in self._steps[len(self._steps) - n:]:  # popped: the earliest one's "before" counts
                expected.setdefault(step.key, step.before)
            for step in reversed(self._steps[:len(self._steps) - n]):  # kept: the latest one's "after"
                expected.setdefault(step.key, step.after)
            matches = sum(fingerprint(key) == expected[key] for key in keys)
            if matches > best_matches:
                best, best_matches = n, matches
        return best

    def note_undo(self) -> int:
        """The bookkeeping of :meth:`sync` without engine calls: the undone interactions are forgotten (their
        prompts too) and their engine steps become :attr:`owed_undos` (sent before the next engine call).
        Also records the tracked segments' fingerprints for :meth:`prompts`. Not while an interaction is
        under way (its :meth:`finish` checks instead): returns 0 then."""
        if self._pending is not None:
            return 0
        current: dict = {}
        n = self._undone(current)
        self._pop(n)
        for key in self._tracked:
            if key not in current:
                current[key] = self._fingerprint(key)
        self._seen = current
        return n

    def sync(self) -> int:
        """Undo in the session what was undone in the editor since the last interaction (waiting for the
        engine); returns how many interactions were taken back.

        The editor's Undo restores whole states: after ``n`` undos each segment that the last ``n``
        interactions wrote is back at its fingerprint from before the earliest of them, and every other
        segment still is as its latest interaction left it. The ``n`` under which most segments are as
        expected is taken (the smallest of equals; 0 when the last interaction's segment still is as it
        wrote it). A segment that matches nothing was changed otherwise (painted, redone): it is
        re-seeded when next used."""
        n = self.note_undo()
        self.settle()
        return n

    def settle(self) -> None:
        """Send the owed undos now (waiting)."""
        while self._owed:
            self._owed -= 1
            self.session.undo()

    def start_settle(self) -> Optional["BackgroundCall"]:
        """Send the owed undos in the background (None when none are owed); pass the call to :meth:`finish`."""
        if not self._owed or self._pending is not None:
            return None
        undos, self._owed = self._owed, 0
        session = self.session

        def run(progress):
            _send_undos(session, undos)

        call = BackgroundCall(run)
        call.kind = "undo"
        return call

    def forget_engine(self) -> None:
        """The engine's state is unknown (an owed undo failed): every segment is re-added when next used."""
        self._tracked.clear()
        self._steps.clear()
        self._prompts.clear()
        self._owed = 0
        self._pending = None

    def _pop(self, n: int) -> None:
        for _ in range(n):
            step = self._steps.pop()
            self._owed += step.engine_steps
            if step.created:
                self._tracked.pop(step.key, None)
                self._prompts.pop(step.key, None)
            else:
                tracked = self._tracked[step.key]
                tracked.fingerprint = step.before
                tracked.stale = tracked.stale or step.reseeded  # the engine is back before that re-seed
                self._prompts[step.key] = step.prompts_before

    # -- prompts (the markers on the slice views) ---------------------------------------------------
    def prompts(self, segmentation_node, segment_id: str) -> tuple:
        """The clicks and boxes the engine holds for the segment, as of the latest :meth:`note_undo` (or
        interaction): empty when the segment no longer matches the engine (painted, or redone), since
        the next interaction re-seeds it and the engine forgets them."""
        key = self._key(segmentation_node, segment_id)
        tracked = self._tracked.get(key)
        if tracked is None or tracked.stale or self._seen.get(key) != tracked.fingerprint:
            return ()
        return self._prompts.get(key, ())

    def pending_prompts(self, segmentation_node, segment_id: str) -> tuple:
        """The prompts of the interaction under way on the segment (``pending=True``)."""
        pending = self._pending
        if pending is None or pending.key != self._key(segmentation_node, segment_id):
            return ()
        return tuple(replace(p, pending=True) for p in pending.new_prompts)

    # -- an interaction ------------------------------------------------------------------------------
    def _selected(self, segmentation_node, segment_id: str) -> bool:
        """Whether the editor's selected segment is this one (its masking treats that one as the edited)."""
        node, selected = self.writer.selected()
        return node is not None and node.GetID() == segmentation_node.GetID() and selected == segment_id

    def _start(self, segmentation_node, segment_id: str, kind: str, act: Callable, new_prompts: tuple = (),
               cancel: Optional[CancelToken] = None) -> "BackgroundCall":
        """Check the selection, note the editor's undos, and start the engine job of one interaction:
        the owed undos, ``add_object``/``seed`` when the engine's object does not match the segment, then
        ``act(session, object_id, progress)``. The job undoes its own steps if it fails."""
        if self._pending is not None:
            raise InputError("wait for the propagation to finish (or cancel it)" if self._pending.kind == "propagate"
                             else "wait for the previous click to be answered")
        if not self._selected(segmentation_node, segment_id):
            raise InputError("select the segment to correct in the Segment Editor first")
        self.note_undo()
        key = self._key(segmentation_node, segment_id)
        grid = VolumeGrid.of(self.volume_node, segmentation_node)
        region = segment_region(segmentation_node, segment_id, grid)
        fingerprint = region.fingerprint()
        tracked, created, reseeded, name, seed = self._tracked.get(key), False, False, None, None
        if tracked is None:
            name = segmentation_node.GetSegmentation().GetSegment(segment_id).GetName()
            tracked, created = _Tracked(None, fingerprint), True
        elif tracked.fingerprint != fingerprint or tracked.stale:
            reseeded = True
        if (created and not region.empty) or reseeded:
            full = region.full(grid.shape)  # read here, on the GUI thread: the job never reads the scene
            seed = (full, key_slices_for(full, self.axis))
        undos, self._owed = self._owed, 0
        session, object_id = self.session, tracked.object_id

        def run(progress):
            _send_undos(session, undos)
            steps, oid = 0, object_id
            try:
                if name is not None:
                    oid = int(session.add_object(name))
                    steps += 1
                if seed is not None:
                    session.seed(oid, *seed)
                    steps += 1
                patch = act(session, oid, progress)
            except BaseException as error:
                try:
                    _send_undos(session, steps)
                except EngineOutOfStep as lost:
                    raise lost from error
                raise
            return _JobResult(oid, steps + 1, patch)

        previous = (tracked.fingerprint, tracked.stale)
        tracked.fingerprint, tracked.stale = fingerprint, False
        self._tracked[key] = tracked
        pending = _Pending(key, tracked, kind, created, reseeded, region, self._prompts.get(key, ()),
                           seed is not None, new_prompts, previous=previous)
        self._pending = pending
        pending.call = BackgroundCall(run, cancel)
        pending.call.kind = kind
        pending.call.key = key
        return pending.call

    def _restore(self, owe: bool) -> None:
        """Forget the interaction under way (nothing was written); ``owe``: its engine steps are undone later."""
        pending, self._pending = self._pending, None
        if pending is None:
            return
        if owe:
            self._owed += pending.engine_steps
        if pending.created:
            self._tracked.pop(pending.key, None)
        elif pending.reseeded:
            pending.tracked.stale = True
        else:
            pending.tracked.fingerprint, pending.tracked.stale = pending.previous

    def finish(self, call: "BackgroundCall") -> Outcome:
        """Write the answer of a finished job (on the GUI thread) as one undoable step; a cancelled, failed or
        refused one raises (nothing written, the engine taken back). Also takes an undo job
        (:meth:`start_settle`), which writes nothing."""
        if not call.finished:
            raise RuntimeError("the engine is still working on it")
        if getattr(call, "kind", None) == "undo":
            if call.error is not None:
                self.forget_engine()
                raise call.error
            return Outcome(None, False)
        pending = self._pending
        if pending is None or pending.call is not call:
            raise RuntimeError("this call is not the interaction under way")
        if call.error is not None:
            if isinstance(call.error, EngineOutOfStep):
                self.forget_engine()
            else:
                self._restore(owe=False)  # the job undid its own steps
            raise call.error
        result: _JobResult = call.result
        pending.engine_steps = result.engine_steps
        pending.tracked.object_id = result.object_id
        node = self._node(pending.key)
        if node is None or node.GetSegmentation().GetSegment(pending.key[1]) is None:
            self._restore(owe=True)
            raise InputError("the segment was removed meanwhile; nothing was written")
        # Ctrl+Z (or painting) while the engine worked: its answer is for a segment that is no longer there
        current: dict = {}
        undone = self._undone(current)
        if undone or self._fingerprint(pending.key) != pending.before.fingerprint():
            self._restore(owe=True)
            self._pop(undone)
            raise InputError("the segment changed while the engine was working; nothing was written")
        return self._write(node, pending.key[1], result.patch)

    def _write(self, segmentation_node, segment_id: str, patch: MaskPatch) -> Outcome:
        """Write the engine's ``patch`` as one undoable step (or take the engine's steps back if that fails)."""
        pending = self._pending
        try:
            if not self._selected(segmentation_node, segment_id):
                raise InputError("another segment was selected meanwhile; nothing was written")
            if patch is None or patch.empty:
                self._restore(owe=True)
                return Outcome(patch, False)
            grid = VolumeGrid.of(self.volume_node, segmentation_node)
            before = pending.before
            region = new_content(before, patch, self.axis)
            modifier = modifier_labelmap(region, grid, reference_geometry(segmentation_node))
            self.writer.save_state()
            self.writer.modify(segmentation_node, segment_id, modifier)
        except BaseException:
            self._restore(owe=True)
            raise
        self._pending = None
        after = segment_region(segmentation_node, segment_id, grid)
        old, new = before.full(grid.shape), after.full(grid.shape)
        pending.tracked.fingerprint = after.fingerprint()
        self._seen[pending.key] = pending.tracked.fingerprint
        held = () if pending.seeded else pending.prompts_before
        self._prompts[pending.key] = _merge_prompts(held, pending.new_prompts)
        self._steps.append(_Step(pending.key, before.fingerprint(), pending.tracked.fingerprint, pending.engine_steps,
                                 pending.created, pending.reseeded, pending.prompts_before))
        del self._steps[:-MAX_STEPS]
        return Outcome(patch, True, list(patch.slices), int((new & ~old).sum()), int((old & ~new).sum()))

    # -- interactions -------------------------------------------------------------------------------
    def start_refine(self, segmentation_node, segment_id: str, points=None, labels=None, box=None
                     ) -> "BackgroundCall":
        """Clicks and/or a box (continuous ``(z, y, x)``) in the background; pass the call to :meth:`finish`."""
        pts, lab, corners = check_points(points, labels, box)  # refused at once, before any engine call
        prompts = _prompts_of(self.axis, pts, lab, corners)
        return self._start(segmentation_node, segment_id, "refine",
                           lambda session, oid, progress: session.refine(oid, points=points, labels=labels,
                                                                         box=box),
                           prompts)

    def refine(self, segmentation_node, segment_id: str, points=None, labels=None, box=None,
               timeout: Optional[float] = None) -> Outcome:
        """:meth:`start_refine` and :meth:`finish`, waiting (scripts and tests)."""
        call = self.start_refine(segmentation_node, segment_id, points, labels, box)
        call.wait(timeout)
        return self.finish(call)

    def start_propagation(self, segmentation_node, segment_id: str, first=None, last=None) -> "BackgroundCall":
        """Re-track the segment in the background: returns a :class:`BackgroundCall` to poll; once it has
        finished, pass it to :meth:`finish` (which writes the result or takes the engine's steps back)."""
        cancel = CancelToken()
        return self._start(segmentation_node, segment_id, "propagate",
                           lambda session, oid, progress: session.propagate(oid, progress=progress, cancel=cancel,
                                                                            first=first, last=last),
                           cancel=cancel)

    def finish_propagation(self, call: "BackgroundCall") -> Outcome:
        """Write a finished propagation; a cancelled or failed one raises its error (nothing written)."""
        return self.finish(call)

    def propagate(self, segmentation_node, segment_id: str, first=None, last=None, timeout: Optional[float] = None
                  ) -> Outcome:
        """:meth:`start_propagation` and :meth:`finish_propagation`, waiting (scripts and tests)."""
        call = self.start_propagation(segmentation_node, segment_id, first, last)
        call.wait(timeout)
        return self.finish_propagation(call)

    def start_prepare(self, slice_index: int, segmentation_node=None, segment_id: Optional[str] = None
                      ) -> Optional["BackgroundCall"]:
        """Have the engine compute a slice's features ahead of the first click on it (None when the session
        cannot, or an interaction or owed undo comes first). With the segment's object when it has one (its
        intensity window), else the session's default (which new objects get)."""
        if self._pending is not None or self._owed or not hasattr(self.session, "prepare"):
            return None
        tracked = None if segmentation_node is None else self._tracked.get(self._key(segmentation_node, segment_id))
        object_id = None if tracked is None else tracked.object_id
        session = self.session
        call = BackgroundCall(lambda progress: session.prepare([int(slice_index)], object_id))
        call.kind = "prepare"
        return call

    def cancel(self) -> None:
        """Abandon an interaction whose result was not written (e.g. the effect was closed meanwhile): its
        call is cancelled; its engine steps are owed."""
        pending = self._pending
        if pending is None:
            return
        if pending.call is not None:
            pending.call.cancel()
        self._restore(owe=True)


def _send_undos(session, n: int) -> None:
    for done in range(n):
        try:
            session.undo()
        except BaseException as error:
            raise EngineOutOfStep(f"the engine could not take back {n - done} step(s): {error}") from error


class InteractiveSegment:
    """The interactive controller of one (segmentation node, segment, source volume): clicks and boxes at
    world positions, propagation; each interaction is one undoable write (see the module docstring)."""

    def __init__(self, workspace: Workspace, segmentation_node, segment_id: str) -> None:
        self.workspace, self.segmentation_node, self.segment_id = workspace, segmentation_node, segment_id

    @property
    def volume_node(self):
        return self.workspace.volume_node

    def _voxel(self, ras) -> np.ndarray:
        zyx = world_to_zyx(self.volume_node, ras)
        shape = VolumeGrid.of(self.volume_node, self.segmentation_node).shape
        if not inside(zyx, shape):
            raise InputError("click inside the source volume")
        return zyx

    def click_prompt(self, ras, positive: bool = True) -> dict:
        """The refine arguments of a click at world position ``ras`` (refused outside the volume)."""
        return {"points": [self._voxel(ras)], "labels": [1 if positive else 0]}

    def box_prompt(self, ras_a, ras_b) -> dict:
        """The refine arguments of a box from two opposite corners (world positions) on one slice; a corner
        dragged past the volume's edge is pulled back onto it (a corner clicked outside is refused)."""
        self._voxel(ras_a)
        shape = VolumeGrid.of(self.volume_node, self.segmentation_node).shape
        edge = np.array(shape, float) - 0.5
        return {"box": [np.clip(world_to_zyx(self.volume_node, ras), -0.5, edge) for ras in (ras_a, ras_b)]}

    def click(self, ras, positive: bool = True) -> Outcome:
        """A positive (the structure is here) or negative click at world position ``ras``."""
        return self.refine(**self.click_prompt(ras, positive))

    def box(self, ras_a, ras_b) -> Outcome:
        """A box from two opposite corners (world positions) on one slice (see :meth:`box_prompt`)."""
        return self.refine(**self.box_prompt(ras_a, ras_b))

    def refine(self, points=None, labels=None, box=None) -> Outcome:
        """Points/box in continuous voxel indices ``(z, y, x)``."""
        return self.workspace.refine(self.segmentation_node, self.segment_id, points, labels, box)

    def propagate(self, first=None, last=None, timeout=None) -> Outcome:
        return self.workspace.propagate(self.segmentation_node, self.segment_id, first, last, timeout)

    def start_propagation(self, first=None, last=None) -> "BackgroundCall":
        return self.workspace.start_propagation(self.segmentation_node, self.segment_id, first, last)


# ------------------------------------------------------------------------------------------ background
class BackgroundCall:
    """``function(progress)`` in a Python thread, polled from the GUI thread's timer.

    The work it does (waiting for an engine task on a server, uploading a volume) is mostly in sockets,
    which release the GIL; but Slicer's main thread holds the GIL while idle in Qt's event loop, so the
    timer's callback calls :meth:`poll`, which gives the thread ``yield_s`` of the GIL each tick. Read
    :attr:`progress`, :attr:`finished`, then :attr:`result` or :attr:`error`; :meth:`cancel` sets the
    :class:`CancelToken` the function was given (a server task is cancelled on the server)."""

    def __init__(self, function: Callable, cancel: Optional[CancelToken] = None) -> None:
        self.cancel_token = cancel or CancelToken()
        self.progress: Optional[ProgressEvent] = None
        self.result = None
        self.error: Optional[BaseException] = None
        self.key = None
        self.kind: Optional[str] = None  # "refine", "propagate", "undo", "prepare" (what the job is)
        self._done = threading.Event()
        self._thread = threading.Thread(target=self._run, args=(function,), daemon=True,
                                        name="MedicalSAM3 interactive")
        self._thread.start()

    def _run(self, function) -> None:
        try:
            self.result = function(self._report)
        except BaseException as error:  # reported to the GUI thread, which raises it
            self.error = error
        finally:
            self._done.set()

    def _report(self, event: ProgressEvent) -> None:
        self.progress = event

    @property
    def finished(self) -> bool:
        return self._done.is_set()

    @property
    def cancelled(self) -> bool:
        return isinstance(self.error, Cancelled)

    def cancel(self) -> None:
        self.cancel_token.cancel()

    def poll(self, yield_s: float = 0.02) -> bool:
        """Let the thread run for up to ``yield_s`` (releasing the GIL); True once it has finished."""
        self._done.wait(yield_s)
        return self.finished

    def wait(self, timeout: Optional[float] = None) -> bool:
        deadline = None if timeout is None else time.monotonic() + timeout
        while not self.finished:
            if deadline is not None and time.monotonic() >= deadline:
                return False
            self.poll(0.05)
        return True


def open_session(backend, volume_node, options=None) -> BackgroundCall:
    """Open an engine session on ``volume_node`` on ``backend`` (a :mod:`.backends` ``LocalServer`` or
    ``RemoteServer``) in the background: the local engine may have to start and the volume is uploaded.
    The call's :attr:`~BackgroundCall.result` is the session
    (:class:`~MedicalSAM3Core.common.remote_session.RemoteSession`, from ``Client.open_session``)."""
    from .scene import volume_from_node

    volume = volume_from_node(volume_node)  # copied here, on the GUI thread: the thread never reads the scene
    cancel = CancelToken()

    def run(progress):
        client = backend.client(cancel)
        if not hasattr(client, "open_session"):
            raise InputError("this version of the Medical SAM3 engine has no interactive sessions; update it")
        return client.open_session(volume, options, cancel=cancel)

    return BackgroundCall(run, cancel)


# ------------------------------------------------------------------------------------------ the queue
#: Seconds the mouse must rest on a slice before the engine is asked to prepare it.
PREPARE_DELAY_S = 0.4
#: Prepared slices remembered per session (the engine's feature cache keeps its own, larger, LRU).
PREPARED_KEPT = 64


@dataclass
class Request:
    """One interaction asked for in the effect, not yet started: ``kind`` ``"refine"`` (``arguments``: the
    refine's points/labels/box) or ``"propagate"``; ``prompts`` are shown (pending) until it is answered."""

    kind: str
    segmentation_node: object
    segment_id: str
    arguments: dict = field(default_factory=dict)
    prompts: tuple = ()

    @property
    def key(self) -> tuple:
        return self.segmentation_node.GetID(), self.segment_id


@dataclass
class Event:
    """What a finished interaction did, for the status line: its ``outcome`` or its ``error``."""

    request: Optional[Request]
    outcome: Optional[Outcome] = None
    error: Optional[BaseException] = None

    @property
    def cancelled(self) -> bool:
        return isinstance(self.error, Cancelled)


class InteractionQueue:
    """Clicks, boxes and propagations of one :class:`Workspace`, run one after another in the background,
    never two at once; polled by the effect's timer (:meth:`poll`), which writes each answer on the GUI
    thread. An interaction is *prepared* (undo check, seed, ...) only when the one before it has been
    written, since that write changes the segment it starts from.

    When idle it sends the undos that the editor's Ctrl+Z made due (:meth:`check`), then, if asked with
    :meth:`hover`, has the engine prepare the slice under the mouse (:data:`PREPARE_DELAY_S` after the mouse
    came to rest on it; at most one at a time; each slice once), so that the first click there is fast."""

    def __init__(self, workspace: Workspace, prepare: bool = True, clock: Callable[[], float] = time.monotonic
                 ) -> None:
        self.workspace, self.prepare_enabled, self.clock = workspace, prepare, clock
        self._queue: list[Request] = []
        self._call: Optional[BackgroundCall] = None
        self._request: Optional[Request] = None  # the request of ``_call`` (None: an undo or prepare job)
        self._check_due = False
        self._wanted: Optional[tuple] = None  # (slice, since, segmentation node, segment id)
        self._prepared: list[int] = []

    # -- asking --------------------------------------------------------------------------------------
    def _segment(self, segmentation_node, segment_id) -> InteractiveSegment:
        if self.propagating:
            raise InputError("wait for the propagation to finish (or cancel it)")
        return self.workspace.segment(segmentation_node, segment_id)

    def click(self, segmentation_node, segment_id: str, ras, positive: bool = True) -> Request:
        """Queue a click at world position ``ras`` (refused at once outside the volume or while propagating)."""
        arguments = self._segment(segmentation_node, segment_id).click_prompt(ras, positive)
        return self._add(Request("refine", segmentation_node, segment_id, arguments,
                                 _prompts_of(self.workspace.axis, **arguments)))

    def box(self, segmentation_node, segment_id: str, ras_a, ras_b) -> Request:
        arguments = self._segment(segmentation_node, segment_id).box_prompt(ras_a, ras_b)
        return self._add(Request("refine", segmentation_node, segment_id, arguments,
                                 _prompts_of(self.workspace.axis, **arguments)))

    def propagate(self, segmentation_node, segment_id: str, first=None, last=None) -> Request:
        self._segment(segmentation_node, segment_id)
        return self._add(Request("propagate", segmentation_node, segment_id, {"first": first, "last": last}))

    def _add(self, request: Request) -> Request:
        self._queue.append(request)
        return request

    def hover(self, ras, segmentation_node=None, segment_id: Optional[str] = None) -> Optional[int]:
        """The mouse is at world position ``ras`` on a slice view: prepare its slice once it rests there.
        Returns the slice (None outside the volume)."""
        if not self.prepare_enabled:
            return None
        volume = self.workspace.volume_node
        image = volume.GetImageData() if volume is not None else None
        if image is None:
            return None
        zyx = world_to_zyx(volume, ras)
        if not inside(zyx, tuple(image.GetDimensions())[::-1]):
            self._wanted = None
            return None
        s = int(round(float(zyx[self.workspace.axis])))
        if self._wanted is None or self._wanted[0] != s:
            self._wanted = (s, self.clock(), segmentation_node, segment_id)
        return s

    def check(self) -> None:
        """The segmentation changed (maybe the editor's Ctrl+Z): keep the engine and the prompts in step
        (now, or once the interaction under way is answered)."""
        if self.workspace.busy:
            self._check_due = True
        else:  # also while an undo or prepare job runs: the newly due undos are sent after it, in order
            self.workspace.note_undo()

    def cancel(self) -> None:
        """Drop the queued interactions and cancel a running propagation (a click's answer still comes)."""
        self._queue.clear()
        if self._call is not None and self._request is not None and self._request.kind == "propagate":
            self._call.cancel()

    def close(self) -> None:
        """Stop: queued interactions are dropped, the one under way is abandoned (nothing more is written)."""
        self._queue.clear()
        if self._call is not None:
            self._call.cancel()
        self.workspace.cancel()
        self._call = self._request = None

    # -- state ---------------------------------------------------------------------------------------
    @property
    def propagating(self) -> bool:
        return (self._request is not None and self._request.kind == "propagate") or any(
            r.kind == "propagate" for r in self._queue)

    @property
    def working(self) -> bool:
        """An interaction is under way or queued (the effect says "working...")."""
        return self._request is not None or bool(self._queue)

    @property
    def queued(self) -> int:
        return len(self._queue)

    @property
    def progress(self) -> Optional[ProgressEvent]:
        return None if self._call is None or self._request is None else self._call.progress

    @property
    def active(self) -> bool:
        """Whether :meth:`poll` has anything to do (the effect's timer runs while it has)."""
        return (self._call is not None or bool(self._queue) or self._check_due or self.workspace.owed_undos > 0
                or self._prepare_wanted())

    def _prepare_wanted(self) -> bool:
        return self.prepare_enabled and self._wanted is not None and self._wanted[0] not in self._prepared

    def prompts(self, segmentation_node, segment_id: str) -> tuple:
        """The segment's prompts to show: those the engine holds, then (``pending``) those of the interaction
        under way and of the queued ones."""
        key = (segmentation_node.GetID(), segment_id)
        out = self.workspace.prompts(segmentation_node, segment_id) + self.workspace.pending_prompts(
            segmentation_node, segment_id)
        for request in self._queue:
            if request.key == key:
                out += tuple(replace(p, pending=True) for p in request.prompts)
        return out

    # -- the timer's work ----------------------------------------------------------------------------
    def poll(self, yield_s: float = 0.02) -> list[Event]:
        """Let the job under way run a moment; once it is answered, write it; then start the next job.
        Returns the finished interactions (usually none)."""
        events: list[Event] = []
        if self._call is not None:
            if not self._call.poll(yield_s):
                return events
            events.extend(self._finished())
        while self._call is None and self._start_next(events):
            pass
        return events

    def _finished(self) -> list[Event]:
        call, request = self._call, self._request
        self._call = self._request = None
        if call.kind == "prepare":
            if call.error is not None:  # an older engine, a busy session: no harm, the click computes them
                self.prepare_enabled = not isinstance(call.error, (AttributeError, NotImplementedError))
            return []
        if request is not None and request.kind == "propagate":
            self.forget_prepared()
        try:
            outcome = self.workspace.finish(call)
        except BaseException as error:  # noqa: BLE001 - reported to the user, the engine is in step again
            return [Event(request, error=error)] if request is not None else [Event(None, error=error)]
        finally:
            if self._check_due:
                self._check_due = False
                self.workspace.note_undo()
        return [Event(request, outcome)] if request is not None else []

    def _start_next(self, events: list) -> bool:
        """Start the next job; False when there is none (True also when a request was refused at once, so
        that the one after it starts)."""
        if self._check_due:
            self._check_due = False
            self.workspace.note_undo()
        if self._queue:
            request = self._queue.pop(0)
            workspace = self.workspace
            try:
                if request.kind == "propagate":
                    call = workspace.start_propagation(request.segmentation_node, request.segment_id,
                                                       **request.arguments)
                else:
                    call = workspace.start_refine(request.segmentation_node, request.segment_id,
                                                  **request.arguments)
            except BaseException as error:  # noqa: BLE001 - e.g. another segment is selected now
                events.append(Event(request, error=error))
                return True
            self._call, self._request = call, request
            return True
        call = self.workspace.start_settle()
        if call is not None:
            self._call = call
            return True
        if self._prepare_wanted() and self.clock() - self._wanted[1] >= PREPARE_DELAY_S:
            s, _, node, segment_id = self._wanted
            call = self.workspace.start_prepare(s, node, segment_id)
            self._prepared = (self._prepared + [s])[-PREPARED_KEPT:]
            if call is not None:
                self._call = call
                return True
        return False

    def forget_prepared(self) -> None:
        """The engine may have dropped its features (e.g. after a propagation): prepare again when asked."""
        self._prepared.clear()
