"""The client/server wire format: exact round trips, and a decoder that only ever raises InputError."""

from __future__ import annotations

import gzip
import json
import struct

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings

from MedicalSAM3Core.common.errors import InputError
from MedicalSAM3Core.common.options import SegmentOptions
from MedicalSAM3Core.common.result import LabelInfo, SegmentationResult, pack_mask
from MedicalSAM3Core.common.volume import Geometry, Volume
from fuzzing import fuzz_bodies
from MedicalSAM3Core.common.wire import MAGIC, Limits, decode_request, decode_result, encode_request, encode_result

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
