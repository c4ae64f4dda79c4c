"""A tiny, random-weight SAM3 detector-tracker for tests and offline smoke runs.

Same architecture and code path as the real model (transformers' ``Sam3VideoModel``), about
6M parameters at 56 px, built from configs with no download. Its tokenizer is a byte-level CLIP
BPE tokenizer with no merges, built offline. Its segmentations are meaningless: it exists to
exercise the pipeline, never to judge accuracy.
"""

from __future__ import annotations

from pathlib import Path

import torch


def _byte_level_vocab() -> dict[str, int]:
    # GPT-2/CLIP byte-to-unicode table: every byte is a printable character.
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + \
        list(range(ord("®"), ord("ÿ") + 1))
    chars, extra = printable[:], 0
    for byte in range(256):
        if byte not in printable:
            printable.append(byte)
            chars.append(256 + extra)
            extra += 1
    symbols = [chr(c) for c in chars]
    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    for symbol in symbols + [s + "</w>" for s in symbols]:
        vocab.setdefault(symbol, len(vocab))
    return vocab


def build_offline_tokenizer():
    """A CLIP tokenizer over single bytes (no merges): valid for any text, no download."""
    from transformers import CLIPTokenizer

    return CLIPTokenizer(vocab=_byte_level_vocab(), merges=[])


def small_video_config(image_size: int = 56, patch_size: int = 14, vit_hidden: int = 64, vit_layers: int = 2,
                       vit_heads: int = 2, vit_mlp: int = 128, window: int = 2,
                       global_attention: list[int] | None = None, hidden: int = 128, heads: int = 2,
                       ffn: int = 128, detr_encoder_layers: int = 1, detr_decoder_layers: int = 2,
                       queries: int = 8, text_hidden: int = 64, text_layers: int = 1):
    """Config of a scaled-down ``Sam3VideoModel`` (detector + tracker), same architecture as SAM3.

    ``hidden`` is the FPN / DETR / tracker width; transformers' tracker needs it larger than its
    fixed 64 memory channels (object pointers break when they are equal), so at least 128.
    ``global_attention`` defaults to four evenly spaced global-attention ViT layers, as in SAM3.
    """
    from transformers import Sam3Config, Sam3VideoConfig, Sam3VisionConfig, Sam3ViTConfig

    grid = image_size // patch_size
    if global_attention is None:
        global_attention = sorted({max(0, (i + 1) * vit_layers // 4 - 1) for i in range(4)})
    backbone = Sam3ViTConfig(hidden_size=vit_hidden, num_hidden_layers=vit_layers, num_attention_heads=vit_heads,
                             intermediate_size=vit_mlp, image_size=image_size, patch_size=patch_size,
                             window_size=window, global_attn_indexes=global_attention,
                             pretrain_image_size=image_size)
    vision = Sam3VisionConfig(backbone_config=backbone, fpn_hidden_size=hidden, scale_factors=[4.0, 2.0, 1.0, 0.5],
                              backbone_feature_sizes=[[4 * grid] * 2, [2 * grid] * 2, [grid] * 2])
    small = dict(hidden_size=hidden, num_attention_heads=heads, intermediate_size=ffn)
    detector = Sam3Config(
        vision_config=vision,
        text_config=dict(vocab_size=len(_byte_level_vocab()), hidden_size=text_hidden,
                         intermediate_size=4 * text_hidden, projection_dim=text_hidden,
                         num_hidden_layers=text_layers, num_attention_heads=2, max_position_embeddings=32,
                         hidden_act="gelu", bos_token_id=0, eos_token_id=1, pad_token_id=1),
        geometry_encoder_config=dict(num_layers=1, **small),
        detr_encoder_config=dict(num_layers=detr_encoder_layers, **small),
        detr_decoder_config=dict(num_layers=detr_decoder_layers, num_queries=queries, **small),
        mask_decoder_config=dict(hidden_size=hidden, num_upsampling_stages=3, num_attention_heads=heads),
    )
    tracker = small_tracker_config(vision.to_dict(), image_size, hidden=hidden, heads=heads, ffn=ffn)
    return Sam3VideoConfig(detector_config=detector.to_dict(), tracker_config=tracker.to_dict(),
                           low_res_mask_size=4 * grid)


def small_tracker_config(vision_config: dict, image_size: int, hidden: int = 128, heads: int = 2, ffn: int = 128,
                         memory_layers: int = 1, multimask: bool = True):
    """Config of a scaled-down SAM3 tracker (``Sam3TrackerVideoConfig``) reading the vision backbone
    ``vision_config`` (a ``Sam3VisionConfig`` as a dict) at ``image_size`` px: prompt encoder, SAM2
    mask decoder, ``memory_layers`` memory-attention layers and memory encoder, all ``hidden`` wide
    (at least 128: transformers' object pointers break when the width equals its 64 memory channels).
    SAM3 itself: hidden 256, 8 heads, ffn 2048, 4 memory-attention layers.

    ``multimask=False``: the mask decoder always answers with its single-mask output, where SAM answers a
    lone click (and tracks) with three candidates and picks one by its predicted IoU; a tracker trained
    from random weights on little data learns the masks long before its IoU head can rank them (on CPU
    runs of the demo model the head predicted about 0 for every candidate, so the pick was arbitrary)."""
    from transformers import Sam3TrackerVideoConfig

    return Sam3TrackerVideoConfig(
        vision_config=vision_config, prompt_encoder_config=dict(hidden_size=hidden, image_size=image_size),
        mask_decoder_config=dict(hidden_size=hidden, mlp_dim=ffn, num_attention_heads=heads,
                                 iou_head_hidden_dim=hidden, dynamic_multimask_via_stability=multimask),
        multimask_output_in_sam=multimask,
        memory_attention_hidden_size=hidden, memory_attention_num_layers=memory_layers,
        memory_attention_feed_forward_hidden_size=ffn, memory_encoder_hidden_size=hidden,
        memory_encoder_output_channels=64, mask_downsampler_embed_dim=hidden, memory_fuser_embed_dim=hidden,
        memory_fuser_intermediate_dim=ffn, image_size=image_size)


def add_tracker(detector, heads: int = 4, ffn: int = 512, memory_layers: int = 2, multimask: bool = True):
    """A ``Sam3VideoModel`` holding ``detector`` (a ``Sam3Model``; its weights copied exactly) and a new
    tracker sized by :func:`small_tracker_config` to the detector's FPN width, vision backbone and input
    size: the start of a tracker trained on top of a detector-only model. The tracker's FPN neck starts
    as a copy of the detector's trained neck (Meta's SAM3 builds it so, ``sam2_convs = deepcopy(convs)``;
    the tracker's mask decoder then reads features that already outline organs); the rest has random
    weights, the prompt encoder's positional encoding tied to the image's (:func:`tie_prompt_positions`)."""
    from transformers import Sam3VideoConfig, Sam3VideoModel

    config = detector.config
    grid = config.image_size // config.vision_config.backbone_config.patch_size
    hidden = int(config.vision_config.fpn_hidden_size)
    tracker = small_tracker_config(config.vision_config.to_dict(), int(config.image_size), hidden=hidden, heads=heads,
                                   ffn=ffn, memory_layers=memory_layers, multimask=multimask)
    video = Sam3VideoModel(Sam3VideoConfig(detector_config=config.to_dict(), tracker_config=tracker.to_dict(),
                                           low_res_mask_size=4 * grid))
    video.detector_model.load_state_dict(detector.state_dict(), strict=True)
    video.tracker_neck.load_state_dict(detector.vision_encoder.neck.state_dict(), strict=True)
    tie_prompt_positions(video.tracker_model)
    return video


def tie_prompt_positions(tracker) -> None:
    """Give the tracker's prompt encoder the image's positional encoding (in place).

    SAM's points and boxes are placed on the image by comparing their random Fourier encoding with the
    image's: one Gaussian matrix for both (Meta's SAM2/SAM3 share it; ``convert.py`` writes the one
    checkpoint tensor into both transformers buffers). transformers' random initialisation draws
    ``prompt_encoder.shared_embedding`` and ``shared_image_embedding`` independently, and both are
    buffers, which training never changes: a tracker trained from that start can hardly tell where a
    click or a box is."""
    import torch

    with torch.no_grad():
        tracker.prompt_encoder.shared_embedding.positional_embedding.copy_(
            tracker.shared_image_embedding.positional_embedding)


def tiny_video_config(image_size: int = 56):
    """The ~6M-parameter test model: ViT 64-d x 2 at 56 px, FPN/DETR/tracker 128-d."""
    return small_video_config(image_size=image_size, global_attention=[1])


def build_tiny_model(out_dir: str | Path, seed: int = 0, image_size: int = 56) -> Path:
    """Write a random-weight tiny ``Sam3VideoModel`` + offline tokenizer to ``out_dir``."""
    from transformers import Sam3VideoModel

    out_dir = Path(out_dir)
    torch.manual_seed(seed)
    model = Sam3VideoModel(tiny_video_config(image_size=image_size)).eval()
    model.save_pretrained(out_dir)
    build_offline_tokenizer().save_pretrained(out_dir)
    (out_dir / "README.md").write_text(
        "# Tiny random-weight SAM3 (test model)\n\nBuilt by `MedicalSAM3Core.inference.tiny.build_tiny_model` "
        f"(seed {seed}). Random weights: its masks are meaningless. For tests and smoke runs only.\n")
    return out_dir
