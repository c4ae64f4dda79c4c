"""Where a slice sits in the square model input, and how model outputs map back onto the slice.

Two policies, saved with a model in ``medsam3_preprocessing.json`` (key ``field_of_view_mm``) so
that every model is fed at inference exactly what it was trained on:

``stretch`` (``field_of_view_mm`` absent or null; SAM3's and Medical SAM3's own preprocessing)
    the whole ``(rows, cols)`` slice is resized to ``(S, S)``; the aspect ratio and the physical
    scale vary with the scan's field of view and pixel spacing.
``field of view`` (``field_of_view_mm: F``)
    the slice is scaled to ``S / F`` pixels per millimetre, the same in both directions, and
    centred on an ``S x S`` canvas that spans ``F x F`` mm: a structure has the same size in pixels
    in every scan. What lies outside the field of view is cropped; where the scan is smaller, the
    canvas is padded with 0 after windowing (the window's low end: air in CT).

Coordinates: a slice is indexed ``(row, col)``; ``pixel_spacing`` is ``(row_mm, col_mm)``. The
canvas is indexed the same way; the slice's resized copy has its top-left pixel at canvas
``offset`` (negative when cropped).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F

from ..common.errors import InputError


@dataclass(frozen=True)
class SliceLayout:
    """Placement of one ``(rows, cols)`` slice shape on an ``(S, S)`` canvas (see module docstring)."""

    image_size: int
    slice_shape: tuple[int, int]
    resized: tuple[int, int]
    offset: tuple[int, int] = (0, 0)

    @property
    def is_stretch(self) -> bool:
        return self.resized == (self.image_size, self.image_size) and self.offset == (0, 0)

    @classmethod
    def stretch(cls, slice_shape: tuple[int, int], image_size: int) -> "SliceLayout":
        return cls(image_size, tuple(slice_shape), (image_size, image_size))

    @classmethod
    def field_of_view(cls, slice_shape: tuple[int, int], pixel_spacing: tuple[float, float], image_size: int,
                      fov_mm: float) -> "SliceLayout":
        if not fov_mm > 0:
            raise InputError(f"field of view must be positive, got {fov_mm} mm")
        scale = image_size / float(fov_mm)  # canvas pixels per mm
        resized = tuple(max(1, int(round(n * mm * scale))) for n, mm in zip(slice_shape, pixel_spacing))
        offset = tuple((image_size - n) // 2 for n in resized)
        return cls(image_size, tuple(slice_shape), resized, offset)

    @classmethod
    def from_policy(cls, preprocessing: Optional[dict], slice_shape: tuple[int, int],
                    pixel_spacing: tuple[float, float], image_size: int) -> "SliceLayout":
        """The layout a model's ``medsam3_preprocessing.json`` asks for."""
        fov = (preprocessing or {}).get("field_of_view_mm")
        if fov is None:
            return cls.stretch(slice_shape, image_size)
        return cls.field_of_view(slice_shape, pixel_spacing, image_size, float(fov))

    # -- slice -> canvas ---------------------------------------------------------------------------
    def place(self, x: torch.Tensor, antialias: bool = True) -> torch.Tensor:
        """``(B, C, rows, cols)`` -> ``(B, C, S, S)``: resize (bilinear, antialiased as transformers'
        Sam3ImageProcessor does), then crop/pad onto the canvas (padding 0)."""
        resized = F.interpolate(x, size=self.resized, mode="bilinear", align_corners=False, antialias=antialias)
        if self.is_stretch:
            return resized
        size = self.image_size
        canvas = resized.new_zeros((*x.shape[:2], size, size))
        (top, left), (h, w) = self.offset, self.resized
        src_r, dst_r = _overlap(top, h, size)
        src_c, dst_c = _overlap(left, w, size)
        canvas[..., dst_r, dst_c] = resized[..., src_r, src_c]
        return canvas

    # -- canvas -> slice ---------------------------------------------------------------------------
    def to_slice(self, maps: torch.Tensor, fill: float = 0.0) -> torch.Tensor:
        """``(B, N, h, w)`` maps over the canvas (any resolution, e.g. SAM3's 288 px mask logits or
        probabilities) -> ``(B, N, rows, cols)`` on the slice grid, bilinear. Parts of the slice
        that were cropped away (outside the field of view) get ``fill`` ("nothing": 0 for
        probabilities, a very negative number for logits)."""
        maps = maps.float()
        if self.is_stretch:  # exactly transformers' post-processing (bilinear, align_corners=False)
            return F.interpolate(maps, size=self.slice_shape, mode="bilinear", align_corners=False)
        grid = self._sampling_grid(maps.device).expand(maps.shape[0], -1, -1, -1)
        sampled = F.grid_sample(maps - fill, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
        return sampled + fill

    def _sampling_grid(self, device) -> torch.Tensor:
        """Where each slice pixel centre lies on the canvas, in grid_sample's [-1, 1] coordinates
        (resolution-free with align_corners=False, so it serves maps of any size)."""
        axes = []
        for n, resized, offset in zip(self.slice_shape, self.resized, self.offset):
            centres = torch.arange(n, device=device, dtype=torch.float32) + 0.5
            canvas = offset + centres * (resized / n)  # continuous canvas coordinate (pixel k spans [k, k+1))
            axes.append(2.0 * canvas / self.image_size - 1.0)  # grid_sample, align_corners=False
        rows, cols = torch.meshgrid(axes[0], axes[1], indexing="ij")
        return torch.stack((cols, rows), dim=-1)[None]  # (1, rows, cols, 2) as (x, y)


def _overlap(offset: int, length: int, size: int) -> tuple[slice, slice]:
    """Source and destination index ranges of a ``length``-long run placed at ``offset`` in ``[0, size)``."""
    start, stop = max(0, offset), min(size, offset + length)
    return slice(start - offset, stop - offset), slice(start, stop)


def pixel_spacing(spacing_xyz: tuple[float, float, float], slice_axis: int) -> tuple[float, float]:
    """``(row_mm, col_mm)`` of slices taken along array axis ``slice_axis`` of a ``(z, y, x)`` array."""
    spacing_zyx = tuple(reversed(spacing_xyz))
    rest = [spacing_zyx[a] for a in range(3) if a != slice_axis]
    return rest[0], rest[1]
