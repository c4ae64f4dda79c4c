"""The Slicer module's scene logic on a real MRML scene (slicer-core) with the tiny model."""

from __future__ import annotations

import numpy as np
import pytest

import slicer
import slicer.util

from MedicalSAM3Core.common.errors import Cancelled, InputError
from MedicalSAM3Core.common.options import SegmentOptions
from MedicalSAM3Core.inference.engine import Segmenter
from MedicalSAM3Lib.scene import (PROMPT_TAG, _oriented_image, restore_previous, segment_center_ras, segment_mask,
                                  segment_tag, segment_volume, unchanged_since_written, volume_from_node,
                                  volume_grid, write_segments)
from phantoms import GRIDS, make_phantom



@pytest.fixture
def run(tiny_model):
    def run(volume, prompts):
        return Segmenter(tiny_model).segment(volume, prompts, SegmentOptions(mode="slices", score_threshold=0.2))

    return run


def _segments(node):
    segmentation = node.GetSegmentation()
    return {segmentation.GetNthSegmentID(i): segmentation.GetNthSegment(i) for i in range(segmentation.GetNumberOfSegments())}


@pytest.mark.parametrize("grid", sorted(GRIDS))
def test_segments_land_on_the_volume_grid(scene, run, grid):
    volume_node = slicer.util.addVolumeFromArray(make_phantom(), ijkToRAS=GRIDS[grid], name="ct")
    volume = volume_from_node(volume_node)
    np.testing.assert_allclose(volume.geometry.ijk_to_ras(), GRIDS[grid], atol=1e-6)
    node = segment_volume(volume_node, ["liver", "spleen"], run, segmentations_logic=scene.segmentations).node
    expected = run(volume, ["liver", "spleen"])
    segments = _segments(node)
    assert list(segments) == ["MedicalSAM3_liver", "MedicalSAM3_spleen"]
    assert any(label.voxel_count for label in expected.labels)
    for label in expected.labels:
        segment_id = f"MedicalSAM3_{label.name.lower()}"
        np.testing.assert_array_equal(segment_mask(node, segment_id, volume_node), expected.label_map == label.value)
        segment = segments[segment_id]
        assert segment.GetName() == label.name and segment_tag(segment, PROMPT_TAG) == label.name
        assert np.allclose(segment.GetColor(), np.array(label.color) / 255.0)
        assert label.terminology["type"]["code"] in segment.GetTerminology()


def test_user_segments_are_kept_and_reruns_replace_only_their_own(scene, run):
    volume_node = slicer.util.addVolumeFromArray(make_phantom(), ijkToRAS=GRIDS["RAS"], name="ct")
    node = segment_volume(volume_node, ["liver"], run, segmentations_logic=scene.segmentations).node
    segmentation = node.GetSegmentation()
    user_id = segmentation.AddEmptySegment("my_tumor", "my tumor", (1.0, 1.0, 0.0))
    drawn = np.zeros(make_phantom().shape, np.uint8)
    drawn[4:6, 10:14, 10:14] = 1
    scene.segmentations.SetBinaryLabelmapToSegment(_oriented_image(drawn, GRIDS["RAS"]), node, user_id,
                                                    scene.segmentations.MODE_REPLACE)
    # a user segment that happens to use our id scheme but has no tag is not ours either
    impostor = segmentation.AddEmptySegment("MedicalSAM3_spleen", "spleen (mine)", (0.0, 1.0, 0.0))
    segment_volume(volume_node, ["liver", "spleen"], run, segmentation_node=node,
                   segmentations_logic=scene.segmentations)
    segments = _segments(node)
    assert len(segments) == 4  # liver replaced in place; new spleen beside the impostor
    assert list(segments).count("MedicalSAM3_liver") == 1
    assert segments[impostor].GetName() == "spleen (mine)" and segment_tag(segments[impostor], PROMPT_TAG) is None
    np.testing.assert_array_equal(segment_mask(node, user_id, volume_node), drawn.astype(bool))


def test_keep_overlapping_writes_each_prompts_own_mask(scene, run):
    volume_node = slicer.util.addVolumeFromArray(make_phantom(), ijkToRAS=GRIDS["LPS"], name="ct")
    node = segment_volume(volume_node, ["liver", "spleen"], run, keep_overlapping=True,
                          segmentations_logic=scene.segmentations).node
    expected = run(volume_from_node(volume_node), ["liver", "spleen"])
    for index, label in enumerate(expected.labels):
        np.testing.assert_array_equal(segment_mask(node, f"MedicalSAM3_{label.name.lower()}", volume_node),
                                      expected.mask(index))


def test_a_cancelled_or_failed_run_changes_nothing(scene):
    volume_node = slicer.util.addVolumeFromArray(make_phantom(), ijkToRAS=GRIDS["RAS"], name="ct")
    before = scene.mrml.GetNumberOfNodes()

    def cancelled(volume, prompts):
        raise Cancelled("segmentation cancelled")

    with pytest.raises(Cancelled):
        segment_volume(volume_node, ["liver"], cancelled, segmentations_logic=scene.segmentations)
    with pytest.raises(InputError, match="structure name"):
        segment_volume(volume_node, [" "], cancelled, segmentations_logic=scene.segmentations)
    assert scene.mrml.GetNumberOfNodes() == before


def _other_result(run, box):
    def other(volume, prompts):
        result = run(volume, prompts)
        result.label_map[:] = 0
        result.label_map[box] = 1
        return result

    return other


def _paint(scene, node, segment_id, box, value=1):
    """What a Segment Editor stroke does to a segment: some voxels added (value 1) or erased (0)."""
    mask = segment_mask(node, segment_id, scene.volume)
    mask[box] = bool(value)
    scene.segmentations.SetBinaryLabelmapToSegment(_oriented_image(mask.astype(np.uint8), GRIDS["RAS"]), node,
                                                    segment_id, scene.segmentations.MODE_REPLACE)


def test_restore_previous_brings_back_what_a_rerun_replaced_and_removes_what_it_added(scene, run):
    volume_node = scene.volume = slicer.util.addVolumeFromArray(make_phantom(), ijkToRAS=GRIDS["RAS"], name="ct")
    node = segment_volume(volume_node, ["liver"], run, segmentations_logic=scene.segmentations).node
    first = segment_mask(node, "MedicalSAM3_liver", volume_node)
    assert first.any()
    assert not scene.mrml.GetUndoFlag()  # no global undo: it would copy the segmentation on every change
    report = segment_volume(volume_node, ["liver", "spleen"], _other_result(run, np.s_[1:3, 5:9, 5:9]),
                            segmentation_node=node, segmentations_logic=scene.segmentations)
    assert list(report.record.previous) == ["MedicalSAM3_liver", "MedicalSAM3_spleen"]
    assert report.record.previous["MedicalSAM3_spleen"] is None  # added by the rerun
    assert not np.array_equal(segment_mask(node, "MedicalSAM3_liver", volume_node), first)
    restored = restore_previous(report.record, scene.mrml, scene.segmentations)
    assert restored.restored == ["Liver"] and restored.removed == ["Spleen"] and restored.kept_edited == []
    np.testing.assert_array_equal(segment_mask(node, "MedicalSAM3_liver", volume_node), first)
    assert list(_segments(node)) == ["MedicalSAM3_liver"]
    # the restored segment is the module's own, unchanged one again: the next run may replace it
    assert unchanged_since_written(node, "MedicalSAM3_liver", first.shape, GRIDS["RAS"])


def test_a_segment_the_user_edited_is_never_overwritten_by_a_rerun_or_a_restore(scene, run):
    volume_node = scene.volume = slicer.util.addVolumeFromArray(make_phantom(), ijkToRAS=GRIDS["RAS"], name="ct")
    node = segment_volume(volume_node, ["liver", "spleen"], run, segmentations_logic=scene.segmentations).node
    liver_before = segment_mask(node, "MedicalSAM3_liver", volume_node)
    assert liver_before.any()
    _paint(scene, node, "MedicalSAM3_liver", np.s_[0:2, 0:3, 0:3])  # the user corrects the liver
    edited = segment_mask(node, "MedicalSAM3_liver", volume_node)
    assert not np.array_equal(edited, liver_before)
    node.GetSegmentation().GetSegment("MedicalSAM3_spleen").SetName("spleen, checked")  # and renames the spleen
    spleen = segment_mask(node, "MedicalSAM3_spleen", volume_node)

    report = segment_volume(volume_node, ["liver", "spleen"], _other_result(run, np.s_[4:6, 20:30, 20:30]),
                            segmentation_node=node, segmentations_logic=scene.segmentations)
    segments = _segments(node)
    np.testing.assert_array_equal(segment_mask(node, "MedicalSAM3_liver", volume_node), edited)  # untouched
    np.testing.assert_array_equal(segment_mask(node, "MedicalSAM3_spleen", volume_node), spleen)
    assert segments["MedicalSAM3_spleen"].GetName() == "spleen, checked"
    # both kept; the new liver goes next to "Liver", the new spleen takes the name "Spleen", now free
    assert report.kept_edited == {"Liver": "Liver (new)", "spleen, checked": "Spleen"}
    new_liver = [i for i in report.record.written if i not in ("MedicalSAM3_liver", "MedicalSAM3_spleen")]
    assert len(segments) == 4 and len(new_liver) == 2
    assert segments[report.rows[0].segment_id].GetName() == "Liver (new)"
    assert report.rows[0].found and report.rows[0].slices == 2

    # a third run replaces the module's own new segments, still not the edited ones
    third = segment_volume(volume_node, ["liver"], _other_result(run, np.s_[4:5, 20:25, 20:25]),
                           segmentation_node=node, segmentations_logic=scene.segmentations)
    assert list(third.record.previous) == [report.rows[0].segment_id] and third.kept_edited == {}
    np.testing.assert_array_equal(segment_mask(node, "MedicalSAM3_liver", volume_node), edited)

    # the user edits the rerun's segment, then asks to restore: the edit wins, nothing is overwritten
    _paint(scene, node, report.rows[0].segment_id, np.s_[4:5, 20:22, 20:22], value=0)
    kept = segment_mask(node, report.rows[0].segment_id, volume_node)
    restored = restore_previous(third.record, scene.mrml, scene.segmentations)
    assert restored.kept_edited == ["Liver (new)"] and restored.restored == []
    np.testing.assert_array_equal(segment_mask(node, report.rows[0].segment_id, volume_node), kept)


def test_a_user_segment_overlapping_the_result_keeps_its_voxels(scene, run):
    volume_node = scene.volume = slicer.util.addVolumeFromArray(make_phantom(), ijkToRAS=GRIDS["RAS"], name="ct")
    node = slicer.mrmlScene.AddNewNodeByClass("vtkMRMLSegmentationNode")
    node.SetReferenceImageGeometryParameterFromVolumeNode(volume_node)
    user_id = node.GetSegmentation().AddEmptySegment("mine", "mine")
    drawn = np.zeros(make_phantom().shape, np.uint8)
    drawn[1:3, 4:10, 4:10] = 1
    scene.segmentations.SetBinaryLabelmapToSegment(_oriented_image(drawn, GRIDS["RAS"]), node, user_id,
                                                    scene.segmentations.MODE_REPLACE)
    segment_volume(volume_node, ["liver"], _other_result(run, np.s_[1:3, 5:9, 5:9]), segmentation_node=node,
                   segmentations_logic=scene.segmentations)
    np.testing.assert_array_equal(segment_mask(node, user_id, volume_node), drawn.astype(bool))
    assert segment_mask(node, "MedicalSAM3_liver", volume_node)[1:3, 5:9, 5:9].all()


def test_rows_of_the_results_table(scene, run):
    volume_node = slicer.util.addVolumeFromArray(make_phantom(), ijkToRAS=GRIDS["RAS"], name="ct")
    volume = volume_from_node(volume_node)
    report = segment_volume(volume_node, ["liver", "spleen"], _other_result(run, np.s_[0:3, 5:9, 5:9]),
                            segmentations_logic=scene.segmentations)
    liver, spleen = report.rows
    assert (liver.name, liver.slices, liver.found) == ("Liver", 3, True)
    assert liver.volume_ml == pytest.approx(3 * 4 * 4 * volume.voxel_volume_ml)
    assert (spleen.found, spleen.volume_ml, spleen.needs_check) == (False, 0.0, True)


def test_transforms(scene, run):
    volume_node = slicer.util.addVolumeFromArray(make_phantom(), ijkToRAS=GRIDS["RAS"], name="ct")
    linear = scene.mrml.AddNewNodeByClass("vtkMRMLLinearTransformNode")
    volume_node.SetAndObserveTransformNodeID(linear.GetID())
    node = segment_volume(volume_node, ["liver"], run, segmentations_logic=scene.segmentations).node
    assert node.GetParentTransformNode() is linear  # lines up with the volume in the views
    warp = scene.mrml.AddNewNodeByClass("vtkMRMLGridTransformNode")
    volume_node.SetAndObserveTransformNodeID(warp.GetID())
    with pytest.raises(InputError, match="harden"):
        volume_from_node(volume_node)
    label_node = slicer.util.addVolumeFromArray(np.zeros((2, 3, 4), np.uint8), nodeClassName="vtkMRMLLabelMapVolumeNode")
    with pytest.raises(InputError, match="scalar"):
        volume_from_node(label_node)


def test_segment_center_is_in_world_coordinates_for_the_views(scene, run):
    volume_node = slicer.util.addVolumeFromArray(make_phantom(), ijkToRAS=GRIDS["oblique"], name="ct")
    node = segment_volume(volume_node, ["liver"], _other_result(run, np.s_[2:4, 10:14, 20:24]),
                          segmentations_logic=scene.segmentations).node
    center = np.array(segment_center_ras(node, "MedicalSAM3_liver"))
    inside = GRIDS["oblique"] @ np.array([21.5, 11.5, 2.5, 1.0])  # the box's middle voxel, (i, j, k)
    assert np.linalg.norm(center - inside[:3]) < 3.0  # within a voxel or so of the box's middle
    import vtk

    shift = vtk.vtkMatrix4x4()
    shift.SetElement(0, 3, 100.0)
    transform = scene.mrml.AddNewNodeByClass("vtkMRMLLinearTransformNode")
    transform.SetMatrixTransformToParent(shift)
    node.SetAndObserveTransformNodeID(transform.GetID())
    np.testing.assert_allclose(segment_center_ras(node, "MedicalSAM3_liver"), center + [100.0, 0, 0], atol=1e-6)
    empty = node.GetSegmentation().AddEmptySegment("empty", "empty")
    assert segment_center_ras(node, empty) is None and segment_center_ras(node, "no such segment") is None


def test_an_older_slicer_is_refused_before_any_node_or_segment_is_added(scene, run, monkeypatch):
    from MedicalSAM3Lib.compatibility import SUPPORTED, version_problem

    assert version_problem(5, 8) and "5.10 or newer" in version_problem(5, 8) and "5.8" in version_problem(5, 8)
    assert all(version_problem(*version) is None for version in SUPPORTED)
    assert version_problem(5, 13) is None  # newer: allowed (logged)

    class Slicer58Segment:  # what vtkSegment offers in Slicer 5.8: tags, no SetTerminology
        SetTag = GetTag = None

    volume_node = slicer.util.addVolumeFromArray(make_phantom(), ijkToRAS=GRIDS["RAS"], name="ct")
    result = run(volume_from_node(volume_node), ["liver"])
    nodes = scene.mrml.GetNumberOfNodes()
    monkeypatch.setattr(slicer, "vtkSegment", Slicer58Segment)
    with pytest.raises(InputError, match="5.10 or newer"):
        write_segments(result, volume_node, segmentations_logic=scene.segmentations)
    assert scene.mrml.GetNumberOfNodes() == nodes


def test_the_engine_gets_a_copy_of_the_voxels_and_the_grid_needs_none(scene):
    volume_node = slicer.util.addVolumeFromArray(make_phantom(), ijkToRAS=GRIDS["oblique"], name="ct")
    volume = volume_from_node(volume_node)
    voxels = slicer.util.arrayFromVolume(volume_node)
    assert not np.shares_memory(volume.array, voxels)  # the user may edit the volume while a run uses it
    voxels[:] = 0
    np.testing.assert_array_equal(volume.array, make_phantom())
    shape, geometry = volume_grid(volume_node)
    assert shape == volume.shape and geometry == volume.geometry
