"""What an interactive correction sends and gets back, torch-free (the Slicer module and the client import it).

Coordinates are those of the input volume's voxel grid: an array ``(z, y, x)`` indexed ``[k, j, i]``
(IJK), points and box corners as continuous voxel indices ``(z, y, x)`` (the centre of voxel ``[k, j, i]``
is ``(k, j, i)``). Slicer's IJK is the same grid with the order reversed (``(i, j, k)``).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional, Sequence

import numpy as np

from .errors import InputError


@dataclass
class MaskPatch:
    """A change of one object's mask: the voxels ``[start, start + mask.shape)`` of the ``(z, y, x)`` grid
    hold ``mask`` now; voxels outside the box did not change.

    ``slices``: the slice indices (along the session's slice axis, input index) whose mask changed;
    ``empty`` patches (no slice changed) have a ``(0, 0, 0)`` mask. ``stage`` says what made it
    (``refine``, ``seed``, ``propagate``, ``undo``, ``text``).
    """

    object_id: int
    start: tuple[int, int, int]
    mask: np.ndarray
    slices: list[int] = field(default_factory=list)
    stage: str = ""

    @property
    def empty(self) -> bool:
        return not self.slices

    @property
    def stop(self) -> tuple[int, int, int]:
        return tuple(int(a + n) for a, n in zip(self.start, self.mask.shape))

    def apply(self, volume_mask: np.ndarray) -> None:
        """Write the patch into a full ``(z, y, x)`` bool mask of the object (in place)."""
        if self.empty:
            return
        if any(b > n for b, n in zip(self.stop, volume_mask.shape)):
            raise InputError(f"patch {self.start}..{self.stop} lies outside a volume of shape {volume_mask.shape}")
        region = tuple(slice(a, b) for a, b in zip(self.start, self.stop))
        volume_mask[region] = self.mask

    def to_dict(self) -> dict:
        """JSON-ready header; the mask travels separately (bit-packed, see ``wire``)."""
        return {"object_id": int(self.object_id), "start": [int(v) for v in self.start],
                "shape": [int(v) for v in self.mask.shape], "slices": [int(s) for s in self.slices],
                "stage": self.stage}


def check_points(points: Optional[Sequence], labels: Optional[Sequence], box: Optional[Sequence]) -> tuple:
    """Validated ``(points (N, 3) float, labels (N,) int, box (2, 3) float or None)``; raises InputError
    naming what is wrong. Labels: 1 = the structure is here (positive), 0 = it is not (negative)."""
    try:
        pts = np.zeros((0, 3)) if points is None or not np.size(points) else np.asarray(points, dtype=float)
        lab = np.zeros((0,), dtype=int) if labels is None else np.asarray(labels).reshape(-1)
    except (TypeError, ValueError) as error:
        raise InputError(f"points and labels must be numbers: {error}") from None
    if pts.ndim != 2 or pts.shape[1] != 3:
        raise InputError(f"points are (z, y, x) voxel indices, one row each: got an array of shape {pts.shape}")
    if lab.size and not np.issubdtype(lab.dtype, np.number):
        raise InputError("point labels must be 1 (positive) or 0 (negative)")
    if len(pts) != len(lab):
        raise InputError(f"{len(pts)} points but {len(lab)} labels: give one label (1 positive, 0 negative) per point")
    if lab.size and not np.isin(lab, (0, 1)).all():
        raise InputError(f"point labels must be 1 (positive) or 0 (negative), got {sorted(set(lab.tolist()))}")
    corners = None
    if box is not None:
        try:
            corners = np.asarray(box, dtype=float)
        except (TypeError, ValueError) as error:
            raise InputError(f"box corners must be numbers: {error}") from None
        if corners.shape != (2, 3):
            raise InputError(f"a box is two corners (z, y, x), got an array of shape {corners.shape}")
    if not len(pts) and corners is None:
        raise InputError("an interaction needs at least one point or a box")
    for name, values in (("point", pts), ("box corner", corners if corners is not None else np.zeros((0, 3)))):
        if not np.isfinite(values).all():
            raise InputError(f"a {name} has a coordinate that is not a finite number")
    return pts, lab.astype(int), corners
