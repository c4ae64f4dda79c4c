"""LoRA (low-rank adapters, via ``peft``) for users whose GPU cannot hold full fine-tuning.

Adapters ``W + (alpha / r) * B @ A`` are injected into the detector's attention and MLP linears
(transformers' SAM3 names them ``q_proj``, ``k_proj``, ``v_proj``, ``o_proj``, ``fc1``, ``fc2``);
every other weight is frozen. A run saves the adapters alone (``adapter/``: a few MB) and, for
inference, the model with the adapters merged into the base weights (``model/``), which the engine
loads like any other model folder.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

DEFAULT_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "fc1", "fc2")


def add_lora(detector: torch.nn.Module, rank: int = 16, alpha: float = 32.0, dropout: float = 0.0,
             targets=DEFAULT_TARGETS):
    """Freeze ``detector`` and inject LoRA adapters in place (parameter names stay the model's)."""
    from peft import LoraConfig, inject_adapter_in_model

    for param in detector.parameters():
        param.requires_grad_(False)
    config = LoraConfig(r=rank, lora_alpha=alpha, lora_dropout=dropout, target_modules=list(targets))
    inject_adapter_in_model(config, detector)
    return config


def merged_state_dict(state: dict[str, torch.Tensor], scaling: float) -> dict[str, torch.Tensor]:
    """A state dict with LoRA layers (``x.base_layer.weight``, ``x.lora_A.default.weight``,
    ``x.lora_B.default.weight``) turned back into plain ones: ``x.weight = W + scaling * B @ A``."""
    merged: dict[str, torch.Tensor] = {}
    for key, value in state.items():
        if ".lora_" in key:
            continue
        if ".base_layer." in key:
            prefix, _, name = key.partition(".base_layer.")
            if name == "weight" and f"{prefix}.lora_A.default.weight" in state:
                a, b = state[f"{prefix}.lora_A.default.weight"], state[f"{prefix}.lora_B.default.weight"]
                value = value + scaling * (b.float() @ a.float()).to(value.dtype)
            key = f"{prefix}.{name}"
        merged[key] = value
    return merged


def save_adapter(detector: torch.nn.Module, config, folder: Path) -> Path:
    """The adapters alone, in peft's format (``adapter_model.safetensors`` + ``adapter_config.json``)."""
    from peft import get_peft_model_state_dict
    from safetensors.torch import save_file

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    weights = {k: v.detach().contiguous() for k, v in get_peft_model_state_dict(detector).items()}
    save_file(weights, str(folder / "adapter_model.safetensors"))
    data = config.to_dict()
    data = {k: (sorted(v) if isinstance(v, set) else v) for k, v in data.items()}
    (folder / "adapter_config.json").write_text(json.dumps(data, indent=2, default=str) + "\n")
    return folder
