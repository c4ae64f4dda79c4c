"""The GPU check (``Testing/benchmarks/gpu_check.py``, issue #28) runs every step and every trial in its
CPU dry run and records figures, not errors, in its JSON and Markdown summary."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
SCRIPT = REPO / "Testing" / "benchmarks" / "gpu_check.py"


def _number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and value == value


@pytest.fixture(scope="module")
def dry_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("gpu-check")
    run = subprocess.run([sys.executable, str(SCRIPT), "--dry-run", str(out)], capture_output=True, text=True,
                         timeout=300, cwd=REPO)
    assert run.returncode == 0, run.stdout[-4000:] + run.stderr[-4000:]
    return out, json.loads((out / "gpu_check.json").read_text()), (out / "gpu_check.md").read_text()


@pytest.mark.slow
def test_every_step_records_figures(dry_run):
    out, data, _ = dry_run
    assert data["dry_run"] and data["finished"]
    steps = data["steps"]
    assert set(steps) == {"slices", "clicks", "baseline", "propagate", "agreement", "trials"}
    for name, step in steps.items():
        assert step["status"] == "done", (name, step.get("error"), step.get("traceback"), step.get("skipped"))
        assert "error" not in step and not step.get("skipped"), (name, step)
        assert _number(step["seconds"])
    for name in ("slices", "propagate"):
        runs = steps[name]["runs"]
        assert [r["K"] for r in runs] == [1, 2]
        assert all(_number(r["seconds"]) and r["seconds"] > 0 and _number(r["slices_per_s"]) for r in runs)
    assert all(r["tracks"] >= 1 for r in steps["propagate"]["runs"])
    clicks = steps["clicks"]
    assert clicks["clicks"] >= 3 and all(_number(clicks[key]) and clicks[key] > 0 for key in (
        "first_click_s", "click_median_s", "click_p95_s", "propagate_s", "propagate_s_per_slice"))
    assert clicks["propagate_slices"] == 6  # the dry run's whole volume (fewer slices than the window)
    baseline = steps["baseline"]["runs"]
    assert [r["K"] for r in baseline] == [1, 2]
    assert all(_number(r["ratio"]) and r["ratio"] > 0 and _number(r["differing_voxels"]) for r in baseline)
    agreement = steps["agreement"]
    assert len(agreement["prompts"]) == 2
    assert all(0 <= p["dice"] <= 1 and 0 <= p["iou"] <= 1 for p in agreement["prompts"])
    assert all(_number(agreement["raw"][key]) for key in ("score_max_abs_diff", "mask_prob_max_abs_diff"))
    assert "float16" in agreement["low_precision"]  # a low precision really compared (fp16 on a CPU)
    trials = steps["trials"]["trials"]
    assert set(trials) == {"batch_size", "channels_last", "pinned_memory", "compile"}
    for name, trial in trials.items():
        assert "error" not in trial, (name, trial.get("error"), trial.get("traceback"))
    for name in ("batch_size", "channels_last", "compile"):
        assert trials[name]["status"] == "done" and _number(trials[name]["speedup"]), trials[name]
    assert _number(trials["compile"]["first_call_s"]) and "eager" in trials["compile"]["applied"]
    assert set(trials["batch_size"]["runs"]) == {"2", "8"}
    pinned = trials["pinned_memory"]
    assert pinned["status"] == "not applicable" and pinned["reason"]
    assert _number(pinned["h2d_pageable_ms"]) and _number(pinned["volume_copies_s"])
    environment = data["environment"]
    for key in ("date_utc", "command", "torch", "transformers", "cuda", "cudnn", "gpu"):
        assert key in environment
    assert "--dry-run" in environment["command"]
    assert sorted(p.name for p in out.iterdir()) == ["gpu_check.json", "gpu_check.md"]  # no temporary files left


@pytest.mark.slow
def test_summary_states_the_targets(dry_run):
    _, data, summary = dry_run
    assert len(data["targets"]) == 4 and all(t["value"] is not None for t in data["targets"])
    for text in ("<= 20 s", ">= 5x", ">= 1.3x", "< 100 ms", "DRY RUN", "Recommendations"):
        assert text in summary
    assert summary.count("PASS") + summary.count("FAIL") >= 2
    for number in (1, 2, 3, 4, 5, 6):
        assert f"## {number}. " in summary
