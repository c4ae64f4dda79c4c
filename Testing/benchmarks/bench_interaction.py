"""Interactive correction speed (issue #27): how long a click takes to come back as the slice's new mask.

    python Testing/benchmarks/bench_interaction.py [--model Resources/demo_model] [--scan PATH] [--device cpu]
                                                   [--clicks 30] [--json OUT.json]

On one scan (default: the shipped sample ``Resources/sample/example_ct_sm.nii.gz``, a validation scan)
through :class:`MedicalSAM3Core.inference.session.VolumeSession`, the one class behind the CLI, the server
and Slicer:

* ``first click``: a click on a slice never seen (its vision features are computed: ViT + tracker neck);
* ``click (cached)``: ``--clicks`` clicks, alternately positive and negative at points inside the body,
  on slices whose features are cached: the prompt encoder and mask decoder only. Median, 95th
  percentile and maximum; the ratio to the target (0.3 s on a CPU, 0.1 s on a GPU) is printed;
* ``propagate``: re-tracking from the corrected slices through the whole volume, seconds per slice;
* ``undo``: one interaction back.

Times are wall clock around the session call (what the server and Slicer wait for, without transport).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))


def _timed(call):
    start = time.perf_counter()
    value = call()
    return time.perf_counter() - start, value


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default=str(REPO / "Resources" / "demo_model"))
    parser.add_argument("--scan", default=str(REPO / "Resources" / "sample" / "example_ct_sm.nii.gz"))
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="auto")
    parser.add_argument("--clicks", type=int, default=30)
    parser.add_argument("--json", type=Path, help="also write the figures here")
    args = parser.parse_args(argv)

    import torch

    from MedicalSAM3Core.imaging.io import read_volume
    from MedicalSAM3Core.inference.engine import Segmenter
    from MedicalSAM3Core.inference.models import load_model

    load_s, model = _timed(lambda: load_model(args.model, device=args.device, dtype=args.dtype))
    volume = read_volume(args.scan)
    session = Segmenter(model).session(volume)
    n = session.n_slices
    body = volume.array > -500  # clicks land inside the body (CT); any voxel for other scans
    if not body.any():
        body = np.ones(volume.shape, bool)
    rng = np.random.default_rng(0)
    middle = n // 2
    obj = session.add_object("benchmark")

    def click_on(z: int, label: int):
        ys, xs = np.nonzero(body[z])
        i = int(rng.integers(len(ys)))
        return session.refine(obj, points=[(z, float(ys[i]), float(xs[i]))], labels=[label])

    sync = torch.cuda.synchronize if model.device.type == "cuda" else (lambda: None)
    first_s, _ = _timed(lambda: (click_on(middle, 1), sync()))
    cached = []
    slices = [middle, max(0, middle - n // 4), min(n - 1, middle + n // 4)]
    session.prepare(slices[1:])
    for k in range(args.clicks):
        z = slices[k % len(slices)]
        seconds, _ = _timed(lambda: (click_on(z, 1 if k % 2 == 0 else 0), sync()))
        cached.append(seconds)
    propagate_s, patch = _timed(lambda: (session.propagate(obj), sync())[0])
    undo_s, _ = _timed(session.undo)

    target = 0.1 if model.device.type == "cuda" else 0.3
    median = statistics.median(cached)
    p95 = float(np.percentile(cached, 95))
    figures = {
        "model": Path(args.model).name, "scan": Path(args.scan).name, "shape_zyx": list(volume.shape),
        "image_size": model.image_size, "device": str(model.device),
        "device_name": torch.cuda.get_device_name(model.device) if model.device.type == "cuda" else platform.processor()
        or platform.machine(),
        "threads": torch.get_num_threads(), "cpus": os.cpu_count(), "model_load_s": round(load_s, 3),
        "first_click_s": round(first_s, 4), "cached_click_median_s": round(median, 4),
        "cached_click_p95_s": round(p95, 4), "cached_click_max_s": round(max(cached), 4), "clicks": len(cached),
        "target_s": target, "target_over_median": round(target / median, 1),
        "propagate_s": round(propagate_s, 3), "propagate_s_per_slice": round(propagate_s / n, 4),
        "propagated_slices": len(patch.slices), "undo_s": round(undo_s, 4),
        "feature_cache_mb": round(session.cache.bytes / 2 ** 20, 1), "cached_slices": len(session.cache),
    }
    print(f"model {figures['model']} ({model.image_size} px) on {figures['device']} ({figures['threads']} threads), "
          f"scan {figures['scan']} {tuple(volume.shape)}")
    print(f"first click (slice encoded): {first_s * 1000:8.1f} ms")
    print(f"click, features cached:      {median * 1000:8.1f} ms median, {p95 * 1000:.1f} ms p95, "
          f"{max(cached) * 1000:.1f} ms max over {len(cached)} clicks")
    print(f"target {target * 1000:.0f} ms / median = {target / median:.1f}x  ->  "
          f"{'MET' if p95 <= target else 'NOT MET'} (p95 {'<=' if p95 <= target else '>'} target)")
    print(f"propagate {n} slices: {propagate_s:.2f} s ({propagate_s / n * 1000:.1f} ms per slice); "
          f"undo {undo_s * 1000:.1f} ms; feature cache {figures['feature_cache_mb']} MB for "
          f"{figures['cached_slices']} slices")
    if args.json:
        args.json.write_text(json.dumps(figures, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
