#!/usr/bin/env python3
"""The one GPU check (issue #28): every GPU-side figure of the project in one run, on random weights.

    timeout 540 python Testing/benchmarks/gpu_check.py --out gpu-results     # one H100: fits 480 s
    python Testing/benchmarks/gpu_check.py --dry-run /tmp/gpu-dry              # CPU, tiny model, seconds

Full-size SAM3 detector-tracker (``Sam3VideoConfig()``, 1008 px) with random seeded weights, so
nothing is downloaded; a CT-like phantom of 300 slices of 512 x 512 (``bench_engine.phantom``).
Steps, in priority order (each skipped, "skipped (budget)", when it would not end within
``--budget-s`` of the start):

1. ``slices`` mode, K = 1 and K = 8 prompts, bf16 autocast: seconds, slices/s, peak GPU memory;
2. the published per-prompt, per-slice baseline (``bench_engine.baseline``) on a subset of the
   slices, its slices/s against the engine's (ratio at K = 1 and K = 8), PASS/FAIL against issue
   #8's targets: <= 20 s for 300 slices at K = 8, >= 5x at K = 8, >= 1.3x at K = 1;
4. bf16 against fp32 on a few slices: Dice/IoU of the engine's masks, score differences;
3. ``propagate`` mode, K = 1 and K = 8, on the same volume;
5. trials, each timed on and off on the same slices: ``torch.compile`` of the vision encoder,
   channels-last, batch size, pinned memory / copy-compute overlap.

The JSON (``gpu_check.json``) and the Markdown summary (``gpu_check.md``) in the output folder are
rewritten (atomically) after every run inside a step, so a run stopped by a time limit still leaves
its figures. Exit status: 0, or 1 when a step or a trial recorded an error (the targets are
reported, not enforced).
"""

from __future__ import annotations

import argparse
import dataclasses
import gc
import json
import os
import platform
import shlex
import signal
import subprocess
import sys
import time
import traceback
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_engine import (PROMPTS, REPO, THRESHOLD, WINDOW, baseline, build_model, full_config,  # noqa: E402
                          phantom, timed)

from MedicalSAM3Core.common.errors import Cancelled  # noqa: E402
from MedicalSAM3Core.common.progress import CancelToken  # noqa: E402
from MedicalSAM3Core.common.volume import Geometry, Volume  # noqa: E402
from MedicalSAM3Core.inference.engine import SegmentOptions, Segmenter  # noqa: E402
from MedicalSAM3Core.inference.models import choose_autocast, use_prompt_graph  # noqa: E402
from MedicalSAM3Core.preprocessing.intensity import ct_window  # noqa: E402

#: steps in the order they run (priority), with their numbers in the issue
ORDER = ["slices", "clicks", "baseline", "agreement", "propagate", "trials"]
NUMBER = {"slices": 1, "baseline": 2, "propagate": 3, "agreement": 4, "trials": 5, "clicks": 6}
TITLE = {"slices": "slices mode", "baseline": "per-prompt, per-slice baseline",
         "propagate": "propagate mode", "agreement": "bf16 vs fp32 agreement", "trials": "trials",
         "clicks": "interactive clicks and re-propagation (issue #27)"}
TARGET_CLICK_S = 0.1  # issue #27: a click on a slice whose features are cached, full-size model on a GPU
CLICK_PROPAGATE_SLICES = 32  # re-propagation measured over this many slices around the clicked one
TRIALS = ["batch_size", "channels_last", "pinned_memory", "compile"]
TARGET_SECONDS, TARGET_RATIO_HIGH, TARGET_RATIO_LOW = 20.0, 5.0, 1.3
MARGIN_S = 5.0  # kept free at the end of the budget (writing the files, giving memory back)

PROFILES = {
    # a real run: full-size model, issue #8's volume
    "gpu": dict(device="cuda", dtype="bf16", agreement_dtype="bf16", slices=300, size=512, prompts="1,8", batch_size=4,
                baseline_slices=24, agreement_slices=8, trial_slices=48, batch_sizes="8,16",
                compile_backend="inductor", repeats=20),
    # every step and trial on a CPU in seconds: the tiny test model, a few small slices. fp32: on a CPU,
    # torch's autocast "promotes" torch.cat and rejects float16 inputs under bf16 autocast (torchvision's
    # roi_align in SAM3's geometry encoder), and mixed inputs under fp16 autocast (the tracker's memory);
    # CUDA's autocast leaves torch.cat alone. Step 4 compares fp16 autocast (slices mode works) with fp32.
    "dry": dict(device="cpu", dtype="fp32", agreement_dtype="fp16", slices=6, size=64, prompts="1,2", batch_size=4,
                baseline_slices=4, agreement_slices=3, trial_slices=6, batch_sizes="2,8",
                compile_backend="eager", repeats=3),
}


class OutOfBudget(Exception):
    """A run inside a step was stopped (cancelled through the engine's token) at the budget."""


class Terminated(BaseException):
    """SIGTERM (``timeout``): recorded, the files written, then the process ends."""


# -- the record --------------------------------------------------------------------------------------
class Check:
    def __init__(self, args, settings: dict, out_dir: Path) -> None:
        self.args, self.settings, self.out_dir = args, settings, out_dir
        self.start = time.monotonic()
        self.budget_s = float(args.budget_s)
        self.data = {"issue": 28, "dry_run": bool(args.dry_run), "budget_s": self.budget_s, "finished": False,
                     "environment": environment(), "settings": settings, "setup": {},
                     "steps": {name: {"number": NUMBER[name], "title": TITLE[name], "status": "pending"}
                               for name in ORDER},
                     "targets": []}
        self.cuda = False
        self.measured: dict = {}  # figures later steps estimate their time from

    def elapsed(self) -> float:
        return time.monotonic() - self.start

    def left(self) -> float:
        return self.budget_s - MARGIN_S - self.elapsed()

    def fits(self, estimate_s: float) -> bool:
        return estimate_s <= self.left()

    def save(self) -> None:
        self.data["elapsed_s"] = round(self.elapsed(), 2)
        self.data["targets"] = targets(self.data)
        self.out_dir.mkdir(parents=True, exist_ok=True)
        _write_atomic(self.out_dir / "gpu_check.json", json.dumps(self.data, indent=2, default=_json_default) + "\n")
        _write_atomic(self.out_dir / "gpu_check.md", markdown(self.data))


def _json_default(value):
    if isinstance(value, (np.floating, np.integer)):
        return value.item()
    return str(value)


def _write_atomic(path: Path, text: str) -> None:
    temporary = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    temporary.write_text(text)
    os.replace(temporary, path)


def environment() -> dict:
    import transformers

    env = {"date_utc": datetime.now(timezone.utc).isoformat(timespec="seconds"),
           "command": shlex.join(["python"] + sys.argv), "python": platform.python_version(),
           "torch": torch.__version__, "transformers": transformers.__version__, "numpy": np.__version__,
           "cuda": torch.version.cuda, "cudnn": torch.backends.cudnn.version() if torch.backends.cudnn.is_available()
           else None, "machine": platform.machine(), "cpu_count": os.cpu_count(),
           "torch_threads": torch.get_num_threads(), "gpu": None}
    if torch.cuda.is_available():
        properties = torch.cuda.get_device_properties(0)
        env.update(gpu=properties.name, gpu_memory_gib=round(properties.total_memory / 2**30, 1),
                   gpu_capability=".".join(map(str, torch.cuda.get_device_capability(0))),
                   gpu_count=torch.cuda.device_count())
        env["driver"] = _command(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"])
    env["git_commit"] = _command(["git", "-C", str(REPO), "rev-parse", "HEAD"])
    if env["git_commit"]:
        env["git_dirty"] = bool(_command(["git", "-C", str(REPO), "status", "--porcelain", "--untracked-files=no"]))
    return env


def _command(argv: list[str]):
    try:
        out = subprocess.run(argv, capture_output=True, text=True, timeout=20)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip().splitlines()[0] if out.returncode == 0 and out.stdout.strip() else None


# -- shared pieces -----------------------------------------------------------------------------------
def _sync(check: Check) -> None:
    if check.cuda:
        torch.cuda.synchronize()


def _free(check: Check) -> None:
    gc.collect()
    if check.cuda:
        torch.cuda.empty_cache()


def _peak_reset(check: Check) -> None:
    if check.cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()


def _peak_gib(check: Check):
    return round(torch.cuda.max_memory_allocated() / 2**30, 3) if check.cuda else None


def _round(value, digits: int = 4):
    return None if value is None else round(float(value), digits)


def engine_run(check: Check, segmenter: Segmenter, volume: Volume, k: int, mode: str, batch_size: int):
    """One timed ``segment`` call; stopped through the engine's cancel token when the budget runs out
    (:class:`OutOfBudget`, with how far it got and the time the whole run would have taken)."""
    token, seen = CancelToken(), {"done": 0, "total": 0}

    def progress(event) -> None:
        seen.update(done=event.done, total=event.total)
        if check.left() <= 0:
            token.cancel()

    options = SegmentOptions(mode=mode, window=WINDOW, score_threshold=THRESHOLD, batch_size=batch_size)
    _peak_reset(check)
    started = time.perf_counter()
    try:
        result, seconds = timed(lambda: segmenter.segment(volume, PROMPTS[:k], options, progress, token),
                                segmenter.model)
    except Cancelled:
        spent = time.perf_counter() - started
        whole = spent / seen["done"] * seen["total"] if seen["done"] else None
        raise OutOfBudget(f"{mode} K={k} stopped at the budget after {spent:.1f} s, {seen['done']} of "
                          f"{seen['total']} slice visits" + (f" (whole run about {whole:.0f} s)" if whole else ""))
    n = volume.shape[0]
    row = {"K": k, "mode": mode, "batch_size": batch_size, "slices": n, "seconds": _round(seconds),
           "slices_per_s": _round(n / seconds), "peak_gpu_gib": _peak_gib(check)}
    if mode == "propagate" and seen["total"]:
        probes = min(SegmentOptions().anchor_samples, n)
        row["tracks"] = int(round((seen["total"] - probes) / (n + 1)))  # one pair of sweeps per distinct start slice
    return result, row


def _skip(record: dict, what: str, estimate: float, check: Check) -> None:
    record.setdefault("skipped", []).append(f"{what}: skipped (budget): needs about {estimate:.0f} s, "
                                            f"{max(0.0, check.left()):.0f} s left")


def _per_slice(check: Check, k: int):
    """Seconds per slice of ``slices`` mode at K = ``k`` (or the nearest K measured), for estimates."""
    rates = check.measured.get("slices", {})
    if not rates:
        return None
    nearest = min(rates, key=lambda measured: abs(measured - k))
    return rates[nearest] * max(1.0, k / nearest) ** 0.5 if nearest < k else rates[nearest]


# -- step 1 ------------------------------------------------------------------------------------------
def step_slices(check: Check, state: dict, record: dict) -> None:
    s = check.settings
    segmenter, volume = state["segmenter"], state["volume"]
    warm = Volume(volume.array[:2 * s["batch_size"]], Geometry(), modality="CT")
    _, row = engine_run(check, segmenter, warm, max(state["ks"]), "slices", s["batch_size"])
    record["warm_up_s"] = row["seconds"]
    record["runs"] = []
    for k in state["ks"]:
        estimate = (_per_slice(check, k) or 0.0) * s["slices"] * 1.5
        if not check.fits(estimate):
            _skip(record, f"K={k}", estimate, check)
            continue
        _, row = engine_run(check, segmenter, volume, k, "slices", s["batch_size"])
        record["runs"].append(row)
        check.measured.setdefault("slices", {})[k] = row["seconds"] / row["slices"]
        check.save()


# -- step 2 ------------------------------------------------------------------------------------------
def step_baseline(check: Check, state: dict, record: dict) -> None:
    s, model, segmenter = check.settings, state["model"], state["segmenter"]
    volume = state["volume"]
    picks = np.unique(np.linspace(0, volume.shape[0] - 1, s["baseline_slices"]).round().astype(int))
    array = np.ascontiguousarray(volume.array[picks])  # spread through the volume
    baseline(model, array[:1], PROMPTS[:1])  # warm-up: the processor, the un-batched shapes
    record["runs"] = []
    per_forward = None
    for k in state["ks"]:
        n = len(array)
        if per_forward is not None:
            n = min(n, int(check.left() / 1.2 / (per_forward * k)))
            if n < 2:
                _skip(record, f"baseline K={k}", per_forward * k * 2, check)
                continue
        masks, seconds = timed(lambda: baseline(model, array[:n], PROMPTS[:k]), model)
        per_forward = seconds / (n * k)
        row = {"K": k, "slices": n, "slice_indices": [int(p) for p in picks[:n]], "seconds": _round(seconds),
               "slices_per_s": _round(n / seconds),
               "seconds_per_forward": _round(per_forward)}
        # the engine on the same slices: its masks against the baseline's (bf16: batching may flip a few pixels)
        engine_result, engine_row = engine_run(check, segmenter, Volume(array[:n], Geometry(), modality="CT"), k,
                                               "slices", s["batch_size"])
        row["engine_subset_slices_per_s"] = engine_row["slices_per_s"]
        differing = max(float((engine_result.mask(i) != m).mean()) for i, m in enumerate(masks))
        row["differing_voxels"] = _round(differing, 6)
        row["baseline_slices_found"] = int(sum(int(m.any(axis=(1, 2)).sum()) for m in masks))
        full = next((r for r in check.data["steps"]["slices"].get("runs", []) if r["K"] == k), None)
        engine_rate = full["slices_per_s"] if full else engine_row["slices_per_s"]
        row["engine_slices_per_s"] = engine_rate
        row["engine_rate_from"] = "step 1" if full else "subset"
        row["ratio"] = _round(engine_rate / row["slices_per_s"], 3)
        record["runs"].append(row)
        check.save()


# -- step 4 ------------------------------------------------------------------------------------------
def step_agreement(check: Check, state: dict, record: dict) -> None:
    s, model = check.settings, state["model"]
    volume = state["volume"]
    k = max(state["ks"])
    picks = np.unique(np.linspace(0, volume.shape[0] - 1, s["agreement_slices"]).round().astype(int))
    array = np.ascontiguousarray(volume.array[picks])
    few = Volume(array, Geometry(), modality="CT")
    low = dataclasses.replace(model, autocast_dtype=choose_autocast(model.device, s["agreement_dtype"]))
    fp32 = dataclasses.replace(model, autocast_dtype=None)
    record.update(slices=[int(p) for p in picks], K=k, low_precision=str(low.autocast_dtype))
    results = {}
    for name, loaded in (("low", low), ("fp32", fp32)):
        results[name], row = engine_run(check, Segmenter(loaded), few, k, "slices", s["batch_size"])
        record[f"{name}_seconds"] = row["seconds"]
    prompts = []
    for i in range(k):
        a, b = results["fp32"].mask(i), results["low"].mask(i)
        union, both = int((a | b).sum()), int((a & b).sum())
        total = int(a.sum() + b.sum())
        fp32_label, low_label = results["fp32"].labels[i], results["low"].labels[i]
        prompts.append({"prompt": PROMPTS[i], "voxels_fp32": int(a.sum()), "voxels_low": int(b.sum()),
                        "dice": _round(2 * both / total if total else 1.0),
                        "iou": _round(both / union if union else 1.0),
                        "max_score_abs_diff": _round(abs(fp32_label.max_score - low_label.max_score), 6)})
    record["prompts"] = prompts
    record["dice_min"] = min(p["dice"] for p in prompts)
    record["dice_mean"] = _round(np.mean([p["dice"] for p in prompts]))
    record["iou_min"] = min(p["iou"] for p in prompts)
    check.save()
    record["raw"] = raw_agreement(low, array, k)


@torch.inference_mode()
def raw_agreement(model, array: np.ndarray, k: int) -> dict:
    """Detector outputs (all queries) in fp32 and in the autocast dtype on the same slices: the largest
    differences of the scores (sigmoid(logit) x sigmoid(presence)) and of the mask probabilities."""
    from transformers import Sam3ImageProcessor

    spec = ct_window(WINDOW)
    processor = Sam3ImageProcessor(size={"height": model.image_size, "width": model.image_size}, do_rescale=False)
    unit = np.clip((array.astype(np.float32) - spec.low) / (spec.high - spec.low), 0, 1)
    images = [torch.from_numpy(np.repeat(plane[None], 3, axis=0)) for plane in unit]
    pixel_values = processor(images=images, return_tensors="pt")["pixel_values"].to(model.device)
    outputs = {}
    for name, dtype in (("fp32", None), ("low", model.autocast_dtype)):
        context = dataclasses.replace(model, autocast_dtype=dtype).autocast()
        with context:
            vision = model.detector.get_vision_features(pixel_values=pixel_values)
        scores, masks = [], []
        for prompt in PROMPTS[:k]:
            tokens = model.tokenizer(prompt, return_tensors="pt", padding="max_length", max_length=32, truncation=True)
            ids = tokens["input_ids"].to(model.device).expand(len(array), -1)
            mask = tokens["attention_mask"].to(model.device).expand(len(array), -1)
            with context:
                out = model.detector(vision_embeds=vision, input_ids=ids, attention_mask=mask)
            score = out.pred_logits.float().sigmoid()
            if out.presence_logits is not None:
                score = score * out.presence_logits.float().sigmoid()
            scores.append(score)
            masks.append(out.pred_masks.float().sigmoid())
        outputs[name] = (torch.stack(scores), torch.stack(masks))
    score_diff = (outputs["fp32"][0] - outputs["low"][0]).abs()
    mask_diff = (outputs["fp32"][1] - outputs["low"][1]).abs()
    top_fp32 = outputs["fp32"][0].argmax(dim=-1)
    top_low = outputs["low"][0].argmax(dim=-1)
    return {"score_max_abs_diff": _round(score_diff.max(), 6), "score_mean_abs_diff": _round(score_diff.mean(), 6),
            "mask_prob_max_abs_diff": _round(mask_diff.max(), 6),
            "mask_prob_mean_abs_diff": _round(mask_diff.mean(), 6),
            "same_best_query": _round((top_fp32 == top_low).float().mean(), 4),
            "queries": int(outputs["fp32"][0].shape[-1])}


# -- step 3 ------------------------------------------------------------------------------------------
def step_propagate(check: Check, state: dict, record: dict) -> None:
    s, segmenter, volume = check.settings, state["segmenter"], state["volume"]
    record["runs"] = []
    k1 = None
    for k in state["ks"]:
        # K = 1: a probe pass and one pair of sweeps; K > 1: up to one pair of sweeps per prompt (the
        # middle of that range is the estimate: a run that outlasts the budget is stopped and its pace recorded)
        estimate = k1 * (1 + (k - 1) / 2) if k1 else (_per_slice(check, k) or 0.0) * s["slices"] * 2.5
        if not check.fits(estimate):
            _skip(record, f"K={k}", estimate, check)
            continue
        _, row = engine_run(check, segmenter, volume, k, "propagate", s["batch_size"])
        record["runs"].append(row)
        k1 = k1 or row["seconds"]
        check.save()


# -- step 6 ------------------------------------------------------------------------------------------
def step_clicks(check: Check, state: dict, record: dict) -> None:
    """Issue #27: the volume session's click latency (features cached: prompt encoder + mask decoder only),
    the first click on a slice (its vision features computed), and re-propagation from the clicked slice."""
    s, segmenter, volume = check.settings, state["segmenter"], state["volume"]
    session = segmenter.session(volume)
    obj = session.add_object("click")
    n, size = volume.shape[0], volume.shape[1]
    z = n // 2
    points = [(z, size * (0.3 + 0.4 * f), size * (0.35 + 0.3 * g)) for f, g in
              ((0.5, 0.5), (0.2, 0.7), (0.8, 0.3), (0.6, 0.9), (0.1, 0.1))]

    def click(i: int) -> float:
        started = time.perf_counter()
        session.refine(obj, points=[points[i % len(points)]], labels=[1 if i % 2 == 0 else 0])
        _sync(check)
        return time.perf_counter() - started

    record["first_click_s"] = _round(click(0))
    times = [click(i + 1) for i in range(max(3, s["repeats"]))]
    record.update(clicks=len(times), click_median_s=_round(float(np.median(times))),
                  click_p95_s=_round(float(np.percentile(times, 95))), click_max_s=_round(max(times)))
    check.save()
    first, last = max(0, z - CLICK_PROPAGATE_SLICES // 2), min(n - 1, z + CLICK_PROPAGATE_SLICES // 2 - 1)
    started = time.perf_counter()
    session.propagate(obj, first=first, last=last)
    _sync(check)
    seconds = time.perf_counter() - started
    record.update(propagate_slices=last - first + 1, propagate_s=_round(seconds),
                  propagate_s_per_slice=_round(seconds / (last - first + 1)), feature_cache_mb=_round(
                      session.cache.bytes / 2 ** 20, 1), peak_gpu_gib=_peak_gib(check))


# -- step 5 ------------------------------------------------------------------------------------------
def step_trials(check: Check, state: dict, record: dict) -> None:
    s, model, segmenter = check.settings, state["model"], state["segmenter"]
    k = max(state["ks"])
    volume = state["trial_volume"] = Volume(state["volume"].array[:s["trial_slices"]], Geometry(), modality="CT")
    record.update(K=k, slices=volume.shape[0], reference_batch_size=s["batch_size"])
    per_slice = _per_slice(check, k)
    one_run = (per_slice or 0.0) * volume.shape[0] * 1.3

    def measure(batch_size: int = s["batch_size"]):
        engine_run(check, segmenter, Volume(volume.array[:batch_size], Geometry(), modality="CT"), k, "slices",
                   batch_size)  # warm-up at this batch shape
        return engine_run(check, segmenter, volume, k, "slices", batch_size)[1]

    if not check.fits(2 * one_run):
        raise OutOfBudget("no time left for the reference run of the trials")
    reference = measure()
    record["reference"] = reference
    trials = record.setdefault("trials", {})
    check.save()
    for name in [t for t in TRIALS if t in state["trials"]]:
        estimate = {"compile": max(2 * one_run, 60.0 if check.cuda else 0.0), "pinned_memory": 5.0,
                    "batch_size": 4 * one_run}.get(name, 2 * one_run)
        if not check.fits(estimate):
            trials[name] = {"status": "skipped (budget)", "note": f"needs about {estimate:.0f} s"}
            _skip(record, f"trial {name}", estimate, check)
            check.save()
            continue
        trials[name] = {"status": "running"}
        check.save()
        entry = {}
        try:
            TRIAL_FUNCTIONS[name](check, state, model, reference, measure, entry)
            entry["status"] = entry.get("status", "done")
        except OutOfBudget as stop:
            entry.update(status="stopped (budget)", note=str(stop))
        except Exception as error:  # one trial's failure never loses the others
            entry.update(status="error", error=f"{type(error).__name__}: {error}",
                         traceback=traceback.format_exc(limit=6))
        trials[name] = entry
        _free(check)
        check.save()
    if any(t.get("status") == "error" for t in trials.values()):
        record["errors"] = [f"{n}: {t['error']}" for n, t in trials.items() if t.get("status") == "error"]


def _on_off(reference: dict, row: dict) -> dict:
    return {"off_s": reference["seconds"], "on_s": row["seconds"],
            "speedup": _round(reference["seconds"] / row["seconds"], 3),
            "on_peak_gpu_gib": row["peak_gpu_gib"], "off_peak_gpu_gib": reference["peak_gpu_gib"]}


def trial_batch_size(check, state, model, reference, measure, entry) -> None:
    entry["applied"] = "SegmentOptions.batch_size (slices per vision-encoder call)"
    entry["runs"] = {}
    for batch_size in state["batch_sizes"]:
        try:
            row = measure(batch_size)
            entry["runs"][str(batch_size)] = _on_off(reference, row)
        except torch.cuda.OutOfMemoryError as error:
            entry["runs"][str(batch_size)] = {"error": f"out of GPU memory: {str(error).splitlines()[0]}"}
            _free(check)
        check.save()
    measured = {b: r for b, r in entry["runs"].items() if "speedup" in r}
    if not measured:  # a batch that does not fit is a figure; none fitting is not
        raise RuntimeError("; ".join(f"batch {b}: {r['error']}" for b, r in entry["runs"].items()))
    best = max(measured, key=lambda b: measured[b]["speedup"])
    entry.update(best_batch_size=int(best), **measured[best])


def trial_channels_last(check, state, model, reference, measure, entry) -> None:
    """Weights of every 4-D layer (patch embedding, FPN and mask-head convolutions) in channels-last, and
    the pixel values handed to the vision encoder converted by a forward pre-hook (no engine change)."""
    module = model.video if model.video is not None else model.detector
    encoder = model.detector.vision_encoder

    def to_channels_last(_module, args, kwargs):
        if args and isinstance(args[0], torch.Tensor) and args[0].dim() == 4:
            return (args[0].contiguous(memory_format=torch.channels_last), *args[1:]), kwargs
        if isinstance(kwargs.get("pixel_values"), torch.Tensor):
            pixels = kwargs["pixel_values"].contiguous(memory_format=torch.channels_last)
            return args, {**kwargs, "pixel_values": pixels}
        return None

    entry["applied"] = ("model.to(memory_format=torch.channels_last) + a forward pre-hook on "
                        "detector.vision_encoder making pixel_values channels-last")
    entry["converted_weights"] = sum(1 for p in module.parameters() if p.dim() == 4)
    module.to(memory_format=torch.channels_last)
    handle = encoder.register_forward_pre_hook(to_channels_last, with_kwargs=True)
    try:
        row = measure()
    finally:
        handle.remove()
        module.to(memory_format=torch.contiguous_format)
    entry.update(_on_off(reference, row))


def trial_pinned_memory(check, state, model, reference, measure, entry) -> None:
    """Not applicable as on/off: the engine copies each batch with a blocking ``.to(device)`` of a fresh
    pageable tensor (``engine._run_slices``) and each prompt's confidences back with ``.cpu()``; there
    is no hook to pin them or to overlap the copies with compute. Measured instead: the copies of one
    batch, pageable and pinned, and their sum over a volume as the upper bound of what overlap could save."""
    s = check.settings
    entry["status"] = "not applicable"
    entry["reason"] = ("the engine copies each batch with a blocking .to(device) of a fresh pageable tensor "
                       "(engine._run_slices / _slices_tensor) and each prompt's confidences back with .cpu(); "
                       "no hook to pin memory or overlap copies with compute without changing the engine")
    batch, size, k = s["batch_size"], s["size"], max(state["ks"])
    host = torch.from_numpy(state["volume"].array[:batch].copy())  # int16 slices, as the engine copies them
    out = torch.zeros((batch, size, size), dtype=torch.float32, device=model.device)  # one prompt's confidences
    repeats = s["repeats"]

    def median_s(function) -> float:
        times = []
        for _ in range(repeats):
            _sync(check)
            started = time.perf_counter()
            function()
            _sync(check)
            times.append(time.perf_counter() - started)
        return float(np.median(times))

    if check.cuda:
        h2d_pageable = median_s(lambda: host.to(model.device))
        pinned = host.pin_memory()
        h2d_pinned = median_s(lambda: pinned.to(model.device, non_blocking=True))
        d2h_pageable = median_s(lambda: out.cpu())
        landing = torch.empty(out.shape, dtype=out.dtype, pin_memory=True)
        d2h_pinned = median_s(lambda: landing.copy_(out, non_blocking=True))
    else:  # dry run: no pinned memory without CUDA; the same code path with CPU copies
        h2d_pageable = median_s(lambda: host.clone())
        d2h_pageable = median_s(lambda: out.clone())
        h2d_pinned = d2h_pinned = None
        entry["note"] = "no CUDA: pinned copies not measurable; pageable copies timed as CPU clones"
    batches = -(-s["slices"] // batch)
    per_volume = batches * (h2d_pageable + k * d2h_pageable)
    whole = next((r["seconds"] for r in check.data["steps"]["slices"].get("runs", []) if r["K"] == k), None)
    entry.update(batch_slices=batch, bytes_h2d_per_batch=int(host.nbytes),
                 bytes_d2h_per_batch_per_prompt=int(out.nbytes), h2d_pageable_ms=_round(h2d_pageable * 1e3),
                 h2d_pinned_ms=_round(h2d_pinned * 1e3 if h2d_pinned else None),
                 d2h_pageable_ms=_round(d2h_pageable * 1e3),
                 d2h_pinned_ms=_round(d2h_pinned * 1e3 if d2h_pinned else None),
                 volume_copies_s=_round(per_volume), volume_slices=s["slices"], K=k,
                 slices_mode_s=whole, upper_bound_saving=_round(per_volume / whole if whole else None))


def trial_compile(check, state, model, reference, measure, entry) -> None:
    """``torch.compile`` of the vision encoder, swapped into the loaded model (the engine calls
    ``detector.get_vision_features``, which calls ``detector.vision_encoder``; propagate mode too)."""
    backend = check.settings["compile_backend"]
    detector = model.detector
    original = detector.vision_encoder
    entry["applied"] = (f"detector.vision_encoder = torch.compile(detector.vision_encoder, backend={backend!r}, "
                        "dynamic=False)")
    if check.data["dry_run"]:
        entry["note"] = "dry-run: compile checked with backend=eager (no inductor code generation)"
    detector.vision_encoder = torch.compile(original, backend=backend, dynamic=False)
    try:
        # first run on the trial volume itself: compiles every batch shape it has (a short last batch too)
        started = time.perf_counter()
        engine_run(check, state["segmenter"], state["trial_volume"], max(state["ks"]), "slices",
                   check.settings["batch_size"])
        entry["first_call_s"] = _round(time.perf_counter() - started)  # compilation included
        row = measure()
    finally:
        detector.vision_encoder = original
    entry.update(_on_off(reference, row))
    saved = reference["seconds"] - row["seconds"]
    if saved > 0:
        entry["break_even_runs"] = _round(entry["first_call_s"] / saved, 1)


TRIAL_FUNCTIONS = {"batch_size": trial_batch_size, "channels_last": trial_channels_last,
                   "pinned_memory": trial_pinned_memory, "compile": trial_compile}
STEP_FUNCTIONS = {"clicks": step_clicks, "slices": step_slices, "baseline": step_baseline, "agreement": step_agreement,
                  "propagate": step_propagate, "trials": step_trials}


def step_estimate(check: Check, name: str, state: dict) -> float:
    """A rough lower estimate of a step's time from the figures so far (0 when nothing is known)."""
    s, k = check.settings, max(state["ks"])
    one = _per_slice(check, 1) or 0.0
    if name == "baseline":
        return one * s["baseline_slices"] * (1 + k)
    if name == "agreement":
        return (_per_slice(check, k) or 0.0) * s["agreement_slices"] * 4
    if name == "propagate":
        return one * s["slices"] * 2
    if name == "trials":
        return (_per_slice(check, k) or 0.0) * s["trial_slices"] * 2.6
    return 0.0


# -- targets and the summary -------------------------------------------------------------------------
def targets(data: dict) -> list[dict]:
    settings, steps = data["settings"], data["steps"]
    ks = [int(k) for k in settings["prompts"].split(",")]
    low, high = min(ks), max(ks)
    dry = data["dry_run"]
    runs = {r["K"]: r for r in steps["slices"].get("runs", [])}
    ratios = {r["K"]: r["ratio"] for r in steps["baseline"].get("runs", [])}
    exact = settings["slices"] == 300 and settings["size"] == 512 and high == 8
    rows = []

    def verdict(value, ok) -> str:
        if value is None:
            return "not measured"
        return ("PASS" if ok else "FAIL") + (" (dry-run: tiny model, not a verdict)" if dry else "")

    seconds = runs.get(high, {}).get("seconds")
    rows.append({"target": f"slices mode, 300 slices of 512 x 512, K = 8: <= {TARGET_SECONDS:g} s on one H100",
                 "measured": f"{seconds} s ({settings['slices']} slices of {settings['size']}², K = {high})"
                 if seconds is not None else None, "value": seconds,
                 "verdict": verdict(seconds, seconds is not None and seconds <= TARGET_SECONDS)
                 if exact or seconds is None else "n/a (not the target volume)" + (" - dry-run" if dry else "")})
    for k, goal in ((high, TARGET_RATIO_HIGH), (low, TARGET_RATIO_LOW)):
        named = 8 if goal == TARGET_RATIO_HIGH else 1
        value = ratios.get(k)
        rows.append({"target": f"engine / baseline slices per second at K = {named}: >= {goal:g}x",
                     "measured": f"{value}x (K = {k})" if value is not None else None, "value": value,
                     "verdict": verdict(value, value is not None and value >= goal)})
    click = steps.get("clicks", {}).get("click_median_s")
    rows.append({"target": f"issue #27: a click on a cached slice, full-size model: < {TARGET_CLICK_S * 1000:.0f} ms",
                 "measured": f"{click * 1000:.1f} ms median" if click is not None else None, "value": click,
                 "verdict": verdict(click, click is not None and click < TARGET_CLICK_S)})
    return rows


def _fmt(value, digits: int = 2) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.{digits}f}"
    return str(value)


def markdown(data: dict) -> str:
    env, steps, s, setup = data["environment"], data["steps"], data["settings"], data["setup"]
    lines = [f"# GPU check (issue #28){' - DRY RUN (CPU, tiny model)' if data['dry_run'] else ''}", "",
             f"- date (UTC): {env['date_utc']}; command: `{env['command']}`",
             f"- device: {env.get('gpu') or 'CPU (' + str(env['machine']) + ', ' + str(env['cpu_count']) + ' cores)'}"
             + (f", {env.get('gpu_memory_gib')} GiB, compute capability {env.get('gpu_capability')}, driver "
                f"{env.get('driver')}" if env.get("gpu") else ""),
             f"- torch {env['torch']}, CUDA {env['cuda']}, cuDNN {env['cudnn']}, transformers {env['transformers']}, "
             f"Python {env['python']}",
             f"- git commit: {env.get('git_commit') or 'not available'}"
             + (" (uncommitted changes)" if env.get("git_dirty") else ""),
             f"- model: {setup.get('model', '-')} (random weights, built in {_fmt(setup.get('build_s'), 1)} s), "
             f"autocast {setup.get('autocast', '-')}, attention {setup.get('attention', '-')}; "
             f"volume {s['slices']} slices of {s['size']} x {s['size']}; "
             f"batch {s['batch_size']}; score threshold {THRESHOLD}",
             *([f"- SETUP FAILED: `{setup['error']}`"] if setup.get("error") else []),
             f"- budget {data['budget_s']:.0f} s, elapsed {_fmt(data.get('elapsed_s'), 1)} s, "
             + ("finished" if data["finished"] else "NOT finished (still running, or stopped)"), "",
             "## Targets (issues #8 and #27)", "", "| target | measured | verdict |", "|---|---|---|"]
    for row in data["targets"]:
        lines.append(f"| {row['target']} | {row['measured'] or '-'} | {row['verdict']} |")
    for name in ORDER:
        record = steps[name]
        lines += ["", f"## {record['number']}. {record['title']} — {record['status']}"
                  + (f" ({_fmt(record.get('seconds'), 1)} s)" if record.get("seconds") is not None else ""), ""]
        if record.get("error"):
            lines += [f"ERROR: `{record['error']}`", ""]
        if record.get("note"):
            lines += [record["note"], ""]
        lines += SECTION[name](record)
        for skipped in record.get("skipped", []):
            lines.append(f"- {skipped}")
    lines += ["", "## Recommendations (from the trials)", ""] + recommendations(steps["trials"], data["dry_run"])
    return "\n".join(lines) + "\n"


def _section_clicks(record: dict) -> list[str]:
    if record.get("click_median_s") is None:
        return []
    return ["| first click (slice encoded) | click, features cached: median / p95 / max | clicks | "
            "re-propagation | feature cache |", "|---|---|---|---|---|",
            f"| {_fmt(record.get('first_click_s'), 4)} s | {_fmt(record['click_median_s'], 4)} / "
            f"{_fmt(record['click_p95_s'], 4)} / {_fmt(record['click_max_s'], 4)} s | {record['clicks']} | "
            f"{_fmt(record.get('propagate_s'))} s for {record.get('propagate_slices', '-')} slices "
            f"({_fmt(record.get('propagate_s_per_slice'), 4)} s/slice) | {_fmt(record.get('feature_cache_mb'), 1)} MB |"]


def _section_runs(record: dict) -> list[str]:
    if not record.get("runs"):
        return []
    tracks = "tracks" in record["runs"][0]
    lines = ["| K | slices | seconds | slices/s | peak GPU memory (GiB) |" + (" tracks |" if tracks else ""),
             "|---|---|---|---|---|" + ("---|" if tracks else "")]
    for r in record["runs"]:
        lines.append(f"| {r['K']} | {r['slices']} | {_fmt(r['seconds'])} | {_fmt(r['slices_per_s'])} | "
                     f"{_fmt(r['peak_gpu_gib'])} |" + (f" {r.get('tracks', '-')} |" if "tracks" in r else ""))
    return lines


def _section_baseline(record: dict) -> list[str]:
    if not record.get("runs"):
        return []
    lines = ["| K | baseline slices | baseline s | baseline slices/s | engine slices/s | engine ÷ baseline | "
             "voxels differing (engine vs baseline) |", "|---|---|---|---|---|---|---|"]
    for r in record["runs"]:
        lines.append(f"| {r['K']} | {r['slices']} | {_fmt(r['seconds'])} | {_fmt(r['slices_per_s'])} | "
                     f"{_fmt(r['engine_slices_per_s'])} ({r['engine_rate_from']}) | **{_fmt(r['ratio'])}x** | "
                     f"{r['differing_voxels']:.2e} ({r['baseline_slices_found']} slices found) |")
    return lines


def _section_agreement(record: dict) -> list[str]:
    if not record.get("prompts"):
        return []
    lines = [f"Slices {record['slices']}, K = {record['K']}, {record['low_precision']} autocast against fp32 "
             f"({_fmt(record.get('low_seconds'))} s against {_fmt(record.get('fp32_seconds'))} s).", "",
             "| prompt | voxels fp32 | voxels low precision | Dice | IoU | max score diff |",
             "|---|---|---|---|---|---|"]
    for p in record["prompts"]:
        lines.append(f"| {p['prompt']} | {p['voxels_fp32']} | {p['voxels_low']} | {_fmt(p['dice'], 4)} | "
                     f"{_fmt(p['iou'], 4)} | {p['max_score_abs_diff']:.2e} |")
    lines.append(f"\nDice min {_fmt(record['dice_min'], 4)}, mean {_fmt(record['dice_mean'], 4)}; IoU min "
                 f"{_fmt(record['iou_min'], 4)}.")
    raw = record.get("raw")
    if raw:
        lines.append(f"Detector outputs, all {raw['queries']} queries: scores max |diff| "
                     f"{raw['score_max_abs_diff']:.2e} "
                     f"(mean {raw['score_mean_abs_diff']:.2e}), mask probabilities max |diff| "
                     f"{raw['mask_prob_max_abs_diff']:.2e} (mean {raw['mask_prob_mean_abs_diff']:.2e}), same best "
                     f"query {raw['same_best_query']:.0%}.")
    return lines


def _section_trials(record: dict) -> list[str]:
    reference = record.get("reference")
    if not reference:
        return []
    lines = [f"Each trial against the same reference: slices mode, {record['slices']} slices, K = {record['K']}, "
             f"batch {record['reference_batch_size']}: {_fmt(reference['seconds'])} s.", "",
             "| trial | status | off s | on s | speedup | notes |", "|---|---|---|---|---|---|"]
    for name, t in record.get("trials", {}).items():
        notes = t.get("error") or t.get("applied") or t.get("note") or ""
        if name == "batch_size" and t.get("runs"):
            notes = "; ".join(f"batch {b}: " + (f"{r['on_s']:.2f} s ({r['speedup']:.2f}x, "
                                                 f"peak {_fmt(r['on_peak_gpu_gib'])} GiB)"
                                                 if "speedup" in r else r["error"]) for b, r in t["runs"].items())
        if name == "compile" and t.get("first_call_s") is not None:
            notes += f"; first call (compiling) {t['first_call_s']:.1f} s" + (
                f", pays off after {t['break_even_runs']} runs of this size" if t.get("break_even_runs") else "")
            notes += f"; {t['note']}" if t.get("note") else ""
        if name == "pinned_memory" and t.get("h2d_pageable_ms") is not None:
            notes = (f"{t['reason']}. One batch ({t['batch_slices']} slices): "
                     f"H2D {t['h2d_pageable_ms']:.3f} ms pageable, "
                     f"{_fmt(t['h2d_pinned_ms'], 3)} ms pinned; D2H per prompt {t['d2h_pageable_ms']:.3f} ms pageable, "
                     f"{_fmt(t['d2h_pinned_ms'], 3)} ms pinned. All copies of a {t['volume_slices']}-slice volume at "
                     f"K = {t['K']}: {t['volume_copies_s']:.3f} s = upper bound of what overlap could save"
                     + (f" ({t['upper_bound_saving']:.1%} of the slices-mode run)"
                        if t.get("upper_bound_saving") is not None else "")
                     + (f"; {t['note']}" if t.get("note") else ""))
        lines.append(f"| {name} | {t.get('status')} | {_fmt(t.get('off_s'))} | {_fmt(t.get('on_s'))} | "
                     f"{_fmt(t.get('speedup'))}{'x' if t.get('speedup') is not None else ''} | {notes} |")
    return lines


SECTION = {"clicks": _section_clicks, "slices": _section_runs, "baseline": _section_baseline, "agreement": _section_agreement,
           "propagate": _section_runs, "trials": _section_trials}


def recommendations(record: dict, dry_run: bool) -> list[str]:
    lines = []
    for name, t in record.get("trials", {}).items():
        speedup = t.get("speedup")
        if t.get("status") == "not applicable":
            saving = t.get("upper_bound_saving")
            lines.append(f"- {name}: not applicable without an engine change" + (
                f"; overlapping the copies could save at most {saving:.1%} of a slices-mode run"
                if saving is not None else ""))
        elif speedup is None:
            lines.append(f"- {name}: no figure ({t.get('status')})")
        elif speedup >= 1.05:
            what = f" (batch {t['best_batch_size']})" if name == "batch_size" else ""
            lines.append(f"- {name}{what}: {speedup:.2f}x faster - worth keeping "
                         "(a change to make in the engine/server)")
        elif speedup <= 0.95:
            lines.append(f"- {name}: {speedup:.2f}x - slower, do not use")
        else:
            lines.append(f"- {name}: {speedup:.2f}x - within 5%, no measurable gain, not worth it")
    if dry_run:
        lines.append("- (dry-run: timings of the tiny model on a CPU; they say nothing about a GPU)")
    return lines or ["- no trial ran"]


# -- main --------------------------------------------------------------------------------------------
def setup(check: Check, args) -> dict:
    from MedicalSAM3Core.inference.tiny import tiny_video_config

    s = check.settings
    device = s["device"]
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise SystemExit("gpu_check: no CUDA GPU visible to torch; use --dry-run (CPU) or --device cpu")
    check.cuda = device.startswith("cuda")
    started = time.perf_counter()
    config = tiny_video_config() if args.dry_run else full_config()
    model = build_model(config, device, s["dtype"])
    use_prompt_graph(model.detector, {})  # as load_model does: SAM3's graph (the empty geometry prompt)
    name = "tiny test model (tiny.py)" if args.dry_run else "full-size SAM3 (Sam3VideoConfig())"
    check.data["setup"].update(model=name,
                               image_size=model.image_size, autocast=str(model.autocast_dtype),
                               attention=getattr(model.detector.config, "_attn_implementation", None),
                               parameters_m=round(sum(p.numel() for p in model.video.parameters()) / 1e6, 1),
                               build_s=round(time.perf_counter() - started, 2))
    started = time.perf_counter()
    volume = Volume(phantom(s["slices"], s["size"]), Geometry(), modality="CT")
    check.data["setup"]["phantom_s"] = round(time.perf_counter() - started, 2)
    ks = [int(k) for k in s["prompts"].split(",")]
    if max(ks) > len(PROMPTS):
        raise SystemExit(f"gpu_check: at most {len(PROMPTS)} prompts")
    return {"model": model, "segmenter": Segmenter(model), "volume": volume, "ks": ks,
            "batch_sizes": [int(b) for b in s["batch_sizes"].split(",")],
            "trials": [t.strip() for t in args.trials.split(",") if t.strip()]}


def run_step(check: Check, name: str, state: dict) -> None:
    record = check.data["steps"][name]
    estimate = step_estimate(check, name, state)
    if not check.fits(estimate):
        record.update(status="skipped (budget)",
                      note=f"needs about {estimate:.0f} s, {max(0.0, check.left()):.0f} s left")
        check.save()
        print(f"step {record['number']} ({name}): skipped (budget)", flush=True)
        return
    record["status"] = "running"
    check.save()
    print(f"step {record['number']} ({name}) at {check.elapsed():.0f} s ...", flush=True)
    started = time.perf_counter()
    try:
        STEP_FUNCTIONS[name](check, state, record)
        record["status"] = "partial (budget)" if record.get("skipped") else "done"
        if record.get("errors"):
            record["status"] = "done with errors"
    except OutOfBudget as stop:
        record.update(status="stopped (budget)", note=str(stop))
    except Exception as error:
        record.update(status="error", error=f"{type(error).__name__}: {error}", traceback=traceback.format_exc(limit=8))
    record["seconds"] = round(time.perf_counter() - started, 2)
    _free(check)
    check.save()
    print(f"step {record['number']} ({name}): {record['status']} in {record['seconds']:.1f} s"
          + (f" - {record['error']}" if record.get("error") else ""), flush=True)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("out_dir", nargs="?", help="output folder (or --out)")
    parser.add_argument("--out", help="output folder for gpu_check.json and gpu_check.md")
    parser.add_argument("--dry-run", action="store_true", help="CPU, tiny model, a few small slices: every step "
                        "and trial in seconds")
    parser.add_argument("--budget-s", type=float, default=480.0, help="stop starting work after this many seconds")
    parser.add_argument("--steps", default=",".join(ORDER), help="steps to run, comma-separated (default: all); they "
                        "always run in priority order: " + ",".join(ORDER))
    parser.add_argument("--trials", default=",".join(TRIALS), help="trials of step 5")
    for name in PROFILES["gpu"]:
        parser.add_argument("--" + name.replace("_", "-"), type=type(PROFILES["gpu"][name]), default=None)
    args = parser.parse_args()
    out = args.out or args.out_dir
    if not out:
        parser.error("give the output folder (positional or --out)")
    settings = dict(PROFILES["dry" if args.dry_run else "gpu"])
    settings.update({k: v for k, v in vars(args).items() if k in settings and v is not None})
    unknown = set(args.steps.split(",")) - set(ORDER)
    if unknown:
        parser.error(f"unknown steps {sorted(unknown)}; known: {ORDER}")
    torch.set_grad_enabled(False)
    check = Check(args, settings, Path(out))

    def on_sigterm(signum, frame):
        raise Terminated()

    signal.signal(signal.SIGTERM, on_sigterm)
    try:
        try:
            state = setup(check, args)
        except Exception as error:  # e.g. a transformers without SAM3: recorded, then the run ends
            check.data["setup"].update(error=f"{type(error).__name__}: {error}", traceback=traceback.format_exc())
            check.save()
            print(f"gpu_check: setup failed: {type(error).__name__}: {error}", file=sys.stderr)
            return 1
        check.save()
        for name in ORDER:
            if name in args.steps.split(","):
                run_step(check, name, state)
            else:
                check.data["steps"][name]["status"] = "not requested (--steps)"
        check.data["finished"] = True
    except Terminated:
        running = [n for n, r in check.data["steps"].items() if r["status"] == "running"]
        for name in running:
            check.data["steps"][name]["status"] = "killed (SIGTERM)"
            for trial in check.data["steps"][name].get("trials", {}).values():
                if trial.get("status") == "running":
                    trial["status"] = "killed (SIGTERM)"
        print("gpu_check: terminated (SIGTERM); figures so far are written", flush=True)
        check.save()
        return 143
    check.save()
    print(markdown(check.data))
    print(f"written: {check.out_dir / 'gpu_check.json'} and {check.out_dir / 'gpu_check.md'}")
    errors = [n for n, r in check.data["steps"].items() if r["status"] in ("error", "done with errors")]
    return 1 if errors else 0


if __name__ == "__main__":
    sys.exit(main())
