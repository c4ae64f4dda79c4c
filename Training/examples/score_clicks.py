"""How well a tracker answers one click, on TRAINING clips (issue #27): the quick check by which the tracker
runs of ``Training/configs/demo_tracker_*.yaml`` were judged before any of them met a validation scan.

    python Training/examples/score_clicks.py --config Training/configs/demo_tracker_clicks.yaml \\
        --model runs/demo_tracker_clicks/model --severity 0.5
    python Training/examples/score_clicks.py --config ... --model runs/demo_tracker_clicks/checkpoint.pt
    python Training/examples/score_clicks.py --config ... --model ... --lone    # a lone click instead

Clip ``i`` (``i < --clips``) is drawn by the config's own :class:`Training.tracker.ClipSource` (its data,
augmentation and ``min_area``) from the numpy generator seeded ``[7, i]``; on its prompted slice:

* by default, an imperfect copy of the truth (:func:`Training.tracker.corrupt_mask` at ``--severity``,
  drawn from the same generator) is the slice's current mask, given to the mask decoder exactly as the
  engine's ``VolumeSession.refine`` gives a text result (``mask_as_logits``), with one click at the centre
  of its largest error (:func:`Training.tracker.click_on_error`): the prompt ``refine`` of training;
* with ``--lone``, the slice has no mask and gets one click at the centre of the object: an annotator's
  first click where the text result found nothing.

Prints the Dice of the given mask and of the tracker's answer (its logits > 0 on the model's canvas),
overall and per concept, how many answers beat what they were given, and the Dice of the truth itself passed
through the decoder's mask grid and back (the prompt encoder's mask-input size, the size of its answers):
the finest answer the decoder can give. Training data, the model's own
canvas: a measure of fit, not of generalisation; models are chosen on the validation scans
(``simulate_annotator.py --case chest``). ``--model``: an exported model folder (the config's data, the
folder's weights) or a run's ``checkpoint.pt`` (the config builds the model, the checkpoint's weights are
loaded into it). Deterministic: the same model and config give the same figures.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from collections import defaultdict
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "Training" / "examples"))

from simulate_annotator import dice  # noqa: E402  (the annotator's Dice, empty against empty = 1)


def score(config: dict, model: Path, clips: int, severity: float, lone: bool) -> list[tuple]:
    """``(concept, Dice of the given mask, Dice of the answer, Dice of the truth on the decoder's grid)`` per
    scored clip (see the module docstring); a clip whose given mask has no error is skipped."""
    import torch

    from MedicalSAM3Core.common.errors import InputError
    from MedicalSAM3Core.inference.tracking import ObjectTrack, mask_as_logits
    from Training.tracker import canvas_logits, click_on_error, corrupt_mask
    from Training.train import Trainer

    if model.is_dir():
        config["model"]["init"], config["model"]["add_tracker"] = str(model.resolve()), None
    elif not model.is_file():
        raise InputError(f"--model {model}: neither an exported model folder nor a checkpoint file")
    config["train"]["tasks"] = ["tracker"]
    rows = []
    with tempfile.TemporaryDirectory() as scratch:
        config["train"]["output"] = scratch
        trainer = Trainer(config, output=Path(scratch))
        if model.is_file():
            state = torch.load(model, map_location="cpu", weights_only=True)
            if not isinstance(state, dict) or "model" not in state:
                raise InputError(f"--model {model}: not a training checkpoint (no 'model' entry)")
            trainer.bundle.full.load_state_dict(state["model"])
        video, detector = trainer.bundle.full.eval(), trainer.detector.eval()
        with torch.inference_mode():
            for i in range(clips):
                rng = np.random.default_rng([7, i])
                clip = trainer.clips.draw(rng)
                p = clip.prompt
                truth = clip.masks[p].cpu().numpy()
                given = np.zeros_like(truth) if lone else corrupt_mask(truth, rng, severity)
                click = click_on_error(given, truth)
                if click is None:
                    continue
                pixels = clip.pixel_values[p:p + 1].to(trainer.device)
                vision = detector.get_vision_features(pixel_values=pixels)
                track = ObjectTrack(video, [video.get_vision_features_for_tracker(vision)], device=trainer.device)
                previous = (mask_as_logits(torch.from_numpy(given).to(trainer.device), video.tracker_model)
                            if given.any() else None)
                step = track.step(0, points=torch.tensor([click[:2]]), labels=torch.tensor([click[2]]),
                                  previous_logits=previous, conditioning=True, memory=False)
                answer = (canvas_logits(step.low_res, truth.shape[-1])[0, 0] > 0).cpu().numpy()
                # the truth through the decoder's mask grid and back: the finest answer it can give
                grid = mask_as_logits(torch.from_numpy(truth).to(trainer.device), video.tracker_model)
                best = (canvas_logits(grid[None, None], truth.shape[-1])[0, 0] > 0).cpu().numpy()
                rows.append((clip.concept, dice(given, truth), dice(answer, truth), dice(best, truth)))
    return rows


def report(rows: list[tuple]) -> str:
    if not rows:
        return "no clip scored"
    given, answer, best = (np.array([r[k] for r in rows]) for k in (1, 2, 3))
    lines = [f"{len(rows)} clips: given {given.mean():.3f}, answer {answer.mean():.3f} (better in "
             f"{int((answer > given).sum())}), the truth on the decoder's mask grid {best.mean():.3f}",
             "| concept | clips | given | answer | truth on the grid |", "|---|---|---|---|---|"]
    by = defaultdict(list)
    for concept, *values in rows:
        by[concept].append(values)
    for concept, values in sorted(by.items()):
        g, a, b = np.mean(values, axis=0)
        lines.append(f"| {concept} | {len(values)} | {g:.3f} | {a:.3f} | {b:.3f} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", required=True, type=Path, help="the run's training config (its data)")
    parser.add_argument("--model", required=True, type=Path, help="exported model folder or checkpoint.pt")
    parser.add_argument("--clips", type=int, default=60)
    parser.add_argument("--severity", type=float, default=1.0, help="corrupt_mask's severity, 0 < s <= 1")
    parser.add_argument("--lone", action="store_true", help="a lone click on an empty slice instead")
    args = parser.parse_args(argv)
    from MedicalSAM3Core.common.errors import InputError
    from Training.train import load_config

    try:
        if args.clips < 1 or not 0 < args.severity <= 1:
            raise InputError(f"--clips must be >= 1 and --severity in (0, 1], got {args.clips} and {args.severity}")
        rows = score(load_config(args.config), args.model, args.clips, args.severity, args.lone)
    except InputError as error:
        print(f"score_clicks: {error}", file=sys.stderr)
        return 2
    print(report(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
