import numpy as np
import pytest
import torch

from MedicalSAM3Core.common.errors import InputError
from MedicalSAM3Core.preprocessing.intensity import (CT_WINDOWS, ct_window, detect_modality, percentile_spec,
                                                     spec_for, to_model_input)


def test_ct_window_maps_level_and_width_to_unit_range():
    spec = ct_window("abdomen")
    level, width = CT_WINDOWS["abdomen"]
    slices = torch.tensor([[[level - width / 2, level, level + width / 2, -3000.0, 3000.0]]])
    x = to_model_input(slices, spec, image_size=5)
    # bilinear resize of a 1x5 row to 5x5 keeps columns; normalised value = 2 * unit - 1
    np.testing.assert_allclose(x[0, 0, 0].numpy(), [-1, 0, 1, -1, 1], atol=1e-6)
    assert x.shape == (1, 3, 5, 5)


def test_unknown_window_is_named():
    with pytest.raises(InputError, match="unknown CT window 'muscle'"):
        ct_window("muscle")


def test_mr_percentiles_are_computed_over_the_volume_not_per_slice():
    volume = np.stack([np.full((8, 8), 100.0), np.full((8, 8), 300.0)])
    volume[0, 0, 0], volume[1, 0, 0] = 0.0, 400.0
    spec = percentile_spec(volume, (0, 100))
    x = to_model_input(torch.from_numpy(volume), spec, image_size=8)
    # the same tissue value gets different gray levels on the two slices: 100 -> 0.25, 300 -> 0.75
    np.testing.assert_allclose(x[0, 0, 4, 4].item(), 2 * 0.25 - 1, atol=1e-6)
    np.testing.assert_allclose(x[1, 0, 4, 4].item(), 2 * 0.75 - 1, atol=1e-6)


def test_modality_detection_and_spec_choice():
    ct = np.full((4, 4, 4), -1000.0)
    mr = np.full((4, 4, 4), 10.0)
    assert detect_modality(ct, None) == "CT" and detect_modality(mr, None) == "MR"
    assert detect_modality(mr, "ct") == "CT"  # the file's tag wins
    assert spec_for("CT", ct, None, "lung").name == "lung"
    assert spec_for("CT", ct, "bone", "lung").name == "bone"  # explicit window wins over the prompt's
    assert spec_for("MR", mr + np.arange(64).reshape(4, 4, 4), None, "abdomen").name.startswith("percentile")


def test_resize_and_normalisation_match_transformers_sam3_image_processor():
    from transformers import Sam3ImageProcessor

    rng = np.random.default_rng(0)
    raw = rng.normal(40, 300, (2, 37, 53)).astype(np.float32)
    spec = ct_window("soft_tissue")
    ours = to_model_input(torch.from_numpy(raw), spec, image_size=56)
    unit = np.clip((raw - spec.low) / (spec.high - spec.low), 0, 1)
    processor = Sam3ImageProcessor(size={"height": 56, "width": 56}, do_rescale=False)
    images = [torch.from_numpy(np.repeat(u[None], 3, axis=0)) for u in unit]
    theirs = processor(images=images, return_tensors="pt")["pixel_values"]
    torch.testing.assert_close(ours, theirs, atol=1e-5, rtol=1e-5)
