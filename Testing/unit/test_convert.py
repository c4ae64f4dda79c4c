"""Converting original SAM3 / Medical SAM3 / MedSAM3-LoRA checkpoints (issue #3).

Without the real weights: state dicts are synthesised from the committed manifests of Meta's
SAM3 state dicts (``Testing/data/sam3_manifest_*.json``, key -> shape, dtype), as meta tensors
(shapes only, no memory), converted, and loaded into transformers' full-size models built on the
meta device with ``strict=True``. Tensor layout changes are checked on real tensors.
"""

from __future__ import annotations

import gzip
import json
import pickle
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from MedicalSAM3Core.cli import main
from MedicalSAM3Core.common.errors import ModelLoadError
from MedicalSAM3Core.inference import convert
from MedicalSAM3Core.inference.convert import (UNUSED_META_KEYS, build_clip_tokenizer, convert_state_dict,
                                               extract_state_dict, load_checkpoint, merge_lora)

DATA = Path(__file__).resolve().parents[1] / "data"
REPO = Path(__file__).resolve().parents[2]


def manifest(name: str) -> dict[str, torch.Tensor]:
    data = json.loads((DATA / f"sam3_manifest_{name}.json").read_text())
    assert "sam3" in data["generated_by"]
    return {k: torch.empty(shape, dtype=getattr(torch, dtype), device="meta") for k, (shape, dtype) in
            data["keys"].items()}


@pytest.fixture(scope="module")
def video_state() -> dict[str, torch.Tensor]:
    return manifest("video")


def load_strict(converted) -> torch.nn.Module:
    """Load into the transformers model (meta device): every key consumed, every parameter filled."""
    from transformers import Sam3Model, Sam3VideoModel

    cls = Sam3VideoModel if converted.model_type == "sam3_video" else Sam3Model
    with torch.device("meta"):
        model = cls(converted.config)
    result = model.load_state_dict(converted.state_dict, strict=True, assign=True)
    assert not result.missing_keys and not result.unexpected_keys
    for name, tensor in model.state_dict().items():
        assert tuple(tensor.shape) == tuple(converted.state_dict[name].shape), name
    return model


def assert_only_known_drops(dropped: list[str]) -> None:
    import re

    for key in dropped:
        stripped = key.removeprefix("detector.")
        assert any(re.fullmatch(p, stripped) for p in UNUSED_META_KEYS) or ".sam2_convs." in key, key


def test_sam3_pt_layout_converts_to_the_video_model(video_state):
    converted = convert_state_dict(video_state, "sam3.pt")
    assert (converted.model_type, converted.image_size) == ("sam3_video", 1008)
    load_strict(converted)
    assert_only_known_drops(converted.dropped)
    assert len(converted.dropped) == 32 + 6  # 32 ViT rotary tables, 6 point-prompt projections


def test_medical_sam3_3d_at_504_rebuilds_resolution_dependent_buffers():
    state = manifest("video_504")
    converted = convert_state_dict(state, "medical_sam3_3d.pt")
    assert (converted.model_type, converted.image_size) == ("sam3_video", 504)
    config = converted.config
    assert config.detector_config.vision_config.backbone_config.image_size == 504
    assert config.tracker_config.image_size == 504
    assert config.tracker_config.prompt_encoder_config.image_size == 504
    assert list(config.tracker_config.memory_attention_rope_feat_sizes) == [36, 36]
    assert config.detector_config.vision_config.backbone_feature_sizes == [[144, 144], [72, 72], [36, 36]]
    assert config.low_res_mask_size == 144
    assert all(k.endswith("freqs_cis") or "points_" in k for k in converted.dropped)  # never copied
    load_strict(converted)


def test_image_model_layout_without_prefix_converts_to_sam3():
    converted = convert_state_dict(manifest("image"), "medical_sam3_2d.pt")
    assert (converted.model_type, converted.image_size) == ("sam3", 1008)
    load_strict(converted)


def test_detector_prefixed_2d_checkpoint_in_a_model_wrapper(video_state):
    detector_only = {k: v for k, v in video_state.items() if k.startswith("detector.")}
    wrapped = {"model": detector_only, "epoch": 7, "optimizer_step": 1000}
    state = extract_state_dict(wrapped, "medical_sam3_2d.pt")
    converted = convert_state_dict(state, "medical_sam3_2d.pt")
    assert converted.model_type == "sam3"
    load_strict(converted)
    assert any(".sam2_convs." in k for k in converted.dropped)  # the tracker neck has no place in Sam3Model


def test_ddp_module_prefix_and_state_dict_wrapper(video_state):
    state = extract_state_dict({"state_dict": {f"module.{k}": v for k, v in video_state.items()}})
    load_strict(convert_state_dict(state))


def test_image_model_with_instance_interactivity_keeps_its_tracker(video_state):
    state = {k.removeprefix("detector."): v for k, v in video_state.items() if k.startswith("detector.")}
    state.update({"inst_interactive_predictor.model." + k.removeprefix("tracker."): v
                  for k, v in video_state.items() if k.startswith("tracker.")})
    converted = convert_state_dict(state)
    assert converted.model_type == "sam3_video"
    load_strict(converted)


def test_unknown_key_is_an_error_that_names_it(video_state):
    state = dict(video_state)
    state["detector.backbone.vision_backbone.trunk.blocks.0.attn.lora_magnitude"] = torch.empty(3, device="meta")
    with pytest.raises(ModelLoadError, match="lora_magnitude"):
        convert_state_dict(state)


def test_missing_key_is_an_error_that_names_it(video_state):
    state = dict(video_state)
    del state["tracker.sam_mask_decoder.iou_token.weight"]
    with pytest.raises(ModelLoadError, match=r"missing.*tracker_model\.mask_decoder\.iou_token\.weight"):
        convert_state_dict(state)


def test_wrong_shape_is_an_error(video_state):
    state = dict(video_state)
    state["detector.transformer.decoder.query_embed.weight"] = torch.empty(100, 256, device="meta")
    with pytest.raises(ModelLoadError, match="query_embed.*shape|shape.*query_embed"):
        convert_state_dict(state)


def test_checkpoint_of_another_model_is_refused():
    other = {"encoder.layer.0.weight": torch.zeros(2, 2), "classifier.bias": torch.zeros(2)}
    with pytest.raises(ModelLoadError, match="not a SAM3 checkpoint.*classifier.bias"):
        convert_state_dict(other, "resnet.pt")


def test_tensor_layouts_on_real_values(video_state):
    """q/k/v split order, class-token row dropped, CLIP projection transposed, point embeddings stacked."""
    state = dict(video_state)
    real = {}
    for key in ["detector.backbone.vision_backbone.trunk.blocks.3.attn.qkv.weight",
                "detector.backbone.vision_backbone.trunk.pos_embed",
                "detector.backbone.language_backbone.encoder.text_projection",
                "detector.backbone.language_backbone.encoder.transformer.resblocks.0.attn.in_proj_bias",
                "detector.transformer.decoder.layers.2.ca_text.in_proj_weight",
                "tracker.sam_prompt_encoder.pe_layer.positional_encoding_gaussian_matrix",
                "tracker.maskmem_backbone.mask_downsampler.encoder.12.weight",
                "tracker.maskmem_backbone.mask_downsampler.encoder.4.bias",
                *[f"tracker.sam_prompt_encoder.point_embeddings.{i}.weight" for i in range(4)]]:
        real[key] = state[key] = torch.randn(video_state[key].shape)
    out = convert_state_dict(state).state_dict
    qkv = real["detector.backbone.vision_backbone.trunk.blocks.3.attn.qkv.weight"]
    layer = "detector_model.vision_encoder.backbone.layers.3.attention"
    for i, name in enumerate("qkv"):
        assert torch.equal(out[f"{layer}.{name}_proj.weight"], qkv[1024 * i:1024 * (i + 1)])
    pos = real["detector.backbone.vision_backbone.trunk.pos_embed"]
    assert torch.equal(out["detector_model.vision_encoder.backbone.embeddings.position_embeddings"], pos[:, 1:])
    proj = real["detector.backbone.language_backbone.encoder.text_projection"]  # Meta: x @ P, P [1024, 512]
    hf_proj = out["detector_model.text_encoder.text_projection.weight"]  # transformers: x @ W.T, W [512, 1024]
    x = torch.randn(2, 1024)
    assert torch.allclose(x @ proj, torch.nn.functional.linear(x, hf_proj))
    in_bias = real["detector.backbone.language_backbone.encoder.transformer.resblocks.0.attn.in_proj_bias"]
    text_attn = "detector_model.text_encoder.text_model.encoder.layers.0.self_attn"
    assert torch.equal(out[f"{text_attn}.v_proj.bias"], in_bias[2048:])
    ca_text = real["detector.transformer.decoder.layers.2.ca_text.in_proj_weight"]
    assert torch.equal(out["detector_model.detr_decoder.layers.2.text_cross_attn.k_proj.weight"], ca_text[256:512])
    gauss = real["tracker.sam_prompt_encoder.pe_layer.positional_encoding_gaussian_matrix"]
    assert torch.equal(out["tracker_model.prompt_encoder.shared_embedding.positional_embedding"], gauss)
    assert torch.equal(out["tracker_model.shared_image_embedding.positional_embedding"], gauss)
    points = torch.cat([real[f"tracker.sam_prompt_encoder.point_embeddings.{i}.weight"] for i in range(4)])
    assert torch.equal(out["tracker_model.prompt_encoder.point_embed.weight"], points)
    down = "tracker_model.memory_encoder.mask_downsampler"
    assert torch.equal(out[f"{down}.final_conv.weight"], real["tracker.maskmem_backbone.mask_downsampler.encoder.12.weight"])
    assert torch.equal(out[f"{down}.layers.1.layer_norm.bias"],
                       real["tracker.maskmem_backbone.mask_downsampler.encoder.4.bias"])


def test_no_two_converted_weights_share_a_tensor(video_state):
    """The tracker's Fourier matrix fills two transformers parameters: each gets its own tensor.

    One tensor under two keys makes the loaded parameters share storage, and transformers'
    ``save_pretrained`` refuses shared tensors that are not declared tied, so no converted video
    model (SAM3 as published, Medical SAM3 3D) could be written (found by Testing/parity/parity_tracker.py).
    """
    state = dict(video_state)
    key = "tracker.sam_prompt_encoder.pe_layer.positional_encoding_gaussian_matrix"
    state[key] = torch.randn(video_state[key].shape)
    out = convert_state_dict(state).state_dict
    prompt = out["tracker_model.prompt_encoder.shared_embedding.positional_embedding"]
    image = out["tracker_model.shared_image_embedding.positional_embedding"]
    assert torch.equal(prompt, state[key]) and torch.equal(image, state[key])
    real = [(name, t) for name, t in out.items() if t.device.type != "meta"]
    pointers = [(t.data_ptr(), tuple(t.shape)) for _, t in real]
    assert len(set(pointers)) == len(pointers), [name for name, _ in real]
    model = load_strict(convert_state_dict(state))
    tracker = model.tracker_model
    assert tracker.prompt_encoder.shared_embedding.positional_embedding is not \
        tracker.shared_image_embedding.positional_embedding


# ---- LoRA ---------------------------------------------------------------------------------


def test_lora_merge_matches_the_adapted_layer_numerically():
    torch.manual_seed(0)
    rank, alpha = 16, 32.0
    base_layer = torch.nn.Linear(48, 40)
    lora_a, lora_b = torch.randn(rank, 48) * 0.1, torch.randn(40, rank) * 0.1
    x = torch.randn(5, 48)
    adapted = base_layer(x) + (alpha / rank) * (x @ lora_a.t() @ lora_b.t())  # what a LoRA layer computes
    name = "backbone.vision_backbone.trunk.blocks.0.mlp.fc1"
    base = {f"detector.{name}.weight": base_layer.weight.detach().clone(), f"detector.{name}.bias": base_layer.bias}
    for adapter in ({f"{name}.lora_A": lora_a, f"{name}.lora_B": lora_b},  # MedSAM3 style, image-model names
                    {f"base_model.model.detector.{name}.lora_A.default.weight": lora_a,  # PEFT
                     f"base_model.model.detector.{name}.lora_B.default.weight": lora_b},
                    {name: {"lora_A": lora_a.t(), "lora_B": lora_b.t()}}):  # nested, stored transposed
        merged = merge_lora(base, adapter, alpha=alpha)
        out = torch.nn.functional.linear(x, merged[f"detector.{name}.weight"], merged[f"detector.{name}.bias"])
        assert torch.allclose(out, adapted, atol=1e-5)
        assert torch.equal(base[f"detector.{name}.weight"], base_layer.weight)  # the base is not modified


def test_lora_on_every_targeted_layer_kind_then_strict_conversion(video_state):
    targets = ["backbone.vision_backbone.trunk.blocks.0.attn.qkv", "backbone.vision_backbone.trunk.blocks.0.attn.proj",
               "backbone.vision_backbone.trunk.blocks.5.mlp.fc1", "backbone.vision_backbone.trunk.blocks.5.mlp.fc2",
               "backbone.language_backbone.encoder.transformer.resblocks.1.mlp.c_fc",
               "backbone.language_backbone.encoder.transformer.resblocks.1.mlp.c_proj",
               "backbone.language_backbone.encoder.transformer.resblocks.1.attn.out_proj",
               "transformer.encoder.layers.2.linear1", "transformer.decoder.layers.3.linear2",
               "transformer.decoder.layers.3.self_attn.out_proj"]
    adapter = {}
    for target in targets:
        out_features, in_features = video_state[f"detector.{target}.weight"].shape
        adapter[f"{target}.lora_A"] = torch.empty(16, in_features, device="meta")
        adapter[f"{target}.lora_B"] = torch.empty(out_features, 16, device="meta")
    merged = merge_lora(video_state, adapter)
    load_strict(convert_state_dict(merged))


def test_lora_for_another_model_is_refused(video_state):
    adapter = {"unet.down.0.attn.to_q.lora_A": torch.zeros(4, 8), "unet.down.0.attn.to_q.lora_B": torch.zeros(8, 4)}
    with pytest.raises(ModelLoadError, match="match no layer.*unet.down.0.attn.to_q"):
        merge_lora(video_state, adapter)
    with pytest.raises(ModelLoadError, match="only one of A/B"):
        merge_lora(video_state, {"x.lora_A": torch.zeros(4, 8)})


# ---- reading files ------------------------------------------------------------------------


def test_truncated_checkpoint(tmp_path):
    path = tmp_path / "sam3.pt"
    torch.save({"detector.a": torch.randn(1000)}, path)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(ModelLoadError, match="truncated or corrupt"):
        load_checkpoint(path)


def test_file_that_is_not_a_checkpoint(tmp_path):
    path = tmp_path / "notes.pt"
    path.write_text("these are not weights\n")
    with pytest.raises(ModelLoadError, match="not a PyTorch checkpoint"):
        load_checkpoint(path)
    empty = tmp_path / "empty.pt"
    empty.write_bytes(b"")
    with pytest.raises(ModelLoadError, match="empty"):
        load_checkpoint(empty)


class Payload:
    """Anything that is not a tensor: unpickling it would run arbitrary code paths."""

    def __reduce__(self):
        return (print, ("this ran while loading",))


def test_pickle_that_is_not_weights_only_is_refused(tmp_path, capsys):
    path = tmp_path / "evil.pt"
    torch.save({"model": {"w": torch.zeros(1)}, "hook": Payload()}, path)
    with pytest.raises(ModelLoadError, match="refused.*arbitrary Python code"):
        load_checkpoint(path)
    assert "this ran" not in capsys.readouterr().out
    raw = tmp_path / "raw.pkl"
    raw.write_bytes(pickle.dumps(Payload()))
    with pytest.raises(ModelLoadError, match="refused|not a PyTorch checkpoint"):
        load_checkpoint(raw)
    assert "this ran" not in capsys.readouterr().out


def test_checkpoint_of_another_model_file_end_to_end(tmp_path):
    path = tmp_path / "linear.pt"
    torch.save(torch.nn.Linear(3, 2).state_dict(), path)
    with pytest.raises(ModelLoadError, match="not a SAM3 checkpoint"):
        convert.convert_checkpoint(path, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_cli_convert_reports_bad_input_with_exit_code_2(tmp_path):
    bad = tmp_path / "bad.pt"
    bad.write_text("nope")
    proc = subprocess.run([sys.executable, "-m", "MedicalSAM3Core", "convert", str(bad), str(tmp_path / "out")],
                          capture_output=True, text=True, cwd=REPO)
    assert proc.returncode == 2 and "not a PyTorch checkpoint" in proc.stderr


def _error_line(err: str) -> str:
    """The one ``medsam3: error:`` sentence of ``err`` (asserting there is one, and no traceback)."""
    errors = [line for line in err.splitlines() if line.startswith("medsam3: error: ")]
    assert len(errors) == 1 and "Traceback" not in err, err
    return errors[0]


@pytest.mark.parametrize("state, key", [({1: torch.zeros(1)}, "1 (a int)"),
                                        ({("a",): torch.zeros(1)}, "('a',) (a tuple)"),
                                        ({"model": {"w": torch.zeros(1), None: torch.zeros(1)}}, "None (a NoneType)")])
def test_cli_convert_names_a_key_that_is_not_a_parameter_name(tmp_path, capsys, state, key):
    """Issue #30 item 7: a state dict with non-string keys used to end in a traceback."""
    path = tmp_path / "odd.pt"
    torch.save(state, path)
    code = main(["convert", str(path), str(tmp_path / "out")])
    error = _error_line(capsys.readouterr().err)
    assert code == 2 and str(path) in error and f"not parameter names, e.g. {key}" in error, error
    assert not (tmp_path / "out").exists()


def test_an_adapter_with_a_key_that_is_not_a_name_is_refused():
    with pytest.raises(ModelLoadError, match=r"adapter\.pt: 1 key\(s\) are not parameter names, e\.g\. 7"):
        merge_lora({"w.weight": torch.zeros(2, 2)}, {7: torch.zeros(1, 2)}, source="adapter.pt")


@pytest.fixture
def no_checkpoint_read(monkeypatch):
    """Fails the test if the checkpoint is read: the refusal must come before the work."""
    def load_checkpoint(path):
        raise AssertionError("the checkpoint was read before the refusal")

    monkeypatch.setattr(convert, "load_checkpoint", load_checkpoint)


def test_cli_convert_into_an_existing_file_is_refused_before_the_work(tmp_path, capsys, no_checkpoint_read):
    checkpoint, out = tmp_path / "sam3.pt", tmp_path / "out"
    torch.save({"w": torch.zeros(1)}, checkpoint)
    out.write_text("a file")
    code = main(["convert", str(checkpoint), str(out)])
    error = _error_line(capsys.readouterr().err)
    assert code == 2 and f"{out} is a file, not a folder" in error, error
    assert out.read_text() == "a file"


def test_cli_make_tiny_model_into_an_existing_file_is_refused_before_the_work(tmp_path, capsys, monkeypatch):
    from MedicalSAM3Core.inference import tiny

    def build_tiny_model(*args, **kwargs):
        raise AssertionError("the model was built before the refusal")

    monkeypatch.setattr(tiny, "build_tiny_model", build_tiny_model)
    out = tmp_path / "tiny"
    out.write_text("a file")
    code = main(["make-tiny-model", str(out)])
    error = _error_line(capsys.readouterr().err)
    assert code == 2 and f"{out} is a file, not a folder" in error, error


def test_cli_convert_checks_write_access_and_free_space_before_the_work(tmp_path, capsys, monkeypatch,
                                                                        no_checkpoint_read):
    """Room for about the checkpoint's size is needed (the weights keep their dtype), and a folder
    where no file can be created (root passes ``os.access`` even there) is refused."""
    import errno
    import os
    import shutil
    from types import SimpleNamespace

    from MedicalSAM3Core.imaging import outputs

    checkpoint = tmp_path / "sam3.pt"
    torch.save({"w": torch.zeros(1000)}, checkpoint)
    free = checkpoint.stat().st_size  # less than the checkpoint plus its tokenizer and configs
    monkeypatch.setattr(shutil, "disk_usage", lambda path: SimpleNamespace(total=10 ** 9, used=10 ** 9 - free,
                                                                           free=free))
    code = main(["convert", str(checkpoint), str(tmp_path / "out")])
    error = _error_line(capsys.readouterr().err)
    assert code == 2 and f"not enough free space in {tmp_path}" in error, error

    def read_only(folder):
        raise OSError(errno.EROFS, os.strerror(errno.EROFS), str(folder))

    monkeypatch.setattr(outputs, "_probe", read_only)
    code = main(["convert", str(checkpoint), str(tmp_path / "out")])
    error = _error_line(capsys.readouterr().err)
    assert code == 2 and f"cannot write to folder {tmp_path}: Read-only file system" in error, error


def test_cli_convert_failing_to_write_leaves_nothing_behind(tmp_path, capsys, monkeypatch):
    """The disk filling up while the weights are saved (safetensors reports it as its own error)."""
    from safetensors import SafetensorError

    def disk_fills_up(converted, folder):
        (Path(folder) / "model.safetensors").write_bytes(b"partial")
        raise SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)")

    conversion = convert.ConvertedCheckpoint(state_dict={}, config=None, model_type="sam3_video", image_size=56,
                                             dropped=[])
    monkeypatch.setattr(convert, "convert_state_dict", lambda state, source, image_size=None: conversion)
    monkeypatch.setattr(convert, "build_clip_tokenizer", lambda path: None)
    monkeypatch.setattr(convert, "save_converted", disk_fills_up)
    checkpoint = tmp_path / "sam3.pt"
    torch.save({"w": torch.zeros(1)}, checkpoint)
    bpe = tmp_path / "bpe.txt.gz"
    bpe.write_bytes(b"")
    code = main(["convert", str(checkpoint), str(tmp_path / "out"), "--bpe", str(bpe)])
    error = _error_line(capsys.readouterr().err)
    assert code == 2 and "cannot write the converted model" in error and "No space left on device" in error, error
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bpe.txt.gz", "sam3.pt"]


# ---- tokenizer ----------------------------------------------------------------------------


def test_clip_tokenizer_from_a_bpe_file(tmp_path):
    bpe = tmp_path / "bpe.txt.gz"
    with gzip.open(bpe, "wt", encoding="utf-8") as handle:
        handle.write("#version\nl i\nv e\nli ve\nlive r</w>\n")
    tokenizer = build_clip_tokenizer(bpe)
    vocab = tokenizer.get_vocab()
    assert len(vocab) == 512 + 4 + 2
    assert vocab["<|startoftext|>"] == 516 and vocab["<|endoftext|>"] == 517
    ids = tokenizer("Liver")["input_ids"]
    assert ids == [516, vocab["liver</w>"], 517]  # one merged token: "liver</w>"
    assert tokenizer.model_max_length == 32


def test_real_clip_vocabulary_when_available():
    try:
        bpe = convert.find_clip_bpe()
    except ModelLoadError as error:
        assert "open_clip_torch" in str(error)
        pytest.skip("no CLIP BPE file here (open_clip_torch not installed)")
    tokenizer = build_clip_tokenizer(bpe)
    assert len(tokenizer) == 49408
    assert tokenizer("a photo")["input_ids"] == [49406, 320, 1125, 49407]  # OpenAI CLIP's ids


# ---- convert on first use -----------------------------------------------------------------


def test_pt_model_is_converted_once_into_a_sha256_cache(tmp_path, monkeypatch, tiny_model_dir):
    import shutil

    from MedicalSAM3Core.inference import models

    calls = []

    def fake_convert(checkpoint, out_dir, **kwargs):  # the real conversion needs full-size weights
        calls.append(Path(checkpoint))
        shutil.copytree(tiny_model_dir, out_dir)
        (Path(out_dir) / convert.CONVERTED_MARKER).write_text("{}")
        return Path(out_dir)

    monkeypatch.setenv("MEDSAM3_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(convert, "convert_checkpoint", fake_convert)
    checkpoint = tmp_path / "medical_sam3.pt"
    checkpoint.write_bytes(b"pretend weights")
    first = models.resolve_model_dir(str(checkpoint))
    assert first == tmp_path / "cache" / "converted" / convert.file_sha256(checkpoint)
    renamed = tmp_path / "renamed.pt"
    checkpoint.rename(renamed)
    assert models.resolve_model_dir(str(renamed)) == first and len(calls) == 1  # same bytes: cached
    loaded = models.load_model(str(renamed), device="cpu")
    assert loaded.video is not None and len(calls) == 1
    renamed.write_bytes(b"other weights")
    assert models.resolve_model_dir(str(renamed)) != first and len(calls) == 2


def test_hub_checkpoint_file_offline_is_a_clear_error(monkeypatch):
    from MedicalSAM3Core.inference import models

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ModelLoadError, match="not in the local Hugging Face cache"):
        models.resolve_model_dir("Chongcong/Medical-SAM3/medical_sam3.pt")


@pytest.mark.slow
def test_convert_command_writes_a_folder_that_segments(tmp_path, monkeypatch, phantom):
    """The writing half end to end, on a tiny model with real tensors: config, safetensors, tokenizer
    built from a BPE file, preprocessing, the conversion record; then load_model + segment.

    (The mapping itself is what the manifest tests and Testing/parity check; here it is replaced by
    the tiny transformers model's own state dict.)
    """
    from transformers import Sam3VideoModel

    from MedicalSAM3Core.common.options import SegmentOptions
    from MedicalSAM3Core.common.volume import Volume
    from MedicalSAM3Core.inference.engine import Segmenter
    from MedicalSAM3Core.inference.models import load_model
    from MedicalSAM3Core.inference.tiny import tiny_video_config

    bpe = tmp_path / "bpe.txt.gz"
    with gzip.open(bpe, "wt", encoding="utf-8") as handle:
        handle.write("#version\nl i\nv e\nli ve\nlive r</w>\n")
    config = tiny_video_config()
    config.detector_config.text_config.vocab_size = 512 + 4 + 2
    torch.manual_seed(0)
    tiny = Sam3VideoModel(config).eval()

    def tiny_conversion(state, source="checkpoint", image_size=None):
        assert set(state) == {"detector.backbone.vision_backbone.trunk.pos_embed"}
        return convert.ConvertedCheckpoint(state_dict=dict(tiny.state_dict()), config=config,
                                           model_type="sam3_video", image_size=56, dropped=[])

    monkeypatch.setattr(convert, "convert_state_dict", tiny_conversion)
    checkpoint = tmp_path / "tiny.pt"
    torch.save({"model": {"detector.backbone.vision_backbone.trunk.pos_embed": torch.zeros(1, 17, 64)}}, checkpoint)
    out = tmp_path / "converted"
    assert main(["convert", str(checkpoint), str(out), "--bpe", str(bpe)]) == 0
    assert {"config.json", "model.safetensors", "tokenizer_config.json", "preprocessor_config.json",
            convert.CONVERTED_MARKER} <= {p.name for p in out.iterdir()}
    assert json.loads((out / convert.CONVERTED_MARKER).read_text())["model_type"] == "sam3_video"
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".converted.")]  # no staging left behind
    model = load_model(str(out), device="cpu")
    assert model.image_size == 56 and model.tokenizer("liver")["input_ids"] == [516, 515, 517]
    for name, tensor in model.video.state_dict().items():
        assert torch.equal(tensor, tiny.state_dict()[name]), name
    result = Segmenter(model).segment(Volume(phantom, modality="CT"), ["liver"], SegmentOptions(mode="slices"))
    assert result.label_map.shape == phantom.shape
    assert main(["convert", str(checkpoint), str(out), "--bpe", str(bpe)]) == 2  # never overwrites
