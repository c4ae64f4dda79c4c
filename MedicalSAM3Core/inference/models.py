"""Load a SAM3 / Medical SAM3 model (transformers format) and pick device and precision.

A model is a folder with ``config.json`` + safetensors + tokenizer files (what
``save_pretrained`` writes), or a Hugging Face hub id (downloaded through ``huggingface_hub``,
honouring ``HF_TOKEN`` and ``HF_HUB_OFFLINE``), or an original SAM3 / Medical SAM3 ``.pt``
checkpoint (local or ``org/name/file.pt`` on the hub), converted once into a cache
(:mod:`.convert`). A ``sam3_video`` model gives both inference
modes; a plain ``sam3`` (image) model gives ``slices`` mode only.

What a model expects as input travels with it, so every model is fed what it was trained on:
image size (``config.json``), mean/std (``preprocessor_config.json``) and, in our own
``medsam3_preprocessing.json`` (optional; absent = SAM3's own preprocessing):

``window``            a CT window preset the model was trained on (always used), or null
``field_of_view_mm``  slices are placed on a fixed physical field of view of this many mm
                      (see :mod:`MedicalSAM3Core.preprocessing.layout`), or null = stretch
``orientation``       ``radiological``: every slice shown in the reading convention whatever the
                      voxel order (:mod:`MedicalSAM3Core.preprocessing.orientation`); absent or
                      ``stored``: slices as the array stores them
``body_mask``         true: in CT, everything outside the patient's trunk (arms, table) is set
                      to air before windowing (:mod:`MedicalSAM3Core.preprocessing.body`);
                      absent or false: nothing is masked
``empty_geometry_prompt``  true (the default): a text prompt alone runs SAM3's own graph, the
                      geometry encoder on an empty prompt (:func:`use_prompt_graph`); false:
                      transformers' text-only graph, for a model trained that way
``mask_threshold``    the mask probability (in (0, 1)) above which a pixel is drawn, chosen for this
                      model on validation data; used when the caller gives none (absent: SAM3's 0.5)
``concept_mask_thresholds``  ``{concept name: mask threshold}`` for concepts drawn at another
                      threshold than ``mask_threshold`` (chosen per concept on validation data);
                      used when the caller gives no threshold (absent: none)
``largest_component`` concept names whose result keeps only its largest 3D connected component,
                      chosen per concept on validation data (as nnU-Net chooses its post-processing);
                      used when the caller does not decide (absent: none)
``trained_concepts``  the concepts (names of the prompt dictionary) the model was trained on, written
                      by the training export; a prompt outside them gets a warning in the result
                      (absent: an open-vocabulary model such as SAM3's own weights, no warning)
``trained_modalities``  the modalities (``CT``, ``MR``...) of its training data, written by the
                      training export when the dataset declares one; a volume of another modality
                      gets a warning (absent: none)
"""

from __future__ import annotations

import inspect
import json
import logging
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import torch

from ..common.errors import ModelLoadError
from ..preprocessing.intensity import SAM3_MEAN, SAM3_STD
from .cv_ops import install_offline_cv_ops

log = logging.getLogger(__name__)

_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
_HUB_FILE = re.compile(r"^([A-Za-z0-9][\w.-]*/[\w.-]+)/([\w./-]+\.(?:pt|pth))$")
_CONVERTIBLE_SUFFIXES = (".pt", ".pth")
_WEIGHT_SUFFIXES = (".bin", ".ckpt", ".safetensors")


@dataclass
class LoadedModel:
    """Everything the engine needs from a model, on its device.

    ``video`` is the detector-tracker (``Sam3VideoModel``) when the checkpoint has a tracker;
    ``detector`` is always the image model (``Sam3Model``), shared with ``video`` when present.
    """

    detector: "torch.nn.Module"
    video: Optional["torch.nn.Module"]
    tokenizer: object
    model_id: str
    image_size: int
    device: torch.device
    autocast_dtype: Optional[torch.dtype]
    mean: tuple[float, float, float] = SAM3_MEAN
    std: tuple[float, float, float] = SAM3_STD
    preprocessing: dict = field(default_factory=dict)

    def autocast(self):
        """Autocast context for inference (bf16 on CUDA; a no-op elsewhere)."""
        if self.autocast_dtype is None:
            return torch.autocast(device_type=self.device.type, enabled=False)
        return torch.autocast(device_type=self.device.type, dtype=self.autocast_dtype)


def choose_device(device: str = "auto") -> torch.device:
    """``auto`` -> CUDA if available, else Apple MPS, else CPU."""
    if device == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    try:
        chosen = torch.device(device)
    except RuntimeError as error:
        raise ModelLoadError(f"unknown device {device!r}: {error}") from None
    if chosen.type == "cuda" and not torch.cuda.is_available():
        raise ModelLoadError("device 'cuda' requested but no CUDA GPU is available to torch")
    return chosen


def choose_autocast(device: torch.device, dtype: str = "auto") -> Optional[torch.dtype]:
    """``auto`` -> bf16 autocast on CUDA, full fp32 elsewhere. ``float32`` disables autocast."""
    if dtype == "auto":
        return torch.bfloat16 if device.type == "cuda" else None
    mapping = {"float32": None, "fp32": None, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
               "float16": torch.float16, "fp16": torch.float16}
    if dtype not in mapping:
        raise ModelLoadError(f"unknown dtype {dtype!r}; use auto, float32, bfloat16 or float16")
    return mapping[dtype]


def resolve_model_dir(source: str) -> Path:
    """A local transformers-format folder for ``source``, downloading or converting if needed.

    ``source`` is a model folder, a hub id (``org/name``), an original ``.pt`` checkpoint (SAM3,
    Medical SAM3; converted on first use into a cache keyed by the file's sha256, see
    :mod:`.convert`), or a checkpoint file on the hub, ``org/name/file.pt``.
    """
    path = Path(source).expanduser()
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise ModelLoadError(f"{path}: folder has no config.json; it is not a transformers-format model")
        return path
    if path.is_file():
        if path.suffix.lower() in _CONVERTIBLE_SUFFIXES:
            from .convert import converted_model_dir

            return converted_model_dir(path)
        if path.suffix.lower() in _WEIGHT_SUFFIXES:
            raise ModelLoadError(
                f"{path}: a bare weights file; give the folder that holds it with its config.json, or an "
                "original SAM3 / Medical SAM3 checkpoint (.pt/.pth)")
        raise ModelLoadError(f"{path}: not a model folder")
    hub_file = _HUB_FILE.match(source)
    if hub_file and not source.startswith((".", "/", "~")):
        from .convert import converted_model_dir

        return converted_model_dir(_download_file(hub_file.group(1), hub_file.group(2)))
    if not _HUB_ID.match(source) or source.startswith((".", "/", "~")):
        raise ModelLoadError(f"{source}: no such model folder (and not a hub id of the form 'org/name')")
    folder = _download(source)
    if not (folder / "config.json").is_file():
        raise ModelLoadError(f"{source}: the hub repository has no transformers config.json; if it holds an "
                             f"original checkpoint, give it as {source}/FILE.pt (converted on first use)")
    return folder


def _hub_errors(repo_id: str, call):
    from huggingface_hub.errors import (EntryNotFoundError, GatedRepoError, LocalEntryNotFoundError,
                                        RepositoryNotFoundError)

    try:
        return call()
    except GatedRepoError:
        raise ModelLoadError(
            f"{repo_id} is gated: request access on its Hugging Face page, then log in with "
            "`hf auth login` or set HF_TOKEN") from None
    except RepositoryNotFoundError:
        raise ModelLoadError(f"{repo_id}: no such model on the Hugging Face hub (or it is private: set HF_TOKEN)") from None
    except LocalEntryNotFoundError:
        offline = os.environ.get("HF_HUB_OFFLINE", "0") not in ("0", "", "false", "False")
        why = "HF_HUB_OFFLINE is set" if offline else "the hub cannot be reached"
        raise ModelLoadError(f"{repo_id} is not in the local Hugging Face cache and {why}; "
                             "download it once with network access or give a local folder") from None
    except EntryNotFoundError:
        raise ModelLoadError(f"{repo_id}: no such file in the hub repository") from None
    except Exception as error:  # network errors of many kinds
        raise ModelLoadError(f"{repo_id}: download failed: {error}") from None


def _download(repo_id: str) -> Path:
    from huggingface_hub import snapshot_download

    return Path(_hub_errors(repo_id, lambda: snapshot_download(
        repo_id, allow_patterns=["*.json", "*.safetensors", "*.txt", "*.model"])))


def _download_file(repo_id: str, filename: str) -> Path:
    from huggingface_hub import hf_hub_download

    return Path(_hub_errors(f"{repo_id}/{filename}", lambda: hf_hub_download(repo_id, filename)))


def from_pretrained(cls, folder, **kwargs):
    """``cls.from_pretrained(folder, **kwargs)`` for a transformers SAM3 class, with hub kernels off.

    Every SAM3 model the project loads (inference, conversion, training) comes through here.
    From transformers 5.25, ``from_pretrained`` "kernelizes" a model by default whenever the
    ``kernels`` package is installed (transformers itself depends on it since 5.25): layers such as
    GELU are swapped, on CUDA, for code downloaded from the Hugging Face hub while the model loads.
    That needs network access a hospital machine does not have (and may stall on it), and would run
    a network that computes differently from the one trained and tested here. The video model's own
    hub kernel (mask NMS, hole filling) is replaced by :func:`.cv_ops.install_offline_cv_ops`.
    """
    return cls.from_pretrained(folder, use_kernels=False, **kwargs)


def load_model(source: str, device: str = "auto", dtype: str = "auto") -> LoadedModel:
    """Load a model folder or hub id onto ``device`` for inference.

    Weights are always held in float32 (whatever precision they are stored in); on CUDA the
    engine computes in bf16 autocast (``dtype``).
    """
    from transformers import AutoTokenizer, Sam3Model, Sam3VideoModel

    model_dir = resolve_model_dir(source)
    try:
        config = json.loads((model_dir / "config.json").read_text())
    except (OSError, json.JSONDecodeError) as error:
        raise ModelLoadError(f"{model_dir}/config.json is unreadable: {error}") from None
    model_type = config.get("model_type")
    torch_device = choose_device(device)
    try:
        if model_type == "sam3_video":
            video = from_pretrained(Sam3VideoModel, model_dir, dtype=torch.float32).eval()
            detector = video.detector_model
        elif model_type == "sam3":
            video = None
            detector = from_pretrained(Sam3Model, model_dir, dtype=torch.float32).eval()
        else:
            raise ModelLoadError(f"{model_dir}: model_type {model_type!r} is not SAM3 (need 'sam3' or 'sam3_video')")
        tokenizer = AutoTokenizer.from_pretrained(model_dir)
    except ModelLoadError:
        raise
    except Exception as error:
        raise ModelLoadError(f"{model_dir}: cannot load the model: {error}") from None
    install_offline_cv_ops()
    module = video if video is not None else detector
    module.to(torch_device)
    preprocessing = read_preprocessing(model_dir)
    use_prompt_graph(detector, preprocessing)
    processor_config = _read_json(model_dir / "preprocessor_config.json")
    processor = processor_config.get("image_processor") or processor_config
    mean = tuple(processor.get("image_mean", SAM3_MEAN))
    std = tuple(processor.get("image_std", SAM3_STD))
    return LoadedModel(detector=detector, video=video, tokenizer=tokenizer, model_id=str(source),
                       image_size=int(detector.config.image_size), device=torch_device,
                       autocast_dtype=choose_autocast(torch_device, dtype), mean=mean, std=std,
                       preprocessing=preprocessing)


PREPROCESSING_FILE = "medsam3_preprocessing.json"
# the entries of that file (each checked by :func:`check_preprocessing`); what a trained model's export writes
PREPROCESSING_KEYS = ("window", "field_of_view_mm", "orientation", "body_mask", "empty_geometry_prompt",
                      "mask_threshold", "concept_mask_thresholds", "largest_component", "default_mode",
                      "trained_concepts", "trained_modalities")


def read_preprocessing(model_dir: Path) -> dict:
    """The model's ``medsam3_preprocessing.json`` (see module docstring), validated."""
    path = Path(model_dir) / PREPROCESSING_FILE
    return check_preprocessing(_read_json(path), path)


def check_preprocessing(data: dict, path) -> dict:
    """``data`` (a ``medsam3_preprocessing.json`` object) if every known entry is usable, else a
    :class:`ModelLoadError` naming ``path`` and the entry."""
    from ..common.options import CT_WINDOWS

    window, fov = data.get("window"), data.get("field_of_view_mm")
    if window is not None and window not in CT_WINDOWS:
        raise ModelLoadError(f"{path}: window {window!r} is not one of {', '.join(CT_WINDOWS)}")
    if fov is not None and (isinstance(fov, bool) or not isinstance(fov, (int, float)) or fov <= 0):
        raise ModelLoadError(f"{path}: field_of_view_mm must be a positive number of millimetres or null")
    from ..preprocessing.orientation import POLICIES

    if data.get("orientation") is not None and data["orientation"] not in POLICIES:
        raise ModelLoadError(f"{path}: orientation {data['orientation']!r} is not one of {', '.join(POLICIES)}")
    if not isinstance(data.get("body_mask", False), bool):
        raise ModelLoadError(f"{path}: body_mask must be true or false, got {data['body_mask']!r}")
    if not isinstance(data.get("empty_geometry_prompt", True), bool):
        raise ModelLoadError(f"{path}: empty_geometry_prompt must be true or false, "
                             f"got {data['empty_geometry_prompt']!r}")
    from ..common.options import MODES

    if data.get("default_mode") is not None and data["default_mode"] not in MODES:
        raise ModelLoadError(f"{path}: default_mode {data['default_mode']!r} is not one of {', '.join(MODES)}")
    threshold = data.get("mask_threshold")
    if threshold is not None and (isinstance(threshold, bool) or not isinstance(threshold, (int, float))
                                  or not 0.0 < threshold < 1.0):
        raise ModelLoadError(f"{path}: mask_threshold must be a number between 0 and 1, got {threshold!r}")
    per_concept = data.get("concept_mask_thresholds")
    if per_concept is not None and (not isinstance(per_concept, dict) or not all(
            isinstance(name, str) and name.strip() and not isinstance(value, bool) and isinstance(value, (int, float))
            and 0.0 < value < 1.0 for name, value in per_concept.items())):
        raise ModelLoadError(f"{path}: concept_mask_thresholds must map concept names to numbers between 0 and 1, "
                             f"got {per_concept!r}")
    largest = data.get("largest_component")
    if largest is not None and (not isinstance(largest, list)
                                or not all(isinstance(name, str) and name.strip() for name in largest)):
        raise ModelLoadError(f"{path}: largest_component must be a list of concept names, got {largest!r}")
    for key in ("trained_concepts", "trained_modalities"):
        names = data.get(key)
        if names is not None and (not isinstance(names, list)
                                  or not all(isinstance(name, str) and name.strip() for name in names)):
            raise ModelLoadError(f"{path}: {key} must be a list of names, got {names!r}")
    return data


# -- the text-only graph -------------------------------------------------------------------------
_PROMPT_GRAPH_HOOK = "_medsam3_prompt_graph_hook"
# geometry-encoder parts that only encode boxes; with the empty prompt of a text-only call they are
# computed on a padding box that attention masks out, so they never get a gradient from text prompts
GEOMETRY_BOX_ONLY = ("label_embed", "boxes_direct_project", "boxes_pool_project", "boxes_pos_enc_project",
                     "vision_layer_norm")


def use_prompt_graph(detector: "torch.nn.Module", preprocessing: dict) -> None:
    """Make every text-only call of ``detector`` (a transformers ``Sam3Model``) run the graph the
    model was trained with; ``preprocessing`` is its ``medsam3_preprocessing.json``.

    Meta's SAM3, and everything trained with its code (SAM3, Medical SAM3), runs the geometry
    encoder even for a text prompt alone: on an empty prompt, whose learned CLS token joins the text
    in the prompt sequence that the DETR encoder and decoder, the scoring and the mask decoder
    attend to. transformers' ``Sam3Model`` skips the geometry encoder when it gets no box: another
    network for those weights (``Testing/parity/RESULTS.md``: with the same random weights the
    logits differ by 0.4 and the mask logits by 1.3; given one box marked as padding, label -10,
    transformers agrees with Meta to 1e-5).

    With ``empty_geometry_prompt`` true (the default, also when the file is absent) a forward
    pre-hook gives every call that has no box one padding box, so the engine's ``slices`` mode,
    ``Sam3VideoModel``'s own detector calls in ``propagate`` mode, and training all run SAM3's graph
    through this one function. Calls with boxes are left as they are. False removes the hook
    (transformers' text-only graph). Calling it again replaces the previous setting.
    """
    handle = getattr(detector, _PROMPT_GRAPH_HOOK, None)
    if handle is not None:
        handle.remove()
        setattr(detector, _PROMPT_GRAPH_HOOK, None)
    if preprocessing.get("empty_geometry_prompt", True):
        setattr(detector, _PROMPT_GRAPH_HOOK,
                detector.register_forward_pre_hook(_add_empty_geometry_prompt, with_kwargs=True))


def _add_empty_geometry_prompt(module, args, kwargs):
    """Forward pre-hook of :func:`use_prompt_graph`: one box labelled -10 (padding) per image."""
    values = dict(kwargs)
    if args:  # positional inputs (every caller here passes keywords): name them
        bound = inspect.signature(module.forward).bind_partial(*args, **kwargs).arguments
        values = {**{k: v for k, v in bound.items() if k != "kwargs"}, **bound.get("kwargs", {})}
    boxes = values.get("input_boxes")
    if boxes is not None and boxes.numel() > 0:
        return None
    if values.get("pixel_values") is not None:
        reference = values["pixel_values"]
    elif values.get("vision_embeds") is not None:
        reference = values["vision_embeds"].fpn_hidden_states[0]
    else:
        return None  # transformers will say what is missing
    batch, device = reference.shape[0], reference.device
    dtype = module.geometry_encoder.boxes_direct_project.weight.dtype
    values["input_boxes"] = torch.zeros((batch, 1, 4), dtype=dtype, device=device)
    values["input_boxes_labels"] = torch.full((batch, 1), -10, dtype=torch.long, device=device)
    return (), values


def _read_json(path: Path) -> dict:
    if not path.is_file():
        return {}
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as error:
        raise ModelLoadError(f"{path}: invalid JSON: {error}") from None
