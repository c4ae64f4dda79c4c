"""The wire format between the client (Slicer, CLI) and ``medsam3 serve`` (torch-free, no pickle).

One message = one HTTP body::

    b"MEDSAM3\\0"                 8-byte magic
    uint32 little-endian          length H of the header
    H bytes                       header: UTF-8 JSON object
    payload                       the arrays listed in the header, C order, each byte-shuffled
                                  (byte planes, as Blosc does), concatenated, then compressed as
                                  one zstd or gzip stream (or not compressed)

The header is plain JSON: ``{"format": "medsam3-request" | "medsam3-result", "wire_version": 1,
"compression": "zstd" | "gzip" | "none", "byte_shuffle": true, "arrays": [{"name", "dtype",
"shape"}, ...], ...}`` where ``dtype``
is a NumPy type string with explicit byte order (``"<i2"``, ``"|u1"``, ``"<f4"``...) from a fixed
allow-list and ``shape`` is ``(z, y, x)``. A request carries one array ``"volume"`` plus
``"geometry"`` (LPS: spacing/origin in (x, y, z) order, direction row-major 3x3, as
:class:`~MedicalSAM3Core.common.volume.Geometry`), ``"modality"``, ``"prompts"``, ``"options"``
and ``"accept_compression"`` (what the result may be compressed with).
A result carries ``"label_map"`` and one bit-packed ``"mask_<i>"`` per prompt, with the JSON
sidecar (the same content ``medsam3 segment`` writes next to its label map) under ``"sidecar"``.

Interactive sessions (``/v1/sessions``) add two messages, both with one bit-packed array ``"mask"``
(``uint8``, ``(z, y, ceil(x / 8))``, bits along x, as ``numpy.packbits(mask, axis=-1)``):

* ``"medsam3-patch"`` (server -> client): the change of one object's mask,
  :meth:`~MedicalSAM3Core.common.interaction.MaskPatch.to_dict` under ``"patch"``; the array holds the
  patch's box only (an empty patch, no slice changed, carries no array);
* ``"medsam3-mask"`` (client -> server): a seed mask of the session's whole ``"shape"`` with its
  ``"key_slices"`` (``"largest"``, ``"all"`` or a list of slice indices).

Compression: zstd level 1 (multi-threaded) when the ``zstandard`` package is installed on both
sides, else gzip level 1 (Python's zlib: always there, also in 3D Slicer). Byte shuffling makes
a CT ~38% of its raw size; see ``Testing/benchmarks/bench_transfer.py`` for the timings.

Why not NRRD: NRRD describes one image; a job needs prompts, options and, for results, per-label
metadata plus per-prompt masks, and a hand-rolled NRRD parser on the server is more attack surface
than a length-prefixed JSON header. The decoder trusts nothing: sizes are checked against the
header before anything is allocated, decompression is bounded (no zip bombs), dtypes come from an
allow-list, and every problem raises :class:`InputError` naming it.
"""

from __future__ import annotations

import json
import struct
import zlib
from dataclasses import dataclass, field
from typing import Callable, Optional, Sequence

import numpy as np

from .errors import InputError
from .interaction import MaskPatch
from .options import SegmentOptions
from .result import LabelInfo, SegmentationResult
from .volume import Geometry, Volume

MAGIC = b"MEDSAM3\0"
WIRE_VERSION = 1
MEDIA_TYPE = "application/vnd.medsam3"
MAX_HEADER_BYTES = 1 << 20
VOLUME_DTYPES = ("|u1", "|i1", "<u2", "<i2", "<u4", "<i4", "<f4", "<f8")
_RESULT_DTYPES = ("|u1", "<u2")
_ALL_DTYPES = frozenset(VOLUME_DTYPES + _RESULT_DTYPES)


@dataclass(frozen=True)
class Limits:
    """What a decoder accepts (the server's caps; see ``medsam3 serve --help``)."""

    max_voxels: int = 1024 * 1024 * 1024
    max_dim: int = 4096
    max_prompts: int = 64
    max_prompt_chars: int = 200


@dataclass
class JobRequest:
    """A decoded segmentation request: the volume, the prompts and the options."""

    volume: Volume
    prompts: list[str]
    options: SegmentOptions = field(default_factory=SegmentOptions)
    result_compression: Optional[str] = None  # what the client can read; None = best available


def available_compressions() -> list[str]:
    """Compressions this side can read and write, best first (zstd needs the ``zstandard`` package)."""
    return (["zstd"] if _zstd() is not None else []) + ["gzip", "none"]


def _zstd():
    try:
        import zstandard
    except ImportError:
        return None
    return zstandard


def _shuffle(array: np.ndarray) -> np.ndarray:
    """Byte planes: all first bytes of the elements, then all second bytes... (as Blosc does).
    The high bytes of CT/MR voxels vary slowly, so planes compress ~20% better and faster."""
    if array.dtype.itemsize == 1:
        return array.reshape(-1)
    return np.ascontiguousarray(array.reshape(-1).view(np.uint8).reshape(-1, array.dtype.itemsize).T)


def _unshuffle(planes: np.ndarray, dtype: np.dtype, shape: list[int]) -> np.ndarray:
    if dtype.itemsize == 1:
        return planes.view(dtype).reshape(shape)
    return np.ascontiguousarray(planes.reshape(dtype.itemsize, -1).T).view(dtype).reshape(shape)


# -- encoding ------------------------------------------------------------------------------------
def _pack(header: dict, arrays: Sequence[tuple[str, np.ndarray]], compression: Optional[str]) -> bytes:
    compression = compression or available_compressions()[0]
    if compression not in available_compressions():
        raise InputError(f"compression {compression!r} is not available here; use one of "
                         f"{', '.join(available_compressions())}")
    header = dict(header, wire_version=WIRE_VERSION, compression=compression, byte_shuffle=True,
                  arrays=[{"name": name, "dtype": a.dtype.str, "shape": list(a.shape)} for name, a in arrays])
    head = json.dumps(header, separators=(",", ":"), allow_nan=False).encode("utf-8")
    parts = [MAGIC, struct.pack("<I", len(head)), head]
    planes = [memoryview(_shuffle(array)).cast("B") for _, array in arrays]
    if compression == "zstd":
        compressor = _zstd().ZstdCompressor(level=1, threads=-1).compressobj()
        parts += [compressor.compress(plane) for plane in planes] + [compressor.flush()]
    elif compression == "gzip":
        compressor = zlib.compressobj(1, zlib.DEFLATED, 31)  # wbits 31: gzip container
        parts += [compressor.compress(plane) for plane in planes] + [compressor.flush()]
    else:
        parts += [bytes(plane) for plane in planes]
    return b"".join(parts)


def _wire_array(array: np.ndarray, allowed: Sequence[str]) -> np.ndarray:
    """``array`` as C-ordered little-endian data of a type in ``allowed`` (byte-swapped if needed)."""
    dtype = array.dtype.newbyteorder("<")
    if dtype.str not in allowed:
        raise InputError(f"voxel type {array.dtype} cannot be sent; use one of {', '.join(allowed)}")
    return np.ascontiguousarray(array, dtype=dtype)


def encode_request(volume: Volume, prompts: Sequence[str], options: Optional[SegmentOptions] = None,
                   compression: Optional[str] = None, accept: Optional[Sequence[str]] = None) -> bytes:
    """Serialise one job: ``volume`` (z, y, x) with its LPS geometry, the prompts and the options.

    ``compression`` defaults to the best available here (zstd, else gzip); ``accept`` lists the
    compressions the result may come back in (default: all this side can read).
    """
    options = options or SegmentOptions()
    options.validate()
    header = {"format": "medsam3-request", "geometry": volume.geometry.to_dict(), "modality": volume.modality,
              "prompts": list(prompts), "options": options.to_dict(),
              "accept_compression": list(accept or available_compressions())}
    return _pack(header, [("volume", _wire_array(volume.array, VOLUME_DTYPES))], compression)


def encode_result(result: SegmentationResult, compression: Optional[str] = None) -> bytes:
    """Serialise a result: label map, per-prompt bit-packed masks and the JSON sidecar."""
    arrays = [("label_map", _wire_array(result.label_map, _RESULT_DTYPES))]
    arrays += [(f"mask_{i}", np.ascontiguousarray(m, dtype=np.uint8)) for i, m in enumerate(result.packed_masks)]
    return _pack({"format": "medsam3-result", "sidecar": result.sidecar()}, arrays, compression)


# -- decoding ------------------------------------------------------------------------------------
def _read_header(view: memoryview, expected_format: str) -> tuple[dict, int]:
    """The message's JSON header (format checked) and its length."""
    if len(view) < 12 or bytes(view[:8]) != MAGIC:
        raise InputError("not a MedicalSAM3 message (bad magic bytes); send what wire.encode_request writes")
    (head_len,) = struct.unpack("<I", view[8:12])
    if head_len > MAX_HEADER_BYTES or 12 + head_len > len(view):
        raise InputError(f"header length {head_len} is larger than the message or the {MAX_HEADER_BYTES}-byte cap")
    try:
        header = json.loads(bytes(view[12:12 + head_len]).decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError) as error:
        raise InputError(f"header is not valid UTF-8 JSON: {error}") from None
    if not isinstance(header, dict):
        raise InputError("header must be a JSON object")
    if header.get("format") != expected_format:
        raise InputError(f"expected a {expected_format!r} message, got format {header.get('format')!r}")
    return header, head_len


def _unpack(body: bytes | bytearray, expected_format: str, max_raw_bytes: int,
            check_arrays: Optional[Callable[[list[dict]], None]] = None,
            allow_no_arrays: bool = False) -> tuple[dict, list[tuple[dict, np.ndarray]]]:
    view = memoryview(body)
    header, head_len = _read_header(view, expected_format)
    if header.get("wire_version") != WIRE_VERSION:
        raise InputError(f"wire version {header.get('wire_version')!r} is not supported (this side speaks "
                         f"{WIRE_VERSION}); update the client or the server so both match")
    compression = header.get("compression")
    if compression not in available_compressions():
        raise InputError(f"compression {compression!r} is not supported here; use one of "
                         f"{', '.join(available_compressions())}")
    shuffled = header.get("byte_shuffle", False)
    if not isinstance(shuffled, bool):
        raise InputError("byte_shuffle must be true or false")
    specs = header.get("arrays")
    if not isinstance(specs, list) or not (specs or allow_no_arrays):
        raise InputError("header 'arrays' must be a non-empty list")
    sizes = []
    for spec in specs:
        if not isinstance(spec, dict) or not isinstance(spec.get("name"), str):
            raise InputError("each entry of 'arrays' needs a name, dtype and shape")
        dtype, shape = spec.get("dtype"), spec.get("shape")
        if not isinstance(dtype, str) or dtype not in _ALL_DTYPES:
            raise InputError(f"array {spec['name']!r}: voxel type {dtype!r} is not accepted; use one of "
                             f"{', '.join(VOLUME_DTYPES)}")
        if not isinstance(shape, list) or not shape or not all(
                isinstance(n, int) and not isinstance(n, bool) and n >= 1 for n in shape):
            raise InputError(f"array {spec['name']!r}: shape must be a list of positive integers, got {shape!r}")
        size = np.dtype(dtype).itemsize
        for n in shape:
            size *= n
            if size > max_raw_bytes:
                raise InputError(f"array {spec['name']!r} of shape {shape} is larger than the "
                                 f"{max_raw_bytes}-byte limit")
        sizes.append(size)
    total = sum(sizes)
    if total > max_raw_bytes:
        raise InputError(f"arrays need {total} bytes, more than the {max_raw_bytes}-byte limit")
    if check_arrays is not None:  # what the header claims is checked before anything is decompressed
        check_arrays(specs)
    payload = view[12 + head_len:]
    if compression == "zstd":
        raw = _zstd_decompress(payload, total)
    elif compression == "gzip":
        decompressor = zlib.decompressobj(31)
        try:
            raw = decompressor.decompress(payload, total + 1)  # bounded: a zip bomb stops here
        except zlib.error as error:
            raise InputError(f"payload is not valid gzip data: {error}") from None
        if len(raw) != total or not decompressor.eof or decompressor.unconsumed_tail:
            raise InputError(f"payload does not match the header: expected {total} bytes of array data "
                             "in one complete gzip stream")
        if decompressor.unused_data:
            raise InputError("unexpected bytes after the gzip stream")
    else:
        raw = payload
        if len(raw) != total:
            raise InputError(f"payload is {len(raw)} bytes, the header's arrays need {total}")
    arrays, offset = [], 0
    for spec, size in zip(specs, sizes):
        dtype = np.dtype(spec["dtype"])
        if shuffled:
            array = _unshuffle(np.frombuffer(raw, np.uint8, count=size, offset=offset), dtype, spec["shape"])
        else:
            array = np.frombuffer(raw, dtype=dtype, count=size // dtype.itemsize, offset=offset).reshape(spec["shape"])
        arrays.append((spec, array))
        offset += size
    return header, arrays


def _zstd_decompress(payload: memoryview, total: int) -> bytes:
    """Decompress exactly ``total`` bytes; never more than ``total + 1`` are produced (no zip bombs)."""
    import io

    zstandard = _zstd()
    try:
        reader = zstandard.ZstdDecompressor().stream_reader(io.BytesIO(payload), read_across_frames=True)
        raw = reader.read(total + 1) if total else b""
        while 0 < len(raw) < total + 1:  # read() may return short; keep reading up to the bound
            more = reader.read(total + 1 - len(raw))
            if not more:
                break
            raw += more
    except zstandard.ZstdError as error:
        raise InputError(f"payload is not valid zstd data: {error}") from None
    if len(raw) != total:
        raise InputError(f"payload does not match the header: expected {total} bytes of array data")
    return raw


def _geometry(data) -> Geometry:
    """The request's geometry, refused unless well-formed and plausible (:meth:`Geometry.check_plausible`)."""
    if not isinstance(data, dict) or not all(k in data for k in ("spacing", "origin", "direction")):
        raise InputError("geometry must be an object with spacing, origin and direction")
    try:
        geometry = Geometry.from_dict(data)
    except (TypeError, ValueError, OverflowError) as error:
        raise InputError(f"geometry is malformed: {error}") from None
    geometry.check_plausible()
    return geometry


def _volume_spec_checker(limits: Limits) -> Callable[[list[dict]], None]:
    """Checks a request's array list against ``limits`` from the header alone (before decompression:
    a small body must not decompress into more than the server accepts)."""

    def check(specs: list[dict]) -> None:
        if len(specs) != 1 or specs[0]["name"] != "volume":
            raise InputError("a request carries exactly one array, named 'volume'")
        dtype, shape = specs[0]["dtype"], specs[0]["shape"]
        if dtype not in VOLUME_DTYPES:
            raise InputError(f"voxel type {dtype!r} is not accepted; use one of {', '.join(VOLUME_DTYPES)}")
        if len(shape) != 3:
            raise InputError(f"the volume must be 3D (z, y, x), got shape {list(shape)}")
        if int(np.prod(shape, dtype=np.int64)) > limits.max_voxels or max(shape) > limits.max_dim:
            raise InputError(f"volume shape {list(shape)} exceeds this server's limits "
                             f"({limits.max_voxels} voxels, {limits.max_dim} per axis)")

    return check


def check_prompts(prompts, limits: Limits = Limits(), allow_none: bool = False) -> None:
    """Refuse prompts that are not a list of non-blank strings within ``limits`` (InputError naming why)."""
    if not isinstance(prompts, list) or not all(isinstance(p, str) for p in prompts):
        raise InputError("prompts must be a list of strings")
    if (not prompts and not allow_none) or any(not p.strip() for p in prompts):
        raise InputError("empty prompt: give at least one structure name such as 'liver'")
    if len(prompts) > limits.max_prompts or any(len(p) > limits.max_prompt_chars for p in prompts):
        raise InputError(f"at most {limits.max_prompts} prompts of at most {limits.max_prompt_chars} characters")


def decode_request(body: bytes | bytearray, limits: Limits = Limits(), allow_no_prompts: bool = False) -> JobRequest:
    """Parse and validate a request body; raises :class:`InputError` naming the first problem.
    The array's type, dimensions and size are checked from the header before decompression.
    ``allow_no_prompts``: an empty prompt list is accepted (a session opened without text prompts)."""
    max_bytes = limits.max_voxels * 8
    header, arrays = _unpack(body, "medsam3-request", max_bytes, _volume_spec_checker(limits))
    _, array = arrays[0]
    prompts = header.get("prompts")
    check_prompts(prompts, limits, allow_none=allow_no_prompts)
    modality = header.get("modality")
    if modality is not None and (not isinstance(modality, str) or len(modality) > 16):
        raise InputError("modality must be a short string such as 'CT' or null")
    options = SegmentOptions.from_dict(header.get("options", {}))
    accept = header.get("accept_compression", ["gzip"])
    if not isinstance(accept, list):
        raise InputError("accept_compression must be a list such as ['zstd', 'gzip']")
    usable = [c for c in available_compressions() if c in accept]
    volume = Volume(array, _geometry(header.get("geometry")), modality=modality, source="wire")
    return JobRequest(volume, list(prompts), options, usable[0] if usable else "none")


def decode_result(body: bytes, max_bytes: int = 1 << 36) -> SegmentationResult:
    """Parse a result body into the same :class:`SegmentationResult` the local engine returns."""
    header, arrays = _unpack(body, "medsam3-result", max_bytes)
    named = {spec["name"]: array for spec, array in arrays}
    sidecar = header.get("sidecar")
    if "label_map" not in named or not isinstance(sidecar, dict):
        raise InputError("result message lacks the label map or its sidecar")
    try:
        labels = [LabelInfo.from_dict(item) for item in sidecar["labels"]]
        masks = [named[f"mask_{i}"].copy() for i in range(len(labels)) if f"mask_{i}" in named]
        return SegmentationResult(
            label_map=named["label_map"].copy(), geometry=Geometry.from_dict(sidecar["geometry_lps"]), labels=labels,
            packed_masks=masks, mode=sidecar["mode"], model_id=sidecar["model"], slice_axis=sidecar["slice_axis"],
            warnings=list(sidecar["warnings"]), parameters=dict(sidecar["parameters"]))
    except (KeyError, TypeError, ValueError, OverflowError) as error:
        raise InputError(f"result sidecar is malformed: {error!r}") from None


# -- interactive sessions: mask patches and seed masks -------------------------------------------
def _packed_shape(shape: Sequence[int]) -> list[int]:
    return [int(shape[0]), int(shape[1]), (int(shape[2]) + 7) // 8]


def _shape3(value, what: str, minimum: int = 1) -> tuple[int, int, int]:
    if not isinstance(value, list) or len(value) != 3 or not all(
            isinstance(n, int) and not isinstance(n, bool) and n >= minimum for n in value):
        raise InputError(f"{what} must be three integers (z, y, x) of at least {minimum}, got {value!r}")
    return tuple(value)


def encode_patch(patch: MaskPatch, compression: Optional[str] = None) -> bytes:
    """Serialise one :class:`MaskPatch`: its header and its box's mask, bit-packed."""
    header = {"format": "medsam3-patch", "patch": patch.to_dict()}
    if patch.empty:
        return _pack(header, [], "none")
    return _pack(header, [("mask", np.packbits(np.asarray(patch.mask, dtype=bool), axis=-1))], compression)


def decode_patch(body: bytes | bytearray, volume_shape: Optional[Sequence[int]] = None) -> MaskPatch:
    """Parse a patch message; with ``volume_shape`` the patch must lie inside that grid (and the message
    may not decode to more than that grid's bit-packed size)."""
    max_bytes = 1 << 36 if volume_shape is None else \
        int(np.prod(_packed_shape(volume_shape), dtype=np.int64)) + (1 << 16)
    header, arrays = _unpack(body, "medsam3-patch", max_bytes, allow_no_arrays=True)
    data = header.get("patch")
    if not isinstance(data, dict):
        raise InputError("a patch message needs a 'patch' object")
    object_id, slices, stage = data.get("object_id"), data.get("slices"), data.get("stage", "")
    if not isinstance(object_id, int) or isinstance(object_id, bool):
        raise InputError(f"patch object_id must be an integer, got {object_id!r}")
    if not isinstance(slices, list) or not all(isinstance(s, int) and not isinstance(s, bool) for s in slices):
        raise InputError(f"patch slices must be a list of integers, got {slices!r}")
    if not isinstance(stage, str):
        raise InputError("patch stage must be a string")
    start = _shape3(data.get("start"), "patch start", minimum=0)
    if not slices:
        if arrays:
            raise InputError("an empty patch (no slice changed) carries no mask")
        return MaskPatch(object_id, (0, 0, 0), np.zeros((0, 0, 0), dtype=bool), [], stage)
    shape = _shape3(data.get("shape"), "patch shape")
    if len(arrays) != 1 or arrays[0][0]["name"] != "mask" or arrays[0][0]["dtype"] != "|u1" \
            or arrays[0][0]["shape"] != _packed_shape(shape):
        raise InputError(f"a patch of shape {list(shape)} carries one array 'mask' of type |u1 and shape "
                         f"{_packed_shape(shape)} (bits along x)")
    if volume_shape is not None and any(a + n > v for a, n, v in zip(start, shape, volume_shape)):
        raise InputError(f"patch {list(start)} + {list(shape)} lies outside the volume {list(volume_shape)}")
    mask = np.unpackbits(arrays[0][1], axis=-1, count=shape[2]).astype(bool)
    return MaskPatch(object_id, start, mask, sorted(slices), stage)


def encode_mask(mask: np.ndarray, key_slices="largest", compression: Optional[str] = None) -> bytes:
    """Serialise a seed mask (bool ``(z, y, x)``, the session's whole grid) and its key slices."""
    mask = np.asarray(mask)
    if mask.ndim != 3:
        raise InputError(f"a seed mask must be 3D (z, y, x), got shape {mask.shape}")
    if not isinstance(key_slices, str):
        key_slices = [int(s) for s in key_slices]
    header = {"format": "medsam3-mask", "shape": [int(n) for n in mask.shape], "key_slices": key_slices}
    return _pack(header, [("mask", np.packbits(mask.astype(bool, copy=False), axis=-1))], compression)


def decode_mask(body: bytes | bytearray, volume_shape: Sequence[int]) -> tuple[np.ndarray, object]:
    """Parse a seed mask message for a session of ``volume_shape``: ``(mask bool (z, y, x), key_slices)``.
    The shape is checked from the header before anything is decompressed."""
    expected = [int(n) for n in volume_shape]

    def check(specs: list[dict]) -> None:
        if len(specs) != 1 or specs[0]["name"] != "mask" or specs[0]["dtype"] != "|u1":
            raise InputError("a mask message carries exactly one array 'mask' of type |u1 (bit-packed)")
        if specs[0]["shape"] != _packed_shape(expected):
            raise InputError(f"a seed mask must have the session's shape {expected} (bit-packed "
                             f"{_packed_shape(expected)}), got packed shape {specs[0]['shape']}")

    head, _ = _read_header(memoryview(body), "medsam3-mask")
    shape = head.get("shape")
    if shape != expected:
        raise InputError(f"a seed mask must have the session's shape {expected}, got {shape!r}")
    header, arrays = _unpack(body, "medsam3-mask", int(np.prod(_packed_shape(expected), dtype=np.int64)), check)
    key_slices = header.get("key_slices", "largest")
    if not (key_slices in ("largest", "all") or (isinstance(key_slices, list) and all(
            isinstance(s, int) and not isinstance(s, bool) for s in key_slices))):
        raise InputError(f"key_slices must be 'largest', 'all' or a list of slice indices, got {key_slices!r}")
    return np.unpackbits(arrays[0][1], axis=-1, count=expected[2]).astype(bool), key_slices

