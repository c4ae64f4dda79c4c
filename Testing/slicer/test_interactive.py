"""Interactive correction (the Segment Editor effect's scene logic) on a real MRML scene (slicer-core).

Writes go through the real ``vtkSlicerSegmentEditorLogic::ModifySegmentByLabelmap`` with a Segment Editor
node carrying the masking settings, as the effect's ``modifySegmentByLabelmap`` does inside Slicer; the
engine is a small fake with the ``VolumeSession`` protocol (deterministic masks), and at the end the real
``VolumeSession`` on the tiny model."""

from __future__ import annotations

import threading
import time
import types

import numpy as np
import pytest

import slicer
import slicer.util
import vtk

from MedicalSAM3Core.common.errors import Cancelled, InputError
from MedicalSAM3Core.common.interaction import MaskPatch, check_points
from MedicalSAM3Lib.interactive import (FEW_SLICES, PREPARE_DELAY_S, EditorLogicWriter, InteractionQueue, Region,
                                        VolumeGrid, Workspace, inside,
                                        key_slices_for, modifier_labelmap, reference_geometry, segment_region,
                                        world_to_zyx, zyx_to_world)
from MedicalSAM3Lib.scene import _oriented_image
from phantoms import GRIDS, make_phantom

SHAPE = make_phantom().shape  # (10, 40, 48)
R = 3  # the fake engine's click square: +-R voxels


class FakeSession:
    """The ``VolumeSession`` protocol with predictable masks: a positive click adds a square of +-R voxels
    around it on its slice, a negative one removes it, a box fills the box; propagation copies the mask of
    the lowest conditioning slice to every other slice; one history entry per call, as the engine."""

    axis = 0

    def __init__(self, shape=SHAPE):
        self.shape, self.objects, self.history, self.calls = shape, {}, [], []
        self.conditioning = {}

    def _patch(self, oid, slices, stage):
        if not slices:
            return MaskPatch(oid, (0, 0, 0), np.zeros((0, 0, 0), bool), [], stage)
        lo, hi = min(slices), max(slices)
        return MaskPatch(oid, (lo, 0, 0), self.objects[oid][lo:hi + 1].copy(), sorted(slices), stage)

    def add_object(self, name=""):
        oid = max(self.objects, default=0) + 1
        self.objects[oid], self.conditioning[oid] = np.zeros(self.shape, bool), set()
        self.history.append((oid, None))
        self.calls.append(("add_object", name))
        return oid

    def _save(self, oid):
        self.history.append((oid, (self.objects[oid].copy(), set(self.conditioning[oid]))))

    def seed(self, oid, mask, key_slices="largest"):
        assert mask.shape == self.shape and mask.dtype == bool
        self._save(oid)
        self.calls.append(("seed", key_slices))
        self.objects[oid] = mask.copy()
        present = [int(s) for s in np.flatnonzero(mask.any(axis=(1, 2)))]
        self.conditioning[oid] = set(present) if key_slices == "all" else {
            max(present, key=lambda s: mask[s].sum())} if present else set()
        return self._patch(oid, present, "seed")

    def refine(self, oid, points=None, labels=None, box=None, replace_prompts=False):
        pts, lab, corners = check_points(points, labels, box)
        everything = pts if corners is None else np.concatenate([pts, corners])
        slices = set(np.round(everything[:, 0]).astype(int))
        if len(slices) != 1:
            raise InputError("the points and box of one interaction must lie on one slice")
        z = slices.pop()
        self._save(oid)
        self.calls.append(("refine", z))
        m = self.objects[oid]
        if corners is not None:
            (y0, x0), (y1, x1) = np.round(corners[:, 1:].min(0)).astype(int), np.round(corners[:, 1:].max(0)).astype(int)
            m[z] = False
            m[z, y0:y1 + 1, x0:x1 + 1] = True
        for (_, y, x), label in zip(pts, lab):
            y, x = int(round(y)), int(round(x))
            m[z, max(0, y - R):y + R + 1, max(0, x - R):x + R + 1] = bool(label)
        self.conditioning[oid].add(z)
        return self._patch(oid, [z], "refine")

    slow = False  # propagate waits for a cancel (up to 10 s)

    def propagate(self, oid, progress=None, cancel=None, first=None, last=None):
        deadline = time.monotonic() + (10 if self.slow else 0)
        while time.monotonic() < deadline and not cancel.cancelled:
            time.sleep(0.01)
        if cancel is not None and cancel.cancelled:
            raise Cancelled("cancelled")
        source = min(self.conditioning[oid])
        self._save(oid)
        self.calls.append(("propagate", source))
        m = self.objects[oid]
        changed = [s for s in range(self.shape[0]) if s not in self.conditioning[oid]
                   and not np.array_equal(m[s], m[source])]
        for s in changed:
            m[s] = m[source]
        return self._patch(oid, changed, "propagate")

    def undo(self):
        if not self.history:
            return None
        oid, before = self.history.pop()
        self.calls.append(("undo", oid))
        if before is None:
            del self.objects[oid]
        else:
            self.objects[oid], self.conditioning[oid] = before
        return None


@pytest.fixture
def editor(scene):
    """A source volume, a segmentation with a user-drawn segment "A" and another segment "B", and the
    Segment Editor's node and logic (undo states kept, as the Segment Editor module sets them);
    ``session(volume node)`` makes the engine session (default: :class:`FakeSession`)."""

    def make(grid="RAS", session=None):
        volume = slicer.util.addVolumeFromArray(make_phantom(), ijkToRAS=GRIDS[grid], name="ct")
        node = scene.mrml.AddNewNodeByClass("vtkMRMLSegmentationNode", "seg")
        node.CreateDefaultDisplayNodes()
        node.SetReferenceImageGeometryParameterFromVolumeNode(volume)
        segmentation = node.GetSegmentation()
        a, b = segmentation.AddEmptySegment("A", "A"), segmentation.AddEmptySegment("B", "B")
        editor_node = scene.mrml.AddNewNodeByClass("vtkMRMLSegmentEditorNode")
        logic = slicer.vtkSlicerSegmentEditorLogic()
        logic.SetMRMLScene(scene.mrml)
        logic.SetMRMLApplicationLogic(scene.application)
        logic.SetSegmentEditorNode(editor_node)
        editor_node.SetAndObserveSegmentationNode(node)
        logic.SetSourceVolumeNode(volume)
        logic.SetMaximumNumberOfUndoStates(10)
        editor_node.SetSelectedSegmentID(a)
        env = types.SimpleNamespace(volume=volume, node=node, a=a, b=b, editor=editor_node, logic=logic,
                                    ijk_to_ras=GRIDS[grid],
                                    session=session(volume) if callable(session) else FakeSession())
        env.put = lambda sid, mask: _put(scene, env, sid, mask)
        env.get = lambda sid: segment_region(node, sid, VolumeGrid.of(volume, node)).full(SHAPE)
        env.workspace = Workspace(env.session, volume, EditorLogicWriter(logic, editor_node))
        env.segment = env.workspace.segment(node, a)
        return env

    return make


def _put(scene, env, sid, mask):
    image = _oriented_image(mask.astype(np.uint8), env.ijk_to_ras)
    assert scene.segmentations.SetBinaryLabelmapToSegment(image, env.node, sid, scene.segmentations.MODE_REPLACE,
                                                          image.GetExtent())


def _square(z, y, x, r=R):
    m = np.zeros(SHAPE, bool)
    m[z, max(0, y - r):y + r + 1, max(0, x - r):x + r + 1] = True
    return m


def _ras(env, z, y, x):
    return zyx_to_world(env.volume, (z, y, x))


B_BLOCK = (slice(3, 7), slice(18, 26), slice(20, 28))


@pytest.fixture
def drawn(editor):
    """A: a user's drawing on slices 4 and 5; B: a block overlapping where the click will add to A."""
    env = editor()
    a = np.zeros(SHAPE, bool)
    a[4:6, 10:14, 10:14] = True
    b = np.zeros(SHAPE, bool)
    b[B_BLOCK] = True
    env.put(env.a, a)
    env.put(env.b, b)
    env.a0, env.b0 = a, b
    return env


# ---------------------------------------------------------------------------------------- coordinates
@pytest.mark.parametrize("grid", sorted(GRIDS))
def test_a_click_on_a_voxel_centre_maps_to_k_j_i(scene, grid):
    volume = slicer.util.addVolumeFromArray(make_phantom(), ijkToRAS=GRIDS[grid], name="ct")
    for i, j, k in [(0, 0, 0), (5, 7, 3), (47, 39, 9), (12, 30, 6)]:
        ras = (GRIDS[grid] @ np.array([i, j, k, 1.0]))[:3]
        np.testing.assert_allclose(world_to_zyx(volume, ras), (k, j, i), atol=1e-9)
        assert inside(world_to_zyx(volume, ras), SHAPE)
    outside = (GRIDS[grid] @ np.array([-0.7, 3, 3, 1.0]))[:3]
    assert not inside(world_to_zyx(volume, outside), SHAPE)


def test_a_click_follows_the_volumes_parent_transform(scene):
    volume = slicer.util.addVolumeFromArray(make_phantom(), ijkToRAS=GRIDS["oblique"], name="ct")
    transform = scene.mrml.AddNewNodeByClass("vtkMRMLLinearTransformNode")
    to_parent = np.eye(4)
    to_parent[:3, :3] = np.linalg.qr(np.array([[1.0, 0.2, 0.0], [0.1, 1.0, 0.3], [0.0, -0.2, 1.0]]))[0]
    to_parent[:3, 3] = (5.0, -7.0, 12.0)
    transform.SetMatrixTransformToParent(slicer.util.vtkMatrixFromArray(to_parent))
    volume.SetAndObserveTransformNodeID(transform.GetID())
    i, j, k = 20, 11, 4
    world = (to_parent @ GRIDS["oblique"] @ np.array([i, j, k, 1.0]))[:3]
    np.testing.assert_allclose(world_to_zyx(volume, world), (k, j, i), atol=1e-9)
    np.testing.assert_allclose(zyx_to_world(volume, (k, j, i)), world, atol=1e-9)


# ---------------------------------------------------------------------------------------- seeding
def test_key_slices_of_a_drawn_segment():
    few, many, gapped = (np.zeros(SHAPE, bool) for _ in range(3))
    few[4:6, 5:9, 5:9] = True
    many[1:1 + FEW_SLICES + 1, 5:9, 5:9] = True
    gapped[[1, 3, 5, 7, 9, 8], 5:9, 5:9] = True
    assert key_slices_for(few) == "all"
    assert key_slices_for(many) == "largest"
    assert key_slices_for(gapped) == "all"  # key slices with gaps, for propagation to fill


def test_first_click_seeds_the_engine_with_the_users_drawing(drawn):
    env = drawn
    outcome = env.segment.click(_ras(env, 5, 30, 40))
    assert env.session.calls[:3] == [("add_object", "A"), ("seed", "all"), ("refine", 5)]
    assert outcome.written and outcome.slices == [5]
    expected = env.a0 | _square(5, 30, 40)
    np.testing.assert_array_equal(env.get(env.a), expected)  # the drawing on slices 4 and 5 is kept
    np.testing.assert_array_equal(env.session.objects[1], expected)
    assert outcome.added == int(_square(5, 30, 40).sum()) and outcome.removed == 0
    env.segment.click(_ras(env, 5, 11, 11), positive=False)  # the next click does not seed again
    assert [c[0] for c in env.session.calls] == ["add_object", "seed", "refine", "refine"]
    np.testing.assert_array_equal(env.get(env.a), expected & ~_square(5, 11, 11))


def test_an_empty_segment_is_not_seeded(editor):
    env = editor()
    env.segment.click(_ras(env, 2, 20, 20))
    assert [c[0] for c in env.session.calls] == ["add_object", "refine"]
    np.testing.assert_array_equal(env.get(env.a), _square(2, 20, 20))


def test_a_segment_painted_meanwhile_is_reseeded(drawn):
    env = drawn
    env.segment.click(_ras(env, 5, 30, 40))
    painted = env.get(env.a)
    painted[8, 2:5, 2:5] = True  # the user paints with another effect
    env.put(env.a, painted)
    env.segment.click(_ras(env, 8, 30, 10))
    assert [c[0] for c in env.session.calls] == ["add_object", "seed", "refine", "seed", "refine"]
    np.testing.assert_array_equal(env.get(env.a), painted | _square(8, 30, 10))


# ---------------------------------------------------------------------------------------- masking
OVERWRITE = {"all": "OverwriteAllSegments", "visible": "OverwriteVisibleSegments", "none": "OverwriteNone"}


@pytest.mark.parametrize("mode,b_visible", [("all", True), ("visible", True), ("visible", False), ("none", True)])
def test_other_segments_are_overwritten_only_as_the_editor_allows(drawn, mode, b_visible):
    env = drawn
    env.editor.SetOverwriteMode(getattr(env.editor, OVERWRITE[mode]))
    env.node.GetDisplayNode().SetSegmentVisibility(env.b, b_visible)
    click = _square(4, 20, 22)  # overlaps B
    assert (click & env.b0).any() and (click & ~env.b0).any()
    env.segment.click(_ras(env, 4, 20, 22))
    np.testing.assert_array_equal(env.get(env.a), env.a0 | click)
    overwritten = mode == "all" or (mode == "visible" and b_visible)
    np.testing.assert_array_equal(env.get(env.b), env.b0 & ~click if overwritten else env.b0)


def test_editable_area_outside_all_segments(drawn):
    env = drawn
    env.editor.SetMaskMode(slicer.vtkMRMLSegmentationNode.EditAllowedOutsideAllSegments)
    click = _square(4, 20, 22)
    env.segment.click(_ras(env, 4, 20, 22))
    np.testing.assert_array_equal(env.get(env.a), env.a0 | (click & ~env.b0))
    np.testing.assert_array_equal(env.get(env.b), env.b0)


def test_editable_area_inside_one_segment_keeps_the_rest_of_the_drawing(drawn):
    env = drawn
    env.editor.SetMaskMode(slicer.vtkMRMLSegmentationNode.EditAllowedInsideSingleSegment)
    env.editor.SetMaskSegmentID(env.b)
    # a box on slice 5 replaces the slice's mask in the engine; A's drawing there lies outside B, where
    # nothing may be edited: Slicer keeps it, and adds only the box's voxels inside B
    outcome = env.segment.box(_ras(env, 5, 17, 19), _ras(env, 5, 22, 24))
    box = np.zeros(SHAPE, bool)
    box[5, 17:23, 19:25] = True
    np.testing.assert_array_equal(env.get(env.a), env.a0 | (box & env.b0))
    assert outcome.removed == 0


def test_intensity_range(drawn):
    env = drawn
    volume = env.volume
    values = slicer.util.arrayFromVolume(volume)
    click = _square(4, 20, 22)
    lo, hi = (int(v) for v in np.percentile(values[click], [30, 100]))  # whole numbers: voxels are int16
    env.editor.SetSourceVolumeIntensityMask(True)
    env.editor.SetSourceVolumeIntensityMaskRange(float(lo), float(hi))
    editable = (values >= lo) & (values <= hi)
    assert (click & editable).any() and (click & ~editable).any()
    env.segment.click(_ras(env, 4, 20, 22))
    # A's drawing lies outside the range: kept; B loses only the voxels A got
    np.testing.assert_array_equal(env.get(env.a), env.a0 | (click & editable))
    np.testing.assert_array_equal(env.get(env.b), env.b0 & ~(click & editable))


def test_only_the_selected_segment_is_corrected(drawn):
    env = drawn
    env.editor.SetSelectedSegmentID(env.b)
    with pytest.raises(InputError, match="select the segment"):
        env.segment.click(_ras(env, 4, 20, 22))
    assert env.session.calls == [] and env.session.objects == {}
    np.testing.assert_array_equal(env.get(env.a), env.a0)


def test_a_failed_interaction_leaves_the_engine_as_it_was(drawn):
    env = drawn
    with pytest.raises(InputError, match="one slice"):
        env.segment.refine(box=[(4, 10, 10), (6, 20, 20)])
    assert env.session.objects == {} and env.session.history == []  # add_object and seed undone
    np.testing.assert_array_equal(env.get(env.a), env.a0)
    assert not env.logic.CanUndo()  # nothing written, no undo state


# ---------------------------------------------------------------------------------------- undo
def test_one_interaction_is_one_undo_step_and_the_engine_follows(drawn):
    env = drawn
    states = [(env.get(env.a), env.get(env.b))]
    for z, y, x, positive in [(4, 20, 22, True), (4, 30, 40, True), (4, 21, 21, False)]:
        env.segment.click(_ras(env, z, y, x), positive)
        states.append((env.get(env.a), env.get(env.b)))
    assert len({s[0].tobytes() for s in states}) == 4
    env.logic.Undo()  # Ctrl+Z: the negative click
    np.testing.assert_array_equal(env.get(env.a), states[2][0])
    np.testing.assert_array_equal(env.get(env.b), states[2][1])
    env.logic.Undo()
    np.testing.assert_array_equal(env.get(env.a), states[1][0])
    np.testing.assert_array_equal(env.get(env.b), states[1][1])
    assert env.workspace.sync() == 2
    np.testing.assert_array_equal(env.session.objects[1], states[1][0])  # the engine took both back
    env.segment.click(_ras(env, 4, 8, 40))
    assert env.session.calls[-1] == ("refine", 4) and ("seed", "all") == env.session.calls[1]
    assert [c[0] for c in env.session.calls].count("seed") == 1  # in step: no re-seed
    np.testing.assert_array_equal(env.get(env.a), states[1][0] | _square(4, 8, 40))


def test_undoing_the_first_interaction_forgets_the_engine_object(drawn):
    env = drawn
    env.segment.click(_ras(env, 4, 20, 22))
    env.logic.Undo()
    np.testing.assert_array_equal(env.get(env.a), env.a0)
    np.testing.assert_array_equal(env.get(env.b), env.b0)
    env.segment.click(_ras(env, 5, 30, 40))
    calls = [c[0] for c in env.session.calls]
    assert calls == ["add_object", "seed", "refine", "undo", "undo", "undo", "add_object", "seed", "refine"]
    assert list(env.session.objects) == [1]


def test_undo_across_two_segments_pops_in_order(drawn):
    env = drawn
    segment_b = env.workspace.segment(env.node, env.b)
    env.segment.click(_ras(env, 2, 30, 40))
    env.editor.SetSelectedSegmentID(env.b)
    segment_b.click(_ras(env, 8, 10, 40))
    a1, b1 = env.get(env.a), env.get(env.b)
    env.editor.SetSelectedSegmentID(env.a)
    env.segment.click(_ras(env, 2, 10, 30))
    env.logic.Undo()
    env.logic.Undo()  # B's click: the editor's history is one stack across segments, as the session's
    np.testing.assert_array_equal(env.get(env.b), env.b0)
    np.testing.assert_array_equal(env.get(env.a), a1)
    env.segment.click(_ras(env, 2, 35, 10))
    assert set(env.session.objects) == {1}  # B's object (added by its first click) is gone
    np.testing.assert_array_equal(env.session.objects[1], a1 | _square(2, 35, 10))
    assert b1.any()


def test_redo(drawn):
    env = drawn
    env.segment.click(_ras(env, 4, 20, 22))
    after = env.get(env.a)
    env.logic.Undo()
    env.logic.Redo()  # undone and redone before the engine was asked anything: still in step
    np.testing.assert_array_equal(env.get(env.a), after)
    assert env.workspace.sync() == 0
    env.logic.Undo()
    assert env.workspace.sync() == 1  # e.g. a click that the engine then refused
    env.logic.Redo()  # the engine cannot redo: the segment no longer matches it and is re-seeded
    env.segment.click(_ras(env, 4, 30, 40))
    calls = [c[0] for c in env.session.calls]
    assert calls == ["add_object", "seed", "refine", "undo", "undo", "undo", "add_object", "seed", "refine"]
    np.testing.assert_array_equal(env.get(env.a), after | _square(4, 30, 40))


# ---------------------------------------------------------------------------------------- propagation
def test_propagation_is_one_undoable_step(editor):
    env = editor()
    env.segment.click(_ras(env, 3, 20, 20))
    before = env.get(env.a)
    call = env.segment.start_propagation()
    assert call.wait(30) and env.workspace.busy
    with pytest.raises(InputError, match="wait for the propagation"):
        env.segment.click(_ras(env, 3, 30, 30))
    outcome = env.workspace.finish_propagation(call)
    assert outcome.written and len(outcome.slices) == SHAPE[0] - 1
    np.testing.assert_array_equal(env.get(env.a), np.broadcast_to(before[3], SHAPE))
    env.logic.Undo()
    np.testing.assert_array_equal(env.get(env.a), before)
    assert env.workspace.sync() == 1 and env.session.calls[-1] == ("undo", 1)


def test_a_cancelled_propagation_writes_nothing(drawn):
    env = drawn
    env.session.slow = True
    call = env.segment.start_propagation()
    assert not call.poll(0.05)
    call.cancel()  # as the effect's Cancel button does
    assert call.wait(30) and call.cancelled
    with pytest.raises(Cancelled):
        env.workspace.finish_propagation(call)
    assert env.session.objects == {} and not env.workspace.busy  # the seed was undone too
    np.testing.assert_array_equal(env.get(env.a), env.a0)
    assert not env.logic.CanUndo()


# ---------------------------------------------------------------------------------------- geometry
def test_segmentation_on_another_grid_keeps_the_masking(editor):
    """The segmentation's reference geometry is twice as fine as the volume: the modifier is resampled
    onto it (nearest neighbour), so the editor's masking applies."""
    env = editor()
    finer = slicer.vtkOrientedImageData()
    finer.SetExtent(0, 2 * SHAPE[2] - 1, 0, 2 * SHAPE[1] - 1, 0, 2 * SHAPE[0] - 1)
    finer.SetSpacing(0.4, 0.45, 1.25)
    finer.SetOrigin(-0.2, -0.225, -0.625)
    converter = slicer.vtkSegmentationConverter
    env.node.GetSegmentation().SetConversionParameter(converter.GetReferenceImageGeometryParameterName(),
                                                      converter.SerializeImageGeometry(finer))
    b = np.zeros(SHAPE, bool)
    b[B_BLOCK] = True
    grid = VolumeGrid.of(env.volume, env.node)
    EditorLogicWriter(env.logic, env.editor).modify(env.node, env.b, modifier_labelmap(
        Region.of(b), grid, reference_geometry(env.node)))  # B as an editor effect writes it: on the finer grid
    stored = slicer.vtkOrientedImageData()
    env.node.GetBinaryLabelmapRepresentation(env.b, stored)
    assert stored.GetSpacing() == pytest.approx((0.4, 0.45, 1.25))
    np.testing.assert_array_equal(env.get(env.b), b)
    env.editor.SetMaskMode(slicer.vtkMRMLSegmentationNode.EditAllowedOutsideAllSegments)
    env.segment.click(_ras(env, 4, 20, 22))
    np.testing.assert_array_equal(env.get(env.a), _square(4, 20, 22) & ~b)
    np.testing.assert_array_equal(env.get(env.b), b)
    env.editor.SetMaskMode(slicer.vtkMRMLSegmentationNode.EditAllowedEverywhere)
    env.segment.click(_ras(env, 5, 20, 30))  # overwrite all: B loses what A gets
    np.testing.assert_array_equal(env.get(env.a), (_square(4, 20, 22) & ~b) | _square(5, 20, 30))
    np.testing.assert_array_equal(env.get(env.b), b & ~_square(5, 20, 30))


# ---------------------------------------------------------------------------------------- the real engine
@pytest.fixture(scope="module")
def visible(tiny_model_dir):
    torch = pytest.importorskip("torch")
    from MedicalSAM3Core.inference.engine import Segmenter
    from MedicalSAM3Core.inference.models import load_model

    model = load_model(str(tiny_model_dir), device="cpu")
    with torch.no_grad():
        model.video.tracker_model.mask_decoder.pred_obj_score_head.proj_out.bias.fill_(5.0)
    return Segmenter(model)


def test_the_real_session_clicks_undo_and_propagate(editor, visible):
    from MedicalSAM3Lib.scene import volume_from_node

    env = editor("oblique", lambda volume: visible.session(volume_from_node(volume)))
    session = env.session
    drawing = np.zeros(SHAPE, bool)
    drawing[5, 15:25, 18:30] = True
    env.put(env.a, drawing)
    first = env.segment.click(_ras(env, 5, 20, 24))
    assert first.written and first.slices == [5]
    np.testing.assert_array_equal(env.get(env.a), session.mask(1))  # the segment is the engine's object
    env.segment.box(_ras(env, 5, 10, 12), _ras(env, 5, 30, 36))
    after_box = env.get(env.a)
    np.testing.assert_array_equal(after_box, session.mask(1))
    env.logic.Undo()
    assert env.workspace.sync() == 1
    np.testing.assert_array_equal(env.get(env.a), session.mask(1))  # the engine took the box back
    outcome = env.segment.propagate(timeout=300)
    assert outcome.written and len(outcome.slices) > 1
    np.testing.assert_array_equal(env.get(env.a), session.mask(1))
    env.logic.Undo()
    assert env.workspace.sync() == 1
    np.testing.assert_array_equal(env.get(env.a), session.mask(1))


# ---------------------------------------------------------------------------------------- the queue (the effect's path)
class GatedSession(FakeSession):
    """A FakeSession whose refine waits for ``gate`` (an engine computing a slice's features), and which
    records the calls in flight at once (never more than one) and ``prepare`` calls."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.gate = threading.Event()
        self.gate.set()
        self.in_flight, self.most_in_flight = 0, 0
        self.prepared = []

    def _enter(self):
        self.in_flight += 1
        self.most_in_flight = max(self.most_in_flight, self.in_flight)

    def refine(self, *args, **kwargs):
        self._enter()
        try:
            assert self.gate.wait(10)
            return super().refine(*args, **kwargs)
        finally:
            self.in_flight -= 1

    def prepare(self, slices, object_id=None):
        self._enter()
        try:
            self.prepared.append((list(slices), object_id))
        finally:
            self.in_flight -= 1


def _drain(queue, timeout=20):
    events, deadline = [], time.monotonic() + timeout
    while queue.working or queue.workspace.owed_undos or queue._call is not None:
        events += queue.poll(0.01)
        assert time.monotonic() < deadline, "the queue did not finish"
    return events


def _points(prompts):
    return [(p.kind, p.slice, p.positive, p.pending) for p in prompts]


@pytest.fixture
def queued(editor):
    env = editor(session=lambda volume: GatedSession())
    env.queue = InteractionQueue(env.workspace, prepare=False)
    return env


def test_clicks_return_at_once_and_are_answered_in_order(queued):
    env = queued
    env.session.gate.clear()  # the engine is slow (the first click on a slice)
    started = time.monotonic()
    env.queue.click(env.node, env.a, _ras(env, 3, 20, 20))
    env.queue.click(env.node, env.a, _ras(env, 3, 20, 30))
    env.queue.click(env.node, env.a, _ras(env, 3, 30, 30), positive=False)
    assert env.queue.poll(0.01) == [] and env.queue.working and env.queue.queued == 2
    assert time.monotonic() - started < 1  # nothing waited for the engine
    assert not env.get(env.a).any()  # nothing written yet
    pending = env.queue.prompts(env.node, env.a)
    assert _points(pending) == [("point", 3, True, True), ("point", 3, True, True), ("point", 3, False, True)]
    env.session.gate.set()
    events = _drain(env.queue)
    assert [e.error for e in events] == [None] * 3 and all(e.outcome.written for e in events)
    assert env.session.most_in_flight == 1  # one engine call at a time
    assert [c for c in env.session.calls if c[0] == "refine"] == [("refine", 3)] * 3
    np.testing.assert_array_equal(env.get(env.a), (_square(3, 20, 20) | _square(3, 20, 30)) & ~_square(3, 30, 30))
    assert _points(env.queue.prompts(env.node, env.a)) == [("point", 3, True, False), ("point", 3, True, False),
                                                           ("point", 3, False, False)]
    for _ in range(3):  # one undo step per click
        assert env.logic.CanUndo()
        env.logic.Undo()
    np.testing.assert_array_equal(env.get(env.a), np.zeros(SHAPE, bool))


def test_markers_follow_ctrl_z_and_the_engine_takes_it_back(queued):
    env = queued
    env.queue.click(env.node, env.a, _ras(env, 3, 20, 20))
    env.queue.box(env.node, env.a, _ras(env, 3, 10, 10), _ras(env, 3, 25, 30))
    env.queue.click(env.node, env.a, _ras(env, 6, 20, 20))
    _drain(env.queue)
    assert _points(env.queue.prompts(env.node, env.a)) == [("point", 3, True, False), ("box", 3, True, False),
                                                           ("point", 6, True, False)]
    env.logic.Undo()  # Ctrl+Z: the click on slice 6
    env.queue.check()  # the effect calls this once the segmentation is quiet
    assert _points(env.queue.prompts(env.node, env.a)) == [("point", 3, True, False), ("box", 3, True, False)]
    assert env.workspace.owed_undos == 1 and env.queue.active
    _drain(env.queue)  # the undo is sent in the background
    assert env.session.calls[-1] == ("undo", 1) and env.workspace.owed_undos == 0
    np.testing.assert_array_equal(env.session.objects[1], env.get(env.a))
    env.logic.Undo()
    env.logic.Undo()  # back before the first click: the engine object is forgotten, no markers
    env.queue.check()
    assert env.queue.prompts(env.node, env.a) == ()
    _drain(env.queue)
    assert env.session.objects == {}


def test_a_new_box_replaces_the_slices_box_and_a_seed_forgets_the_prompts(queued):
    env = queued
    env.queue.box(env.node, env.a, _ras(env, 4, 10, 10), _ras(env, 4, 20, 20))
    env.queue.click(env.node, env.a, _ras(env, 4, 15, 15))
    env.queue.box(env.node, env.a, _ras(env, 4, 12, 12), _ras(env, 4, 30, 30))
    _drain(env.queue)
    prompts = env.queue.prompts(env.node, env.a)
    assert _points(prompts) == [("point", 4, True, False), ("box", 4, True, False)]
    assert prompts[1].zyx[0][1:] == pytest.approx((12, 12)) and prompts[1].zyx[1][1:] == pytest.approx((30, 30))
    painted = env.get(env.a)
    painted[8, 2:5, 2:5] = True  # painted with another effect: the engine no longer matches, no markers
    env.put(env.a, painted)
    env.queue.check()
    assert env.queue.prompts(env.node, env.a) == ()
    env.queue.click(env.node, env.a, _ras(env, 8, 30, 10))  # re-seeds: only the new click is held
    _drain(env.queue)
    assert _points(env.queue.prompts(env.node, env.a)) == [("point", 8, True, False)]


def test_an_answer_for_a_segment_undone_meanwhile_is_not_written(queued):
    env = queued
    env.queue.click(env.node, env.a, _ras(env, 3, 20, 20))
    _drain(env.queue)
    first = env.get(env.a)
    env.session.gate.clear()
    env.queue.click(env.node, env.a, _ras(env, 5, 20, 20))
    env.queue.poll(0.01)  # in flight
    env.logic.Undo()  # Ctrl+Z of the first click while the engine works on the second
    env.queue.check()  # deferred: an interaction is under way
    env.session.gate.set()
    events = _drain(env.queue)
    assert len(events) == 1 and isinstance(events[0].error, InputError) and "changed" in str(events[0].error)
    assert not env.get(env.a).any() and first.any()
    assert env.session.objects == {}  # both clicks (and the object) taken back in the engine
    assert env.queue.prompts(env.node, env.a) == () and not env.logic.CanUndo()


def test_refusals_come_at_once_and_the_queue_goes_on(queued):
    env = queued
    outside = zyx_to_world(env.volume, (3, -3, 20))
    with pytest.raises(InputError, match="inside the source volume"):
        env.queue.click(env.node, env.a, outside)
    env.queue.click(env.node, env.b, _ras(env, 3, 20, 20))  # B is not selected when its turn comes
    env.queue.click(env.node, env.a, _ras(env, 3, 20, 20))
    events = _drain(env.queue)
    assert "select the segment" in str(events[0].error) and events[1].outcome.written
    assert env.queue.prompts(env.node, env.b) == ()


def test_propagation_in_the_queue_and_cancel(queued):
    env = queued
    env.queue.click(env.node, env.a, _ras(env, 3, 20, 20))
    env.queue.propagate(env.node, env.a)
    with pytest.raises(InputError, match="propagation"):
        env.queue.click(env.node, env.a, _ras(env, 5, 20, 20))
    events = _drain(env.queue)
    assert events[1].outcome.written and len(events[1].outcome.slices) == SHAPE[0] - 1
    assert _points(env.queue.prompts(env.node, env.a)) == [("point", 3, True, False)]  # propagation keeps them
    env.session.slow = True
    env.queue.propagate(env.node, env.a)
    env.queue.poll(0.01)
    env.queue.cancel()
    events = _drain(env.queue)
    assert events[0].cancelled and len(env.session.history) == 3  # add_object, refine, propagate
    assert _points(env.queue.prompts(env.node, env.a)) == [("point", 3, True, False)]


def test_the_slice_under_the_mouse_is_prepared_once_it_rests_there(queued):
    env = queued
    now = [100.0]
    queue = InteractionQueue(env.workspace, prepare=True, clock=lambda: now[0])
    queue.hover(_ras(env, 4, 20, 20), env.node, env.a)
    assert queue.active and queue.poll(0.01) == [] and env.session.prepared == []  # not yet: debounced
    now[0] += 0.1
    queue.hover(_ras(env, 6, 20, 20), env.node, env.a)  # scrolled on
    now[0] += PREPARE_DELAY_S - 0.05
    queue.poll(0.01)
    assert env.session.prepared == []
    now[0] += 0.1
    queue.poll(0.01)
    assert queue.poll(0.5) == [] and env.session.prepared == [([6], None)]
    assert not queue.active  # each slice once
    queue.hover(_ras(env, 6, 30, 30), env.node, env.a)
    now[0] += 1
    queue.poll(0.01)
    assert env.session.prepared == [([6], None)]
    queue.click(env.node, env.a, _ras(env, 2, 20, 20))  # an interaction goes first; then the object's window
    queue.hover(_ras(env, 7, 20, 20), env.node, env.a)
    now[0] += 1
    _drain(queue)
    while queue.active:
        queue.poll(0.05)
    assert env.session.prepared[-1] == ([7], 1) and env.session.most_in_flight == 1
    assert queue.hover(zyx_to_world(env.volume, (20, 5, 5)), env.node, env.a) is None  # outside: nothing


# ---------------------------------------------------------------------------------------- markers on a slice view
def _slice_node(scene, env, z):
    """An axial-ish slice view through slice ``z`` of the volume (its plane holds the volume's i and j axes)."""
    node = scene.mrml.AddNewNodeByClass("vtkMRMLSliceNode")
    node.SetDimensions(200, 160, 1)
    node.SetFieldOfView(100.0, 80.0, 1.0)
    m = env.ijk_to_ras
    normal = np.cross(m[:3, 0], m[:3, 1])
    node.SetSliceToRASByNTP(*normal, *m[:3, 0], *zyx_to_world(env.volume, (z, 20, 24)), 0)
    node.UpdateMatrices()
    return node


@pytest.mark.parametrize("grid", ["RAS", "oblique"])
def test_markers_of_the_slice_on_screen(scene, editor, grid):
    from MedicalSAM3Lib import overlay

    env = editor(grid, session=lambda volume: GatedSession())
    queue = InteractionQueue(env.workspace, prepare=False)
    queue.click(env.node, env.a, _ras(env, 3, 20, 20))
    queue.click(env.node, env.a, _ras(env, 3, 30, 30), positive=False)
    queue.box(env.node, env.a, _ras(env, 3, 10, 12), _ras(env, 3, 25, 30))
    queue.click(env.node, env.a, _ras(env, 5, 20, 20))
    _drain(queue)
    prompts = queue.prompts(env.node, env.a)
    view3, view4, view5 = (_slice_node(scene, env, z) for z in (3, 4, 5))
    shapes = overlay.shapes_on_slice(prompts, env.volume, view3, env.workspace.axis)
    assert [(s.kind, s.rgba[:3]) for s in shapes] == [("point", overlay.POSITIVE), ("point", overlay.NEGATIVE),
                                                      ("box", overlay.BOX)]
    xy_to_ras = slicer.util.arrayFromVTKMatrix(view3.GetXYToRAS())
    centre = xy_to_ras @ np.array([*shapes[0].xy[0], 0.0, 1.0])
    np.testing.assert_allclose(centre[:3], _ras(env, 3, 20, 20), atol=1e-6)  # drawn where it was clicked
    corners = [xy_to_ras @ np.array([x, y, 0.0, 1.0]) for x, y in shapes[2].xy]
    np.testing.assert_allclose(corners[0][:3], _ras(env, 3, 10, 12), atol=1e-6)
    np.testing.assert_allclose(corners[2][:3], _ras(env, 3, 25, 30), atol=1e-6)
    assert overlay.shapes_on_slice(prompts, env.volume, view4, env.workspace.axis) == []
    assert [s.kind for s in overlay.shapes_on_slice(prompts, env.volume, view5, env.workspace.axis)] == ["point"]
    band = overlay.rubber_band(env.volume, view3, _ras(env, 3, 5, 5), _ras(env, 3, 9, 15), env.workspace.axis)
    polydata = vtk.vtkPolyData()
    overlay.fill_polydata(polydata, shapes + [band])
    assert polydata.GetPolys().GetNumberOfCells() == 2 and polydata.GetLines().GetNumberOfCells() == 2
    assert polydata.GetNumberOfPoints() == 2 * overlay.CIRCLE_SEGMENTS + 8
    colors = polydata.GetPointData().GetScalars()
    assert colors.GetNumberOfComponents() == 4 and colors.GetTuple4(0) == (38, 217, 64, 255)


def test_pending_markers_are_faint(queued, scene):
    from MedicalSAM3Lib import overlay

    env = queued
    env.session.gate.clear()
    env.queue.click(env.node, env.a, _ras(env, 3, 20, 20))
    shapes = overlay.shapes_on_slice(env.queue.prompts(env.node, env.a), env.volume, _slice_node(scene, env, 3),
                                     env.workspace.axis)
    assert [s.rgba[3] for s in shapes] == [overlay.PENDING_ALPHA]
    env.session.gate.set()
    _drain(env.queue)
