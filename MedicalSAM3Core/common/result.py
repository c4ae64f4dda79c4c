"""The result of segmenting one volume: a label map on the input grid plus per-label metadata.

Shared by the local engine, the server/client wire format and the Slicer scene logic (torch-free).
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field
from typing import Optional

import numpy as np

from .errors import OutputError
from .volume import Geometry


@dataclass
class LabelInfo:
    """Metadata of one label value of the label map (one prompt).

    ``confidence`` is the mean detection score over the slices where the structure was found,
    ``max_score`` the best slice's score (both ``score = sigmoid(class) * sigmoid(presence)``);
    ``voxel_count``/``volume_ml`` count the voxels carrying this value in the merged label map.
    """

    value: int
    name: str
    prompt: str
    model_text: str
    color: tuple[int, int, int]
    known_concept: bool
    confidence: float = 0.0
    max_score: float = 0.0
    voxel_count: int = 0
    volume_ml: float = 0.0
    slices_found: int = 0
    terminology: Optional[dict] = None

    def to_dict(self) -> dict:
        data = asdict(self)
        data["color"] = list(self.color)
        return data

    @classmethod
    def from_dict(cls, data: dict) -> "LabelInfo":
        data = dict(data)
        data["color"] = tuple(data["color"])
        return cls(**data)


@dataclass
class SegmentationResult:
    """Label map ``(z, y, x)`` on exactly the input voxel grid, per-prompt masks and metadata.

    * ``label_map``: 0 is background; value ``i + 1`` is prompt ``i``. Where prompts overlap, the
      voxel goes to the prompt with the highest confidence (see :mod:`~MedicalSAM3Core.inference.merging`).
    * per-prompt binary masks (which may overlap) are kept bit-packed along x; use :meth:`mask`.
    * ``geometry`` is the input volume's geometry, unchanged.
    """

    label_map: np.ndarray
    geometry: Geometry
    labels: list[LabelInfo]
    packed_masks: list[np.ndarray] = field(default_factory=list)
    mode: str = "slices"
    model_id: str = ""
    slice_axis: str = "k"
    warnings: list[str] = field(default_factory=list)
    parameters: dict = field(default_factory=dict)

    @property
    def shape(self) -> tuple[int, int, int]:
        return tuple(self.label_map.shape)  # type: ignore[return-value]

    def mask(self, index: int) -> np.ndarray:
        """Binary mask ``(z, y, x)`` of prompt ``index`` before merging (may overlap other prompts)."""
        packed = self.packed_masks[index]
        return np.unpackbits(packed, axis=-1, count=self.label_map.shape[-1]).astype(bool)

    def sidecar(self) -> dict:
        """JSON-serialisable description of the labels (what the CLI writes next to the label map)."""
        from .. import __version__

        return {
            "format": "medsam3-segmentation",
            "version": 1,
            "generator": f"MedicalSAM3Core {__version__}",
            "model": self.model_id,
            "mode": self.mode,
            "slice_axis": self.slice_axis,
            "shape_zyx": list(self.shape),
            "geometry_lps": self.geometry.to_dict(),
            "background_value": 0,
            "labels": [label.to_dict() for label in self.labels],
            "parameters": self.parameters,
            "warnings": list(self.warnings),
        }

    def sidecar_json(self) -> str:
        """:meth:`sidecar` as indented, strictly standard JSON text.

        A NaN or infinite number (JSON has none; Python would write ``NaN``, which JSON readers
        reject) raises :class:`OutputError` naming where it is: a bug upstream, since the geometry
        checks keep volumes finite, surfaces as a clear error instead of an unreadable sidecar.
        """
        sidecar = self.sidecar()
        try:
            return json.dumps(sidecar, indent=2, allow_nan=False) + "\n"
        except ValueError:
            raise OutputError(f"the result cannot be saved: its {_first_non_finite(sidecar, 'sidecar')} is a number "
                              "JSON cannot store") from None


def _first_non_finite(value, path: str) -> Optional[str]:
    """``"labels[0].volume_ml = inf"``: where the first NaN or infinite float of nested dicts and
    lists ``value`` is, ``path`` naming ``value`` itself; ``None`` if there is none."""
    if isinstance(value, float):
        return None if math.isfinite(value) else f"{path} = {value}"
    if isinstance(value, dict):
        children = ((f"{path}.{key}", item) for key, item in value.items())
    elif isinstance(value, (list, tuple)):
        children = ((f"{path}[{index}]", item) for index, item in enumerate(value))
    else:
        return None
    return next((found for child_path, item in children if (found := _first_non_finite(item, child_path))), None)


def pack_mask(mask: np.ndarray) -> np.ndarray:
    """Bit-pack a boolean ``(z, y, x)`` mask along x (8x smaller); inverse of ``SegmentationResult.mask``."""
    return np.packbits(np.asarray(mask, dtype=bool), axis=-1)
