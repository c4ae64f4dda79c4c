"""Numerical parity of SAM3's tracker (memory bank): Meta's reference vs. our conversion into transformers.

What it does. Builds Meta's SAM3 video model (PyPI ``sam3``, ``build_sam3_video_model``: detector +
``Sam3TrackerPredictor``) with random weights (every parameter perturbed by N(0, noise²), so that
zero- or one-initialised tensors also prove their mapping), converts the whole state dict (detector
and ``tracker.`` keys) with :func:`MedicalSAM3Core.inference.convert.convert_state_dict`, loads it
into transformers' ``Sam3VideoModel`` with :func:`~MedicalSAM3Core.inference.convert.instantiate`, and
tracks one object through the same smooth random video (frames already normalised to [-1, 1]) in
both implementations: a MASK prompt (a random blob, binary, at Meta's tracker input-mask size
1152², as Meta's video model hands masks to its tracker) on the middle frame, then propagation
forward to the last frame and backward from the middle frame to the first.

The vision backbone is computed once per frame by Meta's ViT (it is proven identical to ours by
``parity_sam3.py``); that same ViT output goes through Meta's tracker neck (``sam2_convs``, plus the
SAM decoder's ``conv_s0``/``conv_s1`` as Meta's video model applies them) and through ours
(``Sam3VideoModel.get_vision_features_for_tracker``); the neck outputs are compared, and each tracker
then runs on its own neck's features.

Compared per frame: low-res (288²) and full-res (1008²) mask logits, object score logits, object
pointers, the memory written to the bank (``maskmem_features``, stored in bfloat16 by both, and
``maskmem_pos_enc``), the inputs and output of memory attention, and WHICH frames the memory bank
conditions on (spatial memories and object pointers, identified by exact equality of the attended
tokens with the stored memories). Runs:

* ``meta_no_selection``: Meta's tracker with ``use_memory_selection=False``, the protocol that
  transformers implements (Meta's video model builds its tracker with memory selection ON).
* ``meta_as_built``: Meta's tracker as ``build_sam3_video_model`` makes it (SAM2Long-style memory
  selection: only past frames whose object score x IoU exceeds 0.01 enter the memory bank).
* ours free-running (each implementation follows its own protocol from the mask prompt on), and ours
  *teacher-forced*: before each frame the memory bank of our session is overwritten with Meta's
  (no selection) stored memories and pointers, so each frame's step is compared on identical inputs.
* isolated stages on Meta's exact inputs of every frame: memory attention, memory encoder (on
  Meta's mask after its resize to 1152²) and the whole memory encoding from the high-res mask logits;
  the mask-prompted frame's object pointer under Meta's and transformers' protocols (and the two
  mixed ones, to split the difference between its causes); and, on one frame, an absent object
  (empty mask prompt, negative object score), which exercises ``no_obj_ptr`` and
  ``no_obj_embed_spatial``.

JSON keys: ``tracker_neck``, ``isolated_stages_on_meta_inputs``, and per comparison
(``teacher_forced_vs_meta_no_selection``, ``free_running_vs_meta_no_selection``,
``free_running_vs_meta_as_built``, ``meta_no_selection_vs_meta_as_built``) a ``summary`` (maxima over
the tracked frames, ``*_meta_max`` = max |Meta|, ``*_prompted_frame`` = the mask-prompted frame) and
per-frame rows (frame lists attended by each side included). Every figure is max |Meta - ours|.

Needs Meta's ``sam3`` package (0.1.4) and its small dependencies on ``PYTHONPATH``. As published it
runs on CUDA; ``RESULTS.md`` next to this file lists the local patches for CPU and the figures.

    PYTHONPATH=/path/to/sam3pkg python Testing/parity/parity_tracker.py --device cpu --fewer-layers \\
        --output Testing/parity/results_tracker_cpu_fewer_layers.json
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import torch
import torch.nn.functional as F

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(Path(__file__).resolve().parent))


def _max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.detach().float().cpu(), b.detach().float().cpu()
    if a.numel() != b.numel():
        raise SystemExit(f"size mismatch {tuple(a.shape)} vs {tuple(b.shape)}")
    return float((a.reshape(-1) - b.reshape(-1)).abs().max())


def _scale(a: torch.Tensor) -> float:
    return float(a.detach().float().abs().max())


def _fewer_layers_video(memory_attention_layers: int) -> None:
    """parity_sam3's fewer-layers build (2 ViT blocks, 1 text/geometry/DETR layer) plus
    ``memory_attention_layers`` memory-attention layers in the tracker (SAM3: 4)."""
    import sam3.model_builder as builder

    from parity_sam3 import _fewer_layers

    _fewer_layers()
    cls = builder.TransformerEncoderCrossAttention

    def build(*args, **kwargs):
        return cls(*args, **{**kwargs, "num_layers": memory_attention_layers})

    builder.TransformerEncoderCrossAttention = build


def _video(n: int, size: int, seed: int) -> torch.Tensor:
    """A smooth random video [n, 3, size, size] in [-1, 1]: a low-frequency field panned 16 px/frame."""
    g = torch.Generator().manual_seed(seed)
    field = torch.rand(1, 3, 24, 24 + n, generator=g) * 2 - 1
    wide = F.interpolate(field, size=(size, size + 16 * n), mode="bicubic", align_corners=False).clamp(-1, 1)
    return torch.cat([wide[..., 16 * t:16 * t + size] for t in range(n)])


def _blob(size: int, seed: int) -> torch.Tensor:
    """A random blob (bool [size, size]): an ellipse with a low-frequency wobble on its border."""
    g = torch.Generator().manual_seed(seed)
    cx, cy, a, b = (torch.rand(4, generator=g) * torch.tensor([0.3, 0.3, 0.15, 0.15])
                    + torch.tensor([0.35, 0.35, 0.12, 0.12])).tolist()
    wobble = F.interpolate(torch.randn(1, 1, 6, 6, generator=g), size=(size, size), mode="bicubic",
                           align_corners=False)[0, 0]
    y, x = torch.meshgrid(torch.linspace(0, 1, size), torch.linspace(0, 1, size), indexing="ij")
    return ((x - cx) ** 2 / a ** 2 + (y - cy) ** 2 / b ** 2 + 0.3 * wobble) < 1


class _Recorder:
    """Collects events (hook records) and hands them to the frame being processed."""

    def __init__(self):
        self.pending: list[tuple[str, dict]] = []

    def add(self, kind: str, **data) -> None:
        self.pending.append((kind, {k: (v.detach().clone() if torch.is_tensor(v) else v) for k, v in data.items()}))

    def take(self) -> dict:
        out: dict = {}
        for kind, data in self.pending:
            out.setdefault(kind, []).append(data)
        self.pending = []
        return out


# ---------------------------------------------------------------------------------------------
# Meta's side
# ---------------------------------------------------------------------------------------------


def _meta_features(meta, frames: torch.Tensor) -> tuple[list, list, list]:
    """Per frame: Meta's ViT output (last level), Meta's tracker neck out (raw fpn, pos) and the
    tracker backbone_out as Meta's video model caches it for its tracker (conv_s0/conv_s1 applied)."""
    backbone = meta.detector.backbone
    trunk_out = []
    handle = backbone.vision_backbone.trunk.register_forward_hook(lambda m, i, o: trunk_out.append(o[-1]))
    vit, raw, cached = [], [], []
    decoder = meta.tracker.sam_mask_decoder
    try:
        for t in range(frames.shape[0]):
            out = backbone.forward_image(frames[t:t + 1])["sam2_backbone_out"]
            vit.append(trunk_out.pop())
            raw.append({"fpn": list(out["backbone_fpn"]), "pos": list(out["vision_pos_enc"])})
            fpn = [decoder.conv_s0(out["backbone_fpn"][0]), decoder.conv_s1(out["backbone_fpn"][1]),
                   out["backbone_fpn"][2]]
            cached.append({"vision_features": fpn[-1], "vision_pos_enc": out["vision_pos_enc"], "backbone_fpn": fpn})
    finally:
        handle.remove()
    return vit, raw, cached


def _run_meta(meta, frames, cached, mask, mid, selection: bool) -> dict:
    tracker = meta.tracker
    tracker.use_memory_selection = selection
    n, size = frames.shape[0], frames.shape[-1]
    rec = _Recorder()
    hooks = [
        tracker.transformer.encoder.register_forward_hook(
            lambda m, a, k, o: rec.add("attention", src=k["src"][-1], src_pos=k["src_pos"][-1], prompt=k["prompt"],
                                       prompt_pos=k["prompt_pos"], num_ptr=k["num_obj_ptr_tokens"], out=o["memory"]),
            with_kwargs=True),
        tracker.maskmem_backbone.register_forward_hook(
            lambda m, a, o: rec.add("mem_encoder", pix_feat=a[0], out=o["vision_features"],
                                    pos=o["vision_pos_enc"][-1])),
        tracker.maskmem_backbone.mask_downsampler.encoder.register_forward_pre_hook(
            lambda m, a: rec.add("mem_mask", mask=a[0])),
    ]
    original_encode = tracker._encode_new_memory

    def encode(**kwargs):
        result = original_encode(**kwargs)
        rec.add("encode", feat=kwargs["current_vision_feats"][-1], high_res=kwargs["pred_masks_high_res"],
                score=kwargs["object_score_logits"], from_pts=kwargs["is_mask_from_pts"], out=result[0])
        return result

    tracker._encode_new_memory = encode
    try:
        state = tracker.init_state(video_height=size, video_width=size, num_frames=n, offload_state_to_cpu=True,
                                   cached_features={t: (frames[t], {"tracker_backbone_out": cached[t]})
                                                    for t in range(n)})
        tracker.add_new_mask(state, frame_idx=mid, obj_id=1, mask=mask)
        tracker.propagate_in_video_preflight(state, run_mem_encoder=True)
        per_frame = {mid: {"events": rec.take(), "order": 0}}
        order = [mid]
        for reverse in (False, True):
            for f, _, low, video_res, scores in tracker.propagate_in_video(
                    state, start_frame_idx=mid, max_frame_num_to_track=n, reverse=reverse, tqdm_disable=True):
                events = rec.take()
                if f == mid:
                    per_frame[mid].update(low=low.clone(), full=video_res.clone(), score=scores.clone())
                    continue
                per_frame[f] = {"events": events, "low": low.clone(), "full": video_res.clone(),
                                "score": scores.clone(), "reverse": reverse}
                order.append(f)
    finally:
        for h in hooks:
            h.remove()
        del tracker._encode_new_memory
    outputs = state["output_dict"]
    for f, record in per_frame.items():
        key = "cond_frame_outputs" if f in outputs["cond_frame_outputs"] else "non_cond_frame_outputs"
        out = outputs[key][f]
        record.update(cond=key == "cond_frame_outputs", maskmem=out["maskmem_features"],
                      maskmem_pos=out["maskmem_pos_enc"][-1], ptr=out["obj_ptr"],
                      stored_score=out["object_score_logits"])
    return {"frames": per_frame, "order": order}


# ---------------------------------------------------------------------------------------------
# Our side (transformers' Sam3VideoModel.tracker_model, as converted)
# ---------------------------------------------------------------------------------------------


def _our_features(ours, vit: list) -> tuple[list, list]:
    raw, cached = [], []
    for x in vit:  # Meta's ViT output [B, C, H, W] -> the [B, H*W, C] hidden states ours expects
        hidden = x.flatten(2).transpose(1, 2)
        height, width = ours.tracker_model.prompt_encoder.image_embedding_size
        spatial = hidden.view(1, height, width, -1).permute(0, 3, 1, 2)
        fpn, pos = ours.tracker_neck(spatial)
        raw.append({"fpn": list(fpn[:-1]), "pos": list(pos[:-1])})
        feats, feat_pos = ours.get_vision_features_for_tracker(SimpleNamespace(last_hidden_state=hidden))
        cached.append({"vision_feats": feats, "vision_pos_embeds": feat_pos})
    return raw, cached


def _flat_mem(x: torch.Tensor) -> torch.Tensor:
    """Meta's [B, C, H, W] memory -> ours [H*W, B, C]."""
    return x.flatten(2).permute(2, 0, 1)


def _run_ours(ours, cached, mask, mid, n, size, teacher: dict | None = None) -> dict:
    from transformers.models.sam3_tracker_video.modeling_sam3_tracker_video import Sam3TrackerVideoInferenceSession

    tracker = ours.tracker_model
    rec = _Recorder()
    hooks = [
        tracker.memory_attention.register_forward_hook(
            lambda m, a, k, o: rec.add("attention", prompt=k["memory"], prompt_pos=k["memory_posision_embeddings"],
                                       num_ptr=k["num_object_pointer_tokens"], out=o), with_kwargs=True),
    ]
    device = cached[0]["vision_feats"][0].device
    session = Sam3TrackerVideoInferenceSession(video_height=size, video_width=size, max_vision_features_cache_size=n,
                                               inference_device=device, inference_state_device=device,
                                               video_storage_device=device, dtype=torch.float32)
    session.processed_frames = {t: torch.zeros(1) for t in range(n)}  # frames are given as features only
    for t in range(n):
        session.cache.cache_vision_features(t, cached[t])
    obj_idx = session.obj_id_to_idx(1)
    session.add_mask_inputs(obj_idx, mid, mask[None, None].float())
    session.obj_with_new_inputs = [1]

    def inject() -> None:
        """Overwrite our memory bank with Meta's stored memories and pointers (teacher forcing)."""
        for key in ("cond_frame_outputs", "non_cond_frame_outputs"):
            for f, out in session.output_dict_per_obj[obj_idx][key].items():
                ref = teacher[f]
                out["maskmem_features"] = _flat_mem(ref["maskmem"]).to(out["maskmem_features"].dtype)
                out["maskmem_pos_enc"] = _flat_mem(ref["maskmem_pos"]).to(out["maskmem_pos_enc"].dtype)
                out["object_pointer"] = ref["ptr"].reshape(out["object_pointer"].shape).clone()

    per_frame = {}
    order = []
    try:
        for reverse in (None, False, True):
            frames = [mid] if reverse is None else (range(mid, n) if not reverse else range(mid, -1, -1))
            for f in frames:
                if reverse is not None and f == mid:
                    continue  # the prompted frame is only processed once (as both implementations do)
                if teacher is not None and reverse is not None:
                    inject()
                output = tracker(inference_session=session, frame_idx=f, reverse=bool(reverse),
                                 run_mem_encoder=True)
                cond = f in session.output_dict_per_obj[obj_idx]["cond_frame_outputs"]
                out = session.output_dict_per_obj[obj_idx]["cond_frame_outputs" if cond else "non_cond_frame_outputs"][f]
                # what this step wrote to the bank (copied now: teacher forcing overwrites it later)
                per_frame[f] = {"events": rec.take(), "low": output.pred_masks.clone(),
                                "score": output.object_score_logits.clone(), "reverse": bool(reverse), "cond": cond,
                                "maskmem": out["maskmem_features"].clone(), "maskmem_pos": out["maskmem_pos_enc"].clone(),
                                "ptr": out["object_pointer"].clone(), "full": out["high_res_masks"].clone()}
                order.append(f)
    finally:
        for h in hooks:
            h.remove()
    return {"frames": per_frame, "order": order}


# ---------------------------------------------------------------------------------------------
# Comparison
# ---------------------------------------------------------------------------------------------


def _identify(prompt: torch.Tensor, num_ptr: int, bank: dict, hw: int) -> dict:
    """Which stored frames the memory tokens come from: spatial memories by exact equality with a
    frame's stored maskmem features, object pointers (each split into 4 tokens of 64) with its pointer."""
    prompt = prompt.float()
    spatial = prompt[:prompt.shape[0] - num_ptr]
    frames = []
    for i in range(spatial.shape[0] // hw):
        chunk = spatial[i * hw:(i + 1) * hw]
        frames.append(next((f for f, r in bank.items() if torch.equal(r["mem_flat"], chunk)), "?"))
    pointers = []
    ptr_tokens = prompt[prompt.shape[0] - num_ptr:]
    for i in range(num_ptr // 4):
        chunk = ptr_tokens[4 * i:4 * i + 4].reshape(-1)
        pointers.append(next((f for f, r in bank.items() if torch.equal(r["ptr_flat"], chunk)), "?"))
    return {"memory_frames": frames, "pointer_frames": pointers}


def _bank(run: dict, meta_layout: bool) -> dict:
    bank = {}
    for f, r in run["frames"].items():
        mem = _flat_mem(r["maskmem"]) if meta_layout else r["maskmem"]
        bank[f] = {"mem_flat": mem.float(), "ptr_flat": r["ptr"].float().reshape(-1)}
    return bank


def _compare(meta_run: dict, our_run: dict, hw: int, teacher_forced: bool = False) -> dict:
    """Per frame and overall maxima of |Meta - ours|. Teacher-forced: our bank held Meta's memories
    when each frame was tracked, so the attended tokens are identified against Meta's bank."""
    meta_bank = _bank(meta_run, True)
    our_bank = meta_bank if teacher_forced else _bank(our_run, False)
    frames = {}
    for f in meta_run["order"]:
        m, o = meta_run["frames"][f], our_run["frames"][f]
        row = {"cond": m["cond"]}
        if not m["cond"]:
            row.update(low_res_mask_logits=_max_diff(m["low"], o["low"]), full_res_mask_logits=_max_diff(m["full"], o["full"]),
                       object_score_logits=_max_diff(m["score"], o["score"]),
                       low_res_scale=_scale(m["low"]), full_res_scale=_scale(m["full"]),
                       object_score_meta=float(m["score"].reshape(-1)[0]), object_score_ours=float(o["score"].reshape(-1)[0]),
                       object_score_scale=_scale(m["score"]))
        else:  # the prompted frame: Meta outputs the consolidated mask (±1024), ours the mask as logits (±10)
            row.update(prompt_mask_sign_agreement=float(((m["low"] > 0) == (o["low"] > 0)).float().mean()),
                       object_score_meta=float(m["score"].reshape(-1)[0]), object_score_ours=float(o["score"].reshape(-1)[0]))
        row.update(object_pointer=_max_diff(m["ptr"], o["ptr"]), object_pointer_scale=_scale(m["ptr"]),
                   maskmem_features=_max_diff(_flat_mem(m["maskmem"]), o["maskmem"]),
                   maskmem_features_scale=_scale(m["maskmem"]),
                   maskmem_features_elements_differing=float((_flat_mem(m["maskmem"]).float() != o["maskmem"].float()).float().mean()),
                   maskmem_pos_enc=_max_diff(_flat_mem(m["maskmem_pos"]), o["maskmem_pos"]))
        ma, oa = m["events"].get("attention"), o["events"].get("attention")
        if ma and oa:
            mi = _identify(ma[0]["prompt"], ma[0]["num_ptr"], meta_bank, hw)
            oi = _identify(oa[0]["prompt"], oa[0]["num_ptr"], our_bank, hw)
            row.update(meta_memory_frames=mi["memory_frames"], ours_memory_frames=oi["memory_frames"],
                       meta_pointer_frames=mi["pointer_frames"], ours_pointer_frames=oi["pointer_frames"],
                       same_memory_frames=mi == oi)
            if ma[0]["prompt"].shape == oa[0]["prompt"].shape:
                row.update(memory_tokens=_max_diff(ma[0]["prompt"], oa[0]["prompt"]),
                           memory_pos=_max_diff(ma[0]["prompt_pos"], oa[0]["prompt_pos"]),
                           memory_pos_scale=_scale(ma[0]["prompt_pos"]),
                           memory_attention_out=_max_diff(ma[0]["out"].transpose(0, 1), oa[0]["out"]),
                           memory_attention_out_scale=_scale(ma[0]["out"]))
        frames[f] = row
    summary = {}
    for key in ("low_res_mask_logits", "full_res_mask_logits", "object_score_logits", "object_pointer",
                "maskmem_features", "maskmem_pos_enc", "memory_tokens", "memory_pos", "memory_attention_out"):
        values = [r[key] for r in frames.values() if key in r and not r["cond"]]
        if values:
            summary[key] = max(values)
    scales = {"low_res_mask_logits": "low_res_scale", "full_res_mask_logits": "full_res_scale",
              "object_score_logits": "object_score_scale", "object_pointer": "object_pointer_scale",
              "maskmem_features": "maskmem_features_scale", "memory_pos": "memory_pos_scale",
              "memory_attention_out": "memory_attention_out_scale"}
    for key, scale in scales.items():
        values = [r[scale] for r in frames.values() if scale in r and not r["cond"]]
        if values:
            summary[f"{key}_meta_max"] = max(values)
    summary["maskmem_features_elements_differing"] = max(r["maskmem_features_elements_differing"]
                                                         for r in frames.values() if not r["cond"])
    for key in ("object_pointer", "maskmem_features", "maskmem_pos_enc"):
        summary[f"{key}_prompted_frame"] = next(r[key] for r in frames.values() if r["cond"])
    summary["same_memory_frames_all"] = all(r.get("same_memory_frames", True) for r in frames.values())
    return {"summary": summary, "frames": {str(k): v for k, v in frames.items()}}


def _prompted_pointer(ours, meta_run: dict, cached: dict, mask: torch.Tensor, mid: int) -> dict:
    """The object pointer of the mask-prompted frame, from our modules under both protocols.

    Meta (``_use_mask_as_output``): ``mask_downsample`` on the mask at 1152² (-> 288², the SAM mask
    input size), SAM heads with ``multimask_output=False`` (pointer from the single-mask token).
    transformers (``Sam3TrackerVideoModel._use_mask_as_output``): the mask resized to 1008² first
    (-> 252², resized back to 288² by the prompt path), SAM heads with the default
    ``multimask_output=True`` (pointer from the best-IoU multimask token). The two mixed cases split
    the difference between its two causes.
    """
    tracker = ours.tracker_model
    feats, sizes = cached["vision_feats"], tracker.backbone_feature_sizes
    high = [x.permute(1, 2, 0).view(x.size(1), x.size(2), *s) for x, s in zip(feats[:-1], sizes[:-1])]
    pix = feats[-1].permute(1, 2, 0).view(-1, tracker.hidden_dim, *sizes[-1])
    m1152 = mask[None, None].float()
    m1008 = F.interpolate(m1152, size=(tracker.image_size,) * 2, mode="bilinear", align_corners=False, antialias=True)
    reference = meta_run["frames"][mid]["ptr"]

    def pointer(m, multimask):
        return tracker._single_frame_forward(input_masks=tracker.mask_downsample(m), image_embeddings=high + [pix],
                                             multimask_output=multimask).object_pointer

    return {"meta_protocol_1152_single_mask_token": _max_diff(reference, pointer(m1152, False)),
            "mask_at_1152_multimask_token": _max_diff(reference, pointer(m1152, True)),
            "mask_resized_to_1008_single_mask_token": _max_diff(reference, pointer(m1008, False)),
            "transformers_use_mask_as_output": _max_diff(reference, tracker._use_mask_as_output(pix, high, m1152).object_pointer),
            "scale": _scale(reference)}


def _absent_object(meta, ours, meta_cached: dict, our_cached: dict) -> dict:
    """The parameters used only when the object is absent, which tracking a present object never
    touches: an empty mask prompt gives the pointer ``no_obj_ptr``, and an empty mask with a
    negative object score adds ``no_obj_embed_spatial`` to the memory (the mask is -10 everywhere,
    so the order of resizing and binarising does not matter). On one frame's features."""
    tracker, ref = ours.tracker_model, meta.tracker
    sizes = tracker.backbone_feature_sizes
    feats = our_cached["vision_feats"]
    high = [x.permute(1, 2, 0).view(x.size(1), x.size(2), *s) for x, s in zip(feats[:-1], sizes[:-1])]
    pix = feats[-1].permute(1, 2, 0).view(-1, tracker.hidden_dim, *sizes[-1])
    meta_feats = [x.flatten(2).permute(2, 0, 1) for x in meta_cached["backbone_fpn"]]
    meta_high, meta_pix = list(meta_cached["backbone_fpn"][:-1]), meta_cached["backbone_fpn"][-1]
    empty = torch.zeros(1, 1, ref.input_mask_size, ref.input_mask_size, device=pix.device)
    meta_ptr = ref._use_mask_as_output(meta_pix, meta_high, empty)[5]
    our_ptr = tracker._use_mask_as_output(pix, high, empty).object_pointer
    logits = torch.full((1, 1, tracker.image_size, tracker.image_size), -10.0, device=pix.device)
    score = torch.full((1, 1), -10.0, device=pix.device)
    meta_mem, _ = ref._encode_new_memory(image=None, current_vision_feats=meta_feats, feat_sizes=[tuple(s) for s in sizes],
                                         pred_masks_high_res=logits, object_score_logits=score, is_mask_from_pts=True)
    our_mem, _ = tracker._encode_new_memory(current_vision_feats=feats[-1], pred_masks_high_res=logits,
                                            object_score_logits=score, is_mask_from_pts=True)
    meta_mem = _flat_mem(meta_mem).to(torch.bfloat16)
    return {"empty_prompt_object_pointer_no_obj_ptr": _max_diff(meta_ptr, our_ptr),
            "no_obj_ptr_scale": _scale(meta_ptr),
            "empty_mask_negative_score_memory_bf16": _max_diff(meta_mem, our_mem),
            "empty_mask_negative_score_memory_elements_differing": float((meta_mem.float() != our_mem.float()).float().mean()),
            "empty_mask_negative_score_memory_scale": _scale(meta_mem)}


def _isolated(ours, meta_run: dict) -> dict:
    """Our modules on Meta's exact inputs, frame by frame."""
    tracker = ours.tracker_model
    att, enc, enc_pos, encode, encode_frac, encode32 = [], [], [], [], [], []
    fp32 = []
    handle = tracker.memory_encoder.register_forward_hook(lambda m, a, o: fp32.append(o[0].detach().clone()))
    for f in meta_run["order"]:
        events = meta_run["frames"][f]["events"]
        for a in events.get("attention", []):
            out = tracker.memory_attention(current_vision_features=a["src"], memory=a["prompt"].float(),
                                           current_vision_position_embeddings=a["src_pos"],
                                           memory_posision_embeddings=a["prompt_pos"],
                                           num_object_pointer_tokens=a["num_ptr"])
            att.append(_max_diff(a["out"].transpose(0, 1), out))
        for e, mk in zip(events.get("mem_encoder", []), events.get("mem_mask", [])):
            feats, pos = tracker.memory_encoder(e["pix_feat"], mk["mask"])
            enc.append(_max_diff(e["out"], feats))
            enc_pos.append(_max_diff(e["pos"], pos))
        for e in events.get("encode", []):
            feats, _ = tracker._encode_new_memory(current_vision_feats=e["feat"], pred_masks_high_res=e["high_res"],
                                                  object_score_logits=e["score"], is_mask_from_pts=e["from_pts"])
            reference = _flat_mem(e["out"]).to(torch.bfloat16).float()
            encode.append(_max_diff(reference, feats))
            encode_frac.append(float((reference != feats.float()).float().mean()))
            # the same before the bfloat16 storage cast: Meta's memory encoder output vs ours
            encode32.append(_max_diff(events["mem_encoder"][0]["out"], fp32.pop()))
    handle.remove()
    return {"memory_attention_on_meta_inputs": max(att), "memory_encoder_on_meta_mask": max(enc),
            "memory_encoding_fp32_from_meta_high_res_logits_per_frame": dict(zip(map(str, meta_run["order"]), encode32)),
            "memory_encoder_out_scale": max(_scale(meta_run["frames"][f]["events"]["mem_encoder"][0]["out"])
                                            for f in meta_run["order"]),
            "memory_encoder_pos_on_meta_mask": max(enc_pos),
            "memory_encoding_from_meta_high_res_logits": max(encode),
            "memory_encoding_from_meta_high_res_logits_elements_differing": max(encode_frac),
            "memory_encoding_per_frame": dict(zip(map(str, meta_run["order"]), encode)),
            "memory_attention_per_frame": att}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cpu", help="cpu (Meta's sam3 needs the local CPU patch) or cuda")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--frames", type=int, default=8, help="video length (at least 6); the prompt is on the middle frame")
    parser.add_argument("--noise", type=float, default=0.02, help="std of the perturbation added to every parameter")
    parser.add_argument("--output", type=Path, help="write the differences as JSON here")
    parser.add_argument("--fewer-layers", action="store_true",
                        help="SAM3's widths with 2 ViT blocks, 1 text/geometry/DETR layer and 2 memory-attention "
                             "layers (a CPU-sized check); default: SAM3's sizes")
    args = parser.parse_args()
    if args.frames < 6:
        parser.error("--frames must be at least 6")
    if args.fewer_layers:
        _fewer_layers_video(memory_attention_layers=2)

    from sam3.model_builder import build_sam3_video_model

    from MedicalSAM3Core.inference.convert import convert_state_dict, find_clip_bpe, instantiate

    device = torch.device(args.device)
    torch.manual_seed(args.seed)
    started = time.time()
    meta = build_sam3_video_model(load_from_HF=False, bpe_path=str(find_clip_bpe()), device=device.type)
    meta = meta.to(device).eval()
    with torch.no_grad():
        text = meta.detector.backbone.language_backbone.encoder  # torch.empty in Meta's code, see parity_sam3.py
        torch.nn.init.normal_(text.positional_embedding, std=0.01)
        torch.nn.init.normal_(text.text_projection, std=text.text_projection.shape[0] ** -0.5)
        for parameter in meta.parameters():
            parameter.add_(torch.randn_like(parameter) * args.noise)
    converted = convert_state_dict({k: v.detach().cpu() for k, v in meta.state_dict().items()}, "meta sam3 video")
    ours = instantiate(converted).to(device).eval()
    size = converted.image_size
    n, mid = args.frames, args.frames // 2
    frames = _video(n, size, args.seed + 1).to(device)
    mask = _blob(meta.tracker.input_mask_size, args.seed + 2).to(device)
    tracker_config = ours.tracker_model.config
    built = time.time() - started

    def stage(name: str) -> None:
        print(f"[{time.time() - started:7.1f} s] {name}", file=sys.stderr, flush=True)

    stage("built and converted")
    with torch.inference_mode():
        vit, meta_raw, meta_cached = _meta_features(meta, frames)
        stage("Meta's ViT and tracker neck on every frame")
        our_raw, our_cached = _our_features(ours, vit)
        neck = {"fpn_raw": [max(_max_diff(m["fpn"][i], o["fpn"][i]) for m, o in zip(meta_raw, our_raw)) for i in range(3)],
                "fpn_raw_scale": [max(_scale(m["fpn"][i]) for m in meta_raw) for i in range(3)],
                "pos_enc": [max(_max_diff(m["pos"][i], o["pos"][i]) for m, o in zip(meta_raw, our_raw)) for i in range(3)],
                "tracker_features_with_conv_s0_s1": [
                    max(_max_diff(m["backbone_fpn"][i].flatten(2).permute(2, 0, 1), o["vision_feats"][i])
                        for m, o in zip(meta_cached, our_cached)) for i in range(3)],
                "tracker_features_scale": [max(_scale(m["backbone_fpn"][i]) for m in meta_cached) for i in range(3)]}
        hw = our_cached[0]["vision_feats"][-1].shape[0]

        meta_plain = _run_meta(meta, frames, meta_cached, mask, mid, selection=False)
        stage("Meta's tracker, memory selection off")
        meta_selected = _run_meta(meta, frames, meta_cached, mask, mid, selection=True)
        stage("Meta's tracker as built (memory selection on)")
        ours_free = _run_ours(ours, our_cached, mask, mid, n, size)
        stage("our tracker, free-running")
        ours_forced = _run_ours(ours, our_cached, mask, mid, n, size, teacher=meta_plain["frames"])
        stage("our tracker, teacher-forced")
        isolated = _isolated(ours, meta_plain)
        isolated["prompted_frame_object_pointer"] = _prompted_pointer(ours, meta_plain, our_cached[mid], mask, mid)
        isolated["absent_object"] = _absent_object(meta, ours, meta_cached[mid], our_cached[mid])
        stage("isolated stages")

    results = {
        "tracker_neck": neck,
        "isolated_stages_on_meta_inputs": isolated,
        "teacher_forced_vs_meta_no_selection": _compare(meta_plain, ours_forced, hw, teacher_forced=True),
        "free_running_vs_meta_no_selection": _compare(meta_plain, ours_free, hw),
        "free_running_vs_meta_as_built": _compare(meta_selected, ours_free, hw),
        "meta_no_selection_vs_meta_as_built": _compare(meta_selected, _meta_in_our_layout(meta_plain), hw),
        "processing_order": meta_plain["order"],
        "prompted_frame": mid,
        "frames": n,
        "device": str(device),
        "image_size": size,
        "fewer_layers": args.fewer_layers,
        "memory_attention_layers": tracker_config.memory_attention_num_layers,
        "noise": args.noise,
        "seed": args.seed,
        "torch": torch.__version__,
        "transformers": __import__("transformers").__version__,
        "seconds_build_and_convert": round(built, 1),
        "seconds": round(time.time() - started, 1),
    }
    print(json.dumps(results, indent=1))
    print("\nmax |Meta - ours| over the tracked frames (max |Meta| in brackets):", file=sys.stderr)
    for name in ("teacher_forced_vs_meta_no_selection", "free_running_vs_meta_no_selection",
                 "free_running_vs_meta_as_built"):
        summary = results[name]["summary"]
        cells = [f"{k} {v:.2g}" + (f" [{summary[k + '_meta_max']:.2g}]" if k + "_meta_max" in summary else "")
                 for k, v in summary.items() if isinstance(v, float) and not k.endswith("_meta_max")]
        print(f"  {name}: " + "; ".join(cells) + f"; same frames attended: {summary['same_memory_frames_all']}",
              file=sys.stderr)
    if args.output:
        args.output.write_text(json.dumps(results, indent=1) + "\n")
    return 0


def _meta_in_our_layout(run: dict) -> dict:
    """A Meta run in our layout (to compare two Meta runs with :func:`_compare`)."""
    frames = {}
    for f, r in run["frames"].items():
        frames[f] = {**r, "maskmem": _flat_mem(r["maskmem"]), "maskmem_pos": _flat_mem(r["maskmem_pos"]),
                     "events": {k: [{**e, "out": e["out"].transpose(0, 1)} if k == "attention" else e for e in v]
                                for k, v in r["events"].items()}}
    return {"frames": frames, "order": run["order"]}


if __name__ == "__main__":
    sys.exit(main())
