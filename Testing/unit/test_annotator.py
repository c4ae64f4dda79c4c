"""The simulated annotator's click rule (``evaluation.annotator.next_click``), in 3D and with anisotropic voxels."""

import numpy as np

from MedicalSAM3Core.evaluation.annotator import next_click


def test_a_missed_region_larger_than_any_false_one_gets_a_positive_click_farthest_from_its_border():
    from scipy.ndimage import distance_transform_edt

    truth = np.zeros((9, 20, 20), bool)
    truth[1:8, 2:18, 2:18] = True
    predicted = truth.copy()
    predicted[1:8, 2:18, 10:18] = False  # the right half missed: 7 x 16 x 8 voxels
    predicted[0, 0:3, 0:3] = True  # a small false region
    (z, y, x), label = next_click(predicted, truth)
    assert label == 1 and truth[z, y, x] and not predicted[z, y, x]
    missed = np.pad(truth & ~predicted, 1)
    depth = distance_transform_edt(missed)[1:-1, 1:-1, 1:-1]
    assert depth[z, y, x] == depth.max() == 4.0 and x in (13, 14)  # the middle of the missed half in x


def test_the_centre_is_measured_in_millimetres():
    """3 thick slices of a 9 x 9 square: in voxel steps the slab's thinness limits every in-plane position
    alike; in millimetres (10 mm slices) only the square's centre is deepest."""
    truth = np.zeros((3, 11, 11), bool)
    truth[:, 1:10, 1:10] = True
    predicted = np.zeros_like(truth)
    (_, y, x), _ = next_click(predicted, truth, sampling=(10.0, 1.0, 1.0))
    assert (y, x) == (5, 5)
    (_, y_voxels, x_voxels), _ = next_click(predicted, truth)
    assert (y_voxels, x_voxels) != (5, 5)


def test_a_false_region_gets_a_negative_click_and_no_error_gets_none():
    truth = np.zeros((4, 10, 10), bool)
    truth[1:3, 2:5, 2:5] = True
    predicted = truth.copy()
    predicted[:, 6:10, 6:10] = True
    (z, y, x), label = next_click(predicted, truth)
    assert label == 0 and predicted[z, y, x] and not truth[z, y, x]
    assert next_click(truth, truth) is None
