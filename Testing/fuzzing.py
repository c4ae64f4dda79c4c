"""Hypothesis strategies for wire-format messages: valid, malformed, truncated and random bodies."""

import gzip
import json
import struct

from hypothesis import strategies as st

from MedicalSAM3Core.common.wire import MAGIC

_json_values = st.recursive(st.none() | st.booleans() | st.integers(-2**70, 2**70) | st.floats() | st.text(max_size=8),
                            lambda children: st.lists(children, max_size=4)
                            | st.dictionaries(st.text(max_size=8), children, max_size=4), max_leaves=12)
_headers = st.fixed_dictionaries(
    {},
    optional={"format": st.sampled_from(["medsam3-request", "medsam3-result", "x"]) | _json_values,
              "wire_version": st.sampled_from([1, 2]) | _json_values,
              "compression": st.sampled_from(["gzip", "none", "zstd"]) | _json_values,
              "arrays": st.lists(st.fixed_dictionaries(
                  {"name": st.sampled_from(["volume", "label_map", "x"]) | _json_values,
                   "dtype": st.sampled_from(["<i2", "|u1", "<f4", "|O", ">i2", "<c8", "V8"]) | _json_values,
                   "shape": st.lists(st.integers(-2, 40), max_size=4) | _json_values}), max_size=3) | _json_values,
              "geometry": st.fixed_dictionaries({"spacing": _json_values, "origin": _json_values,
                                                 "direction": _json_values}) | _json_values,
              "modality": _json_values, "prompts": st.lists(st.text(max_size=10), max_size=3) | _json_values,
              "options": st.dictionaries(st.sampled_from(["mode", "batch_size", "window", "percentiles",
                                                          "score_threshold", "shared_anchor", "bogus"]),
                                         _json_values, max_size=3) | _json_values,
              "sidecar": _json_values})


def fuzz_bodies():
    structured = st.builds(lambda header, payload, gz: _message(header, gzip.compress(payload) if gz else payload),
                           _headers, st.binary(max_size=4096), st.booleans())
    return structured | st.binary(max_size=256) | st.builds(lambda b: MAGIC + b, st.binary(max_size=256))


def _message(header: dict, payload: bytes) -> bytes:
    head = json.dumps(header).encode()
    return MAGIC + struct.pack("<I", len(head)) + head + payload
