"""Slice <-> model canvas placement: stretch (SAM3's own) and fixed physical field of view."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from MedicalSAM3Core.common.errors import InputError
from MedicalSAM3Core.preprocessing.layout import SliceLayout, pixel_spacing


def _disk(shape, centre, radius_mm, spacing):
    rows, cols = np.meshgrid(np.arange(shape[0]) * spacing[0], np.arange(shape[1]) * spacing[1], indexing="ij")
    return ((rows - centre[0]) ** 2 + (cols - centre[1]) ** 2 < radius_mm ** 2).astype(np.float32)


def test_stretch_is_exactly_the_plain_resize():
    x = torch.rand(2, 1, 37, 53)
    layout = SliceLayout.stretch((37, 53), 64)
    expected = F.interpolate(x, size=(64, 64), mode="bilinear", align_corners=False, antialias=True)
    assert torch.equal(layout.place(x), expected)
    maps = torch.rand(2, 3, 16, 16)
    assert torch.equal(layout.to_slice(maps), F.interpolate(maps, size=(37, 53), mode="bilinear", align_corners=False))


def test_field_of_view_keeps_physical_size_and_round_trips():
    spacing = (2.0, 1.0)  # anisotropic pixels: rows 2 mm, cols 1 mm
    shape = (100, 240)  # 200 x 240 mm
    disk = _disk(shape, (100.0, 120.0), 40.0, spacing)
    layout = SliceLayout.field_of_view(shape, spacing, image_size=128, fov_mm=320.0)
    assert layout.resized == (80, 96) and layout.offset == (24, 16)
    canvas = layout.place(torch.from_numpy(disk)[None, None])[0, 0].numpy()
    # the disk is round on the canvas (0.4 px per mm both ways): 80 mm across = 32 px each way
    rows, cols = np.nonzero(canvas > 0.5)
    assert abs((rows.max() - rows.min() + 1) - 32) <= 1 and abs((cols.max() - cols.min() + 1) - 32) <= 1
    assert canvas[:20].max() == 0 and canvas[-20:].max() == 0  # padding outside the scan
    back = layout.to_slice(torch.from_numpy(canvas)[None, None])[0, 0].numpy() > 0.5
    iou = (back & (disk > 0)).sum() / (back | (disk > 0)).sum()
    assert iou > 0.93


def test_field_of_view_crops_and_cropped_parts_are_nothing():
    layout = SliceLayout.field_of_view((200, 200), (1.0, 1.0), image_size=50, fov_mm=100.0)
    assert layout.resized == (100, 100) and layout.offset == (-25, -25)
    ones = torch.ones(1, 1, 200, 200)
    canvas = layout.place(ones)
    assert canvas.shape == (1, 1, 50, 50) and torch.allclose(canvas, torch.ones(()))
    back = layout.to_slice(torch.full((1, 1, 25, 25), 5.0), fill=-7.0)[0, 0]
    assert back[100, 100] == pytest.approx(5.0) and back[0, 0] == pytest.approx(-7.0)
    assert back[:40].max() == pytest.approx(-7.0) and back[60:140, 60:140].min() == pytest.approx(5.0)


def test_exact_field_of_view_is_the_stretch_layout():
    layout = SliceLayout.field_of_view((64, 64), (0.5, 0.5), image_size=64, fov_mm=32.0)
    assert layout.is_stretch
    with pytest.raises(InputError, match="positive"):
        SliceLayout.field_of_view((64, 64), (0.5, 0.5), 64, 0.0)


def test_pixel_spacing_per_slice_axis():
    spacing_xyz = (0.7, 0.8, 3.0)
    assert pixel_spacing(spacing_xyz, 0) == (0.8, 0.7)  # axial (k): rows y, cols x
    assert pixel_spacing(spacing_xyz, 1) == (3.0, 0.7)  # j: rows z, cols x
    assert pixel_spacing(spacing_xyz, 2) == (3.0, 0.8)  # i: rows z, cols y


def test_engine_applies_the_models_field_of_view(tiny_model_dir, tmp_path, phantom):
    """A model saved with field_of_view_mm is fed on that canvas; outputs land on the input grid."""
    import shutil

    from MedicalSAM3Core.common.options import SegmentOptions
    from MedicalSAM3Core.common.volume import Geometry, Volume
    from MedicalSAM3Core.inference.engine import Segmenter
    from MedicalSAM3Core.inference.models import load_model

    model_dir = tmp_path / "fov_model"
    shutil.copytree(tiny_model_dir, model_dir)
    prep_path = model_dir / "medsam3_preprocessing.json"
    prep = json.loads(prep_path.read_text()) if prep_path.exists() else {}
    geometry = Geometry(spacing=(1.5, 1.5, 4.0))
    rows_mm = phantom.shape[1] * 1.5
    options = SegmentOptions(mode="slices", score_threshold=0.2)
    results, inputs = {}, {}
    for name, fov in (("stretch", None), ("exact", rows_mm), ("wide", 2 * rows_mm)):
        prep_path.write_text(json.dumps({**prep, "field_of_view_mm": fov}))
        # exact: a square field equal to the slice's extent only when rows == cols
        volume = Volume(phantom[:, :, :phantom.shape[1]].copy(), geometry, modality="CT")
        model = load_model(str(model_dir), device="cpu")
        seen, encode = [], model.detector.get_vision_features

        def spy(pixel_values, **kwargs):
            seen.append(pixel_values.clone())
            return encode(pixel_values=pixel_values, **kwargs)

        model.detector.get_vision_features = spy
        results[name] = Segmenter(model).segment(volume, ["liver"], options)
        assert results[name].shape == volume.shape and results[name].geometry == geometry
        inputs[name] = torch.cat(seen)
    np.testing.assert_array_equal(results["exact"].label_map, results["stretch"].label_map)
    assert torch.equal(inputs["exact"], inputs["stretch"])
    # wide: the scan fills the middle half of the canvas, the rest is padding (0 after windowing)
    size = inputs["wide"].shape[-1]
    border = (0.0 - model.mean[0]) / model.std[0]
    quarter = size // 4
    assert torch.all(inputs["wide"][..., : quarter - 1, :] == border)
    assert torch.all(inputs["wide"][..., :, size - quarter + 1:] == border)
    assert not torch.all(inputs["wide"][..., quarter + 1: size - quarter - 1, quarter + 1: size - quarter - 1] == border)


def test_bad_preprocessing_file_is_a_model_error(tmp_path):
    from MedicalSAM3Core.common.errors import ModelLoadError
    from MedicalSAM3Core.inference.models import read_preprocessing

    assert read_preprocessing(tmp_path) == {}
    for content, message in (('{"field_of_view_mm": -3}', "positive"), ('{"window": "kidney"}', "window"),
                             ("{nope", "invalid JSON")):
        (tmp_path / "medsam3_preprocessing.json").write_text(content)
        with pytest.raises(ModelLoadError, match=message):
            read_preprocessing(tmp_path)
