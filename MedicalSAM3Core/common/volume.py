"""The in-memory volume: voxels plus the geometry that places them in patient space.

Conventions (the same everywhere in this project):

* ``Volume.array`` is indexed ``(z, y, x)`` == ``(k, j, i)``, as SimpleITK's ``GetArrayFromImage``
  and Slicer's ``arrayFromVolume`` return it.
* ``spacing``, ``origin`` and the columns of ``direction`` are in ``(x, y, z)`` == ``(i, j, k)``
  order and in **LPS** patient coordinates (DICOM/ITK convention), millimetres.
* ``direction`` is the 3x3 matrix whose column ``c`` is the LPS unit vector of index axis ``c``,
  so ``lps = origin + direction @ (spacing * ijk)``. Slicer's IJK-to-RAS matrix is the same with
  the first two rows negated (see :meth:`Geometry.ijk_to_ras` / :meth:`Geometry.from_ijk_to_ras`).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

import numpy as np

from .errors import InputError

_LPS_TO_RAS = np.diag([-1.0, -1.0, 1.0, 1.0])

#: Largest voxel spacing and origin coordinate (mm) of a plausible geometry: beyond any scanner, and
#: far from overflowing volumes in ml and the JSON of a result (see :meth:`Geometry.check_plausible`).
MAX_SPACING_MM, MAX_COORDINATE_MM = 1e4, 1e7
#: How far ``D @ D.T`` of a plausible direction matrix ``D`` may be from the identity.
ORTHONORMAL_TOLERANCE = 1e-3


@dataclass(frozen=True)
class Geometry:
    """Placement of a ``(z, y, x)`` voxel grid in LPS patient space (see module docstring)."""

    spacing: tuple[float, float, float] = (1.0, 1.0, 1.0)
    origin: tuple[float, float, float] = (0.0, 0.0, 0.0)
    direction: tuple[float, ...] = (1.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 1.0)

    def __post_init__(self) -> None:
        spacing = tuple(float(s) for s in self.spacing)
        origin = tuple(float(o) for o in self.origin)
        direction = tuple(float(d) for d in np.asarray(self.direction, dtype=float).ravel())
        if len(spacing) != 3 or len(origin) != 3 or len(direction) != 9:
            raise InputError("geometry needs 3 spacings, 3 origin coordinates and a 3x3 direction")
        if not all(np.isfinite(spacing + origin + direction)):
            raise InputError(f"geometry contains NaN or infinite values: spacing {_numbers(spacing)} mm, "
                             f"origin {_numbers(origin)} mm, direction {_numbers(direction)}")
        if min(spacing) <= 0:
            raise InputError(f"voxel spacing must be positive, got {spacing}")
        matrix = np.asarray(direction).reshape(3, 3)
        if abs(abs(np.linalg.det(matrix)) - 1.0) > 1e-3:
            raise InputError("direction matrix is not orthonormal (|det| != 1)")
        object.__setattr__(self, "spacing", spacing)
        object.__setattr__(self, "origin", origin)
        object.__setattr__(self, "direction", direction)

    def check_plausible(self) -> None:
        """Refuse a geometry that no scanner produces (the one check of a volume's geometry, shared by
        the file reader and the server's request decoder).

        A spacing above ``MAX_SPACING_MM`` or an origin coordinate beyond ``MAX_COORDINATE_MM`` (a
        damaged or forged header) would overflow volumes in ml to infinity and, at the end of a job,
        the JSON of the result; a direction matrix that is not orthonormal within
        ``ORTHONORMAL_TOLERANCE`` hides a scale or shear that belongs in the spacing.
        """
        if max(self.spacing) > MAX_SPACING_MM:
            raise InputError(f"implausible geometry: voxel spacing {_numbers(self.spacing)} mm (at most "
                             f"{MAX_SPACING_MM:g} mm per axis); a damaged header?")
        if max(abs(o) for o in self.origin) > MAX_COORDINATE_MM:
            raise InputError(f"implausible geometry: origin {_numbers(self.origin)} mm (each coordinate within "
                             f"{MAX_COORDINATE_MM:g} mm); a damaged header?")
        matrix = self.direction_matrix
        if not np.allclose(matrix @ matrix.T, np.eye(3), atol=ORTHONORMAL_TOLERANCE):
            raise InputError(f"direction matrix {_numbers(self.direction)} is not orthonormal (its rows must be "
                             "unit vectors at right angles; a scaling or shear belongs in the spacing)")

    @property
    def direction_matrix(self) -> np.ndarray:
        return np.asarray(self.direction, dtype=float).reshape(3, 3)

    def ijk_to_lps(self) -> np.ndarray:
        """4x4 homogeneous matrix mapping voxel index ``(i, j, k, 1)`` to LPS millimetres."""
        matrix = np.eye(4)
        matrix[:3, :3] = self.direction_matrix @ np.diag(self.spacing)
        matrix[:3, 3] = self.origin
        return matrix

    def ijk_to_ras(self) -> np.ndarray:
        """4x4 homogeneous matrix mapping voxel index ``(i, j, k, 1)`` to RAS millimetres (Slicer)."""
        return _LPS_TO_RAS @ self.ijk_to_lps()

    @classmethod
    def from_ijk_to_ras(cls, ijk_to_ras: np.ndarray) -> "Geometry":
        """Geometry from Slicer's 4x4 IJK-to-RAS matrix (what ``GetIJKToRASMatrix`` gives)."""
        ijk_to_lps = _LPS_TO_RAS @ np.asarray(ijk_to_ras, dtype=float).reshape(4, 4)
        axes = ijk_to_lps[:3, :3]
        spacing = np.linalg.norm(axes, axis=0)
        if np.any(spacing <= 0):
            raise InputError("IJK-to-RAS matrix has a zero-length axis")
        return cls(tuple(spacing), tuple(ijk_to_lps[:3, 3]), tuple((axes / spacing).ravel()))

    def to_dict(self) -> dict:
        return {"spacing": list(self.spacing), "origin": list(self.origin), "direction": list(self.direction)}

    @classmethod
    def from_dict(cls, data: dict) -> "Geometry":
        return cls(tuple(data["spacing"]), tuple(data["origin"]), tuple(data["direction"]))


def _numbers(values) -> str:
    """``(1e+200, 1, 1)``: numbers as a message shows them."""
    return "(" + ", ".join(f"{v:g}" for v in values) + ")"


@dataclass
class Volume:
    """A scalar 3D image: ``array`` indexed ``(z, y, x)`` plus its LPS :class:`Geometry`.

    ``modality`` is ``"CT"``, ``"MR"``, another DICOM modality string, or ``None`` if unknown.
    """

    array: np.ndarray
    geometry: Geometry = field(default_factory=Geometry)
    modality: Optional[str] = None
    source: Optional[str] = None
    #: for a DICOM series: its files in slice order (``array[k]`` is ``dicom_files[k]``), what a
    #: DICOM SEG of a result references; empty for every other input
    dicom_files: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        array = np.asarray(self.array)
        if array.ndim != 3:
            raise InputError(
                f"expected a 3D volume, got a {array.ndim}D array of shape {array.shape}"
                + (" (a single 2D image is not a volume)" if array.ndim == 2 else "")
            )
        if min(array.shape) < 1:
            raise InputError(f"volume has an empty dimension: shape (z, y, x) = {array.shape}")
        if array.dtype == bool or not (np.issubdtype(array.dtype, np.integer)
                                       or np.issubdtype(array.dtype, np.floating)):
            raise InputError(f"voxel type {array.dtype} is not a scalar intensity type")
        if np.issubdtype(array.dtype, np.floating):
            finite = np.isfinite(array)
            if not finite.all():
                bad = int(array.size - np.count_nonzero(finite))
                raise InputError(f"volume contains {bad} NaN or infinite voxel(s); fix or mask them first")
        self.array = array

    @property
    def shape(self) -> tuple[int, int, int]:
        """``(z, y, x)`` voxel counts."""
        return tuple(self.array.shape)  # type: ignore[return-value]

    @property
    def voxel_volume_ml(self) -> float:
        sx, sy, sz = self.geometry.spacing
        return sx * sy * sz / 1000.0
