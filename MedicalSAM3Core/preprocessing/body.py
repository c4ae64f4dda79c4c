"""Body masking: what lies outside the patient's trunk (arms beside it, the table, cables) becomes air.

A per-model policy, saved in ``medsam3_preprocessing.json`` as ``"body_mask": true`` and applied by
the engine and by training through :func:`mask_outside_body`, so a model is always fed what it was
trained on. It is for CT (Hounsfield units); other modalities are fed unchanged. Absent or false:
nothing is masked (SAM3's and Medical SAM3's own preprocessing).

Why: a model trained on scans cropped tight to the body has never seen arms or a table, and
mistakes them for organs in a wider field of view (the demo model drew "spleen" on an arm before).

Rule, per slice ``(rows, cols)``:

1. tissue = voxels above ``threshold`` HU (-500: everything but air and lung);
2. a morphological opening with a disc of ``bridge_mm`` radius cuts thin bridges (a blanket, an arm
   touching the skin along a few millimetres);
3. the trunk = the largest connected component, plus every component at least ``min_fraction`` of
   its area (the two thighs of a pelvic slice; an upper arm is about a seventh of an abdomen);
4. the trunk is grown back by ``bridge_mm`` and its holes are filled (lungs, bowel gas, trachea stay);
5. everything outside is set to ``fill`` HU (air). A slice without tissue is left as it is.
"""

from __future__ import annotations

import numpy as np
from scipy import ndimage

#: HU above which a voxel is tissue, not air.
BODY_THRESHOLD_HU = -500.0
#: value given to everything outside the body (air).
AIR_HU = -1000.0


def _disc(radius_rows: float, radius_cols: float) -> np.ndarray:
    r, c = max(1, int(round(radius_rows))), max(1, int(round(radius_cols)))
    rows, cols = np.ogrid[-r:r + 1, -c:c + 1]
    return (rows / r) ** 2 + (cols / c) ** 2 <= 1.0


def body_mask(slice_hu: np.ndarray, pixel_spacing: tuple[float, float] = (1.0, 1.0),
              threshold: float = BODY_THRESHOLD_HU, bridge_mm: float = 6.0, min_fraction: float = 0.3) -> np.ndarray:
    """Boolean ``(rows, cols)`` mask of the patient's trunk in one CT slice (see module docstring).

    ``pixel_spacing`` is ``(row_mm, col_mm)``, so the same millimetres are used at every resolution.
    Returns an all-True mask for a slice without tissue (nothing to decide there)."""
    slice_hu = np.asarray(slice_hu)
    if slice_hu.ndim != 2:
        raise ValueError(f"expected one (rows, cols) slice, got shape {slice_hu.shape}")
    tissue = slice_hu > threshold
    if not tissue.any():
        return np.ones(slice_hu.shape, dtype=bool)
    disc = _disc(bridge_mm / pixel_spacing[0], bridge_mm / pixel_spacing[1])
    opened = ndimage.binary_opening(tissue, structure=disc)
    if not opened.any():  # only thin things (a sliver of skin at the edge): keep the tissue itself
        opened = tissue
    components, _ = ndimage.label(opened)
    sizes = np.bincount(components.ravel())
    sizes[0] = 0
    keep = np.nonzero(sizes >= min_fraction * sizes.max())[0]
    trunk = np.isin(components, keep)
    trunk = ndimage.binary_dilation(trunk, structure=disc) & tissue | trunk
    return ndimage.binary_fill_holes(trunk)


def mask_outside_body(slices: np.ndarray, pixel_spacing: tuple[float, float] = (1.0, 1.0),
                      fill: float = AIR_HU, **kwargs) -> np.ndarray:
    """``(s, rows, cols)`` CT slices (HU) -> a float32 copy with everything outside each slice's
    :func:`body_mask` set to ``fill``. The input is never written to."""
    slices = np.asarray(slices)
    if slices.ndim != 3:
        raise ValueError(f"expected (s, rows, cols) slices, got shape {slices.shape}")
    out = np.array(slices, dtype=np.float32, copy=True)
    for k in range(out.shape[0]):
        out[k][~body_mask(slices[k], pixel_spacing, **kwargs)] = fill
    return out


def uses_body_mask(preprocessing: dict | None, modality: str) -> bool:
    """Whether a model's ``medsam3_preprocessing.json`` asks for the body mask on this modality."""
    return bool((preprocessing or {}).get("body_mask")) and modality == "CT"


class BodyMaskedSlices:
    """A lazy ``(s, rows, cols)`` view whose indexed slices come out of :func:`mask_outside_body`.

    What the engine indexes instead of the raw slices when a model asks for the body mask: a batch
    is masked when it is read, inside the engine's loop (which reports progress and checks for
    cancellation), so no volume-sized pass precedes the first slice. Index with slices or index
    arrays along axis 0 (each read returns a new float32 ``(b, rows, cols)`` array)."""

    def __init__(self, slices: np.ndarray, pixel_spacing: tuple[float, float]) -> None:
        if np.ndim(slices) != 3:
            raise ValueError(f"expected (s, rows, cols) slices, got shape {np.shape(slices)}")
        self._slices, self._spacing = slices, tuple(pixel_spacing)

    @property
    def shape(self) -> tuple[int, int, int]:
        return tuple(self._slices.shape)

    def __len__(self) -> int:
        return self._slices.shape[0]

    def __getitem__(self, key) -> np.ndarray:
        if isinstance(key, (int, np.integer)):
            raise TypeError("index BodyMaskedSlices with a slice or an index array (it returns (b, rows, cols))")
        return mask_outside_body(self._slices[key], self._spacing)
