"""Assigning predictions (queries) to ground-truth instances.

* :func:`hungarian_match`: DETR's one-to-one matching (scipy ``linear_sum_assignment``) on
  ``w_class * focal_class_cost + w_l1 * L1(cxcywh) - w_giou * GIoU``, as SAM3's
  ``HungarianMatcher`` (sam3/train/matcher.py) defines it; defaults (2, 5, 2) are DETR's.
  Optionally (``MatchCosts.mask``/``dice`` > 0, off by default; Mask2Former uses 5 and 5) the
  last decoder layer's matching also weighs how well each query's MASK fits each instance
  (pixel-mean BCE and 1 - Dice), which keeps the assignment stable while boxes are still poor
  (training from scratch).
* :func:`one_to_many_match`: the auxiliary assignment that stabilises learning under sparse
  supervision: each ground truth gets its ``k`` best queries (lowest matching cost) among those
  whose box overlaps it with IoU >= ``iou_threshold``, always including its one-to-one match.

Boxes are normalised ``(x1, y1, x2, y2)`` in [0, 1] of the model's square input canvas.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from scipy.optimize import linear_sum_assignment


def box_xyxy_to_cxcywh(boxes: torch.Tensor) -> torch.Tensor:
    x1, y1, x2, y2 = boxes.unbind(-1)
    return torch.stack(((x1 + x2) / 2, (y1 + y2) / 2, x2 - x1, y2 - y1), dim=-1)


def box_iou(a: torch.Tensor, b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Pairwise IoU and union of ``(N, 4)`` and ``(M, 4)`` xyxy boxes -> ``(N, M)`` each."""
    area_a = (a[:, 2] - a[:, 0]).clamp(min=0) * (a[:, 3] - a[:, 1]).clamp(min=0)
    area_b = (b[:, 2] - b[:, 0]).clamp(min=0) * (b[:, 3] - b[:, 1]).clamp(min=0)
    top_left = torch.maximum(a[:, None, :2], b[None, :, :2])
    bottom_right = torch.minimum(a[:, None, 2:], b[None, :, 2:])
    inter = (bottom_right - top_left).clamp(min=0).prod(-1)
    union = area_a[:, None] + area_b[None, :] - inter
    return inter / union.clamp(min=1e-9), union


def generalized_box_iou(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Pairwise GIoU (Rezatofighi et al. 2019) of xyxy boxes -> ``(N, M)`` in [-1, 1]."""
    iou, union = box_iou(a, b)
    top_left = torch.minimum(a[:, None, :2], b[None, :, :2])
    bottom_right = torch.maximum(a[:, None, 2:], b[None, :, 2:])
    hull = (bottom_right - top_left).clamp(min=0).prod(-1)
    return iou - (hull - union) / hull.clamp(min=1e-9)


@dataclass(frozen=True)
class MatchCosts:
    cls: float = 2.0
    l1: float = 5.0
    giou: float = 2.0
    focal_alpha: float = 0.25
    focal_gamma: float = 2.0
    mask: float = 0.0  # last layer: pixel-mean BCE between query mask and instance
    dice: float = 0.0  # last layer: 1 - Dice between query mask and instance


def match_cost(logits: torch.Tensor, boxes: torch.Tensor, target_boxes: torch.Tensor,
               costs: MatchCosts = MatchCosts()) -> torch.Tensor:
    """``(Q, N)`` cost of assigning each of ``Q`` queries to each of ``N`` ground truths of one image."""
    prob = logits.float().sigmoid()
    a, g = costs.focal_alpha, costs.focal_gamma
    positive = a * (1 - prob) ** g * -(prob + 1e-8).log()
    negative = (1 - a) * prob ** g * -(1 - prob + 1e-8).log()
    cost_class = (positive - negative)[:, None].expand(-1, target_boxes.shape[0])
    cost_l1 = torch.cdist(box_xyxy_to_cxcywh(boxes.float()), box_xyxy_to_cxcywh(target_boxes.float()), p=1)
    cost_giou = -generalized_box_iou(boxes.float(), target_boxes.float())
    return costs.cls * cost_class + costs.l1 * cost_l1 + costs.giou * cost_giou


def mask_cost(mask_logits: torch.Tensor, target_masks: torch.Tensor, costs: MatchCosts) -> torch.Tensor:
    """``(Q, N)`` mask part of the matching cost: ``mask_logits`` ``(Q, h, w)``, ``target_masks``
    ``(N, h, w)`` in [0, 1] at the same resolution."""
    logits = mask_logits.float().flatten(1)
    targets = target_masks.float().flatten(1)
    pixels = logits.shape[1]
    # BCE(x, t) = softplus(x) - x * t, averaged over pixels, for every (query, instance) pair
    bce = (torch.nn.functional.softplus(logits).sum(1, keepdim=True) - logits @ targets.T) / pixels
    prob = logits.sigmoid()
    dice = 1 - (2 * prob @ targets.T + 1) / (prob.sum(1, keepdim=True) + targets.sum(1)[None] + 1)
    return costs.mask * bce + costs.dice * dice


@torch.no_grad()
def hungarian_match(cost: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
    """Optimal one-to-one assignment for a ``(Q, N)`` cost matrix: ``(query_indices, target_indices)``,
    sorted by target (every target gets a query when ``Q >= N``)."""
    if cost.numel() == 0:
        return np.zeros(0, np.int64), np.zeros(0, np.int64)
    rows, cols = linear_sum_assignment(cost.detach().cpu().numpy())
    order = np.argsort(cols)
    return rows[order].astype(np.int64), cols[order].astype(np.int64)


@torch.no_grad()
def one_to_many_match(cost: torch.Tensor, boxes: torch.Tensor, target_boxes: torch.Tensor, k: int = 4,
                      iou_threshold: float = 0.5) -> tuple[np.ndarray, np.ndarray]:
    """Each target's ``k`` lowest-cost queries among those with IoU >= ``iou_threshold`` (plus its
    one-to-one match). A query goes to at most one target (the one it costs least for)."""
    if cost.numel() == 0:
        return np.zeros(0, np.int64), np.zeros(0, np.int64)
    iou, _ = box_iou(boxes.float(), target_boxes.float())  # (Q, N)
    eligible = torch.where(iou >= iou_threshold, cost, torch.full_like(cost, float("inf")))
    rows_o2o, cols_o2o = hungarian_match(cost)
    eligible[torch.as_tensor(rows_o2o), torch.as_tensor(cols_o2o)] = -float("inf")  # always kept
    owner = eligible.argmin(dim=1)  # each query's cheapest target
    queries, targets = [], []
    for n in range(cost.shape[1]):
        mine = torch.nonzero((owner == n) & torch.isfinite(eligible[:, n]) | (eligible[:, n] == -float("inf")))
        mine = mine.flatten()
        if mine.numel() == 0:
            continue
        best = mine[torch.argsort(eligible[mine, n])[:k]]
        queries.extend(best.tolist())
        targets.extend([n] * best.numel())
    return np.asarray(queries, np.int64), np.asarray(targets, np.int64)
