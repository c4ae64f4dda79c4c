"""Segmentation metrics on ``(z, y, x)`` binary masks with anisotropic spacing (numpy + scipy only).

* Dice, IoU: voxel overlap.
* Surface distances: the surface of a mask is its voxels with a face-neighbour outside it
  (the mask minus its 6-connected erosion); distances are Euclidean in millimetres between
  voxel centres (``scipy.ndimage.distance_transform_edt`` with the spacing), as MONAI's
  ``compute_hausdorff_distance`` / ``compute_surface_dice`` define them.
* HD95: the larger of the two directed 95th percentiles (prediction -> truth, truth -> prediction).
* NSD (normalised surface Dice, Nikolov et al. 2021) at tolerance ``tau`` mm: the fraction of both
  surfaces lying within ``tau`` of the other surface, counted in surface voxels.

Empty masks (documented rules, as in the Medical Segmentation Decathlon / Metrics Reloaded):

=====================  =====  =====  =====  ================
prediction / truth      Dice   IoU    NSD    HD95
=====================  =====  =====  =====  ================
both empty              1      1      1      0
one of them empty       0      0      0      inf (undefined)
=====================  =====  =====  =====  ================

Summaries average Dice/IoU/NSD over all cases and HD95 over finite values only, and say how
many were left out.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

import numpy as np
from scipy import ndimage


@dataclass(frozen=True)
class Scores:
    dice: float
    iou: float
    nsd: float
    hd95: float
    pred_voxels: int
    true_voxels: int

    @property
    def case_type(self) -> str:
        if self.pred_voxels == 0 and self.true_voxels == 0:
            return "both empty"
        if self.true_voxels == 0:
            return "false positive (truth empty)"
        if self.pred_voxels == 0:
            return "missed (prediction empty)"
        return "both present"


def _crop(pred: np.ndarray, truth: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Both masks cut to the bounding box of their union plus one voxel (surfaces unchanged)."""
    union = pred | truth
    slices = []
    for axis in range(union.ndim):
        present = np.nonzero(union.any(axis=tuple(a for a in range(union.ndim) if a != axis)))[0]
        slices.append(slice(max(0, present[0] - 1), present[-1] + 2))
    return pred[tuple(slices)], truth[tuple(slices)]


def surface(mask: np.ndarray) -> np.ndarray:
    """Voxels of ``mask`` with at least one face-neighbour outside it (array borders count as outside)."""
    eroded = ndimage.binary_erosion(mask, structure=ndimage.generate_binary_structure(mask.ndim, 1), border_value=0)
    return mask & ~eroded


def surface_distances(pred: np.ndarray, truth: np.ndarray, spacing_zyx: Sequence[float]) -> tuple[np.ndarray, np.ndarray]:
    """Distances (mm) from each surface voxel of ``pred`` to ``truth``'s surface, and the reverse.
    Both masks must be non-empty."""
    pred, truth = _crop(pred, truth)
    s_pred, s_true = surface(pred), surface(truth)
    to_true = ndimage.distance_transform_edt(~s_true, sampling=spacing_zyx)
    to_pred = ndimage.distance_transform_edt(~s_pred, sampling=spacing_zyx)
    return to_true[s_pred], to_pred[s_true]


def score(pred: np.ndarray, truth: np.ndarray, spacing_zyx: Sequence[float], tolerance_mm: float = 2.0) -> Scores:
    """All metrics for one structure. ``spacing_zyx`` is the voxel size along the array axes (mm)."""
    pred, truth = np.asarray(pred, bool), np.asarray(truth, bool)
    if pred.shape != truth.shape:
        raise ValueError(f"prediction {pred.shape} and truth {truth.shape} differ in shape")
    n_pred, n_true = int(pred.sum()), int(truth.sum())
    if n_pred == 0 and n_true == 0:
        return Scores(1.0, 1.0, 1.0, 0.0, 0, 0)
    if n_pred == 0 or n_true == 0:
        return Scores(0.0, 0.0, 0.0, math.inf, n_pred, n_true)
    inter = int((pred & truth).sum())
    dice = 2.0 * inter / (n_pred + n_true)
    iou = inter / (n_pred + n_true - inter)
    d_pred, d_true = surface_distances(pred, truth, spacing_zyx)
    hd95 = float(max(np.percentile(d_pred, 95), np.percentile(d_true, 95)))
    nsd = float(((d_pred <= tolerance_mm).sum() + (d_true <= tolerance_mm).sum()) / (d_pred.size + d_true.size))
    return Scores(dice, iou, nsd, hd95, n_pred, n_true)
