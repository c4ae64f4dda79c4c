import numpy as np

from MedicalSAM3Core.inference.merging import VolumeAccumulator, clean_up, merge_confidences


def test_overlap_goes_to_the_more_confident_prompt():
    conf = np.zeros((2, 1, 4), np.float32)
    conf[0, 0, :3] = 0.6  # prompt 0 claims columns 0-2
    conf[1, 0, 1:] = 0.9  # prompt 1 claims columns 1-3, more confidently
    labels, best = merge_confidences(conf, [1, 2])
    np.testing.assert_array_equal(labels, [[1, 2, 2, 2]])
    np.testing.assert_allclose(best, [[0.6, 0.9, 0.9, 0.9]])


def test_tie_goes_to_the_prompt_given_first_and_unclaimed_voxels_stay_background():
    conf = np.zeros((3, 1, 3), np.float32)
    conf[1, 0, :2] = 0.5
    conf[2, 0, :2] = 0.5
    labels, _ = merge_confidences(conf, [1, 2, 3])
    np.testing.assert_array_equal(labels, [[2, 2, 0]])


def test_accumulator_keeps_overlapping_per_prompt_masks_and_scores():
    acc = VolumeAccumulator(2, (2, 2, 10), np.uint8, exact=True)
    conf = np.zeros((2, 2, 2, 10), np.float32)
    conf[0, 0, :, :6] = 0.7
    conf[1, 0, :, 4:] = 0.8
    scores = np.array([[0.7, 0.0], [0.8, 0.0]])
    acc.add(0, [0, 1], conf, scores)
    mask0 = np.unpackbits(acc.packed[0], axis=-1, count=10).astype(bool)
    assert mask0[0, :, :6].all() and not mask0[0, :, 6:].any() and not mask0[1].any()
    assert (acc.label_map[0, :, 4:] == 2).all() and (acc.label_map[0, :, :4] == 1).all()
    assert acc.slices_found.tolist() == [1, 1] and acc.max_score.tolist() == [0.7, 0.8]


def test_separate_passes_merge_by_confidence():
    acc = VolumeAccumulator(2, (1, 1, 3), np.uint8, exact=False)
    acc.add(0, [0], np.array([[[[0.4, 0.9, 0.0]]]], np.float32), np.array([[0.9]]))
    acc.add(0, [1], np.array([[[[0.8, 0.5, 0.0]]]], np.float32), np.array([[0.8]]))
    np.testing.assert_array_equal(acc.label_map, [[[2, 1, 0]]])


def test_clean_up_removes_small_components_and_fills_holes():
    mask = np.zeros((5, 9, 12), bool)
    mask[1:4, 1:8, 1:8] = True
    mask[2, 4, 4] = False  # an enclosed hole
    mask[0, 0, 10] = True  # a 1-voxel speck, not touching the block
    label_map = mask.astype(np.uint8)
    cleaned_map, (cleaned,) = clean_up(label_map, [mask], min_voxels=5, fill_holes=True)
    assert not cleaned[0, 0, 10] and cleaned[2, 4, 4]
    assert cleaned_map[0, 0, 10] == 0 and cleaned_map[2, 4, 4] == 1


def test_clean_up_keeps_the_largest_component_only_where_asked():
    """``largest[k]``: prompt k keeps its largest 26-connected component (diagonal neighbours join);
    other prompts and the voxels of other labels are untouched."""
    organ = np.zeros((6, 10, 10), bool)
    organ[1:5, 1:5, 1:5] = True  # 64 voxels
    organ[5, 5, 5] = True  # touches the block's corner diagonally only: same 26-connected component
    organ[0, 8:10, 8:10] = True  # a far 4-voxel blob
    vessel = np.zeros_like(organ)
    vessel[0, 0, 6:9] = True
    vessel[3, 8, 0] = True  # a second, separate piece, kept: this prompt is not cleaned
    label_map = organ.astype(np.uint8) + 2 * vessel.astype(np.uint8)
    cleaned_map, (kept_organ, kept_vessel) = clean_up(label_map, [organ, vessel], largest=[True, False])
    assert kept_organ[5, 5, 5] and kept_organ[1:5, 1:5, 1:5].all() and not kept_organ[0, 8:10, 8:10].any()
    np.testing.assert_array_equal(kept_vessel, vessel)
    assert (cleaned_map[0, 8:10, 8:10] == 0).all() and cleaned_map[3, 8, 0] == 2 and cleaned_map[2, 2, 2] == 1
