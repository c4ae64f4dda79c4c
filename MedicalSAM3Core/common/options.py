"""What a caller can tune in one segmentation job (torch-free: shared by the engine, CLI, wire
format, server, client and the Slicer module)."""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields
from typing import Optional

from .errors import InputError

#: CT window presets as (level, width) in Hounsfield units (radiology reading defaults); the engine and
#: the Slicer panel offer these names.
CT_WINDOWS: dict[str, tuple[float, float]] = {
    "soft_tissue": (40.0, 400.0),
    "abdomen": (50.0, 400.0),
    "lung": (-600.0, 1500.0),
    "bone": (400.0, 1800.0),
    "brain": (40.0, 80.0),
}

SLICE_AXES = {"k": 0, "j": 1, "i": 2}
MODES = ("propagate", "slices", "clips")
#: the mode run when neither the caller nor the model (``default_mode`` of its medsam3_preprocessing.json) chooses
DEFAULT_MODE = "propagate"


@dataclass
class SegmentOptions:
    """What a caller can tune. Defaults follow SAM3's own inference settings."""

    # propagate, slices or clips (the engine's docstring); None: the model's own (``default_mode`` of its
    # medsam3_preprocessing.json, the mode that measured best on its validation scans), else propagate
    mode: Optional[str] = None
    score_threshold: float = 0.5
    # mask probability above which a pixel belongs to an instance, for every prompt; None: the model's
    # own (``concept_mask_thresholds`` / ``mask_threshold`` of its medsam3_preprocessing.json, chosen on
    # validation data), else SAM3's 0.5
    mask_threshold: Optional[float] = None
    # "union": every instance above the score threshold (both lungs, every vertebra); "best": only the
    # most confident instance per slice (chosen for the default on the validation scans, issue #30)
    instances: str = "union"
    window: str = "auto"  # CT preset name, or "auto" (modality + prompt anatomy)
    modality: str = "auto"  # "auto" (file tag, else HU heuristic), "CT", "MR", ...
    percentiles: tuple[float, float] = (0.5, 99.5)
    slice_axis: str = "k"
    batch_size: int = 4
    new_object_threshold: Optional[float] = None  # propagate: detection score that starts a new track
    anchor_samples: int = 16  # propagate: slices probed to choose where tracking starts
    shared_anchor: bool = False  # propagate: one start slice for all prompts (fewer sweeps) instead of one each
    clip_length: int = 4  # clips: slices per independent clip (Medical SAM3's inference_3d.py: 4)
    min_component_voxels: int = 0  # clean-up: drop 3D components smaller than this
    fill_holes: bool = False  # clean-up: fill enclosed cavities
    # clean-up: keep only each structure's largest 3D connected component. None: the model's own choice
    # (``largest_component`` of its medsam3_preprocessing.json: the concepts it was chosen for on
    # validation data, as nnU-Net chooses its post-processing per class); True: every prompt; False: none
    largest_component: Optional[bool] = None
    label_dtype: str = "uint8"

    def validate(self) -> None:
        """Raise :class:`InputError` naming the first unusable option (wrong type or out of range)."""
        self._check_types()
        if self.mode is not None and self.mode not in MODES:
            raise InputError(f"unknown mode {self.mode!r}; use one of {', '.join(MODES)}")
        for name in ("score_threshold", "mask_threshold"):
            value = getattr(self, name)
            if value is not None and not 0.0 <= value < 1.0:
                raise InputError(f"{name} must be in [0, 1), got {value}")
        if self.new_object_threshold is not None and not 0.0 <= self.new_object_threshold < 1.0:
            raise InputError(f"new_object_threshold must be in [0, 1), got {self.new_object_threshold}")
        if self.window != "auto" and self.window not in CT_WINDOWS:
            raise InputError(f"unknown CT window {self.window!r}; choose auto or one of {', '.join(CT_WINDOWS)}")
        if self.instances not in ("best", "union"):
            raise InputError(f"instances must be 'best' or 'union', got {self.instances!r}")
        if self.slice_axis not in SLICE_AXES:
            raise InputError(f"slice_axis must be one of k, j, i (IJK index axes), got {self.slice_axis!r}")
        if not 1 <= self.batch_size <= 256:
            raise InputError(f"batch_size must be between 1 and 256, got {self.batch_size}")
        if self.label_dtype not in ("uint8", "uint16"):
            raise InputError("label_dtype must be uint8 or uint16")
        if self.min_component_voxels < 0:
            raise InputError("min_component_voxels must be >= 0")
        if not 1 <= self.clip_length <= 4096:
            raise InputError(f"clip_length must be between 1 and 4096 slices, got {self.clip_length}")
        if not 1 <= self.anchor_samples <= 1024:
            raise InputError(f"anchor_samples must be between 1 and 1024, got {self.anchor_samples}")
        low, high = self.percentiles
        if not 0.0 <= low < high <= 100.0:
            raise InputError(f"percentiles must satisfy 0 <= low < high <= 100, got {self.percentiles}")

    def _check_types(self) -> None:
        def number(value) -> bool:
            return isinstance(value, (int, float)) and not isinstance(value, bool)

        for name, kind in _TYPES.items():
            value = getattr(self, name)
            if kind == "number" and number(value):
                continue
            if kind == "number?" and (value is None or number(value)):
                continue
            if kind == "int" and isinstance(value, int) and not isinstance(value, bool):
                continue
            if kind == "bool" and isinstance(value, bool):
                continue
            if kind == "bool?" and (value is None or isinstance(value, bool)):
                continue
            if kind == "str" and isinstance(value, str):
                continue
            if kind == "str?" and (value is None or isinstance(value, str)):
                continue
            if kind == "pair" and isinstance(value, (tuple, list)) and len(value) == 2 and all(map(number, value)):
                continue
            raise InputError(f"option {name} has the wrong type: {value!r} (expected {kind.rstrip('?')}"
                             + (" or null" if kind.endswith("?") else "") + ")")

    def to_dict(self) -> dict:
        data = asdict(self)
        data["percentiles"] = list(self.percentiles)
        return data

    @classmethod
    def from_dict(cls, data: dict) -> "SegmentOptions":
        """Options from a JSON object; unknown names are an error naming them (not silently ignored)."""
        if not isinstance(data, dict):
            raise InputError("options must be a JSON object")
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise InputError(f"unknown option(s): {', '.join(unknown)}; known: {', '.join(sorted(known))}")
        values = dict(data)
        if "percentiles" in values:
            if isinstance(values["percentiles"], list):
                values["percentiles"] = tuple(values["percentiles"])
        options = cls(**values)
        options.validate()
        return options


_TYPES = {"mode": "str?", "score_threshold": "number", "mask_threshold": "number?", "instances": "str",
          "window": "str", "modality": "str", "percentiles": "pair", "slice_axis": "str", "batch_size": "int",
          "new_object_threshold": "number?", "anchor_samples": "int", "shared_anchor": "bool",
          "clip_length": "int",
          "min_component_voxels": "int", "fill_holes": "bool", "largest_component": "bool?", "label_dtype": "str"}
