"""Metrics against MONAI's independent implementation and hand-checked cases."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from MedicalSAM3Core.evaluation.metrics import score


def _blob(shape, rng, n=3):
    z, y, x = np.meshgrid(*[np.arange(s) for s in shape], indexing="ij")
    mask = np.zeros(shape, bool)
    for _ in range(n):
        c = rng.uniform(0.25, 0.75, 3) * np.array(shape)
        r = rng.uniform(0.12, 0.3, 3) * np.array(shape)
        mask |= ((z - c[0]) / r[0]) ** 2 + ((y - c[1]) / r[1]) ** 2 + ((x - c[2]) / r[2]) ** 2 < 1
    return mask


@pytest.mark.parametrize("seed", range(4))
def test_against_monai_on_random_shapes_with_anisotropic_spacing(seed):
    from monai.metrics import compute_dice, compute_hausdorff_distance, compute_iou, compute_surface_dice

    rng = np.random.default_rng(seed)
    shape = (14, 30, 26)
    pred, truth = _blob(shape, rng), _blob(shape, rng)
    spacing = (3.0, 0.8, 1.1)  # z, y, x in mm
    tau = 2.0
    ours = score(pred, truth, spacing, tau)

    def t(mask):
        return torch.from_numpy(mask)[None, None].float()

    assert ours.dice == pytest.approx(float(compute_dice(t(pred), t(truth))), abs=1e-6)
    assert ours.iou == pytest.approx(float(compute_iou(t(pred), t(truth))), abs=1e-6)
    hd95 = float(compute_hausdorff_distance(t(pred), t(truth), percentile=95, spacing=spacing))
    assert ours.hd95 == pytest.approx(hd95, rel=1e-5)
    nsd = float(compute_surface_dice(t(pred), t(truth), class_thresholds=[tau], spacing=spacing,
                                     include_background=True))
    assert ours.nsd == pytest.approx(nsd, abs=1e-6)


def test_hand_checked_shifted_cube():
    truth = np.zeros((10, 10, 10), bool)
    truth[2:6, 2:6, 2:6] = True
    pred = np.roll(truth, 1, axis=2)  # one voxel along x (spacing 2 mm)
    s = score(pred, truth, (1.0, 1.0, 2.0), tolerance_mm=1.9)
    assert s.dice == pytest.approx(2 * 48 / 128) and s.iou == pytest.approx(48 / 80)
    assert s.hd95 == pytest.approx(2.0)  # far faces are 2 mm from the other surface
    # the two x-faces (16 voxels each) of each cube are 2 mm from the other surface: beyond 1.9 mm
    assert 0 < s.nsd < 1


def test_empty_rules():
    empty, full = np.zeros((3, 4, 4), bool), np.ones((3, 4, 4), bool)
    both = score(empty, empty, (1, 1, 1))
    assert (both.dice, both.iou, both.nsd, both.hd95, both.case_type) == (1.0, 1.0, 1.0, 0.0, "both empty")
    missed = score(empty, full, (1, 1, 1))
    assert (missed.dice, missed.nsd) == (0.0, 0.0) and math.isinf(missed.hd95)
    assert missed.case_type == "missed (prediction empty)"
    assert score(full, empty, (1, 1, 1)).case_type == "false positive (truth empty)"
