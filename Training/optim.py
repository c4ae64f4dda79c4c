"""Optimizer parameter groups and the learning-rate schedule of the Medical SAM3 recipe.

* separate learning rates: vision backbone (ViT), text encoder, and the heads (FPN neck, DETR
  encoder/decoder, scoring, mask decoder) — e.g. 5e-5 / 5e-5 / 3e-4;
* layer-wise decay on the ViT: block ``i`` of ``L`` gets ``lr * decay ** (L - i)`` (embeddings
  ``decay ** (L + 1)``), so early layers keep their generic features (0.85 per block as in
  SAM3/ViTDet);
* no weight decay on norms, biases, embeddings and positional tables;
* linear warmup, then cosine or inverse-square-root decay.
"""

from __future__ import annotations

import math
import re
from typing import Iterable

import torch


def _group_of(name: str) -> str:
    if name.startswith("vision_encoder.backbone."):
        return "backbone"
    if name.startswith("text_encoder.") or name.startswith("text_projection."):
        return "text"
    return "heads"


def _vit_depth(name: str, n_layers: int) -> int:
    """Depth of a backbone parameter: 0 embeddings, i + 1 for block i, n_layers + 1 after the blocks."""
    match = re.search(r"\.layers\.(\d+)\.", name)
    if match:
        return int(match.group(1)) + 1
    if ".embeddings." in name:
        return 0
    return n_layers + 1


def _no_decay(name: str, param: torch.Tensor) -> bool:
    return param.ndim <= 1 or "norm" in name or "embedding" in name or name.endswith(".bias")


def parameter_groups(model: torch.nn.Module, lr_backbone: float, lr_text: float, lr_heads: float,
                     layer_decay: float = 0.85, weight_decay: float = 0.05) -> list[dict]:
    """AdamW parameter groups for a ``Sam3Model`` (trainable parameters only)."""
    n_layers = len(model.vision_encoder.backbone.layers)
    groups: dict[tuple, dict] = {}
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        kind = _group_of(name)
        if kind == "backbone":
            scale = layer_decay ** (n_layers + 1 - _vit_depth(name, n_layers))
            lr = lr_backbone * scale
        else:
            lr = lr_text if kind == "text" else lr_heads
        decay = 0.0 if _no_decay(name, param) else weight_decay
        key = (kind, round(lr, 12), decay)
        group = groups.setdefault(key, {"params": [], "names": [], "lr": lr, "initial_lr": lr,
                                        "weight_decay": decay, "group": kind})
        group["params"].append(param)
        group["names"].append(name)
    return list(groups.values())


def tracker_parameter_groups(video: torch.nn.Module, lr: float, weight_decay: float = 0.05) -> list[dict]:
    """AdamW groups for the tracker of a ``Sam3VideoModel``: ``tracker_model`` and ``tracker_neck`` (the FPN
    neck that feeds it from the shared ViT), one learning rate, no decay on norms, biases and embeddings."""
    groups: dict[float, dict] = {}
    for prefix in ("tracker_model", "tracker_neck"):
        for name, param in getattr(video, prefix).named_parameters():
            if not param.requires_grad:
                continue
            decay = 0.0 if _no_decay(name, param) else weight_decay
            group = groups.setdefault(decay, {"params": [], "names": [], "lr": lr, "initial_lr": lr,
                                              "weight_decay": decay, "group": "tracker"})
            group["params"].append(param)
            group["names"].append(f"{prefix}.{name}")
    return list(groups.values())


def lr_factor(step: int, warmup: int, total: int, schedule: str = "cosine", min_factor: float = 0.01) -> float:
    """Multiplier of every group's initial learning rate at ``step`` (0-based)."""
    if warmup > 0 and step < warmup:
        return (step + 1) / warmup
    if schedule == "cosine":
        progress = min(1.0, (step - warmup) / max(1, total - warmup))
        return min_factor + (1 - min_factor) * 0.5 * (1 + math.cos(math.pi * progress))
    if schedule == "inverse_sqrt":
        return math.sqrt(max(1, warmup) / max(step + 1, max(1, warmup)))
    if schedule == "constant":
        return 1.0
    raise ValueError(f"unknown schedule {schedule!r}: use cosine, inverse_sqrt or constant")


def build_optimizer(groups: Iterable[dict], betas=(0.9, 0.999), eps: float = 1e-8) -> torch.optim.Optimizer:
    return torch.optim.AdamW([{k: v for k, v in g.items() if k != "names"} for g in groups], betas=tuple(betas),
                             eps=eps)
