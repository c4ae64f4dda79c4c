"""The Slicer module's scene logic on a real MRML scene (slicer-core) with the tiny model."""

from __future__ import annotations

import numpy as np
import pytest

import slicer
import slicer.util

from MedicalSAM3Core.common.errors import Cancelled, InputError
from MedicalSAM3Core.common.options import SegmentOptions
from MedicalSAM3Core.inference.engine import Segmenter
from MedicalSAM3Lib.scene import PROMPT_TAG, segment_mask, segment_tag, segment_volume, volume_from_node
from phantoms import make_phantom

OBLIQUE = np.linalg.qr(np.array([[0.9, 0.3, 0.1], [-0.2, 0.8, 0.4], [0.1, -0.3, 0.9]]))[0]
GRIDS = {
    "RAS": np.diag([0.8, 0.9, 2.5, 1.0]),
    "LPS": np.diag([-0.8, -0.9, 2.5, 1.0]),
    "oblique": np.block([[OBLIQUE @ np.diag([0.8, 0.9, 2.5]), np.array([[10.0], [-20.0], [30.0]])],
                         [np.zeros((1, 3)), np.ones((1, 1))]]),
}


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
    node = segment_volume(volume_node, ["liver", "spleen"], run, segmentations_logic=scene.segmentations)
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
    node = segment_volume(volume_node, ["liver"], run, segmentations_logic=scene.segmentations)
    segmentation = node.GetSegmentation()
    user_id = segmentation.AddEmptySegment("my_tumor", "my tumor", (1.0, 1.0, 0.0))
    drawn = np.zeros(make_phantom().shape, np.uint8)
    drawn[4:6, 10:14, 10:14] = 1
    from MedicalSAM3Lib.scene import _oriented_image

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
                          segmentations_logic=scene.segmentations)
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


def test_undo_restores_the_previous_segment(scene, run):
    scene.mrml.SetUndoOn()
    volume_node = slicer.util.addVolumeFromArray(make_phantom(), ijkToRAS=GRIDS["RAS"], name="ct")
    node = segment_volume(volume_node, ["liver"], run, segmentations_logic=scene.segmentations)
    node.SetUndoEnabled(True)
    first = segment_mask(node, "MedicalSAM3_liver", volume_node)

    def other(volume, prompts):
        result = run(volume, prompts)
        result.label_map[:] = 0
        result.label_map[1:3, 5:9, 5:9] = 1
        return result

    segment_volume(volume_node, ["liver"], other, segmentation_node=node, segmentations_logic=scene.segmentations)
    assert not np.array_equal(segment_mask(node, "MedicalSAM3_liver", volume_node), first)
    scene.mrml.Undo()
    np.testing.assert_array_equal(segment_mask(node, "MedicalSAM3_liver", volume_node), first)


def test_transforms(scene, run):
    volume_node = slicer.util.addVolumeFromArray(make_phantom(), ijkToRAS=GRIDS["RAS"], name="ct")
    linear = scene.mrml.AddNewNodeByClass("vtkMRMLLinearTransformNode")
    volume_node.SetAndObserveTransformNodeID(linear.GetID())
    node = segment_volume(volume_node, ["liver"], run, segmentations_logic=scene.segmentations)
    assert node.GetParentTransformNode() is linear  # lines up with the volume in the views
    warp = scene.mrml.AddNewNodeByClass("vtkMRMLGridTransformNode")
    volume_node.SetAndObserveTransformNodeID(warp.GetID())
    with pytest.raises(InputError, match="harden"):
        volume_from_node(volume_node)
    label_node = slicer.util.addVolumeFromArray(np.zeros((2, 3, 4), np.uint8), nodeClassName="vtkMRMLLabelMapVolumeNode")
    with pytest.raises(InputError, match="scalar"):
        volume_from_node(label_node)
