"""Slice orientation: the same anatomy stored in another voxel order reaches the model as the same image
(``radiological``), and results land back on each input's own grid."""

from __future__ import annotations

import dataclasses
import itertools

import numpy as np
import pytest

from MedicalSAM3Core.common.options import SegmentOptions
from MedicalSAM3Core.common.volume import Geometry, Volume
from MedicalSAM3Core.preprocessing.orientation import SliceOrientation
from phantoms import RAS_STORED, stored_ras_wise as _twin

LPS = (1, 0, 0, 0, 1, 0, 0, 0, 1)  # DICOM's usual order: i -> patient left, j -> posterior
SWAPPED = (0, 1, 0, 1, 0, 0, 0, 0, 1)  # i -> posterior, j -> left


@pytest.mark.parametrize("direction, axis, expected", [
    (LPS, 0, SliceOrientation()),
    (RAS_STORED, 0, SliceOrientation(flip_rows=True, flip_cols=True)),
    (SWAPPED, 0, SliceOrientation(transpose=True)),
    (LPS, 1, SliceOrientation(flip_rows=True)),  # coronal: rows (z) must run toward inferior
    (LPS, 2, SliceOrientation(flip_rows=True)),  # sagittal: columns toward posterior, rows toward inferior
])
def test_radiological_orientation_from_direction_cosines(direction, axis, expected):
    assert SliceOrientation.for_volume(direction, axis, "radiological") == expected
    assert SliceOrientation.for_volume(direction, axis, "stored").identity
    with pytest.raises(ValueError, match="orientation"):
        SliceOrientation.for_volume(direction, axis, "neurological")


@pytest.mark.parametrize("flags", list(itertools.product([False, True], repeat=3)))
def test_restore_inverts_apply_and_spacing_follows(flags):
    orientation = SliceOrientation(*flags)
    stack = np.arange(3 * 4 * 5).reshape(3, 4, 5)
    seen = orientation.apply(stack)
    assert seen.shape == ((3, 5, 4) if flags[0] else (3, 4, 5))
    np.testing.assert_array_equal(orientation.restore(seen), stack)
    assert orientation.spacing(0.7, 0.9) == ((0.9, 0.7) if flags[0] else (0.7, 0.9))


def test_engine_sees_the_same_image_whatever_the_voxel_order(tiny_model, phantom):
    from MedicalSAM3Core.inference.engine import Segmenter

    volume = Volume(phantom, Geometry(spacing=(0.8, 0.9, 2.5), origin=(-20.0, -18.0, 5.0), direction=LPS),
                    modality="CT")
    twin = _twin(volume)
    assert np.allclose(twin.geometry.ijk_to_lps() @ [47, 39, 0, 1], volume.geometry.ijk_to_lps() @ [0, 0, 0, 1])
    options = SegmentOptions(mode="slices", score_threshold=0.2)
    radiological = Segmenter(dataclasses.replace(tiny_model, preprocessing={"orientation": "radiological"}))
    a, b = radiological.segment(volume, ["liver", "spleen"], options), radiological.segment(twin, ["liver", "spleen"],
                                                                                           options)
    assert any(label.voxel_count for label in a.labels)
    assert b.geometry == twin.geometry and b.shape == twin.shape  # on the twin's own grid
    np.testing.assert_array_equal(b.label_map[:, ::-1, ::-1], a.label_map)
    for k in range(len(a.labels)):
        np.testing.assert_array_equal(b.mask(k)[:, ::-1, ::-1], a.mask(k))
    # as stored (the default), the twin is another picture for the model
    stored = Segmenter(tiny_model)
    c, d = stored.segment(volume, ["liver"], options), stored.segment(twin, ["liver"], options)
    assert not np.array_equal(d.label_map[:, ::-1, ::-1], c.label_map)
