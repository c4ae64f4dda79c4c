#!/usr/bin/env python3
"""Engine vs the published per-prompt, per-slice baseline: speed, memory and equal answers.

    python Testing/benchmarks/bench_engine.py                 # CPU bench config, about a minute on 2 cores
    python Testing/benchmarks/bench_engine.py --config full --device cuda --slices 300 --size 512

The baseline is what the published Medical SAM3 / MedSAM3 inference code does: for every prompt
and every slice, the whole pipeline — per-slice image preprocessing with transformers'
``Sam3ImageProcessor``, tokenisation, ``Sam3Model.forward`` (vision encoder + text encoder +
DETR + mask head) and ``post_process_instance_segmentation``. K prompts on S slices cost K x S
vision encodings. Our engine (``slices`` mode) encodes each slice once and embeds each prompt once.

Printed: FLOPs per part (``torch.utils.flop_counter``) of the bench config and of the full-size
model, and the ratio of per-slice vision FLOPs to per-prompt-per-slice FLOPs for both; slices/s
of baseline, ``slices`` and ``propagate`` for K = 1, 4, 8 and their ratios; whether ``slices``
mode gives the same masks as the baseline; peak RSS (and peak GPU memory on CUDA); peak RSS for
64/128/256 slices against the bytes of the input and output arrays.

Weights are random (seeded): speed does not depend on them. With random weights detection scores
sit near 0.25, so the score threshold is 0.2 to make masks non-trivial; no track reaches SAM3's
new-object threshold (0.7), so ``propagate`` timings here are the detector-tracker without live
tracks (a trained model adds tracker work per tracked object).
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import resource
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))

from MedicalSAM3Core.common.volume import Geometry, Volume  # noqa: E402
from MedicalSAM3Core.inference.engine import SegmentOptions, Segmenter  # noqa: E402
from MedicalSAM3Core.inference.models import LoadedModel, choose_autocast, choose_device  # noqa: E402
from MedicalSAM3Core.inference.cv_ops import install_offline_cv_ops  # noqa: E402
from MedicalSAM3Core.inference.tiny import build_offline_tokenizer, small_video_config  # noqa: E402
from MedicalSAM3Core.preprocessing.intensity import ct_window  # noqa: E402

PROMPTS = ["liver", "spleen", "aorta", "pancreas", "stomach", "left kidney", "right kidney", "gallbladder"]
WINDOW = "abdomen"
THRESHOLD = 0.2


def bench_config():
    """CPU bench config: SAM3's architecture scaled so that per-slice vision FLOPs / per-prompt
    per-slice FLOPs stays within 20% of the full-size model's (checked and printed at run time)."""
    return small_video_config(image_size=168, vit_hidden=768, vit_layers=14, vit_heads=12, vit_mlp=3552, window=6,
                              hidden=128, heads=4, ffn=512, detr_encoder_layers=3, detr_decoder_layers=3,
                              queries=50, text_hidden=256, text_layers=2)


def full_config():
    """The full-size SAM3 detector-tracker (facebook/sam3 architecture, 1008 px)."""
    from transformers import Sam3VideoConfig

    return Sam3VideoConfig()


def count_flops(video_config) -> dict:
    """FLOPs of one slice's vision encoding, one prompt's text embedding, and one prompt on one
    slice (DETR encoder/decoder + mask head), counted with ``torch.utils.flop_counter``.

    The vision encoder is counted on the meta device (no memory, no time); text and detector
    heads need real tensors, so they run on CPU in a copy of the model whose ViT has one layer
    (the heads only see the vision features' shapes).
    """
    from torch.utils.flop_counter import FlopCounterMode
    from transformers import Sam3Model
    from transformers.initialization import no_init_weights

    config = copy.deepcopy(video_config.detector_config)
    size = config.image_size
    with torch.device("meta"):
        meta_model = Sam3Model(config).eval()
    with torch.inference_mode(), FlopCounterMode(display=False) as counter:
        vision = meta_model.get_vision_features(pixel_values=torch.zeros(1, 3, size, size, device="meta"))
    vision_flops = counter.get_total_flops()
    heads_config = copy.deepcopy(config)
    heads_config.vision_config.backbone_config.num_hidden_layers = 1
    heads_config.vision_config.backbone_config.global_attn_indexes = [0]
    with no_init_weights():
        heads = Sam3Model(heads_config).eval()
    features = type(vision)(fpn_hidden_states=tuple(torch.randn(t.shape) for t in vision.fpn_hidden_states),
                            fpn_position_encoding=tuple(torch.randn(t.shape) for t in vision.fpn_position_encoding))
    ids = torch.randint(0, 500, (1, 32))
    mask = torch.ones(1, 32, dtype=torch.long)
    with torch.inference_mode():
        with FlopCounterMode(display=False) as counter:
            text = heads.get_text_features(input_ids=ids, attention_mask=mask, return_dict=True)
        text_flops = counter.get_total_flops()
        with FlopCounterMode(display=False) as counter:
            heads(vision_embeds=features, text_embeds=text, attention_mask=mask)
        prompt_flops = counter.get_total_flops()
    return {"vision": vision_flops, "text": text_flops, "per_prompt": prompt_flops,
            "ratio": vision_flops / prompt_flops}


def build_model(video_config, device: str, dtype: str, seed: int = 0) -> LoadedModel:
    from transformers import Sam3VideoModel

    torch.manual_seed(seed)
    video = Sam3VideoModel(video_config).eval()
    torch_device = choose_device(device)
    video.to(torch_device)
    install_offline_cv_ops()
    return LoadedModel(detector=video.detector_model, video=video, tokenizer=build_offline_tokenizer(),
                       model_id="random-weights", image_size=int(video_config.image_size), device=torch_device,
                       autocast_dtype=choose_autocast(torch_device, dtype))


def phantom(slices: int, size: int, seed: int = 0) -> np.ndarray:
    """CT-like ``(z, y, x)`` int16 volume in HU: body ellipse with two organs."""
    rng = np.random.default_rng(seed)
    z, y, x = np.meshgrid(np.linspace(-1, 1, slices), np.linspace(-1, 1, size), np.linspace(-1, 1, size),
                          indexing="ij")
    array = np.full((slices, size, size), -1000.0, np.float32)
    array[(y / 0.8) ** 2 + (x / 0.9) ** 2 < 1] = 20.0
    array[((y + 0.2) / 0.35) ** 2 + ((x + 0.35) / 0.3) ** 2 + (z / 0.9) ** 2 < 1] = 60.0
    array[((y - 0.2) / 0.2) ** 2 + ((x - 0.4) / 0.2) ** 2 < 1] = 200.0
    return (array + rng.normal(0, 10, array.shape)).astype(np.int16)


def _sync(model: LoadedModel) -> None:
    if model.device.type == "cuda":
        torch.cuda.synchronize()


@torch.inference_mode()
def baseline(model: LoadedModel, volume: np.ndarray, prompts: list[str]) -> list[np.ndarray]:
    """The published loop: per prompt, per slice, the full pipeline. Returns a mask per prompt."""
    from transformers import Sam3ImageProcessor

    from MedicalSAM3Core.common.prompts import default_dictionary

    spec = ct_window(WINDOW)
    size = model.image_size
    processor = Sam3ImageProcessor(size={"height": size, "width": size}, do_rescale=False)
    masks = []
    for prompt in prompts:
        text = default_dictionary().resolve(prompt).model_text
        mask = np.zeros(volume.shape, bool)
        for z in range(volume.shape[0]):
            unit = np.clip((volume[z].astype(np.float32) - spec.low) / (spec.high - spec.low), 0, 1)
            image = torch.from_numpy(np.repeat(unit[None], 3, axis=0))
            pixel_values = processor(images=[image], return_tensors="pt")["pixel_values"].to(model.device)
            tokens = model.tokenizer(text, return_tensors="pt", padding="max_length", max_length=32)
            with model.autocast():
                outputs = model.detector(pixel_values=pixel_values, input_ids=tokens["input_ids"].to(model.device),
                                         attention_mask=tokens["attention_mask"].to(model.device))
            result = processor.post_process_instance_segmentation(outputs, threshold=THRESHOLD, mask_threshold=0.5,
                                                                  target_sizes=[volume.shape[1:]])[0]
            if len(result["scores"]):
                mask[z] = result["masks"][result["scores"].argmax()].bool().cpu().numpy()
        masks.append(mask)
    return masks


def timed(function, model: LoadedModel):
    _sync(model)
    start = time.perf_counter()
    value = function()
    _sync(model)
    return value, time.perf_counter() - start


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def _status_mb(field: str) -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024.0
    raise RuntimeError(f"{field} not in /proc/self/status")


def memory_child(args) -> None:
    """Peak RSS of one ``slices``-mode run on ``args.memory_child`` slices, in a fresh process.

    Uses the small test model (memory that scales with depth is the engine's, not the model's).
    The kernel's high-water mark is reset after the model and the input volume exist
    (``/proc/self/clear_refs``), so the reported growth is what segmenting added.
    """
    from MedicalSAM3Core.inference.tiny import tiny_video_config

    model = build_model(tiny_video_config(), "cpu", "float32")
    volume = Volume(phantom(args.memory_child, args.size), Geometry(), modality="CT")
    segmenter = Segmenter(model)
    options = SegmentOptions(mode="slices", window=WINDOW, score_threshold=THRESHOLD)
    segmenter.segment(Volume(volume.array[:4], Geometry(), modality="CT"), PROMPTS[:1], options)  # warm-up
    Path("/proc/self/clear_refs").write_text("5")
    before = _status_mb("VmRSS")
    result = segmenter.segment(volume, PROMPTS[:1], options)
    print(json.dumps({"slices": args.memory_child, "rss_before_mb": before, "peak_rss_mb": _status_mb("VmHWM"),
                      "output_mb": (result.label_map.nbytes + sum(p.nbytes for p in result.packed_masks)) / 2**20}))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", choices=["cpu", "full"], default="cpu")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="auto")
    parser.add_argument("--slices", type=int, default=8)
    parser.add_argument("--size", type=int, default=128, help="in-plane size of the phantom (pixels)")
    parser.add_argument("--prompts", default="1,4,8")
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--skip-memory", action="store_true")
    parser.add_argument("--memory-size", type=int, default=512, help="in-plane size for the memory scaling runs")
    parser.add_argument("--skip-baseline-above", type=int, default=0,
                        help="GPU full size: run the baseline only for K up to this (0 = all)")
    parser.add_argument("--memory-child", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    torch.set_grad_enabled(False)
    if args.memory_child:
        memory_child(args)
        return

    print(f"machine: {platform.processor() or platform.machine()}, {torch.get_num_threads()} torch threads, "
          f"torch {torch.__version__}" + (f", {torch.cuda.get_device_name()}" if torch.cuda.is_available() else ""))
    video_config = bench_config() if args.config == "cpu" else full_config()
    flops = count_flops(video_config)
    full = flops if args.config == "full" else count_flops(full_config())
    counted = [("bench", flops), ("full-size", full)] if args.config == "cpu" else [("full-size", full)]
    for name, f in counted:
        print(f"FLOPs {name:9s}: vision {f['vision'] / 1e9:9.2f} G/slice, text {f['text'] / 1e9:7.3f} G/prompt, "
              f"DETR+mask {f['per_prompt'] / 1e9:8.3f} G/prompt/slice, vision:per-prompt ratio {f['ratio']:.2f}")
    deviation = flops["ratio"] / full["ratio"] - 1
    print(f"ratio deviation from full size: {deviation:+.1%} ({'within' if abs(deviation) <= 0.2 else 'OUTSIDE'} 20%)")

    model = build_model(video_config, args.device, args.dtype)
    volume_array = phantom(args.slices, args.size)
    volume = Volume(volume_array, Geometry(), modality="CT")
    segmenter = Segmenter(model)
    print(f"volume {volume_array.shape} (z, y, x), model input {model.image_size} px, device {model.device}, "
          f"batch {args.batch_size}, random weights")

    def run(mode, prompts):
        options = SegmentOptions(mode=mode, window=WINDOW, score_threshold=THRESHOLD, batch_size=args.batch_size)
        return segmenter.segment(volume, prompts, options)

    run("slices", PROMPTS[:1])  # warm-up (allocator, kernels)
    baseline(model, volume_array[:2], PROMPTS[:1])
    if model.device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    rows, failures = [], []
    for k in [int(k) for k in args.prompts.split(",")]:
        prompts = PROMPTS[:k]
        slices_result, t_slices = timed(lambda: run("slices", prompts), model)
        _, t_propagate = timed(lambda: run("propagate", prompts), model)
        row = {"K": k, "slices": t_slices, "propagate": t_propagate}
        if not args.skip_baseline_above or k <= args.skip_baseline_above:
            base_masks, t_base = timed(lambda: baseline(model, volume_array, prompts), model)
            differing = max(float((slices_result.mask(i) != m).mean()) for i, m in enumerate(base_masks))
            found = sum(int(m.any(axis=(1, 2)).sum()) for m in base_masks)
            row.update(baseline=t_base, differing=differing, found=found)
            if differing > 1e-4:
                failures.append(f"K={k}: slices mode differs from the baseline on {differing:.2e} of voxels")
        rows.append(row)
    s = args.slices
    print(f"\n{'K':>2} {'baseline sl/s':>14} {'slices sl/s':>12} {'propagate sl/s':>15} {'slices/base':>12} "
          f"{'propagate/base':>15} {'equal masks':>12}")
    for row in rows:
        base = row.get("baseline")
        print(f"{row['K']:>2} {s / base if base else float('nan'):>14.2f} {s / row['slices']:>12.2f} "
              f"{s / row['propagate']:>15.2f} {base / row['slices'] if base else float('nan'):>11.2f}x "
              f"{base / row['propagate'] if base else float('nan'):>14.2f}x "
              f"{('yes' if row['differing'] <= 1e-4 else 'NO') + ' (%d sl)' % row['found'] if base else '-':>12}")
    print(f"\npeak RSS {peak_rss_mb():.0f} MB" + (f", peak GPU memory {torch.cuda.max_memory_allocated() / 2**30:.2f} GiB"
                                                  if model.device.type == "cuda" else ""))

    if not args.skip_memory:
        print(f"\nmemory scaling (slices mode, 1 prompt, {args.memory_size}x{args.memory_size} slices, small model, "
              "fresh process each):")
        previous = None
        for n in (64, 128, 256):
            # A fixed glibc mmap threshold: with the default dynamic one, freed per-batch temporaries
            # stay in the heap by chance and add noise unrelated to depth.
            env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="1048576")
            out = subprocess.run([sys.executable, __file__, "--memory-child", str(n), "--size", str(args.memory_size)],
                                 capture_output=True, text=True, check=True, env=env)
            data = json.loads(out.stdout.strip().splitlines()[-1])
            growth = data["peak_rss_mb"] - data["rss_before_mb"]
            line = (f"  {n:4d} slices: peak RSS {data['peak_rss_mb']:.0f} MB, growth while segmenting "
                    f"{growth:.1f} MB, output arrays (label map + packed mask) {data['output_mb']:.1f} MB")
            if previous:
                line += (f"; vs {previous[0]} slices: +{growth - previous[1]:.1f} MB growth for "
                         f"+{data['output_mb'] - previous[2]:.1f} MB of outputs")
            print(line)
            if previous and growth - previous[1] > 1.25 * (data["output_mb"] - previous[2]) + 8:
                failures.append(f"memory growth {n} vs {previous[0]} slices is not explained by the outputs")
            previous = (n, growth, data["output_mb"])
    if failures:
        print("\n".join(["FAIL: " + f for f in failures]))
        sys.exit(1)


if __name__ == "__main__":
    main()
