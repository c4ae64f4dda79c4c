"""The client/server wire format: exact round trips, and a decoder that only ever raises InputError."""

from __future__ import annotations

import gzip
import json
import struct

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from MedicalSAM3Core.common.errors import InputError
from MedicalSAM3Core.common.interaction import MaskPatch
from MedicalSAM3Core.common.options import SegmentOptions
from MedicalSAM3Core.common.result import LabelInfo, SegmentationResult, pack_mask
from MedicalSAM3Core.common.volume import Geometry, Volume
from fuzzing import fuzz_bodies
from MedicalSAM3Core.common.wire import (MAGIC, Limits, decode_mask, decode_patch, decode_request, decode_result,
                                        encode_mask, encode_patch, encode_request, encode_result)

GEOMETRY = Geometry((0.7, 0.7, 3.0), (-10.0, 20.5, -300.25), (0, 1, 0, -1, 0, 0, 0, 0, 1))


@pytest.mark.parametrize("dtype", ["<i2", ">i2", "<f4", ">f8", "|u1", "<u2", "<i4"])
@pytest.mark.parametrize("compression", ["zstd", "gzip", "none"])
def test_request_round_trip(dtype, compression):
    rng = np.random.default_rng(0)
    array = rng.normal(0, 300, (3, 5, 7)) if np.dtype(dtype).kind in "if" else rng.integers(0, 200, (3, 5, 7))
    array = array.astype(dtype)
    options = SegmentOptions(mode="slices", window="lung", percentiles=(1.0, 99.0))
    request = decode_request(encode_request(Volume(array, GEOMETRY, "MR"), ["liver", "left kidney"], options,
                                            compression=compression))
    np.testing.assert_array_equal(request.volume.array, array)  # values equal; byte order normalised to little
    assert request.volume.array.dtype.byteorder in ("<", "|", "=")
    assert request.volume.geometry == GEOMETRY and request.volume.modality == "MR"
    assert request.prompts == ["liver", "left kidney"] and request.options == options


def test_result_round_trip_keeps_masks_and_metadata():
    labels = [LabelInfo(1, "liver", "Liver", "liver", (221, 130, 101), True, 0.8, 0.9, 5, 0.01, 2,
                        {"category": {"scheme": "SCT", "code": "123037004", "meaning": "Anatomical Structure"}})]
    label_map = np.zeros((2, 3, 11), np.uint8)
    label_map[1, 1, 2:7] = 1
    mask = label_map == 1
    mask[0, 0, 0] = True  # a per-prompt mask may differ from the merged map
    result = SegmentationResult(label_map, GEOMETRY, labels, [pack_mask(mask)], "propagate", "tiny", "k",
                                ["a warning"], {"score_threshold": 0.5})
    back = decode_result(encode_result(result))
    np.testing.assert_array_equal(back.label_map, label_map)
    np.testing.assert_array_equal(back.mask(0), mask)
    assert back.sidecar() == json.loads(json.dumps(result.sidecar()))


def test_result_comes_back_in_a_compression_the_client_reads():
    volume = Volume(np.zeros((1, 2, 2), np.int16))
    assert decode_request(encode_request(volume, ["liver"], accept=["gzip"])).result_compression == "gzip"
    assert decode_request(encode_request(volume, ["liver"], accept=["zstd", "gzip"])).result_compression == "zstd"
    assert decode_request(encode_request(volume, ["liver"], accept=["lz4"])).result_compression == "none"


@pytest.mark.parametrize("compression", ["zstd", "gzip"])
def test_truncated_and_padded_payloads_are_refused(compression):
    body = encode_request(Volume(np.arange(2 * 30 * 30, dtype=np.int16).reshape(2, 30, 30)), ["liver"],
                          compression=compression)
    with pytest.raises(InputError, match="payload"):
        decode_request(body[:-20])
    if compression == "gzip":
        with pytest.raises(InputError, match="after the gzip stream"):
            decode_request(body + b"junk")


def test_limits_are_checked_before_allocation():
    body = encode_request(Volume(np.zeros((4, 8, 8), np.int16)), ["liver"])
    with pytest.raises(InputError, match="limit"):
        decode_request(body, Limits(max_voxels=100))
    with pytest.raises(InputError, match="limit"):
        decode_request(body, Limits(max_dim=4))
    with pytest.raises(InputError, match="prompts"):
        decode_request(encode_request(Volume(np.zeros((1, 2, 2), np.int16)), ["x"] * 3), Limits(max_prompts=2))


@pytest.mark.parametrize("compression", ["gzip", "zstd"])
def test_zip_bomb_is_bounded(compression):
    import zstandard

    head = json.dumps({"format": "medsam3-request", "wire_version": 1, "compression": compression,
                       "arrays": [{"name": "volume", "dtype": "|u1", "shape": [1, 1, 16]}], "geometry": None,
                       "prompts": ["liver"], "options": {}}).encode()
    squeeze = gzip.compress if compression == "gzip" else zstandard.ZstdCompressor().compress
    bomb = MAGIC + struct.pack("<I", len(head)) + head + squeeze(bytes(50_000_000))
    with pytest.raises(InputError, match="payload"):
        decode_request(bomb)


def test_unsendable_types_are_named():
    with pytest.raises(InputError, match="complex"):
        encode_request(_raw_volume(np.complex64), ["x"])


def _raw_volume(dtype) -> Volume:
    volume = Volume(np.zeros((1, 2, 2), np.int16))
    volume.array = np.zeros((1, 2, 2), dtype)  # bypass validation, as a caller mutating it could
    return volume


# -- fuzzing: whatever arrives, the decoder answers InputError (a 422), never anything else ---------
@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(fuzz_bodies())
def test_decoder_fuzz_only_raises_input_error(body):
    for decode in (decode_request, decode_result):
        try:
            decode(body)
        except InputError:
            pass



# -- interactive sessions: mask patches and seed masks ----------------------------------------------
@pytest.mark.parametrize("compression", ["zstd", "gzip", "none"])
def test_patch_and_seed_mask_round_trip_bit_packed(compression):
    rng = np.random.default_rng(1)
    box = rng.random((2, 3, 13)) > 0.5  # 13 columns: the last byte of each row is partly padding
    patch = MaskPatch(4, (1, 2, 3), box, [1, 2], "refine")
    body = encode_patch(patch, compression)
    back = decode_patch(body, (5, 10, 20))
    assert back.to_dict() == patch.to_dict() and back.mask.dtype == bool
    np.testing.assert_array_equal(back.mask, box)
    full = rng.random((4, 5, 11)) > 0.5
    mask, key_slices = decode_mask(encode_mask(full, [0, 3], compression), (4, 5, 11))
    np.testing.assert_array_equal(mask, full)
    assert key_slices == [0, 3]
    assert decode_mask(encode_mask(full, "all"), (4, 5, 11))[1] == "all"


def test_an_empty_patch_travels_without_an_array():
    empty = MaskPatch(2, (0, 0, 0), np.zeros((0, 0, 0), bool), [], "undo")
    back = decode_patch(encode_patch(empty), (3, 4, 5))
    assert back.empty and back.object_id == 2 and back.stage == "undo" and back.mask.shape == (0, 0, 0)


def test_patches_and_seed_masks_that_do_not_fit_are_refused():
    patch = MaskPatch(1, (3, 0, 0), np.ones((2, 4, 4), bool), [3, 4], "propagate")
    with pytest.raises(InputError, match="outside the volume"):
        decode_patch(encode_patch(patch), (4, 4, 4))
    with pytest.raises(InputError, match=r"session's shape \[4, 5, 11\], got \[4, 5, 12\]"):
        decode_mask(encode_mask(np.zeros((4, 5, 12), bool)), (4, 5, 11))
    with pytest.raises(InputError, match="key_slices"):
        decode_mask(_message({"format": "medsam3-mask", "wire_version": 1, "compression": "none",
                              "shape": [1, 1, 8], "key_slices": "middle",
                              "arrays": [{"name": "mask", "dtype": "|u1", "shape": [1, 1, 1]}]}, b"\xff"), (1, 1, 8))
    # a header that claims the right shape but carries a bigger array is refused before decompressing it
    bomb = _message({"format": "medsam3-mask", "wire_version": 1, "compression": "gzip", "shape": [4, 5, 11],
                     "arrays": [{"name": "mask", "dtype": "|u1", "shape": [4000, 5, 2]}]}, gzip.compress(bytes(40_000)))
    with pytest.raises(InputError, match="larger than the 40-byte limit"):
        decode_mask(bomb, (4, 5, 11))


def _message(header: dict, payload: bytes) -> bytes:
    head = json.dumps(header).encode()
    return MAGIC + struct.pack("<I", len(head)) + head + payload


_ints = st.integers(-3, 40) | st.none() | st.text(max_size=3) | st.booleans()
_patch_headers = st.fixed_dictionaries(
    {"format": st.sampled_from(["medsam3-patch", "medsam3-mask"]), "wire_version": st.just(1),
     "compression": st.sampled_from(["none", "gzip"])},
    optional={"patch": st.fixed_dictionaries({}, optional={"object_id": _ints, "start": st.lists(_ints, max_size=4),
                                                            "shape": st.lists(_ints, max_size=4),
                                                            "slices": st.lists(_ints, max_size=3), "stage": _ints}),
              "shape": st.lists(_ints, max_size=4), "key_slices": st.sampled_from(["all", "x"]) | st.lists(_ints),
              "arrays": st.lists(st.fixed_dictionaries({"name": st.sampled_from(["mask", "x"]),
                                                        "dtype": st.sampled_from(["|u1", "<i2"]),
                                                        "shape": st.lists(st.integers(0, 6), max_size=4)}),
                                 max_size=2)})


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.builds(lambda header, payload, gz: _message(header, gzip.compress(payload) if gz else payload),
                 _patch_headers, st.binary(max_size=64), st.booleans()) | fuzz_bodies())
def test_patch_and_mask_decoders_fuzz_only_raise_input_error(body):
    for decode in (lambda b: decode_patch(b), lambda b: decode_patch(b, (4, 5, 6)), lambda b: decode_mask(b, (4, 5, 6))):
        try:
            decode(body)
        except InputError:
            pass
