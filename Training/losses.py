"""SAM3's training losses for text-prompted detection + segmentation.

Per image (one text prompt) and per decoder layer:

* ``class`` on every query's logit, target 1 for the queries matched one-to-one to a ground truth,
  else 0; one of (``Criterion.class_loss``):

  - ``"focal"``: sigmoid focal loss (alpha 0.25, gamma 2), summed and normalised by the number of
    instances (the Medical SAM3 recipe);
  - ``"iabce"``: SAM3's IoU-aware BCE (``IABCEMdetr``): matched queries get BCE towards the soft
    target ``prob**0.25 * IoU**0.75`` (detached, at least 0.01) weighted by ``pos_weight`` (10),
    the others BCE towards 0 weighted by ``prob**2``; mean over the query slots;
  - ``"bce"``: the same with target 1 for matched queries (scores then do not follow box quality).

  As SAM3 trains it with a presence head, images without the concept get no class loss
  (``class_on_absent=False``): recognising the concept is the presence token's job, the queries only
  localise it ("decoupled recognition and localisation");
* ``presence``: BCE of the presence logit against "the concept is in this image";
* ``l1`` + ``giou``: box losses of the matched queries (boxes normalised cxcywh for L1, xyxy for GIoU);
* ``mask`` (sigmoid focal) + ``dice``: last layer's masks of the matched queries against the
  ground-truth masks resampled (area) to the mask logits' resolution;
* ``semantic``: BCE of the semantic-segmentation head against the union of the instances;
* ``o2m_class`` + ``o2m_l1`` + ``o2m_giou``: the same terms for the one-to-many assignment.

Default weights are SAM3's training configuration (class 20, presence 20, L1 5, GIoU 2, mask 200,
dice 10; as used by its ``IABCEMdetr``/``Boxes``/``Masks`` losses); the default class loss is the
focal loss the Medical SAM3 recipe names. Sums are normalised by the number of
ground-truth instances over the whole (distributed) batch, as DETR does, so a batch split
across processes gives the same gradients as one process.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.distributed as dist
import torch.nn.functional as F

from .matcher import (MatchCosts, box_iou, box_xyxy_to_cxcywh, generalized_box_iou, hungarian_match, mask_cost, match_cost,
                      one_to_many_match)
from .model import DetectorOutputs


def sigmoid_focal_loss(logits: torch.Tensor, targets: torch.Tensor, alpha: float = 0.25,
                       gamma: float = 2.0) -> torch.Tensor:
    """Elementwise focal loss (Lin et al. 2017) on logits; ``targets`` in [0, 1]."""
    prob = logits.sigmoid()
    ce = F.binary_cross_entropy_with_logits(logits, targets, reduction="none")
    p_t = prob * targets + (1 - prob) * (1 - targets)
    loss = ce * (1 - p_t) ** gamma
    if alpha >= 0:
        loss = (alpha * targets + (1 - alpha) * (1 - targets)) * loss
    return loss


def dice_loss(logits: torch.Tensor, targets: torch.Tensor, smooth: float = 1.0) -> torch.Tensor:
    """``1 - Dice`` per mask: ``logits``/``targets`` ``(N, h, w)`` -> ``(N,)``."""
    prob = logits.sigmoid().flatten(1)
    targets = targets.flatten(1)
    numerator = 2 * (prob * targets).sum(-1) + smooth
    return 1 - numerator / (prob.sum(-1) + targets.sum(-1) + smooth)


@dataclass
class LossWeights:
    cls: float = 20.0
    presence: float = 20.0
    l1: float = 5.0
    giou: float = 2.0
    mask: float = 200.0
    dice: float = 10.0
    semantic: float = 10.0
    o2m: float = 1.0  # multiplies the one-to-many class/box terms
    aux: bool = True  # losses on every decoder layer, not only the last


@dataclass
class Criterion:
    """Matches and weighs everything above; ``__call__`` returns ``(total, {term: value})``."""

    weights: LossWeights = field(default_factory=LossWeights)
    costs: MatchCosts = field(default_factory=MatchCosts)
    o2m_k: int = 4
    o2m_iou: float = 0.5
    class_loss: str = "focal"  # focal | iabce | bce (see the module docstring)
    pos_weight: float = 10.0  # iabce/bce: weight of the matched queries' term (SAM3: 10)
    class_on_absent: bool = False  # True: class loss (all targets 0) also where the concept is absent

    def __post_init__(self) -> None:
        if self.class_loss not in ("focal", "iabce", "bce"):
            raise ValueError(f"class_loss must be focal, iabce or bce, got {self.class_loss!r}")

    def __call__(self, out: DetectorOutputs, targets: list[dict]) -> tuple[torch.Tensor, dict]:
        """``targets[b]``: ``{"boxes": (N, 4) xyxy in [0, 1], "masks": (N, S, S) bool}`` (N may be 0)."""
        device = out.logits.device
        n_boxes = torch.tensor(float(sum(len(t["boxes"]) for t in targets)), device=device)
        world = 1
        if dist.is_available() and dist.is_initialized():
            dist.all_reduce(n_boxes)
            world = dist.get_world_size()
        # clamp the global count, then share it out: DDP averages the ranks' gradients, so each rank
        # divides by count / world (clamping per rank would break equivalence with one process)
        norm = n_boxes.clamp(min=1.0) / world
        layers = range(out.logits.shape[0]) if self.weights.aux else [out.logits.shape[0] - 1]
        terms: dict[str, torch.Tensor] = {}

        def add(name: str, value: torch.Tensor) -> None:
            terms[name] = terms.get(name, 0.0) + value

        last = out.logits.shape[0] - 1
        last_matches = None
        for layer in layers:
            matches, o2m = [], []
            for b, target in enumerate(targets):
                boxes_t = target["boxes"].to(device)
                cost = match_cost(out.logits[layer, b], out.boxes[layer, b], boxes_t, self.costs)
                if layer == last and (self.costs.mask or self.costs.dice) and len(boxes_t):
                    with torch.no_grad():
                        small = F.interpolate(target["masks"].to(device)[:, None].float(), size=out.masks.shape[-2:],
                                              mode="area")[:, 0]
                        cost = cost + mask_cost(out.masks[b], small, self.costs)
                matches.append(hungarian_match(cost))
                o2m.append(one_to_many_match(cost, out.boxes[layer, b], boxes_t, self.o2m_k, self.o2m_iou)
                           if self.weights.o2m else None)
            if layer == last:
                last_matches = matches
            cls, l1, giou = self._detection_terms(out, layer, targets, matches, norm)
            add("class", cls)
            add("l1", l1)
            add("giou", giou)
            if self.weights.o2m:
                cls, l1, giou = self._detection_terms(out, layer, targets, o2m, norm)
                add("o2m_class", cls)
                add("o2m_l1", l1)
                add("o2m_giou", giou)
            present = torch.tensor([float(len(t["boxes"]) > 0) for t in targets], device=device)
            add("presence", F.binary_cross_entropy_with_logits(out.presence[layer].float(), present))
        mask, dice, semantic = self._mask_terms(out, targets, last_matches, norm)
        terms.update(mask=mask, dice=dice, semantic=semantic)
        w = self.weights
        scale = {"class": w.cls, "presence": w.presence, "l1": w.l1, "giou": w.giou, "mask": w.mask,
                 "dice": w.dice, "semantic": w.semantic, "o2m_class": w.cls * w.o2m, "o2m_l1": w.l1 * w.o2m,
                 "o2m_giou": w.giou * w.o2m}
        total = sum(scale[name] * value for name, value in terms.items())
        return total, {name: float(value.detach()) for name, value in terms.items()}

    def _detection_terms(self, out: DetectorOutputs, layer: int, targets: list[dict], matches, norm):
        logits = out.logits[layer].float()
        labels = torch.zeros_like(logits)
        pred, true = [], []
        for b, (queries, indices) in enumerate(matches):
            if len(queries):
                labels[b, torch.as_tensor(queries)] = 1.0
                pred.append(out.boxes[layer, b, torch.as_tensor(queries)].float())
                true.append(targets[b]["boxes"].to(logits.device)[torch.as_tensor(indices)].float())
        keep = torch.ones_like(logits) if self.class_on_absent else \
            torch.tensor([float(len(t["boxes"]) > 0) for t in targets], device=logits.device)[:, None]  # absent: presence only
        if self.class_loss == "focal":
            cls = (sigmoid_focal_loss(logits, labels) * keep).sum() / norm
        else:
            cls = self._iabce(logits, labels, out.boxes[layer].float(), matches, targets, keep)
        if pred:
            pred_t, true_t = torch.cat(pred), torch.cat(true)
            l1 = F.l1_loss(box_xyxy_to_cxcywh(pred_t), box_xyxy_to_cxcywh(true_t), reduction="sum") / norm
            giou = (1 - torch.diag(generalized_box_iou(pred_t, true_t))).sum() / norm
        else:  # keep the box head in the graph (DDP expects a gradient for every parameter)
            l1 = giou = out.boxes[layer].sum() * 0.0
        return cls, l1, giou

    def _iabce(self, logits: torch.Tensor, labels: torch.Tensor, boxes: torch.Tensor, matches, targets,
               keep: torch.Tensor) -> torch.Tensor:
        """SAM3's ``IABCEMdetr`` (gamma 2, alpha 0.25, non-focal positives), mean over the query slots
        of all images (SAM3 averages over every slot too: its ``weak_loss`` normalisation)."""
        prob = logits.sigmoid()
        soft = labels.clone()
        if self.class_loss == "iabce":
            with torch.no_grad():
                for b, (queries, indices) in enumerate(matches):
                    if len(queries):
                        q = torch.as_tensor(queries)
                        truth = targets[b]["boxes"].to(logits.device)[torch.as_tensor(indices)].float()
                        iou = torch.diag(box_iou(boxes[b, q], truth)[0])
                        soft[b, q] = (prob[b, q] ** 0.25 * iou ** 0.75).clamp(min=0.01)
        positive = F.binary_cross_entropy_with_logits(logits, soft.detach(), reduction="none") * labels * self.pos_weight
        negative = F.binary_cross_entropy_with_logits(logits, labels, reduction="none") * (1 - labels) * prob ** 2
        return ((positive + negative) * keep).sum() / logits.numel()

    @staticmethod
    def _mask_terms(out: DetectorOutputs, targets: list[dict], matches, norm):
        masks = out.masks.float()
        size = masks.shape[-2:]
        pred, true = [], []
        semantic_targets = []
        for b, (queries, indices) in enumerate(matches):
            target_masks = targets[b]["masks"].to(masks.device).float()
            if len(target_masks):
                resized = F.interpolate(target_masks[:, None], size=size, mode="area")[:, 0]
                semantic_targets.append(resized.amax(0))
            else:
                semantic_targets.append(masks.new_zeros(size))
            if len(queries):
                pred.append(masks[b, torch.as_tensor(queries)])
                true.append(resized[torch.as_tensor(indices)])
        if pred:
            pred_t, true_t = torch.cat(pred), torch.cat(true)
            mask = sigmoid_focal_loss(pred_t, true_t).flatten(1).mean(-1).sum() / norm
            dice = dice_loss(pred_t, true_t).sum() / norm
        else:
            mask = dice = masks.sum() * 0.0
        if out.semantic is not None:
            semantic_logits = F.interpolate(out.semantic.float(), size=size, mode="bilinear", align_corners=False)[:, 0]
            semantic = F.binary_cross_entropy_with_logits(semantic_logits, torch.stack(semantic_targets))
        else:
            semantic = masks.sum() * 0.0
        return mask, dice, semantic
