"""Convert original SAM3 / Medical SAM3 / MedSAM3-LoRA ``.pt`` checkpoints to transformers format.

Meta's ``sam3`` package names its modules differently from transformers' ``Sam3Model`` /
``Sam3VideoModel`` and stores some tensors in other layouts. :func:`convert_state_dict` maps one
onto the other, strictly: every key of the checkpoint is either converted or on a short list of
keys transformers has no place for (:data:`UNUSED_META_KEYS`, each with its reason), and every
parameter of the target model is filled with a tensor of the right shape; anything else is a
:class:`ModelLoadError` that lists the offending keys.

Checkpoint layouts understood (after unwrapping ``{"model": ...}`` / ``{"state_dict": ...}`` and a
DDP ``module.`` prefix):

* SAM3 as published (``facebook/sam3``, ``sam3.pt``): keys under ``detector.`` (image model) and
  ``tracker.`` (memory-bank tracker) -> ``Sam3VideoModel``.
* Medical SAM3 2D: the detector alone, keys with or without ``detector.`` -> ``Sam3Model``.
* Medical SAM3 3D: like SAM3, built at image size 504; the image size is read from the
  resolution-dependent rotary buffers (``freqs_cis``), which are then dropped: transformers
  rebuilds them from the config. Layer counts are read from the keys too (:func:`infer_depths`);
  widths and head counts are SAM3's (a different width is a shape error, not a silent load).
* MedSAM3 LoRA adapters: merged into a base checkpoint (``W + alpha / r * B @ A``) before
  conversion, see :func:`merge_lora`.

Tensor layout changes: fused ``qkv`` / ``in_proj`` projections are split into q, k, v; the ViT
position embedding loses its class-token row; CLIP's ``text_projection`` is transposed (Meta
multiplies ``x @ P``, transformers applies ``Linear`` = ``x @ W.T``); the tracker's four point
embeddings are stacked into one table, and its random-Fourier prompt embedding is shared with the
image embedding.

Checkpoints are read with ``torch.load(weights_only=True)`` only; a file that needs arbitrary
pickle code is refused.
"""

from __future__ import annotations

import gzip
import hashlib
import json
import logging
import os
import pickle
import re
import shutil
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable, Mapping, Optional, Union

import torch
from safetensors import SafetensorError

from ..common.errors import ModelLoadError, OutputError

log = logging.getLogger(__name__)

PATCH_SIZE = 14
DEFAULT_IMAGE_SIZE = 1008
TEXT_CONTEXT_LENGTH = 32
CONVERTED_MARKER = "medsam3_conversion.json"

Tensor = torch.Tensor
StateDict = dict[str, Tensor]
_Transform = Callable[[str, Tensor], list[tuple[str, Tensor]]]

#: Meta keys with no counterpart in transformers, and why dropping them loses nothing.
UNUSED_META_KEYS: dict[str, str] = {
    r".*\.attn\.freqs_cis": "rotary tables of the ViT, recomputed by transformers from the image size",
    r"geometry_encoder\.points_(direct|pool|pos_enc)_project\.(weight|bias)":
        "point-prompt projections of the detector's geometry encoder; transformers' Sam3Model takes "
        "boxes only (points go to the tracker)",
}

# --------------------------------------------------------------------------------------------
# Key rules. Each is (regex fully matching a Meta key, replacement template, transform name).
# Detector keys are relative to the image model (no ``detector.`` prefix); tracker keys are
# relative to ``tracker.``.
# --------------------------------------------------------------------------------------------

_VIT = r"backbone\.vision_backbone\.trunk\."
_TXT = r"backbone\.language_backbone\.encoder\."


def _attention(src: str, dst: str, out_name: str = "o_proj") -> list[tuple[str, str, str]]:
    """Rules for one ``nn.MultiheadAttention``: fused in_proj split, out_proj renamed."""
    return [(src + r"\.in_proj_(?P<w>weight|bias)", dst + r".{QKV}_proj.\g<w>", "split_qkv"),
            (src + r"\.out_proj\.(?P<w>weight|bias)", dst + f".{out_name}." + r"\g<w>", "copy")]


def _fpn(src: str, dst: str) -> list[tuple[str, str, str]]:
    return [(src + r"\.(\d+)\.dconv_2x2_0\.(weight|bias)", dst + r".\1.scale_layers.0.\2", "copy"),
            (src + r"\.(\d+)\.dconv_2x2_1\.(weight|bias)", dst + r".\1.scale_layers.2.\2", "copy"),
            (src + r"\.(\d+)\.dconv_2x2\.(weight|bias)", dst + r".\1.scale_layers.0.\2", "copy"),
            (src + r"\.(\d+)\.conv_1x1\.(weight|bias)", dst + r".\1.proj1.\2", "copy"),
            (src + r"\.(\d+)\.conv_3x3\.(weight|bias)", dst + r".\1.proj2.\2", "copy")]


def _encoder_layer(src: str, dst: str) -> list[tuple[str, str, str]]:
    """Geometry-encoder and DETR-encoder layers (self-attn, image cross-attn, FFN, 3 norms)."""
    return (_attention(src + r"\.self_attn", dst + ".self_attn")
            + _attention(src + r"\.cross_attn_image", dst + ".cross_attn")
            + [(src + r"\.linear1\.(?P<w>weight|bias)", dst + r".mlp.fc1.\g<w>", "copy"),
               (src + r"\.linear2\.(?P<w>weight|bias)", dst + r".mlp.fc2.\g<w>", "copy"),
               (src + r"\.norm(?P<n>[123])\.(?P<w>weight|bias)", dst + r".layer_norm\g<n>.\g<w>", "copy")])


def _mlp3(src: str, dst: str) -> list[tuple[str, str, str]]:
    """Meta ``MLP(layers=[0, 1, 2])`` -> transformers ``proj_in, layers.0, proj_out``."""
    return [(src + r"\.layers\.0\.(?P<w>weight|bias)", dst + r".proj_in.\g<w>", "copy"),
            (src + r"\.layers\.1\.(?P<w>weight|bias)", dst + r".layers.0.\g<w>", "copy"),
            (src + r"\.layers\.2\.(?P<w>weight|bias)", dst + r".proj_out.\g<w>", "copy")]


def _numbered_mlp(src: str, dst: str, count: int) -> list[tuple[str, str, str]]:
    """Meta ``MLP(layers=[0..])`` -> transformers ``layer1, layer2, ...``."""
    return [(src + rf"\.layers\.{i}\.(?P<w>weight|bias)", dst + f".layer{i + 1}." + r"\g<w>", "copy")
            for i in range(count)]


_DETECTOR_RULES: list[tuple[str, str, str]] = [
    # ViT backbone
    (_VIT + r"pos_embed", "vision_encoder.backbone.embeddings.position_embeddings", "drop_cls_token"),
    (_VIT + r"patch_embed\.proj\.(weight|bias)", r"vision_encoder.backbone.embeddings.patch_embeddings.projection.\1",
     "copy"),
    (_VIT + r"ln_pre\.(weight|bias)", r"vision_encoder.backbone.layer_norm.\1", "copy"),
    (_VIT + r"blocks\.(\d+)\.norm([12])\.(weight|bias)", r"vision_encoder.backbone.layers.\1.layer_norm\2.\3", "copy"),
    (_VIT + r"blocks\.(\d+)\.attn\.qkv\.(weight|bias)", r"vision_encoder.backbone.layers.\1.attention.{QKV}_proj.\2",
     "split_qkv"),
    (_VIT + r"blocks\.(\d+)\.attn\.proj\.(weight|bias)", r"vision_encoder.backbone.layers.\1.attention.o_proj.\2",
     "copy"),
    (_VIT + r"blocks\.(\d+)\.mlp\.(fc[12])\.(weight|bias)", r"vision_encoder.backbone.layers.\1.mlp.\2.\3", "copy"),
    # FPN necks (the tracker's own neck lives at the top of Sam3VideoModel)
    *_fpn(r"backbone\.vision_backbone\.convs", "vision_encoder.neck.fpn_layers"),
    *_fpn(r"backbone\.vision_backbone\.sam2_convs", "@tracker_neck.fpn_layers"),
    # CLIP text encoder
    (_TXT + r"token_embedding\.weight", "text_encoder.text_model.embeddings.token_embedding.weight", "copy"),
    (_TXT + r"positional_embedding", "text_encoder.text_model.embeddings.position_embedding.weight", "copy"),
    (_TXT + r"ln_final\.(weight|bias)", r"text_encoder.text_model.final_layer_norm.\1", "copy"),
    (_TXT + r"text_projection", "text_encoder.text_projection.weight", "transpose"),
    (_TXT + r"transformer\.resblocks\.(\d+)\.attn\.in_proj_(weight|bias)",
     r"text_encoder.text_model.encoder.layers.\1.self_attn.{QKV}_proj.\2", "split_qkv"),
    (_TXT + r"transformer\.resblocks\.(\d+)\.attn\.out_proj\.(weight|bias)",
     r"text_encoder.text_model.encoder.layers.\1.self_attn.out_proj.\2", "copy"),
    (_TXT + r"transformer\.resblocks\.(\d+)\.ln_([12])\.(weight|bias)",
     r"text_encoder.text_model.encoder.layers.\1.layer_norm\2.\3", "copy"),
    (_TXT + r"transformer\.resblocks\.(\d+)\.mlp\.c_fc\.(weight|bias)",
     r"text_encoder.text_model.encoder.layers.\1.mlp.fc1.\2", "copy"),
    (_TXT + r"transformer\.resblocks\.(\d+)\.mlp\.c_proj\.(weight|bias)",
     r"text_encoder.text_model.encoder.layers.\1.mlp.fc2.\2", "copy"),
    (r"backbone\.language_backbone\.resizer\.(weight|bias)", r"text_projection.\1", "copy"),
    # geometry (box prompt) encoder
    (r"geometry_encoder\.(label_embed|cls_embed|final_proj|boxes_direct_project|boxes_pool_project|"
     r"boxes_pos_enc_project)\.(weight|bias)", r"geometry_encoder.\1.\2", "copy"),
    (r"geometry_encoder\.img_pre_norm\.(weight|bias)", r"geometry_encoder.vision_layer_norm.\1", "copy"),
    (r"geometry_encoder\.norm\.(weight|bias)", r"geometry_encoder.prompt_layer_norm.\1", "copy"),
    (r"geometry_encoder\.encode_norm\.(weight|bias)", r"geometry_encoder.output_layer_norm.\1", "copy"),
    *_encoder_layer(r"geometry_encoder\.encode\.(?P<i>\d+)", r"geometry_encoder.layers.\g<i>"),
    # DETR encoder
    *_encoder_layer(r"transformer\.encoder\.layers\.(?P<i>\d+)", r"detr_encoder.layers.\g<i>"),
    # DETR decoder
    (r"transformer\.decoder\.(query_embed|reference_points|presence_token)\.weight", r"detr_decoder.\1.weight",
     "copy"),
    (r"transformer\.decoder\.norm\.(weight|bias)", r"detr_decoder.output_layer_norm.\1", "copy"),
    (r"transformer\.decoder\.presence_token_out_norm\.(weight|bias)", r"detr_decoder.presence_layer_norm.\1",
     "copy"),
    *_numbered_mlp(r"transformer\.decoder\.presence_token_head", "detr_decoder.presence_head", 3),
    *_numbered_mlp(r"transformer\.decoder\.bbox_embed", "detr_decoder.box_head", 3),
    *_numbered_mlp(r"transformer\.decoder\.ref_point_head", "detr_decoder.ref_point_head", 2),
    *_numbered_mlp(r"transformer\.decoder\.boxRPB_embed_x", "detr_decoder.box_rpb_embed_x", 2),
    *_numbered_mlp(r"transformer\.decoder\.boxRPB_embed_y", "detr_decoder.box_rpb_embed_y", 2),
    *_attention(r"transformer\.decoder\.layers\.(?P<i>\d+)\.self_attn", r"detr_decoder.layers.\g<i>.self_attn"),
    *_attention(r"transformer\.decoder\.layers\.(?P<i>\d+)\.ca_text", r"detr_decoder.layers.\g<i>.text_cross_attn"),
    *_attention(r"transformer\.decoder\.layers\.(?P<i>\d+)\.cross_attn",
                r"detr_decoder.layers.\g<i>.vision_cross_attn"),
    (r"transformer\.decoder\.layers\.(\d+)\.linear1\.(weight|bias)", r"detr_decoder.layers.\1.mlp.fc1.\2", "copy"),
    (r"transformer\.decoder\.layers\.(\d+)\.linear2\.(weight|bias)", r"detr_decoder.layers.\1.mlp.fc2.\2", "copy"),
    (r"transformer\.decoder\.layers\.(\d+)\.norm1\.(weight|bias)",
     r"detr_decoder.layers.\1.vision_cross_attn_layer_norm.\2", "copy"),
    (r"transformer\.decoder\.layers\.(\d+)\.catext_norm\.(weight|bias)",
     r"detr_decoder.layers.\1.text_cross_attn_layer_norm.\2", "copy"),
    (r"transformer\.decoder\.layers\.(\d+)\.norm2\.(weight|bias)", r"detr_decoder.layers.\1.self_attn_layer_norm.\2",
     "copy"),
    (r"transformer\.decoder\.layers\.(\d+)\.norm3\.(weight|bias)", r"detr_decoder.layers.\1.mlp_layer_norm.\2",
     "copy"),
    # text-query scoring
    *_numbered_mlp(r"dot_prod_scoring\.prompt_mlp", "dot_product_scoring.text_mlp", 2),
    (r"dot_prod_scoring\.prompt_mlp\.out_norm\.(weight|bias)", r"dot_product_scoring.text_mlp_out_norm.\1", "copy"),
    (r"dot_prod_scoring\.prompt_proj\.(weight|bias)", r"dot_product_scoring.text_proj.\1", "copy"),
    (r"dot_prod_scoring\.hs_proj\.(weight|bias)", r"dot_product_scoring.query_proj.\1", "copy"),
    # mask decoder
    (r"segmentation_head\.pixel_decoder\.(conv_layers|norms)\.(\d+)\.(weight|bias)",
     r"mask_decoder.pixel_decoder.\1.\2.\3", "copy"),
    (r"segmentation_head\.(?:mask_predictor\.)?mask_embed\.layers\.(\d+)\.(weight|bias)",
     r"mask_decoder.mask_embedder.layers.\1.\2", "copy"),
    (r"segmentation_head\.instance_seg_head\.(weight|bias)", r"mask_decoder.instance_projection.\1", "copy"),
    (r"segmentation_head\.semantic_seg_head\.(weight|bias)", r"mask_decoder.semantic_projection.\1", "copy"),
    *_attention(r"segmentation_head\.cross_attend_prompt", "mask_decoder.prompt_cross_attn"),
    (r"segmentation_head\.cross_attn_norm\.(weight|bias)", r"mask_decoder.prompt_cross_attn_norm.\1", "copy"),
]

_MD = r"sam_mask_decoder\."
_TRACKER_RULES: list[tuple[str, str, str]] = [
    (r"maskmem_tpos_enc", "memory_temporal_positional_encoding", "copy"),
    (r"no_mem_embed", "no_memory_embedding", "copy"),
    (r"no_mem_pos_enc", "no_memory_positional_encoding", "copy"),
    (r"no_obj_ptr", "no_object_pointer", "copy"),
    (r"no_obj_embed_spatial", "occlusion_spatial_embedding_parameter", "copy"),
    (r"mask_downsample\.(weight|bias)", r"mask_downsample.\1", "copy"),
    # memory attention (RoPE attention with separate q/k/v already)
    (r"transformer\.encoder\.layers\.(\d+)\.(self_attn|cross_attn_image)\.([qkv]_proj)\.(weight|bias)",
     r"memory_attention.layers.\1.\2.\3.\4", "copy"),
    (r"transformer\.encoder\.layers\.(\d+)\.(self_attn|cross_attn_image)\.out_proj\.(weight|bias)",
     r"memory_attention.layers.\1.\2.o_proj.\3", "copy"),
    (r"transformer\.encoder\.layers\.(\d+)\.(linear[12])\.(weight|bias)", r"memory_attention.layers.\1.\2.\3", "copy"),
    (r"transformer\.encoder\.layers\.(\d+)\.norm([123])\.(weight|bias)",
     r"memory_attention.layers.\1.layer_norm\2.\3", "copy"),
    (r"transformer\.encoder\.norm\.(weight|bias)", r"memory_attention.layer_norm.\1", "copy"),
    # memory encoder
    (r"maskmem_backbone\.mask_downsampler\.encoder\.(\d+)\.(weight|bias)", "", "mask_downsampler"),
    (r"maskmem_backbone\.pix_feat_proj\.(weight|bias)", r"memory_encoder.feature_projection.\1", "copy"),
    (r"maskmem_backbone\.out_proj\.(weight|bias)", r"memory_encoder.projection.\1", "copy"),
    (r"maskmem_backbone\.fuser\.layers\.(\d+)\.gamma", r"memory_encoder.memory_fuser.layers.\1.scale", "copy"),
    (r"maskmem_backbone\.fuser\.layers\.(\d+)\.dwconv\.(weight|bias)",
     r"memory_encoder.memory_fuser.layers.\1.depthwise_conv.\2", "copy"),
    (r"maskmem_backbone\.fuser\.layers\.(\d+)\.pwconv([12])\.(weight|bias)",
     r"memory_encoder.memory_fuser.layers.\1.pointwise_conv\2.\3", "copy"),
    (r"maskmem_backbone\.fuser\.layers\.(\d+)\.norm\.(weight|bias)",
     r"memory_encoder.memory_fuser.layers.\1.layer_norm.\2", "copy"),
    # prompt encoder
    (r"sam_prompt_encoder\.pe_layer\.positional_encoding_gaussian_matrix", "", "shared_positional_embedding"),
    (r"sam_prompt_encoder\.point_embeddings\.(\d+)\.weight", "", "point_embedding"),
    (r"sam_prompt_encoder\.(not_a_point_embed|no_mask_embed)\.weight", r"prompt_encoder.\1.weight", "copy"),
    (r"sam_prompt_encoder\.mask_downscaling\.0\.(weight|bias)", r"prompt_encoder.mask_embed.conv1.\1", "copy"),
    (r"sam_prompt_encoder\.mask_downscaling\.1\.(weight|bias)", r"prompt_encoder.mask_embed.layer_norm1.\1", "copy"),
    (r"sam_prompt_encoder\.mask_downscaling\.3\.(weight|bias)", r"prompt_encoder.mask_embed.conv2.\1", "copy"),
    (r"sam_prompt_encoder\.mask_downscaling\.4\.(weight|bias)", r"prompt_encoder.mask_embed.layer_norm2.\1", "copy"),
    (r"sam_prompt_encoder\.mask_downscaling\.6\.(weight|bias)", r"prompt_encoder.mask_embed.conv3.\1", "copy"),
    # SAM mask decoder
    (_MD + r"transformer\.layers\.(\d+)\.(self_attn|cross_attn_token_to_image|cross_attn_image_to_token)\."
     r"([qkv]_proj)\.(weight|bias)", r"mask_decoder.transformer.layers.\1.\2.\3.\4", "copy"),
    (_MD + r"transformer\.layers\.(\d+)\.(self_attn|cross_attn_token_to_image|cross_attn_image_to_token)\."
     r"out_proj\.(weight|bias)", r"mask_decoder.transformer.layers.\1.\2.o_proj.\3", "copy"),
    (_MD + r"transformer\.layers\.(\d+)\.norm([1234])\.(weight|bias)",
     r"mask_decoder.transformer.layers.\1.layer_norm\2.\3", "copy"),
    (_MD + r"transformer\.layers\.(\d+)\.mlp\.lin1\.(weight|bias)", r"mask_decoder.transformer.layers.\1.mlp.proj_in.\2",
     "copy"),
    (_MD + r"transformer\.layers\.(\d+)\.mlp\.lin2\.(weight|bias)",
     r"mask_decoder.transformer.layers.\1.mlp.proj_out.\2", "copy"),
    (_MD + r"transformer\.final_attn_token_to_image\.([qkv]_proj)\.(weight|bias)",
     r"mask_decoder.transformer.final_attn_token_to_image.\1.\2", "copy"),
    (_MD + r"transformer\.final_attn_token_to_image\.out_proj\.(weight|bias)",
     r"mask_decoder.transformer.final_attn_token_to_image.o_proj.\1", "copy"),
    (_MD + r"transformer\.norm_final_attn\.(weight|bias)", r"mask_decoder.transformer.layer_norm_final_attn.\1",
     "copy"),
    (_MD + r"(iou_token|mask_tokens|obj_score_token)\.weight", r"mask_decoder.\1.weight", "copy"),
    (_MD + r"output_upscaling\.0\.(weight|bias)", r"mask_decoder.upscale_conv1.\1", "copy"),
    (_MD + r"output_upscaling\.1\.(weight|bias)", r"mask_decoder.upscale_layer_norm.\1", "copy"),
    (_MD + r"output_upscaling\.3\.(weight|bias)", r"mask_decoder.upscale_conv2.\1", "copy"),
    (_MD + r"(conv_s[01])\.(weight|bias)", r"mask_decoder.\1.\2", "copy"),
    *_mlp3(_MD + r"output_hypernetworks_mlps\.(?P<i>\d+)", r"mask_decoder.output_hypernetworks_mlps.\g<i>"),
    *_mlp3(_MD + r"iou_prediction_head", "mask_decoder.iou_prediction_head"),
    *_mlp3(_MD + r"pred_obj_score_head", "mask_decoder.pred_obj_score_head"),
    *_mlp3(r"obj_ptr_proj", "object_pointer_proj"),
    (r"obj_ptr_tpos_proj\.(weight|bias)", r"temporal_positional_encoding_projection_layer.\1", "copy"),
]


def _compile(rules: list[tuple[str, str, str]]) -> list[tuple[re.Pattern, str, str]]:
    return [(re.compile(pattern), template, transform) for pattern, template, transform in rules]


_DETECTOR = _compile(_DETECTOR_RULES)
_TRACKER = _compile(_TRACKER_RULES)
_UNUSED = [re.compile(p) for p in UNUSED_META_KEYS]


def _split_qkv(key: str, tensor: Tensor) -> list[tuple[str, Tensor]]:
    if tensor.shape[0] % 3:
        raise ModelLoadError(f"fused q/k/v tensor {key} has {tensor.shape[0]} rows, not a multiple of 3")
    parts = torch.chunk(tensor, 3, dim=0)
    return [(key.replace("{QKV}", name), part) for name, part in zip("qkv", parts)]


def _drop_cls_token(key: str, tensor: Tensor) -> list[tuple[str, Tensor]]:
    # Meta: [1, 1 + g*g, C] with a class-token row first; transformers: [1, g*g, C].
    tokens = tensor.shape[1] - 1
    if tensor.dim() != 3 or int(round(tokens ** 0.5)) ** 2 != tokens:
        raise ModelLoadError(f"ViT position embedding has shape {tuple(tensor.shape)}; expected [1, 1 + n*n, C]")
    return [(key, tensor[:, 1:, :])]


_TRANSFORMS: dict[str, _Transform] = {
    "copy": lambda key, tensor: [(key, tensor)],
    "transpose": lambda key, tensor: [(key, tensor.t())],
    "split_qkv": _split_qkv,
    "drop_cls_token": _drop_cls_token,
}


def _map_keys(state: Mapping[str, Tensor], rules, prefix: str, special: Callable[[str, re.Match, Tensor], None],
              unknown: list[str], unused: list[str], source_prefix: str = "") -> StateDict:
    out: StateDict = {}
    for key, tensor in state.items():
        for pattern, template, transform in rules:
            match = pattern.fullmatch(key)
            if match is None:
                continue
            if transform in _TRANSFORMS:
                new_key = match.expand(template) if template else ""
                target = new_key[1:] if new_key.startswith("@") else prefix + new_key
                for k, t in _TRANSFORMS[transform](target, tensor):
                    out[k] = t
            else:
                special(transform, match, tensor)
            break
        else:
            if any(p.fullmatch(key) for p in _UNUSED):
                unused.append(source_prefix + key)
            else:
                unknown.append(source_prefix + key)
    return out


@dataclass
class ConvertedCheckpoint:
    """A state dict in transformers' layout and the config it belongs to."""

    state_dict: StateDict
    config: object  # Sam3Config or Sam3VideoConfig
    model_type: str  # "sam3" or "sam3_video"
    image_size: int
    dropped: list[str]


_IMAGE_MODEL_TRACKER = "inst_interactive_predictor.model."


def split_checkpoint(state: Mapping[str, Tensor], source: str = "checkpoint") -> tuple[StateDict, Optional[StateDict]]:
    """Split a Meta-layout state dict into (detector, tracker) parts, prefixes removed.

    The tracker is found under ``tracker.`` (video model) or ``inst_interactive_predictor.model.``
    (Meta's image model built with ``enable_inst_interactivity``: the same tracker weights).
    ``tracker`` is None for an image-only (2D) checkpoint. Raises :class:`ModelLoadError` if the
    keys are not SAM3's.
    """
    state = {(k[len("module."):] if k.startswith("module.") else k): v for k, v in state.items()}
    detector: StateDict = {}
    tracker: StateDict = {}
    for key, tensor in state.items():
        if key.startswith("detector."):
            detector[key[len("detector."):]] = tensor
        elif key.startswith("tracker."):
            tracker[key[len("tracker."):]] = tensor
        elif key.startswith(_IMAGE_MODEL_TRACKER):  # image model built with instance interactivity
            tracker[key[len(_IMAGE_MODEL_TRACKER):]] = tensor
        else:
            detector[key] = tensor
    if not any(k.startswith("backbone.vision_backbone.trunk.") for k in detector):
        sample = ", ".join(sorted(state)[:5]) or "no keys at all"
        raise ModelLoadError(
            f"{source}: not a SAM3 checkpoint: no SAM3 vision backbone weights "
            f"('[detector.]backbone.vision_backbone.trunk.*'); its keys start with: {sample}")
    return detector, (tracker or None)


def infer_image_size(detector: Mapping[str, Tensor], default: int = DEFAULT_IMAGE_SIZE) -> int:
    """The input resolution a checkpoint was built for, from its global-attention RoPE tables.

    Meta's ViT stores ``freqs_cis`` per block: [window*window, head_dim/2] for windowed blocks and
    [grid*grid, head_dim/2] for global ones, grid = image_size / 14. Without those buffers the
    default (1008) is assumed.
    """
    rows = [t.shape[0] for k, t in detector.items() if k.endswith(".attn.freqs_cis")]
    if not rows:
        return default
    grid = int(round(max(rows) ** 0.5))
    if grid * grid != max(rows):
        raise ModelLoadError(f"ViT rotary table has {max(rows)} rows, not a square grid; cannot infer the image size")
    return grid * PATCH_SIZE


def _count(keys: Iterable[str], pattern: str) -> int:
    compiled = re.compile(pattern)
    indices = {int(m.group(1)) for k in keys if (m := compiled.match(k)) is not None}
    return max(indices) + 1 if indices else 0


def infer_depths(detector: Mapping[str, Tensor], tracker: Optional[Mapping[str, Tensor]]) -> dict[str, object]:
    """Layer counts (and the ViT's global-attention blocks) of a Meta-layout checkpoint.

    SAM3 as published: 32 ViT blocks (global attention in 7, 15, 23, 31), 24 text layers, 3
    geometry, 6 DETR encoder, 6 DETR decoder and 4 memory-attention layers. Global blocks are those
    whose rotary table covers the whole grid (more rows than the windowed blocks' table).
    """
    depths: dict[str, object] = {
        "vit": _count(detector, r"backbone\.vision_backbone\.trunk\.blocks\.(\d+)\."),
        "text": _count(detector, r"backbone\.language_backbone\.encoder\.transformer\.resblocks\.(\d+)\."),
        "geometry": _count(detector, r"geometry_encoder\.encode\.(\d+)\."),
        "detr_encoder": _count(detector, r"transformer\.encoder\.layers\.(\d+)\."),
        "detr_decoder": _count(detector, r"transformer\.decoder\.layers\.(\d+)\."),
        "memory_attention": _count(tracker or {}, r"transformer\.encoder\.layers\.(\d+)\."),
    }
    rows = {int(k.split(".")[4]): t.shape[0] for k, t in detector.items()
            if re.fullmatch(r"backbone\.vision_backbone\.trunk\.blocks\.\d+\.attn\.freqs_cis", k)}
    if rows and len(set(rows.values())) > 1:
        depths["global_attention"] = sorted(i for i, n in rows.items() if n == max(rows.values()))
    return depths


def sam3_configs(image_size: int = DEFAULT_IMAGE_SIZE, video: bool = True, depths: Optional[Mapping] = None):
    """transformers config of SAM3 at ``image_size`` (1008 as published, 504 for Medical SAM3 3D).

    Every resolution-dependent field is derived from ``image_size``: ViT image size, FPN feature
    sizes, tracker prompt-encoder size, memory-attention RoPE grid and low-res mask size. Widths
    and head counts are SAM3's; layer counts come from ``depths`` (:func:`infer_depths`) where
    given, else SAM3's.
    """
    from transformers import Sam3Config, Sam3VideoConfig

    if image_size % PATCH_SIZE or image_size <= 0:
        raise ModelLoadError(f"image size {image_size} is not a positive multiple of the patch size {PATCH_SIZE}")
    depths = dict(depths or {})
    grid = image_size // PATCH_SIZE
    video_config = Sam3VideoConfig()
    detector = video_config.detector_config.to_dict()
    tracker = video_config.tracker_config.to_dict()
    feature_sizes = [[4 * grid] * 2, [2 * grid] * 2, [grid] * 2]
    for vision in (detector["vision_config"], tracker["vision_config"]):
        backbone = vision["backbone_config"]
        backbone["image_size"] = image_size
        vision["backbone_feature_sizes"] = feature_sizes
        if depths.get("vit"):
            backbone["num_hidden_layers"] = depths["vit"]
            backbone["global_attn_indexes"] = list(depths.get("global_attention") or [
                i for i in backbone["global_attn_indexes"] if i < depths["vit"]])
    if "image_size" in detector:
        detector["image_size"] = image_size
    for key, section, field in (("text", "text_config", "num_hidden_layers"),
                                ("geometry", "geometry_encoder_config", "num_layers"),
                                ("detr_encoder", "detr_encoder_config", "num_layers"),
                                ("detr_decoder", "detr_decoder_config", "num_layers")):
        if depths.get(key):
            detector[section][field] = depths[key]
    if depths.get("memory_attention"):
        tracker["memory_attention_num_layers"] = depths["memory_attention"]
    tracker["image_size"] = image_size
    tracker["prompt_encoder_config"]["image_size"] = image_size
    tracker["memory_attention_rope_feat_sizes"] = [grid, grid]
    if not video:
        return Sam3Config(**{k: v for k, v in detector.items() if k != "model_type"})
    return Sam3VideoConfig(detector_config=detector, tracker_config=tracker, low_res_mask_size=4 * grid)


def convert_state_dict(state: Mapping[str, Tensor], source: str = "checkpoint",
                       image_size: Optional[int] = None) -> ConvertedCheckpoint:
    """Meta-layout SAM3 state dict -> transformers state dict + config (strict, see module doc).

    ``image_size``: override the resolution inferred from the rotary buffers.
    """
    detector, tracker = split_checkpoint(state, source)
    size = image_size or infer_image_size(detector)
    video = tracker is not None
    unknown: list[str] = []
    unused: list[str] = []
    det_prefix = "detector_model." if video else ""
    if not video:  # an image model has no tracker neck: the 2D checkpoint's copy of it is unused
        detector = dict(detector)
        for key in [k for k in detector if k.startswith("backbone.vision_backbone.sam2_convs.")]:
            detector.pop(key)
            unused.append(key)

    def no_special(kind, match, tensor):  # detector rules use only the generic transforms
        raise AssertionError(kind)

    out = _map_keys(detector, _DETECTOR, det_prefix, no_special, unknown, unused,
                    "detector." if video else "")
    if video:
        point_embeddings: dict[int, Tensor] = {}

        def tracker_special(kind: str, match: re.Match, tensor: Tensor) -> None:
            if kind == "mask_downsampler":
                index, what = int(match.group(1)), match.group(2)
                base = "tracker_model.memory_encoder.mask_downsampler."
                if index == 12:
                    out[f"{base}final_conv.{what}"] = tensor
                elif index % 3 == 0:
                    out[f"{base}layers.{index // 3}.conv.{what}"] = tensor
                elif index % 3 == 1:
                    out[f"{base}layers.{index // 3}.layer_norm.{what}"] = tensor
                else:
                    unknown.append(f"tracker.{match.group(0)}")
            elif kind == "shared_positional_embedding":
                # Two separate parameters in transformers: one tensor under both keys would make them
                # share storage, and save_pretrained refuses that (no video model could be written).
                out["tracker_model.prompt_encoder.shared_embedding.positional_embedding"] = tensor
                out["tracker_model.shared_image_embedding.positional_embedding"] = tensor.clone()
            elif kind == "point_embedding":
                point_embeddings[int(match.group(1))] = tensor

        out.update(_map_keys(tracker, _TRACKER, "tracker_model.", tracker_special, unknown, unused, "tracker."))
        if point_embeddings:
            order = sorted(point_embeddings)
            if order != list(range(len(order))):
                raise ModelLoadError(f"{source}: tracker point embeddings {order} are not numbered 0..n-1")
            out["tracker_model.prompt_encoder.point_embed.weight"] = torch.cat(
                [point_embeddings[i] for i in order], dim=0)
    if unknown:
        raise ModelLoadError(f"{source}: {len(unknown)} key(s) that are not part of SAM3 (another model, or a "
                             f"newer SAM3?): {_listing(unknown)}")
    config = sam3_configs(size, video=video, depths=infer_depths(detector, tracker))
    converted = ConvertedCheckpoint(state_dict=out, config=config, model_type="sam3_video" if video else "sam3",
                                    image_size=size, dropped=sorted(unused))
    check_complete(converted, source)
    return converted


def _listing(keys: Iterable[str], limit: int = 20) -> str:
    keys = sorted(keys)
    more = f" ... and {len(keys) - limit} more" if len(keys) > limit else ""
    return ", ".join(keys[:limit]) + more


def _empty_model(converted: ConvertedCheckpoint) -> torch.nn.Module:
    from transformers import Sam3Model, Sam3VideoModel

    cls = Sam3VideoModel if converted.model_type == "sam3_video" else Sam3Model
    with torch.device("meta"):
        return cls(converted.config)


def check_complete(converted: ConvertedCheckpoint, source: str = "checkpoint") -> None:
    """Every persistent parameter/buffer of the target model filled, nothing extra, shapes equal."""
    expected = {k: tuple(v.shape) for k, v in _empty_model(converted).state_dict().items()}
    got = converted.state_dict
    missing = sorted(set(expected) - set(got))
    extra = sorted(set(got) - set(expected))
    wrong = [f"{k} {tuple(got[k].shape)} != {expected[k]}" for k in sorted(set(got) & set(expected))
             if tuple(got[k].shape) != expected[k]]
    problems = []
    if missing:
        problems.append(f"{len(missing)} weight(s) of the {converted.model_type} model missing from it: "
                        f"{_listing(missing)}")
    if extra:
        problems.append(f"{len(extra)} converted key(s) the model has no place for: {_listing(extra)}")
    if wrong:
        problems.append(f"{len(wrong)} shape mismatch(es) (is it a different SAM3 size?): {_listing(wrong)}")
    if problems:
        raise ModelLoadError(f"{source}: cannot convert to transformers' SAM3: " + "; ".join(problems))


def save_converted(converted: ConvertedCheckpoint, folder: Union[str, Path]) -> None:
    """Write ``config.json`` + safetensors of the converted weights (strict load into the model first)."""
    model = _empty_model(converted)
    model.load_state_dict(converted.state_dict, strict=True, assign=True)
    model.config.architectures = [type(model).__name__]
    model.save_pretrained(folder)


def instantiate(converted: ConvertedCheckpoint) -> torch.nn.Module:
    """The transformers model holding the converted weights, loaded as any saved model is.

    Goes through :func:`save_converted` and ``from_pretrained`` (in a temporary folder) so that the
    buffers transformers computes itself (rotary tables, position ids) are built from the config.
    """
    from transformers import Sam3Model, Sam3VideoModel

    from .models import from_pretrained

    cls = Sam3VideoModel if converted.model_type == "sam3_video" else Sam3Model
    with tempfile.TemporaryDirectory() as folder:
        save_converted(converted, folder)
        return from_pretrained(cls, folder, dtype=torch.float32).eval()


# --------------------------------------------------------------------------------------------
# Reading checkpoints safely
# --------------------------------------------------------------------------------------------


def load_checkpoint(path: Union[str, Path]) -> dict:
    """``torch.load(path, weights_only=True)`` with errors that say what is wrong with the file."""
    path = Path(path)
    if not path.is_file():
        raise ModelLoadError(f"{path}: no such checkpoint file")
    if path.stat().st_size == 0:
        raise ModelLoadError(f"{path}: the file is empty")
    try:
        return torch.load(path, map_location="cpu", weights_only=True, mmap=zipfile.is_zipfile(path))
    except pickle.UnpicklingError as error:
        if "Unsupported global" in str(error) or "GLOBAL" in str(error):
            raise ModelLoadError(
                f"{path}: refused: this file needs arbitrary Python code to load (pickled objects, not just "
                "tensors), and loading it could run anything. Only weights-only checkpoints are read; if you "
                "trust it, re-save its state dict with torch.save(model.state_dict(), ...) in the environment "
                "that made it") from None
        raise ModelLoadError(f"{path}: not a PyTorch checkpoint (its bytes are not a torch.save file of "
                             "tensors)") from None
    except Exception as error:  # the unpickler fails on junk in many ways (IndexError, KeyError, ...)
        text = str(error)
        if any(s in text for s in ("central directory", "PytorchStreamReader", "unexpected EOF", "Ran out of input",
                                   "failed finding", "truncated", "invalid header")):
            raise ModelLoadError(f"{path}: truncated or corrupt checkpoint (download it again): "
                                 f"{_first_line(error)}") from None
        raise ModelLoadError(f"{path}: not a PyTorch checkpoint: {_first_line(error)}") from None


def _first_line(error: BaseException) -> str:
    return (str(error).strip().splitlines() or [type(error).__name__])[0][:300]


def extract_state_dict(obj: object, source: str = "checkpoint") -> StateDict:
    """The tensors of a loaded checkpoint: the object itself, or its "model" / "state_dict" entry."""
    if isinstance(obj, Mapping):
        for wrapper in ("model", "state_dict"):
            inner = obj.get(wrapper)
            if isinstance(inner, Mapping) and inner and all(isinstance(v, Tensor) for v in inner.values()):
                return _named(inner, source)
        tensors = {k: v for k, v in obj.items() if isinstance(v, Tensor)}
        if tensors and len(tensors) == len(obj):
            return _named(tensors, source)
        if tensors:
            others = [k for k, v in obj.items() if not isinstance(v, Tensor)]
            raise ModelLoadError(f"{source}: mixes tensors with other entries ({_listing(map(str, others), 8)}); "
                                 "expected a state dict or a {'model': state_dict} wrapper")
    raise ModelLoadError(f"{source}: holds no state dict (a {type(obj).__name__}); expected a mapping of "
                         "parameter names to tensors, possibly under 'model' or 'state_dict'")


def _named(state: Mapping, source: str) -> dict:
    """``state`` as a dict, refused unless every key is a parameter name (a string)."""
    others = [key for key in state if not isinstance(key, str)]
    if others:
        raise ModelLoadError(f"{source}: {len(others)} key(s) are not parameter names, e.g. {others[0]!r} "
                             f"(a {type(others[0]).__name__}); a state dict maps names (strings) to tensors")
    return dict(state)


# --------------------------------------------------------------------------------------------
# LoRA adapters
# --------------------------------------------------------------------------------------------

_LORA_A = re.compile(r"(?P<module>.+?)\.(?:lora\.)?(?:lora_A|lora_down)(?:\.default)?(?:\.weight)?")
_LORA_B = re.compile(r"(?P<module>.+?)\.(?:lora\.)?(?:lora_B|lora_up)(?:\.default)?(?:\.weight)?")
_WRAPPER_PARTS = re.compile(r"\.(base_layer|original_linear_layer|linear|orig)$")


def lora_pairs(adapter: Mapping[str, object], source: str = "adapter") -> dict[str, tuple[Tensor, Tensor]]:
    """``module name -> (A [r, in], B [out, r])`` from a LoRA adapter state dict.

    Accepts flat keys ``M.lora_A`` / ``M.lora_A.weight`` / ``M.lora.lora_A`` / PEFT's
    ``base_model.model.M.lora_A.default.weight`` (and ``lora_down`` / ``lora_up``), and nested
    ``{M: {"lora_A": A, "lora_B": B}}``.
    """
    flat: dict[str, Tensor] = {}
    for key, value in _named(adapter, source).items():
        if isinstance(value, Mapping):
            for sub, tensor in value.items():
                flat[f"{key}.{sub}"] = tensor
        else:
            flat[key] = value
    a_parts, b_parts, other = {}, {}, []
    for key, value in flat.items():
        if not isinstance(value, Tensor):
            other.append(key)
            continue
        clean = key.removeprefix("base_model.model.")
        if (m := _LORA_A.fullmatch(clean)) is not None:
            a_parts[m.group("module")] = value
        elif (m := _LORA_B.fullmatch(clean)) is not None:
            b_parts[m.group("module")] = value
        else:
            other.append(key)
    if other:
        raise ModelLoadError(f"{source}: entries that are not LoRA A/B matrices: {_listing(other, 10)}")
    unpaired = sorted(set(a_parts) ^ set(b_parts))
    if unpaired:
        raise ModelLoadError(f"{source}: LoRA modules with only one of A/B: {_listing(unpaired, 10)}")
    if not a_parts:
        raise ModelLoadError(f"{source}: no LoRA weights (keys ending in lora_A / lora_B)")
    return {_WRAPPER_PARTS.sub("", m): (a_parts[m], b_parts[m]) for m in a_parts}


def is_lora_adapter(state: Mapping[str, object]) -> bool:
    """True when every tensor key looks like a LoRA A/B matrix."""
    keys = list(state)
    return bool(keys) and all("lora_" in str(k) or isinstance(state[k], Mapping) for k in keys)


def merge_lora(base: Mapping[str, Tensor], adapter: Mapping[str, object], alpha: float = 32.0,
               rank: Optional[int] = None, source: str = "adapter") -> StateDict:
    """``W + alpha / r * B @ A`` for every adapted linear layer of ``base`` (Meta key names).

    A module name ``M`` of the adapter targets ``base[M.weight]``, also found as ``detector.M``
    (adapters trained on the image model) or ``M.in_proj_weight`` (a whole
    ``nn.MultiheadAttention``). ``A`` may be stored [r, in] or transposed [in, r] (and ``B``
    [out, r] or [r, out]); ``r`` is read from the tensors unless ``rank`` is given. Computed in
    float32, stored in the base tensor's dtype. Every adapter module must find its layer.
    """
    merged = dict(base)
    unmatched = []
    for module, (a, b) in lora_pairs(adapter, source).items():
        target = next((k for k in (f"{module}.weight", f"detector.{module}.weight", f"{module}.in_proj_weight",
                                   f"detector.{module}.in_proj_weight") if k in merged), None)
        if target is None:
            unmatched.append(module)
            continue
        weight = merged[target]
        out_features, in_features = weight.shape[0], weight.shape[1]
        a32, b32 = a.float(), b.float()
        if a32.shape[1] != in_features and a32.shape[0] == in_features:
            a32 = a32.t()
        if b32.shape[0] != out_features and b32.shape[1] == out_features:
            b32 = b32.t()
        r = rank or a32.shape[0]
        if a32.shape[1] != in_features or b32.shape[0] != out_features or b32.shape[1] != a32.shape[0]:
            raise ModelLoadError(f"{source}: LoRA for {module}: A {tuple(a.shape)} and B {tuple(b.shape)} do not fit "
                                 f"the layer's weight {tuple(weight.shape)}")
        merged[target] = (weight.float() + (alpha / r) * (b32 @ a32)).to(weight.dtype)
    if unmatched:
        raise ModelLoadError(f"{source}: {len(unmatched)} LoRA module(s) match no layer of the base checkpoint "
                             f"(adapter for another model?): {_listing(unmatched, 10)}")
    return merged


# --------------------------------------------------------------------------------------------
# Tokenizer (CLIP BPE) without a download
# --------------------------------------------------------------------------------------------

BPE_FILE = "bpe_simple_vocab_16e6.txt.gz"


def find_clip_bpe(path: Optional[Union[str, Path]] = None) -> Path:
    """CLIP's BPE merges file: ``path``, ``$MEDSAM3_CLIP_BPE``, or the copy inside an installed
    ``open_clip`` (PyPI ``open_clip_torch``) or ``sam3`` package."""
    candidates = [path, os.environ.get("MEDSAM3_CLIP_BPE")]
    for package, sub in (("open_clip", BPE_FILE), ("sam3", f"../assets/{BPE_FILE}")):
        try:
            import importlib.util

            spec = importlib.util.find_spec(package)
        except (ImportError, ValueError):
            spec = None
        if spec is not None and spec.origin:
            candidates.append(Path(spec.origin).parent / sub)
    for candidate in candidates:
        if candidate and Path(candidate).is_file():
            return Path(candidate).resolve()
    if path:
        raise ModelLoadError(f"{path}: no such CLIP BPE file")
    raise ModelLoadError(
        f"the CLIP tokenizer vocabulary ({BPE_FILE}) was not found: install it with "
        "`pip install open_clip_torch` (or `pip install -e \".[convert]\"`), or pass --bpe PATH / set "
        "MEDSAM3_CLIP_BPE to the file")


def _bytes_to_unicode() -> dict[int, str]:
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + \
        list(range(ord("®"), ord("ÿ") + 1))
    codes = printable[:]
    extra = 0
    for byte in range(256):
        if byte not in printable:
            printable.append(byte)
            codes.append(256 + extra)
            extra += 1
    return {byte: chr(code) for byte, code in zip(printable, codes)}


def build_clip_tokenizer(bpe_path: Union[str, Path], max_merges: int = 49152 - 256 - 2):
    """CLIP's tokenizer (vocab 49408, context 32 as SAM3 uses it) from the BPE merges file.

    Vocabulary order as OpenAI CLIP builds it: 256 byte symbols, the same with ``</w>``, one
    token per merge, then ``<|startoftext|>`` and ``<|endoftext|>``.
    """
    from transformers import CLIPTokenizer

    try:
        lines = gzip.open(bpe_path, "rt", encoding="utf-8").read().split("\n")
    except (OSError, EOFError, UnicodeDecodeError) as error:
        raise ModelLoadError(f"{bpe_path}: unreadable CLIP BPE file: {error}") from None
    merges = [tuple(line.split()) for line in lines[1:max_merges + 1] if line.strip()]
    if not merges or any(len(m) != 2 for m in merges):
        raise ModelLoadError(f"{bpe_path}: not a CLIP BPE merges file")
    symbols = list(_bytes_to_unicode().values())
    tokens = symbols + [s + "</w>" for s in symbols] + ["".join(m) for m in merges] + \
        ["<|startoftext|>", "<|endoftext|>"]
    vocab = {token: index for index, token in enumerate(tokens)}
    with tempfile.TemporaryDirectory() as tmp:
        vocab_file, merges_file = Path(tmp) / "vocab.json", Path(tmp) / "merges.txt"
        vocab_file.write_text(json.dumps(vocab, ensure_ascii=False))
        merges_file.write_text("#version: 0.2\n" + "\n".join(" ".join(m) for m in merges) + "\n", encoding="utf-8")
        return CLIPTokenizer(str(vocab_file), str(merges_file), model_max_length=TEXT_CONTEXT_LENGTH,
                             pad_token="<|endoftext|>")


# --------------------------------------------------------------------------------------------
# Whole conversions and the cache
# --------------------------------------------------------------------------------------------


def read_meta_state_dict(path: Union[str, Path]) -> StateDict:
    """The tensors of a ``.pt`` checkpoint file (weights-only), unwrapped."""
    return extract_state_dict(load_checkpoint(path), str(path))


def resolve_base_checkpoint(base: str) -> Path:
    """A base ``.pt`` for a LoRA adapter: a local file, or ``org/name`` (its ``sam3.pt``) on the hub."""
    path = Path(base).expanduser()
    if path.is_file():
        return path
    if "/" not in base or base.startswith((".", "/", "~")):
        raise ModelLoadError(f"{base}: no such base checkpoint file (and not a hub id such as facebook/sam3)")
    from huggingface_hub import hf_hub_download
    from huggingface_hub.errors import GatedRepoError, LocalEntryNotFoundError, RepositoryNotFoundError

    try:
        return Path(hf_hub_download(base, "sam3.pt"))
    except GatedRepoError:
        raise ModelLoadError(f"{base} is gated: request access on its Hugging Face page, then log in with "
                             "`hf auth login` or set HF_TOKEN") from None
    except RepositoryNotFoundError:
        raise ModelLoadError(f"{base}: no such model on the Hugging Face hub (or it is private: set HF_TOKEN)") from None
    except LocalEntryNotFoundError:
        raise ModelLoadError(f"{base}/sam3.pt is not in the local Hugging Face cache and the hub cannot be reached "
                             "(or HF_HUB_OFFLINE is set); download it once or give the file") from None
    except Exception as error:
        raise ModelLoadError(f"{base}: download of sam3.pt failed: {error}") from None


def convert_checkpoint(checkpoint: Union[str, Path], out_dir: Union[str, Path], lora: Optional[Union[str, Path]] = None,
                       base: Optional[str] = None, lora_alpha: float = 32.0, image_size: Optional[int] = None,
                       bpe: Optional[Union[str, Path]] = None) -> Path:
    """Convert ``checkpoint`` (Meta layout) to a transformers folder ``out_dir``.

    ``lora``: an adapter merged into ``checkpoint`` first. If ``checkpoint`` itself is an
    adapter, ``base`` (a ``.pt`` or a hub id, default ``facebook/sam3``) gives the weights it is
    merged into. ``out_dir`` is checked before the work (:func:`_check_destination`); the folder
    is written next to it and renamed into place at the end, so a failed conversion leaves
    nothing behind.
    """
    checkpoint, out_dir = Path(checkpoint), Path(out_dir)
    _check_destination(out_dir, checkpoint)
    state = read_meta_state_dict(checkpoint)
    adapter_path: Optional[Path] = Path(lora) if lora else None
    if is_lora_adapter(state):
        if adapter_path is not None:
            raise ModelLoadError(f"{checkpoint} is itself a LoRA adapter; give the base checkpoint as input "
                                 "(or with --base), not a second adapter")
        adapter_path, adapter = checkpoint, state
        checkpoint = resolve_base_checkpoint(base or "facebook/sam3")
        _check_destination(out_dir, checkpoint)  # the base, not the small adapter, sets the size
        state = read_meta_state_dict(checkpoint)
    elif adapter_path is not None:
        adapter = load_checkpoint(adapter_path)
        if not isinstance(adapter, Mapping):
            raise ModelLoadError(f"{adapter_path}: not a LoRA adapter (a {type(adapter).__name__})")
    if adapter_path is not None:
        state = merge_lora(state, adapter, alpha=lora_alpha, source=str(adapter_path))
    converted = convert_state_dict(state, str(checkpoint), image_size=image_size)
    del state
    tokenizer = build_clip_tokenizer(find_clip_bpe(bpe))  # before writing anything
    record = {"source": str(checkpoint), "lora": str(adapter_path) if adapter_path else None,
              "lora_alpha": lora_alpha if adapter_path else None, "model_type": converted.model_type,
              "image_size": converted.image_size, "dropped_keys": converted.dropped}
    _write_model_folder(out_dir, converted, tokenizer, record)
    return out_dir


#: Room for what a converted folder holds besides the weights (tokenizer, configs), generously.
_FOLDER_EXTRA_BYTES = 64 * 1024 * 1024


def _check_destination(out_dir: Path, checkpoint: Path) -> None:
    """Refuse, before the work, an ``out_dir`` that is a file or a non-empty folder, or whose disk
    cannot take the converted copy of ``checkpoint`` (about its size: the weights keep their dtype;
    :func:`~MedicalSAM3Core.imaging.outputs.check_output_folder` also probes that it is writable)."""
    from ..imaging.outputs import check_output_folder

    if out_dir.is_dir() and any(out_dir.iterdir()):
        raise OutputError(f"{out_dir}: exists and is not empty; choose a new folder")
    weights = checkpoint.stat().st_size if checkpoint.is_file() else 0  # a missing file is load_checkpoint's error
    check_output_folder(out_dir, weights + _FOLDER_EXTRA_BYTES)


def _write_model_folder(out_dir: Path, converted: ConvertedCheckpoint, tokenizer, record: dict) -> None:
    """Write the converted model (weights, tokenizer, preprocessing, the conversion ``record``) into a
    staging folder beside ``out_dir``, then rename it into place. A failure to write (a full disk)
    removes the staging folder and raises :class:`OutputError`."""
    staging: Optional[Path] = None
    try:
        out_dir.parent.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.", dir=out_dir.parent))
        save_converted(converted, staging)
        tokenizer.save_pretrained(staging)
        _write_processor_config(staging, converted.image_size)
        (staging / CONVERTED_MARKER).write_text(json.dumps(record, indent=2) + "\n")
        if out_dir.exists():
            out_dir.rmdir()
        staging.rename(out_dir)
    except BaseException as error:
        if staging is not None:
            shutil.rmtree(staging, ignore_errors=True)
        if isinstance(error, (OSError, SafetensorError)):
            reason = getattr(error, "strerror", None) or str(error)  # "No space left on device"
            raise OutputError(f"cannot write the converted model to {out_dir}: {reason}; "
                              "nothing was written") from None
        raise


def _write_processor_config(folder: Path, image_size: int) -> None:
    """SAM3's image preprocessing: resize to the model's square size, scale to [-1, 1]."""
    config = {"image_processor_type": "Sam3ImageProcessorFast", "processor_class": "Sam3Processor",
              "size": {"height": image_size, "width": image_size}, "do_resize": True, "do_rescale": True,
              "rescale_factor": 1 / 255, "do_normalize": True, "image_mean": [0.5, 0.5, 0.5],
              "image_std": [0.5, 0.5, 0.5]}
    (folder / "preprocessor_config.json").write_text(json.dumps(config, indent=2) + "\n")


def file_sha256(path: Union[str, Path], chunk: int = 1 << 22) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while block := handle.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def cache_root() -> Path:
    """``$MEDSAM3_CACHE`` or ``~/.cache/medsam3``; conversions go to ``converted/<sha256>/``."""
    return Path(os.environ.get("MEDSAM3_CACHE") or Path.home() / ".cache" / "medsam3").expanduser()


def converted_model_dir(checkpoint: Union[str, Path], bpe: Optional[Union[str, Path]] = None) -> Path:
    """The transformers folder for a ``.pt`` checkpoint, converting it on first use.

    Keyed by the file's sha256, so a renamed or moved file is not converted twice and a changed
    file is never served from a stale conversion.
    """
    checkpoint = Path(checkpoint)
    target = cache_root() / "converted" / file_sha256(checkpoint)
    if (target / "config.json").is_file() and (target / CONVERTED_MARKER).is_file():
        return target
    if target.exists():
        shutil.rmtree(target)
    log.warning("converting %s to transformers format in %s (first use only)", checkpoint, target)
    return convert_checkpoint(checkpoint, target, bpe=bpe)
