"""The command line as a user runs it: outputs on the input grid, clear errors, nothing partial."""

import errno
import json
import os
import re
from types import SimpleNamespace

import numpy as np
import pytest
import SimpleITK as sitk

from MedicalSAM3Core import cli
from MedicalSAM3Core.common.volume import Geometry
from MedicalSAM3Core.imaging.io import read_volume, write_volume
from MedicalSAM3Core.inference import engine

LOW = ["--threshold", "0.2", "--new-object-threshold", "0.22"]
OBLIQUE = Geometry((0.7, 0.8, 2.5), (10.0, -20.0, 30.0),
                   (0.936, -0.275, 0.218, 0.289, 0.956, -0.043, -0.196, 0.104, 0.975))


@pytest.fixture
def ct_file(tmp_path, phantom):
    path = tmp_path / "ct.nii.gz"
    write_volume(phantom, OBLIQUE, path)
    return path


def _files(folder):
    return sorted(p.name for p in folder.iterdir())


def test_segment_writes_label_map_sidecar_seg_nrrd_and_overlay_on_the_input_grid(tmp_path, ct_file, tiny_model_dir,
                                                                                  capsys):
    out = tmp_path / "out" / "liver_spleen.nii.gz"
    code = cli.main(["segment", str(ct_file), "--prompt", "liver", "-p", "spleen, IVC", "--model", str(tiny_model_dir),
                     "-o", str(out), "--seg-nrrd", "--overlay", "--quiet", *LOW])
    assert code == 0
    assert _files(out.parent) == ["liver_spleen.json", "liver_spleen.nii.gz", "liver_spleen.seg.nrrd",
                                  "liver_spleen_overlay.png"]
    labels = read_volume(out)
    source = read_volume(ct_file)
    assert labels.shape == source.shape and labels.array.dtype == np.uint8
    np.testing.assert_allclose(labels.geometry.ijk_to_lps(), source.geometry.ijk_to_lps(), atol=1e-4)
    sidecar = json.loads((out.parent / "liver_spleen.json").read_text())
    assert [label["name"] for label in sidecar["labels"]] == ["Liver", "Spleen", "Inferior vena cava"]
    for label in sidecar["labels"]:
        assert label["voxel_count"] == int((labels.array == label["value"]).sum())
        assert set(label) >= {"value", "name", "prompt", "confidence", "voxel_count", "volume_ml", "color"}
    seg = sitk.ReadImage(str(out.parent / "liver_spleen.seg.nrrd"))
    assert seg.GetMetaData("Segment0_Name") == "Liver" and seg.GetMetaData("Segment2_LabelValue") == "3"
    assert "SCT^10200004^Liver" in seg.GetMetaData("Segment0_Tags")
    np.testing.assert_array_equal(sitk.GetArrayFromImage(seg), labels.array)
    assert "Liver" in capsys.readouterr().out


@pytest.mark.parametrize("args, message", [
    (["segment", "{missing}", "-p", "liver"], "no such file"),
    (["segment", "{notimage}", "-p", "liver"], "cannot be read as a medical image"),
    (["segment", "{image2d}", "-p", "liver"], "2D image"),
    (["segment", "{image4d}", "-p", "liver"], "4D image"),
    (["segment", "{nan}", "-p", "liver"], "NaN"),
    (["segment", "{ct}", "-p", "  "], "empty prompt"),
    (["segment", "{ct}", "-p", "liver", "-p", "Liver"], "same structure"),
    (["segment", "{ct}", "-p", "liver", "--model", "{missing}"], "no such model folder"),
    (["segment", "{ct}", "-p", ",".join(f"s{i}" for i in range(256))], "do not fit a uint8"),
])
def test_bad_input_exits_2_with_a_message_and_writes_nothing(tmp_path, ct_file, tiny_model_dir, capsys, args, message):
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "notes.nii.gz").write_text("not an image")
    sitk.WriteImage(sitk.Image(8, 9, sitk.sitkInt16), str(bad / "slice.nrrd"))
    sitk.WriteImage(sitk.Image([4, 5, 6, 2], sitk.sitkInt16), str(bad / "t.nii.gz"))
    nan = np.zeros((3, 8, 8), np.float32)
    nan[1, 1, 1] = np.nan
    sitk.WriteImage(sitk.GetImageFromArray(nan), str(bad / "nan.mha"))
    names = {"missing": bad / "missing.nii.gz", "notimage": bad / "notes.nii.gz", "image2d": bad / "slice.nrrd",
             "image4d": bad / "t.nii.gz", "nan": bad / "nan.mha", "ct": ct_file}
    argv = [a.format(**names) for a in args]
    if "--model" not in argv:
        argv += ["--model", str(tiny_model_dir)]
    out = tmp_path / "result" / "seg.nii.gz"
    assert cli.main(argv + ["-o", str(out), "--quiet"]) == 2
    assert message in capsys.readouterr().err
    assert not out.parent.exists() or _files(out.parent) == []


def test_existing_outputs_are_never_overwritten_silently(tmp_path, ct_file, tiny_model_dir, capsys):
    out = tmp_path / "seg.nii.gz"
    out.write_bytes(b"precious")
    argv = ["segment", str(ct_file), "-p", "liver", "--model", str(tiny_model_dir), "-o", str(out), "--quiet",
            "--mode", "slices"]
    assert cli.main(argv) == 2
    assert "already exist" in capsys.readouterr().err and out.read_bytes() == b"precious"
    assert cli.main(argv + ["--overwrite"]) == 0 and out.read_bytes() != b"precious"


def test_ctrl_c_during_segmentation_leaves_no_file(tmp_path, ct_file, tiny_model_dir, monkeypatch, capsys):
    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(engine.Segmenter, "segment", interrupted)
    out = tmp_path / "out" / "seg.nii.gz"
    code = cli.main(["segment", str(ct_file), "-p", "liver", "--model", str(tiny_model_dir), "-o", str(out),
                     "--seg-nrrd", "--quiet"])
    assert code == 130 and "cancelled" in capsys.readouterr().err
    assert not out.parent.exists() or _files(out.parent) == []


def _error_line(err: str) -> str:
    """The one ``medsam3: error:`` sentence of ``err`` (asserting there is one, and no traceback)."""
    errors = [line for line in err.splitlines() if line.startswith("medsam3: error: ")]
    assert len(errors) == 1 and "Traceback" not in err, err
    return errors[0]


@pytest.fixture
def no_model_load(monkeypatch):
    """Fails the test if the model loads: the refusal must come before it."""
    from MedicalSAM3Core.inference import models

    def load_model(*args, **kwargs):
        raise AssertionError("the model was loaded before the refusal")

    monkeypatch.setattr(models, "load_model", load_model)


def test_failure_while_writing_outputs_leaves_no_partial_set(tmp_path, ct_file, tiny_model_dir, monkeypatch, capsys):
    """Issue #30 item 7: a failure while writing (here the disk filling up in the middle of the .seg.nrrd,
    as SimpleITK reports it) is one sentence with exit 2, and no output, staged or final, is left."""
    from MedicalSAM3Core.imaging import io

    write = sitk.WriteImage

    def disk_fills_up(image, path, *args, **kwargs):
        if path.endswith(".seg.nrrd"):
            with open(path, "wb") as file:
                file.write(b"NRRD0004\n")
            raise RuntimeError("ITK ERROR: NrrdImageIO: Write failed.\nReason: No space left on device")
        write(image, path, *args, **kwargs)

    monkeypatch.setattr(io.sitk, "WriteImage", disk_fills_up)
    out = tmp_path / "out" / "seg.nii.gz"
    code = cli.main(["segment", str(ct_file), "-p", "liver", "--model", str(tiny_model_dir), "-o", str(out),
                     "--seg-nrrd", "--quiet", "--mode", "slices"])
    error = _error_line(capsys.readouterr().err)
    assert code == 2 and "cannot write the outputs" in error and "No space left on device" in error, error
    assert _files(out.parent) == []


def _image_file(path, spacing=(1.0, 1.0, 1.0), origin=(0.0, 0.0, 0.0)):
    image = sitk.GetImageFromArray(np.zeros((3, 8, 8), np.int16))
    image.SetSpacing(spacing)
    image.SetOrigin(origin)
    sitk.WriteImage(image, str(path))
    return path


@pytest.mark.parametrize("name, geometry, value", [
    ("spacing.mha", {"spacing": (1e200, 1.0, 1.0)}, "spacing (1e+200, 1, 1) mm"),
    ("origin.nrrd", {"origin": (1e300, 0.0, 0.0)}, "origin (1e+300, 0, 0) mm"),
])
def test_a_file_with_an_implausible_geometry_is_refused_before_the_model_loads(tmp_path, capsys, no_model_load,
                                                                               name, geometry, value):
    """Issue #30 item 4: spacing 1e200 used to run the whole job and write ``Infinity`` volumes into the
    sidecar. (A NaN spacing cannot be written: SimpleITK refuses it, and its reader refuses it in a file.)"""
    path = _image_file(tmp_path / name, **geometry)
    out = tmp_path / "out" / "seg.nii.gz"
    code = cli.main(["segment", str(path), "-p", "liver", "-o", str(out), "--model", "unused"])
    error = _error_line(capsys.readouterr().err)
    assert code == 2 and str(path) in error and "implausible geometry" in error and value in error, error
    assert not out.parent.exists()


def test_a_folder_that_takes_no_file_is_refused_before_any_work(tmp_path, ct_file, capsys, no_model_load,
                                                                 monkeypatch):
    """Issue #30 item 7: root passes ``os.access`` on a read-only file system, so writability is probed by
    creating a file; here the probe meets a read-only file system."""
    from MedicalSAM3Core.imaging import outputs

    def read_only(folder):
        raise OSError(errno.EROFS, os.strerror(errno.EROFS), str(folder))

    monkeypatch.setattr(outputs, "_probe", read_only)
    code = cli.main(["segment", str(ct_file), "-p", "liver", "-o", str(tmp_path / "seg.nii.gz"), "--model", "unused"])
    error = _error_line(capsys.readouterr().err)
    assert code == 2 and f"cannot write to folder {tmp_path}" in error and "Read-only file system" in error, error


@pytest.mark.parametrize("below", ["notes.txt", "notes.txt/sub"])
def test_an_output_folder_below_a_file_is_refused_before_any_work(tmp_path, ct_file, capsys, no_model_load, below):
    """A real failure to create a file, even for root: the output folder would have to be made inside a file."""
    (tmp_path / "notes.txt").write_text("a file, not a folder")
    code = cli.main(["segment", str(ct_file), "-p", "liver", "-o", str(tmp_path / below / "seg.nii.gz"),
                     "--model", "unused"])
    error = _error_line(capsys.readouterr().err)
    assert code == 2 and f"{tmp_path / 'notes.txt'} is a file, not a folder" in error, error
    assert (tmp_path / "notes.txt").read_text() == "a file, not a folder"


def test_too_little_free_space_is_refused_after_reading_and_before_the_model_loads(tmp_path, ct_file, capsys,
                                                                                   no_model_load, monkeypatch):
    """The outputs' upper bound (label map and .seg.nrrd uncompressed, overlay, sidecar) must fit the disk."""
    import shutil

    monkeypatch.setattr(shutil, "disk_usage", lambda path: SimpleNamespace(total=10 ** 9, used=10 ** 9 - 1000,
                                                                           free=1000))
    code = cli.main(["segment", str(ct_file), "-p", "liver", "-o", str(tmp_path / "out" / "seg.nii.gz"),
                     "--seg-nrrd", "--overlay", "--model", "unused"])
    error = _error_line(capsys.readouterr().err)
    assert code == 2 and f"not enough free space in {tmp_path}" in error and "1000 bytes is free" in error, error


def test_console_script_is_installed_and_prints_help():
    import subprocess
    import sys
    from pathlib import Path

    exe = Path(sys.executable).parent / "medsam3"
    assert exe.is_file(), "the medsam3 entry point is not installed next to this Python"
    out = subprocess.run([str(exe), "segment", "--help"], capture_output=True, text=True, check=True)
    assert "--prompt" in out.stdout and "--seg-nrrd" in out.stdout


def test_the_time_left_is_estimated_after_one_slice_on_a_cpu(tmp_path, phantom, tiny_model_dir, monkeypatch, capsys):
    """With a stand-in slice time of 37 s (the full-size model on 2 CPU cores), a 20-slice run is
    announced as about 12 minutes, with the hint to use a GPU server."""
    from MedicalSAM3Core.common import progress

    volume = np.concatenate([phantom] * (20 // phantom.shape[0] + 1))[:20]
    path = tmp_path / "ct20.nii.gz"
    write_volume(volume, OBLIQUE, path)
    ticks = iter(range(0, 10 ** 6, 37))
    monkeypatch.setattr(progress, "_now", lambda: float(next(ticks)))  # each reading: 37 s later
    code = cli.main(["segment", str(path), "-p", "liver", "--model", str(tiny_model_dir), "--mode", "slices",
                     "--device", "cpu", "-o", str(tmp_path / "out.nii.gz"), *LOW])
    assert code == 0
    err = capsys.readouterr().err
    # one slice done (the first batch on a CPU is one slice) in 37 s: 19 to go, 703 s
    assert "medsam3: about 12 min on this computer; a GPU server takes seconds" in err
    assert err.count("medsam3: about") == 1


def test_the_input_scan_is_never_replaced_by_an_output_even_with_overwrite(tmp_path, ct_file, tiny_model_dir,
                                                                           capsys):
    """Issue #30, item 5: ``-o in.nii.gz --overwrite`` on ``in.nii.gz`` used to replace the CT."""
    original = ct_file.read_bytes()
    link = tmp_path / "link.nii.gz"
    link.symlink_to(ct_file)
    series = tmp_path / "series"  # a DICOM folder: its files are the scan
    series.mkdir()
    (series / "IM0001").write_bytes(b"a slice")
    cases = [(ct_file, ct_file), (ct_file, tmp_path / "." / ct_file.name), (ct_file, link),
             (series, series / "IM0001")]
    for source, out in cases:
        code = cli.main(["segment", str(source), "-p", "liver", "-o", str(out), "--model", str(tiny_model_dir),
                         "--quiet", "--mode", "slices", "--overwrite"])
        err = capsys.readouterr().err
        assert code == 2 and "would replace" in err and "never overwritten" in err, (out, err)
    assert ct_file.read_bytes() == original and (series / "IM0001").read_bytes() == b"a slice"


@pytest.mark.parametrize("name", ["out.nhdr", "out.mhd", "out.png", "out.txt", "out.jpg", "out"])
def test_only_one_file_volume_formats_are_accepted_before_any_work(tmp_path, ct_file, capsys, name):
    """Issue #30 items 6 and 7: checked before the model loads (the model here does not even exist)."""
    out = tmp_path / "result" / name
    code = cli.main(["segment", str(ct_file), "-p", "liver", "--model", str(tmp_path / "no_model"), "-o", str(out)])
    err = capsys.readouterr().err
    assert code == 2 and "cannot write the label map" in err and ".nii.gz" in err, err
    assert not out.parent.exists()


def test_too_many_prompts_for_the_label_type_are_refused_before_the_model_loads(tmp_path, ct_file, capsys):
    prompts = ",".join(f"structure {i}" for i in range(256))
    code = cli.main(["segment", str(ct_file), "-p", prompts, "--model", str(tmp_path / "no_model"),
                     "-o", str(tmp_path / "out.nii.gz")])
    assert code == 2 and "do not fit a uint8" in capsys.readouterr().err


def test_sigterm_cleans_up_like_ctrl_c(tmp_path, phantom, tiny_model_dir):
    import signal
    import subprocess
    import sys
    import time

    path = tmp_path / "long.nii.gz"
    write_volume(np.concatenate([phantom] * 40), OBLIQUE, path)
    out = tmp_path / "out" / "seg.nii.gz"
    process = subprocess.Popen([sys.executable, "-m", "MedicalSAM3Core", "segment", str(path), "-p", "liver",
                                "--model", str(tiny_model_dir), "--mode", "slices", "--batch-size", "1",
                                "-o", str(out), "--seg-nrrd"], stderr=subprocess.PIPE, text=True)
    try:
        line, deadline = "", time.monotonic() + 120
        while "medsam3: about" not in line:  # the run is under way (its first slice is done)
            line = process.stderr.readline()
            assert line and time.monotonic() < deadline, "the run did not start"
        process.send_signal(signal.SIGTERM)
        assert process.wait(60) == 130
        assert "cancelled; no output written" in process.stderr.read()
    finally:
        if process.poll() is None:
            process.kill()
    assert not out.parent.exists() or _files(out.parent) == []


def test_prompts_lists_concepts_by_category_with_codes_and_searches(capsys):
    """``medsam3 prompts``: every concept under its category with its SNOMED CT type (laterality as a
    modifier) and synonyms; ``--search`` keeps what contains the word or is spelt like it."""
    from MedicalSAM3Core.cli import main
    from MedicalSAM3Core.common.prompts import default_dictionary

    assert main(["prompts"]) == 0
    listing = capsys.readouterr().out
    assert "Anatomical Structure\n" in listing
    assert all(f"  {concept.name} " in listing for concept in default_dictionary().concepts)
    assert re.search(r"  Left kidney +SCT 64033007 Kidney \+ Left +kidney left, l kidney", listing)
    assert main(["prompts", "--search", "KIDNEY"]) == 0
    found = capsys.readouterr().out
    assert "Left kidney" in found and "Right kidney" in found and "Liver" not in found
    assert main(["prompts", "--search", "oesophagus"]) == 0  # a synonym (British spelling)
    assert "  Esophagus " in capsys.readouterr().out
    assert main(["prompts", "--search", "spleeen"]) == 0  # spelt like a name
    assert "  Spleen " in capsys.readouterr().out
    assert main(["prompts", "--search", "zzzq"]) == 0
    assert "no concept of the prompt dictionary matches 'zzzq'" in capsys.readouterr().out
