"""Matching and losses against hand-built cases and independent implementations (torchvision)."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch
import torchvision.ops as tv

from Training.losses import Criterion, LossWeights, dice_loss, sigmoid_focal_loss
from Training.matcher import generalized_box_iou, hungarian_match, one_to_many_match
from Training.model import DetectorOutputs


def test_hungarian_is_optimal_on_hand_built_costs():
    cost = torch.tensor([[4.0, 1.0, 3.0], [2.0, 0.0, 5.0], [3.0, 2.0, 2.0], [0.5, 9.0, 9.0]])
    queries, targets = hungarian_match(cost)
    best = min(sum(cost[q, t] for q, t in zip(perm, range(3))) for perm in itertools.permutations(range(4), 3))
    assert list(targets) == [0, 1, 2]
    assert float(cost[torch.as_tensor(queries), torch.as_tensor(targets)].sum()) == pytest.approx(float(best))
    assert list(queries) == [3, 1, 2]


def test_one_to_many_takes_the_k_cheapest_overlapping_queries():
    target = torch.tensor([[0.2, 0.2, 0.6, 0.6]])
    boxes = torch.tensor([[0.2, 0.2, 0.6, 0.6], [0.21, 0.2, 0.6, 0.6], [0.2, 0.22, 0.6, 0.6], [0.25, 0.25, 0.6, 0.6],
                          [0.7, 0.7, 0.9, 0.9]])  # the last does not overlap
    cost = torch.tensor([[0.0], [1.0], [2.0], [3.0], [-5.0]])  # the far box is "cheapest" but IoU 0
    queries, targets = one_to_many_match(cost, boxes, target, k=3, iou_threshold=0.5)
    # the one-to-one match (query 4, lowest cost) is always kept; the other two are the cheapest
    # queries that overlap the target (0 and 1; 2 and 3 cost more, 4 does not overlap)
    assert hungarian_match(cost)[0].tolist() == [4]
    assert sorted(queries.tolist()) == [0, 1, 4] and set(targets.tolist()) == {0}


def test_focal_giou_and_dice_equal_independent_implementations():
    torch.manual_seed(0)
    logits, targets = torch.randn(5, 7), (torch.rand(5, 7) > 0.5).float()
    torch.testing.assert_close(sigmoid_focal_loss(logits, targets),
                               tv.sigmoid_focal_loss(logits, targets, alpha=0.25, gamma=2.0, reduction="none"))
    a = torch.tensor([[0.1, 0.1, 0.5, 0.4], [0.3, 0.2, 0.9, 0.8]])
    b = torch.tensor([[0.2, 0.0, 0.6, 0.5], [0.0, 0.0, 0.2, 0.2], [0.3, 0.2, 0.9, 0.8]])
    torch.testing.assert_close(generalized_box_iou(a, b), tv.generalized_box_iou(a, b))
    mask_logits, mask_targets = torch.randn(3, 8, 8), (torch.rand(3, 8, 8) > 0.5).float()
    p = mask_logits.sigmoid().flatten(1)
    expected = 1 - (2 * (p * mask_targets.flatten(1)).sum(1) + 1) / (p.sum(1) + mask_targets.flatten(1).sum(1) + 1)
    torch.testing.assert_close(dice_loss(mask_logits, mask_targets), expected)


def _outputs(boxes, present: bool, q: int = 4, layers: int = 2, size: int = 16, perfect: bool = True):
    """Detector outputs that are perfect (or not) for one image with ``boxes`` (xyxy)."""
    logits = torch.full((layers, 1, q), -30.0)
    out_boxes = torch.tensor([[0.0, 0.0, 0.1, 0.1]]).repeat(layers, 1, q, 1)
    masks = torch.full((1, q, size, size), -30.0)
    semantic = torch.full((1, 1, size, size), -30.0)
    target_masks = torch.zeros((len(boxes), 64, 64), dtype=torch.bool)
    for n, box in enumerate(boxes):
        x1, y1, x2, y2 = (np.asarray(box) * 64).round().astype(int)
        target_masks[n, y1:y2, x1:x2] = True
        if perfect:
            logits[:, 0, n] = 30.0
            out_boxes[:, 0, n] = torch.tensor(box)
            small = torch.nn.functional.interpolate(target_masks[n][None, None].float(), size=(size, size), mode="area")[0, 0]
            masks[0, n] = torch.where(small > 0.5, 30.0, -30.0)
            semantic[0, 0] = torch.maximum(semantic[0, 0], masks[0, n])
    presence = torch.full((layers, 1), 30.0 if present == perfect else -30.0)
    return DetectorOutputs(logits, out_boxes, presence, masks, semantic), [{"boxes": torch.tensor(boxes).reshape(-1, 4),
                                                                          "masks": target_masks}]


def test_perfect_predictions_cost_almost_nothing_and_wrong_ones_do():
    boxes = [[0.25, 0.25, 0.5, 0.75], [0.5, 0.0, 1.0, 0.25]]  # on the 16-px grid: exact area resampling
    criterion = Criterion(LossWeights(o2m=0.0))
    total, terms = criterion(*_outputs(boxes, present=True))
    assert terms["l1"] < 1e-6 and terms["giou"] < 1e-6 and terms["class"] < 1e-6 and terms["presence"] < 1e-6
    assert terms["mask"] < 1e-6 and terms["dice"] < 0.01 and terms["semantic"] < 1e-6
    wrong, wrong_terms = criterion(*_outputs(boxes, present=True, perfect=False))
    assert float(wrong) > 100 * float(total) + 1
    negative, neg_terms = criterion(*_outputs([], present=False))  # concept absent, nothing predicted
    assert neg_terms["class"] < 1e-6 and neg_terms["presence"] < 1e-6 and float(negative) < 1e-3


def test_class_term_equals_direct_computation():
    outputs, targets = _outputs([[0.25, 0.25, 0.5, 0.75]], present=True, perfect=False)
    outputs.logits.normal_()
    criterion = Criterion(LossWeights(o2m=0.0, aux=False))
    _, terms = criterion(outputs, targets)
    from Training.matcher import match_cost

    q, _ = hungarian_match(match_cost(outputs.logits[-1, 0], outputs.boxes[-1, 0], targets[0]["boxes"]))
    labels = torch.zeros(4)
    labels[q] = 1
    expected = tv.sigmoid_focal_loss(outputs.logits[-1, 0], labels, reduction="sum") / 1.0
    assert terms["class"] == pytest.approx(float(expected), rel=1e-5)


def test_every_term_equals_a_direct_computation():
    """Random outputs, two images (one with two instances, one negative): each loss term recomputed
    independently from the matched pairs (torchvision and plain torch)."""
    import torch.nn.functional as F

    from Training.matcher import box_xyxy_to_cxcywh, match_cost

    torch.manual_seed(1)
    q, size = 6, 16
    boxes = torch.sort(torch.rand(1, 2, q, 4), dim=-1).values[..., [0, 1, 2, 3]]
    boxes = torch.stack([boxes[..., 0], boxes[..., 1], boxes[..., 0] + 0.3, boxes[..., 1] + 0.3], -1).clamp(0, 1)
    outputs = DetectorOutputs(torch.randn(1, 2, q), boxes, torch.randn(1, 2), torch.randn(2, q, size, size),
                              torch.randn(2, 1, size, size))
    masks = torch.zeros((2, 32, 32), dtype=torch.bool)
    masks[0, 4:12, 4:20], masks[1, 20:30, 8:16] = True, True
    targets = [{"boxes": torch.tensor([[0.125, 0.125, 0.625, 0.375], [0.25, 0.625, 0.5, 0.9375]]), "masks": masks},
               {"boxes": torch.zeros((0, 4)), "masks": torch.zeros((0, 32, 32), dtype=torch.bool)}]
    _, terms = Criterion(LossWeights(o2m=0.0, aux=False))(outputs, targets)

    queries, indices = hungarian_match(match_cost(outputs.logits[0, 0], outputs.boxes[0, 0], targets[0]["boxes"]))
    n = 2.0
    labels = torch.zeros(2, q)
    labels[0, queries] = 1
    pred, true = outputs.boxes[0, 0, queries], targets[0]["boxes"][indices]
    # image 1 lacks the concept: only the presence head is told so (SAM3 with a presence token)
    assert terms["class"] == pytest.approx(float(tv.sigmoid_focal_loss(outputs.logits[0, 0], labels[0], reduction="sum")) / n, rel=1e-5)
    _, every = Criterion(LossWeights(o2m=0.0, aux=False), class_on_absent=True)(outputs, targets)
    assert every["class"] == pytest.approx(float(tv.sigmoid_focal_loss(outputs.logits[0], labels, reduction="sum")) / n, rel=1e-5)
    assert terms["l1"] == pytest.approx(float((box_xyxy_to_cxcywh(pred) - box_xyxy_to_cxcywh(true)).abs().sum()) / n, rel=1e-5)
    assert terms["giou"] == pytest.approx(float((1 - torch.diag(tv.generalized_box_iou(pred, true))).sum()) / n, rel=1e-5)
    present = torch.tensor([1.0, 0.0])
    assert terms["presence"] == pytest.approx(float(F.binary_cross_entropy_with_logits(outputs.presence[0], present)), rel=1e-5)
    small = F.avg_pool2d(masks.float()[:, None], 2)[:, 0]  # area resampling 32 -> 16
    pred_masks, true_masks = outputs.masks[0, queries], small[indices]
    focal = tv.sigmoid_focal_loss(pred_masks, true_masks, reduction="none").flatten(1).mean(1).sum() / n
    assert terms["mask"] == pytest.approx(float(focal), rel=1e-5)
    p = pred_masks.sigmoid().flatten(1)
    t = true_masks.flatten(1)
    dice = (1 - (2 * (p * t).sum(1) + 1) / (p.sum(1) + t.sum(1) + 1)).sum() / n
    assert terms["dice"] == pytest.approx(float(dice), rel=1e-5)
    semantic_target = torch.stack([small.amax(0), torch.zeros(size, size)])
    semantic = F.binary_cross_entropy_with_logits(outputs.semantic[:, 0], semantic_target)
    assert terms["semantic"] == pytest.approx(float(semantic), rel=1e-5)


@pytest.mark.parametrize("kind", ["iabce", "bce"])
def test_sam3_iou_aware_bce_equals_its_formula(kind):
    """SAM3's IABCEMdetr (gamma 2, alpha 0.25, pos_weight 10, mean over query slots; no class loss on
    an image without the concept), written out element by element from its definition."""
    import math

    from Training.matcher import match_cost

    torch.manual_seed(3)
    q = 5
    logits = torch.randn(1, 2, q)
    xy = torch.rand(1, 2, q, 2) * 0.5
    boxes = torch.cat([xy, xy + 0.2 + torch.rand(1, 2, q, 2) * 0.3], -1)
    outputs = DetectorOutputs(logits, boxes, torch.randn(1, 2), torch.randn(2, q, 8, 8), None)
    masks = torch.zeros((1, 16, 16), dtype=torch.bool)
    masks[0, 2:10, 4:12] = True
    targets = [{"boxes": torch.tensor([[0.25, 0.125, 0.75, 0.625]]), "masks": masks},
               {"boxes": torch.zeros((0, 4)), "masks": torch.zeros((0, 16, 16), dtype=torch.bool)}]
    _, terms = Criterion(LossWeights(o2m=0.0, aux=False), class_loss=kind, pos_weight=10.0)(outputs, targets)

    (matched,), _ = hungarian_match(match_cost(logits[0, 0], boxes[0, 0], targets[0]["boxes"]))
    expected = 0.0
    for b in range(2):
        for j in range(q):
            x = float(logits[0, b, j])
            p = 1 / (1 + math.exp(-x))
            if b == 1:  # concept absent: no class loss at all
                continue
            if j == matched:
                iou = float(tv.box_iou(boxes[0, 0, j][None], targets[0]["boxes"])[0, 0])
                t = max(p ** 0.25 * iou ** 0.75, 0.01) if kind == "iabce" else 1.0
                expected += 10.0 * -(t * math.log(p) + (1 - t) * math.log(1 - p))
            else:
                expected += -math.log(1 - p) * p ** 2
    assert terms["class"] == pytest.approx(expected / (2 * q), rel=1e-5)


def test_unknown_class_loss_is_refused():
    with pytest.raises(ValueError, match="class_loss"):
        Criterion(class_loss="softmax")


def test_mask_matching_cost_equals_its_formula_and_overrides_misleading_boxes():
    """``MatchCosts(mask=, dice=)``: per (query, instance) pixel-mean BCE and 1 - Dice of the query's
    mask; with it the last layer's match follows the masks when the boxes point elsewhere."""
    import torch.nn.functional as F

    from Training.matcher import MatchCosts, mask_cost

    torch.manual_seed(4)
    logits, targets = torch.randn(3, 8, 8), (torch.rand(2, 8, 8) > 0.5).float()
    cost = mask_cost(logits, targets, MatchCosts(mask=2.0, dice=3.0))
    for q in range(3):
        for n in range(2):
            bce = F.binary_cross_entropy_with_logits(logits[q], targets[n])
            p = logits[q].sigmoid()
            dice = 1 - (2 * (p * targets[n]).sum() + 1) / (p.sum() + targets[n].sum() + 1)
            assert float(cost[q, n]) == pytest.approx(float(2.0 * bce + 3.0 * dice), rel=1e-5)

    q, size = 3, 16
    masks = torch.zeros((1, 32, 32), dtype=torch.bool)
    masks[0, 4:12, 4:12] = True  # top-left instance
    target = [{"boxes": torch.tensor([[0.125, 0.125, 0.375, 0.375]]), "masks": masks}]
    boxes = torch.tensor([[0.6, 0.6, 0.9, 0.9], [0.125, 0.125, 0.375, 0.375], [0.0, 0.6, 0.3, 0.9]])
    mask_logits = torch.full((1, q, size, size), -10.0)
    mask_logits[0, 0, 2:6, 2:6] = 10.0  # query 0: the right mask under a wrong box
    outputs = DetectorOutputs(torch.zeros(1, 1, q), boxes[None, None], torch.zeros(1, 1), mask_logits, None)
    plain = Criterion(LossWeights(o2m=0.0, aux=False))
    with_masks = Criterion(LossWeights(o2m=0.0, aux=False), MatchCosts(mask=10.0, dice=10.0))
    _, by_box = plain(outputs, target)
    _, by_mask = with_masks(outputs, target)
    assert by_mask["dice"] < 0.01 < by_box["dice"]  # the mask terms now supervise query 0, whose mask fits
