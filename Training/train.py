"""``medsam3-train``: full fine-tuning of SAM3's detector on text-prompted medical slices, and of its
tracker on clips of consecutive slices (``train.tasks``; Training/tracker.py).

    medsam3-train --config Training/configs/demo.yaml
    torchrun --nproc-per-node 4 -m Training.train --config Training/configs/full.yaml

One process per GPU (DDP; NCCL on GPU, gloo on CPU). A run folder holds ``config.yaml``,
``checkpoint.pt`` (model, optimizer, step, RNG: ``--resume`` continues exactly where it stopped),
``metrics.jsonl``, TensorBoard logs (when ``tensorboard`` is installed) and, at the end,
``model/``: a transformers-format folder that ``medsam3 segment --model`` and the Slicer module
load directly (with ``medsam3_preprocessing.json``, so the engine feeds it what it was trained on).
"""

from __future__ import annotations

import argparse
import copy
import json
import logging
import os
import re
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import numpy as np
import torch
import torch.distributed as dist
from torch.utils.data import DataLoader

from MedicalSAM3Core.common.errors import InputError, MedSAM3Error

from .data import BalancedSampler, SliceDataset, build_datasets, collate
from .losses import Criterion, LossWeights
from .matcher import MatchCosts
from .model import forward_all_layers
from .optim import build_optimizer, lr_factor, parameter_groups, tracker_parameter_groups
from .tracker import ClipSource, track_clip, tracker_settings

log = logging.getLogger("medsam3.train")

DEFAULTS = {
    "model": {"init": None, "from_config": None, "preprocessing": {}, "seed": 0, "dropout": None, "lora": None,
              "add_tracker": None},
    "data": {},
    "optim": {"lr_backbone": 5e-5, "lr_text": 5e-5, "lr_heads": 3e-4, "layer_decay": 0.85, "weight_decay": 0.05,
              "warmup_steps": 100, "schedule": "cosine", "grad_clip": 0.1, "betas": [0.9, 0.999], "eps": 1e-8},
    "loss": {"weights": {}, "costs": {}, "o2m_k": 4, "o2m_iou": 0.5, "class_loss": "focal", "pos_weight": 10.0,
             "class_on_absent": False},
    "train": {"steps": 1000, "batch_size": 4, "epoch_steps": 100, "val_every": 0, "val_slices": 64,
              "checkpoint_every": 100, "log_every": 10, "output": "runs/medsam3", "seed": 0, "device": "auto",
              "num_workers": 0, "positive_fraction": 0.7, "concepts_per_slice": 1, "concept_weights": {},
              "hard_negative_fraction": 0.0, "hard_negative_slices": 10, "export_dtype": "float32", "export_tracker": True,
              "export_interpolation": None, "box_prompt_probability": 0.0, "box_noise": 0.1, "fsdp": False,
              "trainable": None, "tasks": ["detector"]},
    "tracker": {},  # Training/tracker.py: TRACKER_DEFAULTS
}
TASKS = ("detector", "tracker")


def load_config(path: Path | str) -> dict:
    """A training config (YAML) merged over :data:`DEFAULTS`; unknown sections or keys are errors."""
    import yaml

    path = Path(path)
    try:
        user = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except (OSError, yaml.YAMLError) as error:
        raise InputError(f"cannot read config {path}: {error}") from None
    config = copy.deepcopy(DEFAULTS)
    for section, values in user.items():
        if section not in config:
            raise InputError(f"{path}: unknown section {section!r}; sections: {', '.join(config)}")
        if not isinstance(values, dict):
            raise InputError(f"{path}: section {section!r} must be a mapping")
        if section not in ("data", "tracker"):
            unknown = set(values) - set(config[section])
            if unknown:
                raise InputError(f"{path}: unknown key(s) in {section}: {', '.join(sorted(unknown))}")
        config[section].update(values)
    dataset = config["data"].get("dataset")
    if not dataset:
        raise InputError(f"{path}: data.dataset (a dataset JSON) is required")
    if not Path(dataset).is_absolute():
        config["data"]["dataset"] = str((path.parent / dataset).resolve()) if (path.parent / dataset).exists() \
            else str(Path(dataset).resolve())
    if config["loss"]["class_loss"] not in ("focal", "iabce", "bce"):
        raise InputError(f"{path}: loss.class_loss must be focal, iabce or bce, got {config['loss']['class_loss']!r}")
    if bool(config["model"]["init"]) == bool(config["model"]["from_config"]):
        raise InputError(f"{path}: give exactly one of model.init (a model folder or hub id to fine-tune) or "
                         "model.from_config (sizes of a model trained from scratch)")
    extra = config["model"]["add_tracker"]
    if extra is not None:
        sizes = ("heads", "ffn", "memory_layers")
        sized = {k: v for k, v in extra.items() if k != "multimask"} if isinstance(extra, dict) else None
        if sized is None or set(sized) - set(sizes) or \
                not all(isinstance(v, int) and not isinstance(v, bool) and v >= 1 for v in sized.values()):
            raise InputError(f"{path}: model.add_tracker must be a mapping of positive integers among "
                             f"{', '.join(sizes)} (sizes of the new tracker; {{}} for the defaults) and multimask "
                             f"(true or false), got {extra!r}")
        if not isinstance(extra.get("multimask", True), bool):
            raise InputError(f"{path}: model.add_tracker.multimask must be true or false, got {extra['multimask']!r}")
        if not config["model"]["init"]:
            raise InputError(f"{path}: model.add_tracker puts a tracker around the detector of model.init; "
                             "it needs model.init (a model trained from_config has its tracker already)")
    alpha = config["train"]["export_interpolation"]
    if alpha is not None:
        if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not 0.0 < alpha <= 1.0:
            raise InputError(f"{path}: train.export_interpolation must be a number in (0, 1] (the weight of the "
                             f"fine-tuned model), got {alpha!r}")
        if not config["model"]["init"] or config["model"]["lora"]:
            raise InputError(f"{path}: train.export_interpolation blends the fine-tuned weights with those of "
                             "model.init: it needs model.init and full fine-tuning (no model.lora)")
    tasks = config["train"]["tasks"]
    if not isinstance(tasks, list) or not tasks or set(tasks) - set(TASKS) or len(set(tasks)) != len(tasks):
        raise InputError(f"{path}: train.tasks must list detector and/or tracker (what the run trains), got {tasks!r}")
    config["tracker"] = tracker_settings(config["tracker"], f"{path}: tracker")
    if "tracker" in tasks:
        if config["train"]["fsdp"]:
            raise InputError(f"{path}: train.fsdp does not shard the tracker; train it with DDP (fsdp: false)")
        if config["model"]["lora"]:
            raise InputError(f"{path}: model.lora adapts the detector only; train the tracker without it")
        if not config["train"]["export_tracker"]:
            raise InputError(f"{path}: train.tasks trains the tracker but train.export_tracker: false would not "
                             "export it")
    trainable = config["train"]["trainable"]
    if trainable is not None:
        if not isinstance(trainable, list) or not trainable or not all(isinstance(x, str) and x for x in trainable):
            raise InputError(f"{path}: train.trainable must be a list of regular expressions over parameter names "
                             f"(e.g. ['presence']), got {trainable!r}")
        for pattern in trainable:
            try:
                re.compile(pattern)
            except re.error as error:
                raise InputError(f"{path}: train.trainable: {pattern!r} is not a regular expression ({error})") from None
        if config["model"]["lora"]:
            raise InputError(f"{path}: train.trainable and model.lora exclude each other (LoRA chooses its own parameters)")
    return config


def restrict_trainable(detector: torch.nn.Module, patterns: Optional[list[str]]) -> list[str]:
    """Freeze every trainable parameter whose name matches none of ``patterns`` (``re.search``).

    Returns the names left trainable. Raises :class:`InputError` naming a pattern that matches no
    trainable parameter (a typo would otherwise freeze everything it was meant to train).
    """
    names = [name for name, param in detector.named_parameters() if param.requires_grad]
    if patterns is None:
        return names
    unmatched = [p for p in patterns if not any(re.search(p, name) for name in names)]
    if unmatched:
        raise InputError(f"train.trainable: {', '.join(map(repr, unmatched))} match(es) no trainable parameter; "
                         f"names look like {', '.join(names[:3])}, ... ({len(names)} in all)")
    kept = set(name for name in names if any(re.search(p, name) for p in patterns))
    for name, param in detector.named_parameters():
        if name not in kept:
            param.requires_grad_(False)
    return [name for name in names if name in kept]


# -- model ---------------------------------------------------------------------------------------
@dataclass
class ModelBundle:
    full: torch.nn.Module  # what gets saved: Sam3VideoModel (detector + tracker) or Sam3Model
    detector: torch.nn.Module  # the Sam3Model being trained
    tokenizer: object
    preprocess: dict
    lora: Optional[object] = None  # peft LoraConfig when training adapters only


def build_model(model_cfg: dict, box_prompts: bool = False) -> ModelBundle:
    from transformers import AutoTokenizer, Sam3Model, Sam3VideoModel

    from MedicalSAM3Core.inference.models import (GEOMETRY_BOX_ONLY, check_preprocessing, from_pretrained,
                                                  read_preprocessing, resolve_model_dir, use_prompt_graph)
    from MedicalSAM3Core.inference.tiny import add_tracker, build_offline_tokenizer, small_video_config
    from MedicalSAM3Core.preprocessing.intensity import SAM3_MEAN, SAM3_STD

    torch.manual_seed(int(model_cfg.get("seed", 0)))
    preprocessing: dict = {}
    if model_cfg.get("init"):
        folder = resolve_model_dir(str(model_cfg["init"]))
        kind = json.loads((folder / "config.json").read_text()).get("model_type")
        full = from_pretrained(Sam3VideoModel if kind == "sam3_video" else Sam3Model, folder)
        if model_cfg.get("add_tracker") is not None:  # a new, random tracker around a detector-only model
            if kind == "sam3_video":
                raise InputError(f"model.add_tracker: {folder} already holds a tracker (a sam3_video model); "
                                 "remove add_tracker to train the tracker it has")
            full = add_tracker(full, **model_cfg["add_tracker"])
        tokenizer = AutoTokenizer.from_pretrained(folder)
        preprocessing = read_preprocessing(folder)
    else:
        full = Sam3VideoModel(small_video_config(**model_cfg["from_config"]))
        tokenizer = build_offline_tokenizer()
    detector = full.detector_model if hasattr(full, "detector_model") else full
    if model_cfg.get("dropout") is not None:  # e.g. 0 for bit-reproducible comparisons
        for module in full.modules():
            if isinstance(module, torch.nn.Dropout):
                module.p = float(model_cfg["dropout"])
    preprocessing.update(model_cfg.get("preprocessing") or {})
    check_preprocessing(preprocessing, "model.preprocessing")  # what export writes must load
    # the graph the engine runs: SAM3's empty geometry prompt beside a text prompt unless the model says otherwise
    preprocessing["empty_geometry_prompt"] = bool(preprocessing.get("empty_geometry_prompt", True))
    use_prompt_graph(detector, preprocessing)
    if not box_prompts:  # text-only prompts: the box encoding gets no signal (without the empty prompt, nothing does)
        for name, param in detector.geometry_encoder.named_parameters():
            if not preprocessing["empty_geometry_prompt"] or name.split(".")[0] in GEOMETRY_BOX_ONLY:
                param.requires_grad_(False)
    preprocess = {"image_size": int(detector.config.image_size), "mean": list(SAM3_MEAN), "std": list(SAM3_STD),
                  **preprocessing}
    lora = None
    if model_cfg.get("lora"):
        from .lora import add_lora

        lora = add_lora(detector, **model_cfg["lora"])
    return ModelBundle(full, detector, tokenizer, preprocess, lora)


def freeze_unused(bundle: ModelBundle, device, box_prompts: bool = False) -> list[str]:
    """Freeze the parameters that the text-prompted detector never uses (one probe forward and
    backward finds them: e.g. the FPN level only the tracker reads, the unused text projection).
    DDP requires every trainable parameter to get a gradient in every step."""
    size = bundle.preprocess["image_size"]
    ids, mask = tokenize(bundle.tokenizer, ["liver"], device)
    boxes = labels = None
    if box_prompts:
        boxes = torch.tensor([[[0.5, 0.5, 0.2, 0.2]]], device=device)
        labels = torch.ones((1, 1), dtype=torch.long, device=device)
    out = forward_all_layers(bundle.detector, torch.zeros((1, 3, size, size), device=device), ids, mask, boxes, labels)
    probe = out.logits.sum() + out.boxes.sum() + out.presence.sum() + out.masks.sum()
    (probe + (out.semantic.sum() if out.semantic is not None else 0)).backward()
    frozen = []
    for name, param in bundle.detector.named_parameters():
        if param.requires_grad and param.grad is None:
            param.requires_grad_(False)
            frozen.append(name)
        param.grad = None
    return frozen


def tokenize(tokenizer, texts: list[str], device) -> tuple[torch.Tensor, torch.Tensor]:
    tokens = tokenizer(texts, return_tensors="pt", padding="max_length", max_length=32, truncation=True)
    return tokens["input_ids"].to(device), tokens["attention_mask"].to(device)


def export_model(bundle: ModelBundle, folder: Path, config: dict, metrics: Optional[dict] = None) -> Path:
    """Write ``folder`` in transformers format + our preprocessing file; written beside and renamed.
    ``train.export_dtype`` float16 halves the files (the demo model must stay under 25 MB).
    ``train.export_tracker: false`` writes the trained detector alone (a ``Sam3Model``): for a model
    trained from scratch, whose tracker was never trained, so that nobody tracks with random weights
    (the engine then runs ``slices`` mode and says so)."""
    import shutil

    folder = Path(folder)
    staging = folder.with_name(folder.name + ".partial")
    shutil.rmtree(staging, ignore_errors=True)
    dtype = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}[
        config["train"].get("export_dtype", "float32")]
    model = bundle.full if config["train"].get("export_tracker", True) else bundle.detector
    state = model.state_dict()
    if bundle.lora is not None:  # adapters alone beside the model, and merged into it for inference
        from .lora import merged_state_dict, save_adapter

        save_adapter(bundle.detector, bundle.lora, folder.with_name("adapter"))
        state = merged_state_dict(state, bundle.lora.lora_alpha / bundle.lora.r)
    alpha = config["train"].get("export_interpolation")
    if alpha is not None:
        state = interpolate_with_init(state, config["model"], alpha, tracker=model is bundle.full)
    state = {k: (v.to(dtype) if v.is_floating_point() else v) for k, v in state.items()}
    model.save_pretrained(staging, state_dict=state)  # stored in dtype; the engine loads float32
    bundle.tokenizer.save_pretrained(staging)
    from MedicalSAM3Core.inference.models import PREPROCESSING_KEYS

    keep = {k: v for k, v in bundle.preprocess.items() if k in PREPROCESSING_KEYS}
    (staging / "medsam3_preprocessing.json").write_text(json.dumps(keep, indent=2) + "\n")
    (staging / "training.json").write_text(json.dumps({"config": config, "metrics": metrics or {}}, indent=2) + "\n")
    shutil.rmtree(folder, ignore_errors=True)
    os.replace(staging, folder)
    return folder


def record_knowledge(preprocess: dict, spec) -> None:
    """What the exported model will say it knows (``trained_concepts`` / ``trained_modalities`` of its
    medsam3_preprocessing.json): the dataset's concepts, and its declared modality, added to what the
    initial model already listed. Not guessed: a dataset that declares no modality adds none."""
    preprocess["trained_concepts"] = sorted(set(preprocess.get("trained_concepts") or ()) | set(spec.concepts),
                                            key=str.lower)
    if spec.modality:
        preprocess["trained_modalities"] = sorted(set(preprocess.get("trained_modalities") or ()) | {spec.modality})


def interpolate_with_init(state: dict, model_cfg: dict, alpha: float, tracker: bool) -> dict:
    """WiSE-FT (Wortsman et al., CVPR 2022): ``(1 - alpha) * init + alpha * fine-tuned`` for every
    floating-point tensor, the initial weights read again from ``model.init``. Fine-tuning a model on a
    narrow set (here: new concepts, one patient) costs part of what it did on other data; blending the
    weights back towards the model it started from recovers much of that while keeping most of the new
    skill. Tensors the initial model lacks (none for a full fine-tune) are an error."""
    initial = build_model({**model_cfg, "lora": None})
    reference = (initial.full if tracker else initial.detector).state_dict()
    missing = sorted(set(state) - set(reference))
    if missing:
        raise MedSAM3Error(f"train.export_interpolation: model.init lacks {len(missing)} tensor(s) of the trained "
                           f"model, e.g. {missing[0]}")
    return {k: (torch.lerp(reference[k].to(v.device, v.dtype), v, float(alpha)) if v.is_floating_point() else v)
            for k, v in state.items()}


# -- distributed ---------------------------------------------------------------------------------
def _distributed() -> tuple[int, int, int]:
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1 and not dist.is_initialized():
        backend = "nccl" if torch.cuda.is_available() else "gloo"
        dist.init_process_group(backend)
    return (dist.get_rank() if world > 1 else 0), world, int(os.environ.get("LOCAL_RANK", "0"))


def _device(name: str, local_rank: int) -> torch.device:
    if name == "auto":
        return torch.device(f"cuda:{local_rank}") if torch.cuda.is_available() else torch.device("cpu")
    return torch.device(name)


# -- validation ----------------------------------------------------------------------------------
@torch.no_grad()
def validate(detector, tokenizer, dataset: SliceDataset, device, max_slices: int = 64, score_threshold: float = 0.5,
             batch_size: int = 8) -> dict[str, float]:
    """Per-concept Dice over validation slices (pooled: 2 sum|P & G| / (sum|P| + sum|G|)), with the
    engine's own decision rule (its default instance policy above ``score_threshold``, mask probability > 0.5)."""
    from MedicalSAM3Core.common.options import SegmentOptions
    from MedicalSAM3Core.inference.engine import instance_confidence
    from MedicalSAM3Core.preprocessing.layout import SliceLayout

    was_training = detector.training
    detector.eval()
    by_concept: dict[str, list[int]] = {}
    for index, triplet in enumerate(dataset.triplets):
        by_concept.setdefault(triplet.concept, []).append(index)
    stats: dict[str, list[float]] = {}
    size = int(dataset.preprocess["image_size"])
    layout = SliceLayout.stretch((size, size), size)
    for concept, indices in by_concept.items():
        chosen = [indices[i] for i in np.linspace(0, len(indices) - 1, min(max_slices, len(indices))).round().astype(int)]
        inter = total = 0.0
        for start in range(0, len(chosen), batch_size):
            items = [dataset[i] for i in chosen[start:start + batch_size]]
            batch = collate(items)
            ids, mask = tokenize(tokenizer, batch["text"], device)
            outputs = detector(pixel_values=batch["pixel_values"].to(device), input_ids=ids, attention_mask=mask)
            conf, _ = instance_confidence(outputs, layout, score_threshold, 0.5, SegmentOptions().instances)
            predicted = (conf > 0).cpu()
            truth = torch.stack([m.any(0) if len(m) else torch.zeros((size, size), dtype=torch.bool)
                                 for m in batch["masks"]])
            inter += float((predicted & truth).sum())
            total += float(predicted.sum() + truth.sum())
        stats[concept] = 2 * inter / total if total else 1.0
    detector.train(was_training)
    return stats


# -- training ------------------------------------------------------------------------------------
class Trainer:
    """Builds everything from a config; :meth:`run` trains to ``train.steps`` (resuming if asked)."""

    def __init__(self, config: dict, output: Optional[Path] = None, datasets=None) -> None:
        self.config = config
        t = config["train"]
        self.rank, self.world, local_rank = _distributed()
        self.device = _device(t["device"], local_rank)
        self.output = Path(output or t["output"])
        self.box_prompts = float(t["box_prompt_probability"]) > 0
        self.tasks = list(t.get("tasks") or ["detector"])
        self.tracker_cfg = tracker_settings(config.get("tracker"))
        self.bundle = build_model(config["model"], self.box_prompts)
        self.bundle.full.to(self.device)
        self.detector = self.bundle.detector
        self.detector.train()
        if "tracker" in self.tasks:
            self._prepare_tracker()
        if "detector" in self.tasks:
            frozen = freeze_unused(self.bundle, self.device, self.box_prompts)
        else:  # a tracker stage: the detector (its ViT included, which the tracker reads) stays as it is
            frozen = []
            for param in self.detector.parameters():
                param.requires_grad_(False)
        if frozen and self.rank == 0:
            log.info("%d parameter tensors get no gradient from text prompts and stay fixed: %s", len(frozen),
                     ", ".join(frozen[:6]) + (" ..." if len(frozen) > 6 else ""))
        if t["trainable"] is not None:
            kept = restrict_trainable(self.detector, t["trainable"])
            if self.rank == 0:
                log.info("train.trainable: %d parameter tensors are trained, the rest stay fixed", len(kept))
        if datasets is None:
            datasets = build_datasets(config["data"], self.bundle.preprocess)
        self.train_set, self.val_set = datasets
        if "detector" in self.tasks:  # a tracker stage teaches no text: the model knows what it knew
            record_knowledge(self.bundle.preprocess, self.train_set.spec)
        if t["batch_size"] % self.world:
            raise InputError(f"train.batch_size {t['batch_size']} is not divisible by {self.world} processes")
        self.clips = None
        if "tracker" in self.tasks:
            self.clips = ClipSource(self.train_set, self.tracker_cfg)
            if self.tracker_cfg["clips_per_step"] % self.world:
                raise InputError(f"tracker.clips_per_step {self.tracker_cfg['clips_per_step']} is not divisible by "
                                 f"{self.world} processes")
        self.local_batch = t["batch_size"] // self.world
        self.sampler = BalancedSampler(self.train_set, t["epoch_steps"] * self.local_batch, seed=t["seed"],
                                       positive_fraction=t["positive_fraction"], rank=self.rank, world_size=self.world,
                                       concepts_per_slice=t["concepts_per_slice"],
                                       concept_weights=t["concept_weights"],
                                       hard_negative_fraction=t["hard_negative_fraction"],
                                       hard_negative_slices=t["hard_negative_slices"])
        loss = config["loss"]
        self.criterion = Criterion(LossWeights(**loss["weights"]), MatchCosts(**loss["costs"]), loss["o2m_k"],
                                   loss["o2m_iou"], loss["class_loss"], float(loss["pos_weight"]),
                                   bool(loss["class_on_absent"]))
        self.model = self.detector
        self.fsdp = bool(t["fsdp"]) and self.world > 1
        # with the tracker, gradients are averaged across processes by hand after each backward (one
        # step runs the detector and the tracker: two graphs, which DDP's single forward cannot wrap)
        self.manual_sync = "tracker" in self.tasks and self.world > 1
        if self.fsdp:  # parameters, gradients and optimizer state sharded across the processes
            from torch.distributed.fsdp import fully_shard

            for layer in self.detector.vision_encoder.backbone.layers:
                fully_shard(layer)
            fully_shard(self.detector)
        elif self.world > 1 and not self.manual_sync:
            from torch.nn.parallel import DistributedDataParallel

            # with box prompts the box encoder is used in some steps only
            self.model = DistributedDataParallel(self.detector, device_ids=[self.device.index]
                                                 if self.device.type == "cuda" else None,
                                                 find_unused_parameters=self.box_prompts)
        o = config["optim"]  # after sharding: FSDP replaces the parameters
        groups = parameter_groups(self.detector, o["lr_backbone"], o["lr_text"], o["lr_heads"], o["layer_decay"],
                                  o["weight_decay"])
        if "tracker" in self.tasks:
            lr = self.tracker_cfg["lr"] if self.tracker_cfg["lr"] is not None else o["lr_heads"]
            groups += tracker_parameter_groups(self.bundle.full, float(lr), o["weight_decay"])
        self.trained = [p for g in groups for p in g["params"]]
        self.optimizer = build_optimizer(groups, o["betas"], o["eps"])
        self.step = 0
        self.autocast = (torch.autocast("cuda", dtype=torch.bfloat16) if self.device.type == "cuda"
                         else torch.autocast("cpu", enabled=False))
        self.writer = None

    # checkpoints ---------------------------------------------------------------------------------
    @property
    def checkpoint_path(self) -> Path:
        return self.output / "checkpoint.pt"

    def _full_states(self) -> tuple[dict, dict]:
        """Model and optimizer state as plain (unsharded) dicts; a collective call under FSDP."""
        if not self.fsdp:
            return self._scope().state_dict(), self.optimizer.state_dict()
        from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_model_state_dict,
                                                             get_optimizer_state_dict)

        options = StateDictOptions(full_state_dict=True, cpu_offload=True)
        return (get_model_state_dict(self.detector, options=options),
                get_optimizer_state_dict(self.detector, self.optimizer, options=options))

    def save_checkpoint(self) -> None:
        model_state, optimizer_state = self._full_states()
        if self.rank != 0:
            return
        self.output.mkdir(parents=True, exist_ok=True)
        state = {"model": model_state, "optimizer": optimizer_state, "step": self.step,
                 "scope": "full" if "tracker" in self.tasks else "detector",
                 "torch_rng": torch.get_rng_state(),
                 "cuda_rng": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else []}
        partial = self.checkpoint_path.with_suffix(".pt.partial")
        torch.save(state, partial)
        os.replace(partial, self.checkpoint_path)

    def load_checkpoint(self, path: Optional[Path] = None) -> None:
        path = Path(path or self.checkpoint_path)
        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
        except FileNotFoundError:
            raise InputError(f"no checkpoint to resume from at {path}") from None
        if self.fsdp:
            from torch.distributed.checkpoint.state_dict import (StateDictOptions, set_model_state_dict,
                                                                 set_optimizer_state_dict)

            options = StateDictOptions(full_state_dict=True)
            set_model_state_dict(self.detector, state["model"], options=options)
            set_optimizer_state_dict(self.detector, self.optimizer, state["optimizer"], options=options)
        else:
            scope = "full" if "tracker" in self.tasks else "detector"
            if state.get("scope", "detector") != scope:
                raise InputError(f"{path} holds the {state.get('scope', 'detector')} of a run with other train.tasks "
                                 f"(this run trains {', '.join(self.tasks)}): resume with the config it was made with")
            self._scope().load_state_dict(state["model"], strict=True)
            self.optimizer.load_state_dict(state["optimizer"])
        self.step = int(state["step"])
        torch.set_rng_state(state["torch_rng"])
        if state["cuda_rng"] and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(state["cuda_rng"])

    def _scope(self) -> torch.nn.Module:
        """What checkpoints hold: the whole video model when the tracker is trained, else the detector."""
        return self.bundle.full if "tracker" in self.tasks else self.detector

    def _prepare_tracker(self) -> None:
        """The tracker trains in its inference protocol (``ObjectTrack``), with its dropout active."""
        full = self.bundle.full
        if not hasattr(full, "tracker_model"):
            raise InputError("train.tasks includes the tracker, but model.init is a detector-only model (Sam3Model): "
                             "start from a Sam3VideoModel folder (e.g. facebook/sam3)")
        full.tracker_model.eval()
        for module in full.tracker_model.modules():
            if isinstance(module, torch.nn.Dropout):
                module.train()
        for param in list(full.tracker_model.parameters()) + list(full.tracker_neck.parameters()):
            param.requires_grad_(True)

    # loop ------------------------------------------------------------------------------------------
    def _batches(self):
        """Batches from the current step on; the data order depends only on (seed, step)."""
        t = self.config["train"]
        if "detector" not in self.tasks:  # a tracker stage draws its clips in train_step
            while True:
                yield None
        while True:
            epoch, skip = divmod(self.step, t["epoch_steps"])
            self.sampler.set_epoch(epoch)
            self.train_set.epoch = epoch
            # its own generator: creating a loader must not draw from the global RNG (dropout), or
            # a resumed run would diverge from the uninterrupted one
            loader = DataLoader(self.train_set, batch_size=self.local_batch, sampler=self.sampler,
                                collate_fn=collate, num_workers=t["num_workers"],
                                generator=torch.Generator().manual_seed(t["seed"] + epoch))
            for index, batch in enumerate(loader):
                if index >= skip:
                    yield batch

    def train_step(self, batch: dict) -> dict:
        o = self.config["optim"]
        factor = lr_factor(self.step, o["warmup_steps"], self.config["train"]["steps"], o["schedule"])
        for group in self.optimizer.param_groups:
            group["lr"] = group["initial_lr"] * factor
        self.optimizer.zero_grad(set_to_none=True)
        total = torch.zeros((), device=self.device)
        terms: dict = {}
        if "detector" in self.tasks:
            ids, mask = tokenize(self.bundle.tokenizer, batch["text"], self.device)
            targets = [{"boxes": b, "masks": m} for b, m in zip(batch["boxes"], batch["masks"])]
            boxes, box_labels = self._box_prompts(batch["boxes"])
            with self.autocast:
                outputs = forward_all_layers(self.model, batch["pixel_values"].to(self.device), ids, mask, boxes,
                                             box_labels)
            total, terms = self.criterion(outputs, targets)
        if "tracker" in self.tasks:
            tracker_loss, tracker_terms = self._tracker_loss()
            total = total + float(self.tracker_cfg["loss_weight"]) * tracker_loss
            terms.update(tracker_terms)
        total.backward()
        if self.manual_sync:
            self._average_gradients()
        if o["grad_clip"]:
            torch.nn.utils.clip_grad_norm_(self.trained, o["grad_clip"])
        self.optimizer.step()
        self.step += 1
        return {"loss": float(total.detach()), "lr_factor": factor, **terms}

    def _tracker_loss(self) -> tuple[torch.Tensor, dict]:
        """The mean tracker loss over this process's clips of the step. Clip ``g`` of the global batch
        is drawn from ``(seed, step, g)`` alone: the same clips whatever the number of processes."""
        t = self.config["train"]
        local = self.tracker_cfg["clips_per_step"] // self.world
        losses, sums = [], {}
        backbone_grad = "detector" in self.tasks
        for j in range(local):
            rng = np.random.default_rng([t["seed"], 1, self.step, self.rank * local + j])
            clip = self.clips.draw(rng)
            with self.autocast:
                loss, clip_terms = track_clip(self.bundle.full, self.detector, clip, self.tracker_cfg, rng, self.device,
                                              backbone_grad)
            losses.append(loss)
            for key, value in clip_terms.items():
                sums[key] = sums.get(key, 0.0) + value / local
        terms = {f"tracker_{k}": v for k, v in sums.items()}
        loss = torch.stack(losses).mean()
        terms["tracker_loss"] = float(loss.detach())
        return loss, terms

    def _average_gradients(self) -> None:
        """Average the gradients of every trained parameter across processes (as DDP does); a parameter
        this process did not reach contributes zeros."""
        for param in self.trained:
            if param.grad is None:
                param.grad = torch.zeros_like(param)
        grads = [param.grad for param in self.trained]
        flat = torch.cat([g.reshape(-1) for g in grads])
        dist.all_reduce(flat)
        flat /= self.world
        offset = 0
        for grad in grads:
            grad.copy_(flat[offset:offset + grad.numel()].view_as(grad))
            offset += grad.numel()

    def _box_prompts(self, boxes: list[torch.Tensor]):
        """With ``train.box_prompt_probability``, one ground-truth box per sample (jittered by
        ``train.box_noise`` of its size) as a visual prompt beside the text; None when unused.
        Deterministic for (seed, step, rank), so a resumed run draws the same prompts."""
        t = self.config["train"]
        probability = float(t["box_prompt_probability"])
        if probability <= 0:
            return None, None
        rng = np.random.default_rng([t["seed"], self.step, self.rank])
        prompts = torch.zeros((len(boxes), 1, 4))
        labels = torch.full((len(boxes), 1), -10, dtype=torch.long)  # -10: padding (no prompt)
        for b, sample in enumerate(boxes):
            if len(sample) and rng.random() < probability:
                x1, y1, x2, y2 = sample[rng.integers(len(sample))].tolist()
                w, h = x2 - x1, y2 - y1
                cx, cy, w, h = ((x1 + x2) / 2 + rng.normal(0, t["box_noise"]) * w,
                                (y1 + y2) / 2 + rng.normal(0, t["box_noise"]) * h,
                                w * (1 + rng.normal(0, t["box_noise"])), h * (1 + rng.normal(0, t["box_noise"])))
                prompts[b, 0] = torch.tensor([cx, cy, abs(w), abs(h)]).clamp(0, 1)
                labels[b, 0] = 1
        if not (labels == 1).any():
            return None, None
        return prompts.to(self.device), labels.to(self.device)

    def run(self, resume: bool = False, stop_after: Optional[int] = None) -> dict:
        """Train until ``train.steps`` (or ``stop_after`` more steps); returns the last metrics."""
        t = self.config["train"]
        if resume:
            self.load_checkpoint()
        if self.rank == 0:
            self.output.mkdir(parents=True, exist_ok=True)
            self._open_writer()
        target = t["steps"] if stop_after is None else min(t["steps"], self.step + stop_after)
        metrics: dict = {}
        progress = _progress(self.step, t["steps"], self.rank == 0)
        started = time.monotonic()
        for batch in self._batches():
            if self.step >= target:
                break
            metrics = self.train_step(batch)
            progress.update(1)
            progress.set_postfix(loss=f"{metrics['loss']:.3f}")
            if self.rank == 0 and (self.step % t["log_every"] == 0 or self.step == target):
                self._log({"step": self.step, "elapsed_s": time.monotonic() - started, **metrics})
            if t["val_every"] and self.step % t["val_every"] == 0 and self.val_set is not None and self.rank == 0:
                dice = validate(self.detector, self.bundle.tokenizer, self.val_set, self.device, t["val_slices"])
                self._log({"step": self.step, "val_dice": dice, "val_mean_dice": float(np.mean(list(dice.values())))})
            if t["checkpoint_every"] and self.step % t["checkpoint_every"] == 0:
                self.save_checkpoint()
        progress.close()
        self.save_checkpoint()
        if self.step >= t["steps"]:  # a finished run resumed only to export again keeps its last metrics
            self._export(metrics or self._last_logged())
        if self.writer is not None:
            self.writer.close()
        return metrics

    def _export(self, metrics: dict) -> None:
        bundle = self.bundle
        if self.fsdp:  # gather the shards, then export an ordinary copy of the model
            model_state, _ = self._full_states()
            if self.rank != 0:
                return
            bundle = build_model(self.config["model"], self.box_prompts)
            bundle.detector.load_state_dict(model_state, strict=True)
        if self.rank == 0:
            export_model(bundle, self.output / "model", self.config, metrics)

    def _last_logged(self) -> dict:
        """The last training record of ``metrics.jsonl``, without its step and time."""
        path, last = self.output / "metrics.jsonl", {}
        if path.is_file():
            for line in path.read_text(encoding="utf-8").splitlines():
                record = json.loads(line)
                last = record if "loss" in record else last
        return {k: v for k, v in last.items() if k not in ("step", "elapsed_s")}

    def _open_writer(self) -> None:
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:
            log.info("tensorboard is not installed: metrics go to %s only", self.output / "metrics.jsonl")
            return
        self.writer = SummaryWriter(str(self.output / "tensorboard"))

    def _log(self, record: dict) -> None:
        with open(self.output / "metrics.jsonl", "a", encoding="utf-8") as handle:
            handle.write(json.dumps(record) + "\n")
        if self.writer is not None:
            for key, value in record.items():
                if isinstance(value, (int, float)) and key != "step":
                    self.writer.add_scalar(key, value, record["step"])
                elif isinstance(value, dict):
                    for name, v in value.items():
                        self.writer.add_scalar(f"{key}/{name}", v, record["step"])


def _progress(done: int, total: int, enabled: bool):
    from tqdm import tqdm

    return tqdm(total=total, initial=done, unit="step", disable=not enabled, file=sys.stderr)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="medsam3-train", description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", required=True, type=Path, help="training config (YAML), see Training/configs/")
    parser.add_argument("--output", type=Path, help="run folder (default: train.output of the config)")
    parser.add_argument("--resume", action="store_true", help="continue from <output>/checkpoint.pt")
    parser.add_argument("--steps", type=int, help="override train.steps")
    parser.add_argument("--stop-after", type=int, help="stop (with a checkpoint) after this many steps of this run; "
                                                       "--resume continues on the same schedule")
    parser.add_argument("--check-data", action="store_true",
                        help="only validate the config and the dataset (every problem listed), then stop")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="medsam3-train: %(message)s")
    try:
        config = load_config(args.config)
        if args.steps:
            config["train"]["steps"] = args.steps
        if args.check_data:
            from .data import load_dataset

            spec = load_dataset(config["data"]["dataset"])
            splits = {s: sum(c.split == s for c in spec.cases) for s in ("train", "val")}
            print(f"dataset {spec.name!r}: {splits['train']} training and {splits['val']} validation case(s), "
                  f"concepts: {', '.join(spec.concepts)} - OK")
            return 0
        trainer = Trainer(config, args.output)
        if trainer.rank == 0:
            trainer.output.mkdir(parents=True, exist_ok=True)
            import yaml

            (trainer.output / "config.yaml").write_text(yaml.safe_dump(config, sort_keys=False))
        trainer.run(resume=args.resume, stop_after=args.stop_after)
        if dist.is_initialized():  # every rank done (rank 0's checkpoint written) before the group is torn down
            dist.barrier()
        if trainer.rank == 0:
            print(f"trained weights: {trainer.output / 'model'} (use: medsam3 segment --model {trainer.output / 'model'})")
        return 0
    except MedSAM3Error as error:
        print(f"medsam3-train: error: {error}", file=sys.stderr)
        return 2
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


if __name__ == "__main__":
    sys.exit(main())
