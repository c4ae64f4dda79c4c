"""In-plane orientation of the slices a model sees: as stored, or the radiological display convention.

Volumes arrive in any voxel order: a NIfTI written from RAS arrays and a DICOM series of the same
patient give slices rotated by 180 degrees relative to each other. A model trained on one sees the
other upside down. With the ``radiological`` policy every slice is shown as a radiologist reads it,
whatever the storage order: columns run toward the patient's left and rows toward posterior (axial)
or inferior (coronal, sagittal), i.e. anterior / superior at the top, the patient's right on the
image's left (sagittal: anterior on the left).

Only transposes and flips of the two in-plane array axes, chosen from the volume's direction
cosines (LPS): no resampling, a numpy view each way, and :meth:`SliceOrientation.restore` maps
results back onto the input grid exactly. The policy travels with a model
(``medsam3_preprocessing.json`` key ``orientation``; absent = ``stored``, today's behaviour) and is
applied by the engine and by the training data through this one module.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np

POLICIES = ("stored", "radiological")


@dataclass(frozen=True)
class SliceOrientation:
    """What is done to a ``(s, rows, cols)`` stack of slices: transpose rows/cols, then flip rows, then
    flip columns. The identity (``stored``) changes nothing."""

    transpose: bool = False
    flip_rows: bool = False
    flip_cols: bool = False

    @property
    def identity(self) -> bool:
        return not (self.transpose or self.flip_rows or self.flip_cols)

    @classmethod
    def for_volume(cls, direction: Sequence[float], slice_axis: int, policy: str = "stored") -> "SliceOrientation":
        """The orientation for slices along array axis ``slice_axis`` (0 = k, 1 = j, 2 = i) of a
        ``(z, y, x)`` volume whose ``direction`` (ITK, row-major 3 x 3, column c = world direction of
        index axis c, LPS) is given."""
        if policy not in POLICIES:
            raise ValueError(f"unknown slice orientation {policy!r}; use one of {', '.join(POLICIES)}")
        if policy == "stored":
            return cls()
        matrix = np.asarray(direction, dtype=float).reshape(3, 3)
        world = {a: matrix[:, 2 - a] for a in range(3)}  # array axis (z, y, x) -> its LPS direction
        row_axis, col_axis = (a for a in range(3) if a != slice_axis)
        normal = int(np.argmax(np.abs(world[slice_axis])))
        in_plane = sorted({0, 1, 2} - {normal})
        target_col, target_row = in_plane  # columns toward L (x) or else P (y); rows toward P (y) or I (-z)
        row_sign = 1.0 if target_row == 1 else -1.0
        transpose = int(np.argmax(np.abs(world[row_axis]))) != target_row
        if transpose:
            row_axis, col_axis = col_axis, row_axis
        flip_rows = np.sign(world[row_axis][target_row]) != row_sign
        flip_cols = np.sign(world[col_axis][target_col]) != 1.0
        return cls(bool(transpose), bool(flip_rows), bool(flip_cols))

    def apply(self, stack: np.ndarray) -> np.ndarray:
        """``(s, rows, cols)`` as stored -> as the model sees it (a view, no copy)."""
        if self.transpose:
            stack = stack.swapaxes(-2, -1)
        if self.flip_rows:
            stack = stack[..., ::-1, :]
        if self.flip_cols:
            stack = stack[..., ::-1]
        return stack

    def restore(self, stack: np.ndarray) -> np.ndarray:
        """The inverse of :meth:`apply`: model orientation -> as stored (a view, no copy)."""
        if self.flip_cols:
            stack = stack[..., ::-1]
        if self.flip_rows:
            stack = stack[..., ::-1, :]
        if self.transpose:
            stack = stack.swapaxes(-2, -1)
        return stack

    def spacing(self, row_mm: float, col_mm: float) -> tuple[float, float]:
        """Pixel spacing ``(row_mm, col_mm)`` of the slices as the model sees them."""
        return (col_mm, row_mm) if self.transpose else (row_mm, col_mm)
