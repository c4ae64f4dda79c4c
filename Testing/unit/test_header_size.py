"""A header that claims more voxels than memory can hold is refused before anything is allocated."""

import subprocess
import sys
import time
from pathlib import Path

import pytest

from MedicalSAM3Core.common.errors import InputError
from MedicalSAM3Core.imaging import io
from MedicalSAM3Core.imaging.io import read_volume

REPO = Path(__file__).resolve().parents[2]


def _nrrd_header(sizes: str) -> str:
    """A raw NRRD header of int16 voxels with no voxel data after it."""
    return (f"NRRD0004\ntype: short\ndimension: 3\nsizes: {sizes}\nencoding: raw\nendian: little\n"
            "space: left-posterior-superior\nspace directions: (1,0,0) (0,1,0) (0,0,1)\nspace origin: (0,0,0)\n\n")


# The file: a few hundred bytes claiming 2048 x 2048 x 512 int16 (4 GiB), read where 2 GiB are free.
_CHILD = """
import resource, sys
from MedicalSAM3Core.common.errors import InputError
from MedicalSAM3Core.imaging import io
io.available_memory = lambda: 2 * 1024 ** 3
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
try:
    io.read_volume(sys.argv[1])
except InputError as error:
    print(error)
print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before)
"""


def test_header_claiming_more_than_the_available_memory_is_refused_before_allocating(tmp_path):
    pytest.importorskip("resource")
    path = tmp_path / "claims_4gib.nrrd"
    path.write_text(_nrrd_header("2048 2048 512"))
    child = subprocess.run([sys.executable, "-c", _CHILD, str(path)], cwd=REPO, capture_output=True, text=True,
                           timeout=120)
    assert child.returncode == 0, child.stderr
    message, growth = child.stdout.strip().splitlines()
    growth_bytes = int(growth) * (1 if sys.platform == "darwin" else 1024)  # ru_maxrss: bytes on macOS, else KiB
    assert growth_bytes < 256 * 2 ** 20, f"the reader grew by {growth_bytes / 2 ** 30:.1f} GiB before refusing"
    assert message.startswith(f"{path}: its header claims a 2048 x 2048 x 512 image of 16-bit signed integer voxels "
                              "(4.0 GiB)")
    assert "needs about 8.0 GiB of memory but only 2.0 GiB is available" in message


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="the available memory is read from /proc/meminfo")
def test_absurd_header_is_refused_quickly_with_the_real_available_memory(tmp_path):
    path = tmp_path / "claims_2pib.nrrd"
    path.write_text(_nrrd_header("1048576 1048576 1024"))
    start = time.monotonic()
    with pytest.raises(InputError, match=r"claims a 1048576 x 1048576 x 1024 image .*is available, so it was not read"):
        read_volume(path)
    assert time.monotonic() - start < 1.0


def test_header_that_fits_is_read_as_before(tmp_path, monkeypatch):
    path = tmp_path / "small.nrrd"
    path.write_bytes(_nrrd_header("4 3 2").encode() + bytes(range(48)))
    monkeypatch.setattr(io, "available_memory", lambda: 2 * 48)  # exactly the two copies a read holds
    assert read_volume(path).shape == (2, 3, 4)
    monkeypatch.setattr(io, "available_memory", lambda: 2 * 48 - 1)
    with pytest.raises(InputError, match="small.nrrd: its header claims a 4 x 3 x 2 image"):
        read_volume(path)



def _forged(path: Path) -> Path:
    """A tiny file of ``path``'s format whose header claims 2048 x 2048 x 512 int16 voxels (4 GiB)."""
    import gzip
    import struct

    name = path.name
    if name.endswith(".nrrd"):
        path.write_text(_nrrd_header("2048 2048 512"))
    elif name.endswith((".nii", ".nii.gz")):  # NIfTI-1: 348-byte header, voxels from byte 352
        header = bytearray(352)
        struct.pack_into("<i", header, 0, 348)
        struct.pack_into("<8h", header, 40, 3, 2048, 2048, 512, 1, 1, 1, 1)
        struct.pack_into("<2h", header, 70, 4, 16)  # datatype int16, 16 bits per voxel
        struct.pack_into("<8f", header, 76, 1, 1, 1, 1, 1, 1, 1, 1)
        struct.pack_into("<f", header, 108, 352.0)
        header[344:348] = b"n+1\0"
        path.write_bytes(gzip.compress(bytes(header)) if name.endswith(".gz") else bytes(header))
    else:  # MetaImage, zlib-compressed voxels: a few bytes of them
        path.write_bytes(b"ObjectType = Image\nNDims = 3\nDimSize = 2048 2048 512\nElementType = MET_SHORT\n"
                         b"CompressedData = True\nElementDataFile = LOCAL\n" + bytes(16))
    return path


@pytest.mark.parametrize("suffix", [".nrrd", ".nii", ".nii.gz", ".mha"])
def test_header_claiming_more_than_the_file_holds_is_refused_whatever_memory_is_free(tmp_path, monkeypatch, suffix):
    """The issue's 4 GiB claim in a tiny file, on a computer with memory to spare: refused from the
    file's size, quickly, before anything is allocated."""
    monkeypatch.setattr(io, "available_memory", lambda: 1024 ** 5)
    path = _forged(tmp_path / f"claims_4gib{suffix}")
    start = time.monotonic()
    with pytest.raises(InputError, match=r"claims a 2048 x 2048 x 512 image .* \(4.0 GiB\) but the file has only "
                                         r".*: a truncated or damaged file, not read"):
        read_volume(path)
    assert time.monotonic() - start < 1.0
