"""Numerical parity: Meta's SAM3 image model vs. our conversion of its weights into transformers' Sam3Model.

Builds Meta's reference model (PyPI ``sam3``) with random weights (every parameter perturbed, so
that zero- or one-initialised tensors also prove their mapping), converts its state dict with
:func:`MedicalSAM3Core.inference.convert.convert_state_dict`, and runs both on one random image
with a text prompt, and with a text prompt plus a box. Compares the FPN features, the text
features, the per-query logits, the presence logit, the boxes (xyxy, normalised) and the mask
logits, plus the token ids of the two tokenizers (Meta's SimpleTokenizer vs. our CLIPTokenizer
built from the same BPE file). Prints the maximum absolute differences and writes them as JSON.

Text alone is not the same computation in the two implementations: Meta always runs its geometry
encoder (on an empty prompt it still contributes a CLS token to the prompt sequence), transformers'
Sam3Model skips it when no box is given. The text + box case runs the same graph in both; the third
case is the engine's text-only graph (:func:`MedicalSAM3Core.inference.models.use_prompt_graph`, set
up by ``load_model``): one box marked as padding (label -10), which makes transformers run the
geometry encoder (its CLS token only) as Meta does for text alone.

Needs Meta's ``sam3`` package and its dependencies. As published it runs on CUDA (run there:
``python Testing/parity/parity_sam3.py --device cuda``); see ``RESULTS.md`` next to this file for
what was measured and how.

    python Testing/parity/parity_sam3.py --device cuda --output parity.json
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))


def _cxcywh_to_xyxy(boxes: torch.Tensor) -> torch.Tensor:
    cx, cy, w, h = boxes.unbind(-1)
    return torch.stack([cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2], dim=-1)


def _max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.float().cpu(), b.float().cpu()
    if a.shape != b.shape:
        raise SystemExit(f"shape mismatch {tuple(a.shape)} vs {tuple(b.shape)}")
    return float((a - b).abs().max())


def _fewer_layers() -> None:
    """Build Meta's model with SAM3's widths but 2 ViT blocks (one global), 1 text, geometry, DETR
    encoder and decoder layer: the same code paths, a fraction of the compute (for CPU runs)."""
    import sam3.model_builder as builder

    forced = {"ViT": dict(depth=2, global_att_blocks=(1,)), "VETextEncoder": dict(layers=1),
              "TransformerEncoderFusion": dict(num_layers=1), "TransformerDecoder": dict(num_layers=1),
              "SequenceGeometryEncoder": dict(num_layers=1)}
    for name, overrides in forced.items():
        cls = getattr(builder, name)

        def build(*args, _cls=cls, _overrides=overrides, **kwargs):
            return _cls(*args, **{**kwargs, **_overrides})

        setattr(builder, name, build)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--prompt", default="liver")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--noise", type=float, default=0.02, help="std of the perturbation added to every parameter")
    parser.add_argument("--bpe", help="CLIP BPE file (default: the one Meta's sam3 package uses)")
    parser.add_argument("--output", type=Path, help="write the differences as JSON here")
    parser.add_argument("--fewer-layers", action="store_true",
                        help="SAM3's widths with 2 ViT blocks and 1 layer elsewhere (a CPU-sized check)")
    args = parser.parse_args()
    if args.fewer_layers:
        _fewer_layers()

    from sam3.model.data_misc import FindStage
    from sam3.model_builder import build_sam3_image_model

    from MedicalSAM3Core.inference.convert import build_clip_tokenizer, convert_state_dict, find_clip_bpe, instantiate
    from MedicalSAM3Core.inference.models import use_prompt_graph

    device = torch.device(args.device)
    torch.manual_seed(args.seed)
    started = time.time()
    meta = build_sam3_image_model(load_from_HF=False, device=device.type, eval_mode=True,
                                  bpe_path=args.bpe).to(device).eval()
    with torch.no_grad():
        # Meta's text encoder creates these two with torch.empty (a checkpoint always fills them):
        # uninitialised memory, NaN or garbage from run to run. Initialised as OpenCLIP does.
        text = meta.backbone.language_backbone.encoder
        torch.nn.init.normal_(text.positional_embedding, std=0.01)
        torch.nn.init.normal_(text.text_projection, std=text.text_projection.shape[0] ** -0.5)
        for parameter in meta.parameters():
            parameter.add_(torch.randn_like(parameter) * args.noise)
    converted = convert_state_dict({k: v.detach().cpu() for k, v in meta.state_dict().items()}, "meta sam3")
    ours = instantiate(converted).to(device).eval()
    image_size = converted.image_size

    torch.manual_seed(args.seed + 1)
    image = torch.rand(1, 3, image_size, image_size, device=device) * 2 - 1  # already normalised to [-1, 1]
    tokenizer = build_clip_tokenizer(find_clip_bpe(args.bpe))
    tokens = tokenizer([args.prompt], padding="max_length", max_length=32, truncation=True, return_tensors="pt")
    meta_tokens = meta.backbone.language_backbone.tokenizer([args.prompt], context_length=32)
    n = int(tokens["attention_mask"].sum())

    box = [0.45, 0.5, 0.3, 0.4]  # cx, cy, w, h normalised

    def meta_forward(with_box: bool) -> dict:
        backbone_out = meta.backbone.forward_image(image)
        backbone_out.update(meta.backbone.forward_text([args.prompt], device=device))
        find = FindStage(img_ids=torch.tensor([0], device=device, dtype=torch.long),
                         text_ids=torch.tensor([0], device=device, dtype=torch.long), input_boxes=None,
                         input_boxes_mask=None, input_boxes_label=None, input_points=None, input_points_mask=None)
        prompt = meta._get_dummy_prompt()
        if with_box:
            prompt.append_boxes(torch.tensor(box, device=device).view(1, 1, 4),
                                torch.tensor([True], device=device).view(1, 1))
        out = meta.forward_grounding(backbone_out=backbone_out, find_input=find, geometric_prompt=prompt,
                                     find_target=None)
        out["_backbone"] = backbone_out
        return out

    def our_forward(with_box: bool):
        extra = {}
        if with_box:
            extra = dict(input_boxes=torch.tensor([[box]], device=device),
                         input_boxes_labels=torch.ones(1, 1, dtype=torch.long, device=device))
        return ours(pixel_values=image, input_ids=tokens["input_ids"].to(device),
                    attention_mask=tokens["attention_mask"].to(device), **extra)

    def compare(reference: dict, result) -> dict:
        ref_logits = reference["pred_logits"].squeeze(-1)
        return {"pred_logits": _max_diff(ref_logits, result.pred_logits),
                "presence_logits": _max_diff(reference["presence_logit_dec"].reshape(-1),
                                             result.presence_logits.reshape(-1)),
                "pred_boxes_xyxy": _max_diff(_cxcywh_to_xyxy(reference["pred_boxes"]), result.pred_boxes),
                "pred_masks": _max_diff(reference["pred_masks"], result.pred_masks),
                "pred_logits_scale": float(ref_logits.abs().max()),
                "pred_masks_scale": float(reference["pred_masks"].abs().max())}

    with torch.inference_mode():
        text_only = meta_forward(with_box=False)
        with_box = meta_forward(with_box=True)
        vision = ours.get_vision_features(pixel_values=image)
        text = ours.get_text_features(input_ids=tokens["input_ids"].to(device),
                                      attention_mask=tokens["attention_mask"].to(device), return_dict=True)
        ours_text_only = our_forward(with_box=False)  # transformers' own text-only graph
        ours_with_box = our_forward(with_box=True)
        # the engine's text-only graph: what load_model sets up for every SAM3 model (default policy)
        use_prompt_graph(ours, {})
        ours_engine = our_forward(with_box=False)

    backbone = text_only["_backbone"]
    meta_text = backbone["language_features"]  # [L, B, C], sequence first
    meta_text = meta_text.transpose(0, 1) if meta_text.shape[1] == 1 else meta_text
    diffs = {
        "token_ids_equal": bool(torch.equal(meta_tokens[0, :n].cpu(), tokens["input_ids"][0, :n])),
        "vision_fpn": [_max_diff(m, h) for m, h in zip(backbone["backbone_fpn"], vision.fpn_hidden_states)],
        "vision_fpn_scale": [float(m.abs().max()) for m in backbone["backbone_fpn"]],
        "text_features_valid_tokens": _max_diff(meta_text[:, :n], text.pooler_output[:, :n]),
        "text_features_scale": float(meta_text[:, :n].abs().max()),
        "text_and_box": compare(with_box, ours_with_box),
        "text_only": compare(text_only, ours_text_only),
        "text_only_vs_engine_graph": compare(text_only, ours_engine),
        "device": str(device),
        "image_size": image_size,
        "fewer_layers": args.fewer_layers,
        "prompt": args.prompt,
        "box_cxcywh": box,
        "noise": args.noise,
        "torch": torch.__version__,
        "seconds": round(time.time() - started, 1),
    }
    print(json.dumps(diffs, indent=2))
    if args.output:
        args.output.write_text(json.dumps(diffs, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
