"""transformers' ``Sam3Model`` for training: the standard forward plus every decoder layer's outputs.

SAM3 is trained with losses on every DETR decoder layer (deep supervision). transformers'
forward computes the class logits and boxes of all layers but returns only the last; forward
hooks on the two heads keep the rest, so the network itself is transformers' unchanged.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
from transformers.models.sam3.modeling_sam3 import box_cxcywh_to_xyxy, inverse_sigmoid


@dataclass
class DetectorOutputs:
    """Per-layer detections and last-layer masks of one batch of (image, text) pairs.

    ``logits``: ``(L, B, Q)`` class logits; ``boxes``: ``(L, B, Q, 4)`` normalised ``(x1, y1, x2, y2)``;
    ``presence``: ``(L, B)`` presence logits; ``masks``: ``(B, Q, h, w)`` mask logits of the last
    layer; ``semantic``: ``(B, 1, h, w)`` semantic-segmentation logits.
    """

    logits: torch.Tensor
    boxes: torch.Tensor
    presence: torch.Tensor
    masks: torch.Tensor
    semantic: Optional[torch.Tensor]


def forward_all_layers(detector: torch.nn.Module, pixel_values: torch.Tensor, input_ids: torch.Tensor,
                       attention_mask: torch.Tensor, input_boxes: Optional[torch.Tensor] = None,
                       input_boxes_labels: Optional[torch.Tensor] = None) -> DetectorOutputs:
    """Run ``detector`` (a ``Sam3Model``; may be wrapped by DDP) and collect every layer's outputs.

    ``input_boxes`` ``(B, N, 4)`` normalised cxcywh with ``input_boxes_labels`` ``(B, N)`` (1 positive,
    -10 padding) add box prompts to the text, as SAM3's training does with some probability."""
    core = detector.module if hasattr(detector, "module") else detector
    captured: dict = {}

    def on_scores(_module, _inputs, output):
        captured["logits"] = output.squeeze(-1)  # (L, B, Q)

    def on_box_head(_module, inputs, output):
        if inputs[0].ndim == 4:  # the call on all layers' hidden states, not the per-layer refinement
            captured["offsets"] = output

    def on_decoder(_module, _inputs, output):
        captured["references"] = output.reference_boxes  # (L, B, Q, 4), cxcywh in [0, 1]
        captured["presence"] = output.presence_logits  # (L, B, 1)

    handles = [core.dot_product_scoring.register_forward_hook(on_scores),
               core.detr_decoder.box_head.register_forward_hook(on_box_head),
               core.detr_decoder.register_forward_hook(on_decoder)]
    try:
        outputs = detector(pixel_values=pixel_values, input_ids=input_ids, attention_mask=attention_mask,
                           input_boxes=input_boxes, input_boxes_labels=input_boxes_labels)
    finally:
        for handle in handles:
            handle.remove()
    boxes = box_cxcywh_to_xyxy((inverse_sigmoid(captured["references"]) + captured["offsets"]).sigmoid())
    presence = captured["presence"].reshape(captured["presence"].shape[0], -1)
    return DetectorOutputs(captured["logits"], boxes, presence, outputs.pred_masks, outputs.semantic_seg)
