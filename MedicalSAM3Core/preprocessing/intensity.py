"""Intensity preprocessing: CT windows / MR percentiles -> [0, 1] -> 3 channels -> model size.

One module for inference and training. Windows and percentiles are computed over the whole
volume, never per slice, so the same tissue has the same intensity on every slice. The slice
transform is torch, so it runs on the GPU next to the model.

Arrays are ``(z, y, x)``; a batch of slices is ``(B, H, W)`` = ``(B, y, x)``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence

import numpy as np
import torch

from ..common.errors import InputError
from ..common.options import CT_WINDOWS  # (level, width) in HU; re-exported here
from .layout import SliceLayout

__all__ = ["CT_WINDOWS", "DEFAULT_PERCENTILES", "IntensitySpec", "ct_window", "percentile_spec", "spec_for",
           "to_model_input", "detect_modality"]

#: Default percentiles for MR and other non-CT modalities.
DEFAULT_PERCENTILES = (0.5, 99.5)

#: SAM3's normalisation (transformers' Sam3ImageProcessor: IMAGENET_STANDARD mean/std).
SAM3_MEAN = (0.5, 0.5, 0.5)
SAM3_STD = (0.5, 0.5, 0.5)


@dataclass(frozen=True)
class IntensitySpec:
    """Maps raw voxel values linearly so that ``low -> 0`` and ``high -> 1`` (clipped)."""

    name: str
    low: float
    high: float

    def __post_init__(self) -> None:
        if not (np.isfinite(self.low) and np.isfinite(self.high)) or self.high <= self.low:
            raise InputError(f"intensity range {self.name!r} is empty: [{self.low}, {self.high}]")

    def to_dict(self) -> dict:
        return {"name": self.name, "low": self.low, "high": self.high}


def ct_window(name: str) -> IntensitySpec:
    try:
        level, width = CT_WINDOWS[name]
    except KeyError:
        raise InputError(f"unknown CT window {name!r}; choose one of {', '.join(CT_WINDOWS)}") from None
    return IntensitySpec(name, level - width / 2.0, level + width / 2.0)


def percentile_spec(array: np.ndarray, percentiles: Sequence[float] = DEFAULT_PERCENTILES,
                    max_samples: int = 4_000_000) -> IntensitySpec:
    """Percentile clipping range computed over the whole ``(z, y, x)`` volume.

    Large volumes are subsampled with a fixed stride (deterministic) to bound the cost.
    """
    flat = np.asarray(array).reshape(-1)
    stride = max(1, flat.size // max_samples)
    low, high = np.percentile(flat[::stride].astype(np.float64), list(percentiles))
    if high <= low:
        high = low + 1.0  # constant image: map everything to 0 rather than divide by zero
    return IntensitySpec(f"percentile {percentiles[0]:g}-{percentiles[1]:g}", float(low), float(high))


def detect_modality(array: np.ndarray, declared: Optional[str]) -> str:
    """``"CT"`` or ``"MR"``/other. The file's declared modality wins; otherwise a volume whose
    1st percentile is below -500 is taken as CT in Hounsfield units (air), anything else as MR."""
    if declared:
        return declared.upper()
    sample = np.asarray(array).reshape(-1)[:: max(1, array.size // 1_000_000)]
    return "CT" if float(np.percentile(sample, 1)) < -500 else "MR"


def spec_for(modality: str, array: np.ndarray, window: Optional[str], prompt_window: Optional[str],
             percentiles: Sequence[float] = DEFAULT_PERCENTILES) -> IntensitySpec:
    """The intensity mapping for one prompt.

    CT: the named ``window`` if given, else the prompt's anatomy window from the prompt dictionary
    (``prompt_window``), else soft tissue. Other modalities: volume percentiles (``window`` may
    still force a CT preset, e.g. for a CT whose modality tag is missing).
    """
    if window and window != "auto":
        return ct_window(window)
    if modality == "CT":
        return ct_window(prompt_window or "soft_tissue")
    return percentile_spec(array, percentiles)


def to_model_input(slices: torch.Tensor, spec: IntensitySpec, image_size: int,
                   mean: Sequence[float] = SAM3_MEAN, std: Sequence[float] = SAM3_STD,
                   layout: Optional[SliceLayout] = None) -> torch.Tensor:
    """``(B, H, W)`` raw slices -> ``(B, 3, image_size, image_size)`` float32 model input.

    Window to [0, 1], place on the model's square canvas (``layout``; default: stretch the whole
    slice, bilinear and antialiased, as transformers' Sam3ImageProcessor does), replicate gray to
    3 channels, normalise with the model's mean/std. Training uses this same function.
    """
    if slices.ndim != 3:
        raise ValueError(f"expected (B, H, W) slices, got shape {tuple(slices.shape)}")
    layout = layout or SliceLayout.stretch(tuple(slices.shape[-2:]), image_size)
    if layout.slice_shape != tuple(slices.shape[-2:]) or layout.image_size != image_size:
        raise ValueError(f"layout for {layout.slice_shape} slices at {layout.image_size} px used on "
                         f"{tuple(slices.shape[-2:])} slices at {image_size} px")
    x = slices.to(torch.float32)
    x = ((x - spec.low) / (spec.high - spec.low)).clamp_(0.0, 1.0)
    x = layout.place(x[:, None])
    x = x.expand(-1, 3, -1, -1)
    mean_t = torch.tensor(mean, dtype=x.dtype, device=x.device)[None, :, None, None]
    std_t = torch.tensor(std, dtype=x.dtype, device=x.device)[None, :, None, None]
    return (x - mean_t) / std_t
