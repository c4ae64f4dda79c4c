"""The body-mask policy: arms and table become air, the trunk (with the air inside it) stays; the
engine feeds exactly what training fed, on every grid, and keeps the input geometry."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch

from MedicalSAM3Core.preprocessing.body import (AIR_HU, BodyMaskedSlices, body_mask, mask_outside_body,
                                                uses_body_mask)


def _torso_slice(rows=200, cols=260, row_mm=1.0, col_mm=1.0, arm=True, table=True):
    """A CT slice in HU on a grid of ``row_mm x col_mm`` pixels, every shape placed in millimetres:
    a trunk ellipse with two enclosed lungs, an arm 12 mm beside it, and a thin table under it."""
    r, c = np.meshgrid((np.arange(rows) + 0.5) * row_mm, (np.arange(cols) + 0.5) * col_mm, indexing="ij")
    cy, cx = rows * row_mm / 2, cols * col_mm / 2
    hu = np.full((rows, cols), -1000.0, dtype=np.float32)
    parts = {"trunk": ((r - cy) / 70) ** 2 + ((c - cx) / 95) ** 2 < 1}
    hu[parts["trunk"]] = 40.0
    lungs = [((r - cy) / 30) ** 2 + ((c - cx + s * 45) / 25) ** 2 < 1 for s in (-1, 1)]
    parts["lungs"] = lungs[0] | lungs[1]
    hu[parts["lungs"]] = -850.0
    if arm:
        parts["arm"] = ((r - cy) / 22) ** 2 + ((c - (cx + 95 + 12 + 20)) / 20) ** 2 < 1
        hu[parts["arm"]] = 60.0
    if table:
        parts["table"] = (np.abs(r - (cy + 70 + 10)) < 2.5) & (np.abs(c - cx) < 120)
        hu[parts["table"]] = 100.0
    return hu, parts


@pytest.mark.parametrize("row_mm, col_mm", [(1.0, 1.0), (0.7, 0.7), (2.0, 0.8)])
def test_trunk_and_its_air_stay_arm_and_table_go(row_mm, col_mm):
    rows, cols = int(round(200 / row_mm)), int(round(260 / col_mm))
    hu, parts = _torso_slice(rows, cols, row_mm, col_mm)
    mask = body_mask(hu, (row_mm, col_mm))
    assert mask[parts["trunk"]].mean() > 0.995 and mask[parts["lungs"]].all()  # lungs are inside the body
    assert not mask[parts["arm"]].any() and not mask[parts["table"]].any()
    masked = mask_outside_body(hu[None], (row_mm, col_mm))[0]
    assert masked.dtype == np.float32
    assert np.all(masked[parts["arm"] | parts["table"]] == AIR_HU)
    np.testing.assert_array_equal(masked[mask], hu[mask])  # nothing inside the body changes


def test_an_arm_bridged_by_a_thin_contact_is_cut_off():
    hu, parts = _torso_slice(table=False)
    rows, cols = np.nonzero(parts["arm"])
    row = int(rows.mean())
    bridge_cols = np.arange(cols.min() - 15, cols.min() + 1)
    hu[row - 1:row + 2, bridge_cols] = 30.0  # 3 mm of skin contact
    mask = body_mask(hu)
    assert not mask[parts["arm"]].any() and mask[parts["trunk"]].mean() > 0.995


def test_two_thighs_are_both_kept_and_small_debris_goes():
    r, c = np.meshgrid(np.arange(160) + 0.5, np.arange(260) + 0.5, indexing="ij")
    hu = np.full((160, 260), -1000.0, dtype=np.float32)
    left = ((r - 80) / 55) ** 2 + ((c - 70) / 55) ** 2 < 1
    right = ((r - 80) / 50) ** 2 + ((c - 190) / 50) ** 2 < 1  # a bit smaller: (50/55)^2 = 83 % of the other
    cable = ((r - 10) / 6) ** 2 + ((c - 130) / 6) ** 2 < 1
    hu[left | right] = 30.0
    hu[cable] = 500.0
    mask = body_mask(hu)
    assert mask[left].all() and mask[right].all() and not mask[cable].any()


def test_a_slice_without_tissue_is_left_alone_and_inputs_are_not_written():
    air = np.full((2, 30, 40), -1000.0, dtype=np.float32)
    air[1, 3, 3] = -1024.0
    assert body_mask(air[0]).all()
    before = air.copy()
    np.testing.assert_array_equal(mask_outside_body(air), before)
    np.testing.assert_array_equal(air, before)
    with pytest.raises(ValueError, match="one \\(rows, cols\\) slice"):
        body_mask(air)
    with pytest.raises(ValueError, match="\\(s, rows, cols\\)"):
        mask_outside_body(air[0])


def test_policy_is_for_ct_only_and_the_lazy_view_masks_what_is_read():
    assert uses_body_mask({"body_mask": True}, "CT")
    assert not uses_body_mask({"body_mask": True}, "MR") and not uses_body_mask({}, "CT")
    assert not uses_body_mask(None, "CT")
    hu, parts = _torso_slice()
    stack = np.stack([hu, hu[:, ::-1]])
    view = BodyMaskedSlices(stack, (1.0, 1.0))
    assert view.shape == stack.shape and len(view) == 2
    np.testing.assert_array_equal(view[1:2], mask_outside_body(stack[1:2]))
    np.testing.assert_array_equal(view[np.array([1, 0])], mask_outside_body(stack[[1, 0]]))
    with pytest.raises(TypeError, match="slice or an index array"):
        view[0]


def test_model_files_validate_the_flag(tiny_model_dir, tmp_path):
    import json
    import shutil

    from MedicalSAM3Core.common.errors import ModelLoadError
    from MedicalSAM3Core.inference.models import read_preprocessing

    folder = tmp_path / "model"
    shutil.copytree(tiny_model_dir, folder)
    (folder / "medsam3_preprocessing.json").write_text(json.dumps({"body_mask": True}))
    assert read_preprocessing(folder)["body_mask"] is True
    (folder / "medsam3_preprocessing.json").write_text(json.dumps({"body_mask": "yes"}))
    with pytest.raises(ModelLoadError, match="body_mask must be true or false"):
        read_preprocessing(folder)


def _volume_with_arm(direction=(1, 0, 0, 0, 1, 0, 0, 0, 1)):
    from MedicalSAM3Core.common.volume import Geometry, Volume

    hu, parts = _torso_slice(rows=100, cols=130, row_mm=2.0, col_mm=2.0)
    array = np.repeat(hu[None], 3, axis=0).astype(np.int16)
    array[1][parts["trunk"] & ~parts["lungs"]] += 30  # slices differ
    geometry = Geometry(spacing=(2.0, 2.0, 3.0), origin=(-130.0, -100.0, 20.0), direction=direction)
    return Volume(array, geometry, modality="CT"), parts


def _engine_inputs(segmenter, volume, prompts):
    """Run the engine; return the pixel batches its vision encoder got and the result."""
    seen = []
    handle = segmenter.model.detector.vision_encoder.register_forward_pre_hook(
        lambda _m, args, kwargs: seen.append((kwargs.get("pixel_values", args[0] if args else None)).clone()),
        with_kwargs=True)
    try:
        result = segmenter.segment(volume, prompts)
    finally:
        handle.remove()
    return torch.cat(seen), result


def test_engine_feeds_what_training_feeds_and_keeps_the_geometry(tiny_model, tmp_path):
    """With the policy the engine's model input equals the training loader's pixel for pixel (one
    function), the arm is gone from it, and the label map keeps the input grid."""
    import SimpleITK as sitk

    from MedicalSAM3Core.imaging.io import image_from_array
    from MedicalSAM3Core.inference.engine import Segmenter
    from Training.data import SliceDataset, load_dataset

    volume, parts = _volume_with_arm()
    preprocessing = {"field_of_view_mm": 300.0, "body_mask": True}
    masked_model = dataclasses.replace(tiny_model, preprocessing=preprocessing)
    plain_model = dataclasses.replace(tiny_model, preprocessing={"field_of_view_mm": 300.0})
    plain_inputs, _ = _engine_inputs(Segmenter(plain_model), volume, ["liver"])
    inputs, result = _engine_inputs(Segmenter(masked_model), volume, ["liver"])
    assert result.label_map.shape == volume.shape and result.geometry == volume.geometry

    sitk.WriteImage(image_from_array(volume.array, volume.geometry), str(tmp_path / "ct.nii.gz"))
    sitk.WriteImage(image_from_array(np.zeros(volume.shape, np.uint8) + parts["trunk"][None], volume.geometry),
                    str(tmp_path / "seg.nii.gz"))
    (tmp_path / "ds.json").write_text('{"modality": "CT", "labels": {"1": "liver"}, "cases": '
                                      '[{"id": "a", "image": "ct.nii.gz", "label": "seg.nii.gz"}]}')
    spec = load_dataset(tmp_path / "ds.json")
    dataset = SliceDataset(spec, spec.cases, {"image_size": tiny_model.image_size, "mean": list(tiny_model.mean),
                                              "std": list(tiny_model.std), **preprocessing})
    for k in range(3):
        item = dataset[next(i for i, t in enumerate(dataset.triplets) if t.slice == k)]
        torch.testing.assert_close(inputs[k], item["pixel_values"], rtol=0, atol=0)
    low = float(inputs.min())  # the window's low end: air
    plain_outside = plain_inputs[:, 0] > low  # tissue on the canvas without the policy (trunk, arm, table)
    masked_outside = inputs[:, 0] > low
    assert int(plain_outside.sum()) > int(masked_outside.sum()) * 1.05  # the arm and table are gone
    assert not (masked_outside & ~plain_outside).any()


def test_body_mask_follows_the_patient_on_oblique_and_ras_grids(tiny_model):
    """The same patient stored RAS-wise, or on an oblique grid, gets the same masked input (the
    mask is computed on the slices as the model sees them, with their spacing)."""
    from MedicalSAM3Core.inference.engine import Segmenter

    from phantoms import stored_ras_wise

    volume, _ = _volume_with_arm()
    model = dataclasses.replace(tiny_model, preprocessing={"field_of_view_mm": 300.0, "body_mask": True,
                                                           "orientation": "radiological"})
    segmenter = Segmenter(model)
    inputs, result = _engine_inputs(segmenter, volume, ["liver"])
    twin = stored_ras_wise(volume)
    twin_inputs, twin_result = _engine_inputs(segmenter, twin, ["liver"])
    torch.testing.assert_close(inputs, twin_inputs, rtol=0, atol=0)
    assert twin_result.geometry == twin.geometry
    np.testing.assert_array_equal(twin_result.label_map, result.label_map[:, ::-1, ::-1])
    c, s = np.cos(0.3), np.sin(0.3)
    oblique, _ = _volume_with_arm(direction=(c, -s, 0, s, c, 0, 0, 0, 1))
    oblique_inputs, oblique_result = _engine_inputs(segmenter, oblique, ["liver"])
    torch.testing.assert_close(oblique_inputs, inputs, rtol=0, atol=0)
    assert oblique_result.geometry == oblique.geometry
