"""Batch segmentation (issue #29, parts 1 and 2): a folder of volumes, a CSV list or a dataset JSON;
one model load; a failing case recorded and the run going on; ``--resume``; and the same command
under torchrun (2 CPU processes, gloo) doing every case exactly once with the outputs of a
single-process run. Arrays are ``(z, y, x)``.
"""

import csv
import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

from MedicalSAM3Core import cli
from MedicalSAM3Core.batch import list_cases, shard
from MedicalSAM3Core.common.errors import InputError
from test_dicom_series import _stack, _write_series

REPO = Path(__file__).resolve().parents[2]


def _write(path, array, spacing=(0.8, 0.8, 2.5)):
    image = sitk.GetImageFromArray(array.astype(np.int16))
    image.SetSpacing(spacing)
    sitk.WriteImage(image, str(path))


def _scans(folder, phantom):
    """Two NIfTI scans, one NRRD and a DICOM series sub-folder: four cases."""
    folder.mkdir()
    _write(folder / "ct_a.nii.gz", phantom[:5])
    _write(folder / "ct_b.nii.gz", phantom[2:7])
    _write(folder / "ct_c.nrrd", phantom[1:5, ::-1])
    _write_series(folder / "ct_d", _stack(4), pixels=phantom[:4])
    (folder / "notes.txt").write_text("not a volume")
    return folder


def _summary(path):
    return {row["case"]: row for row in csv.DictReader(path.open())}


def _args(source, out, model, *extra):
    return ["segment", str(source), "-p", "liver, kidneys", "--model", str(model), "--output-dir", str(out),
            "--mode", "slices", "--quiet", *extra]


def test_a_folder_of_volumes_is_segmented_with_one_model_load_and_a_bad_case_does_not_stop_it(
        tmp_path, phantom, tiny_model_dir, monkeypatch, capsys):
    import MedicalSAM3Core.inference.models as models

    loads = []
    real_load = models.load_model
    monkeypatch.setattr(models, "load_model", lambda *a, **k: loads.append(a) or real_load(*a, **k))
    scans = _scans(tmp_path / "scans", phantom)
    (scans / "ct_broken.nii.gz").write_bytes(b"not a NIfTI file")
    out = tmp_path / "out"
    assert cli.main(_args(scans, out, tiny_model_dir)) == 1  # a case failed
    assert len(loads) == 1
    rows = _summary(out / "summary.csv")
    assert list(rows) == ["ct_a", "ct_b", "ct_broken", "ct_c", "ct_d"]
    assert {c: r["status"] for c, r in rows.items()} == {"ct_a": "done", "ct_b": "done", "ct_broken": "failed",
                                                         "ct_c": "done", "ct_d": "done"}
    assert "ct_broken.nii.gz" in rows["ct_broken"]["error"]
    assert "Left kidney volume_ml" in rows["ct_a"] and "Right kidney confidence" in rows["ct_a"]
    for case in ("ct_a", "ct_b", "ct_c", "ct_d"):
        label_map = sitk.ReadImage(str(out / f"{case}.nii.gz"))
        source = scans / (f"{case}.nii.gz" if case in ("ct_a", "ct_b") else "ct_c.nrrd" if case == "ct_c" else case)
        reference = sitk.ReadImage(str(source)) if source.is_file() else None
        if reference is not None:  # the input's grid
            assert label_map.GetSize() == reference.GetSize()
            np.testing.assert_allclose(label_map.GetSpacing(), reference.GetSpacing(), rtol=1e-6)
        sidecar = json.loads((out / f"{case}.json").read_text())
        assert [label["name"] for label in sidecar["labels"]] == ["Liver", "Left kidney", "Right kidney"]
        volumes = {label["name"]: label["volume_ml"] for label in sidecar["labels"]}
        assert float(rows[case]["Liver volume_ml"]) == pytest.approx(volumes["Liver"])
    err = capsys.readouterr().err
    assert "case 3/5 ct_broken failed" in err and "case 5/5 ct_d done" in err

    # --resume: the finished cases are kept (not recomputed), the broken one, now fixed, is done
    _write(scans / "ct_broken.nii.gz", phantom[:3])
    before = {case: (out / f"{case}.nii.gz").stat().st_mtime_ns for case in ("ct_a", "ct_d")}
    assert cli.main(_args(scans, out, tiny_model_dir, "--resume")) == 0
    rows = _summary(out / "summary.csv")
    assert rows["ct_broken"]["status"] == "done" and rows["ct_a"]["status"] == "done earlier"
    assert rows["ct_a"]["Liver volume_ml"] != ""  # read back from its sidecar
    assert {case: (out / f"{case}.nii.gz").stat().st_mtime_ns for case in ("ct_a", "ct_d")} == before
    # without --resume or --overwrite an earlier batch is not overwritten
    assert cli.main(_args(scans, out, tiny_model_dir)) == 2
    assert "--resume to go on with it" in capsys.readouterr().err


def test_csv_lists_and_dataset_jsons_name_their_cases(tmp_path, phantom):
    scans = _scans(tmp_path / "scans", phantom)
    listing = tmp_path / "list.csv"
    listing.write_text("id,path,series\nfirst,scans/ct_b.nii.gz,\nsecond,scans/ct_d,\n")
    assert [(c.id, c.path.name) for c in list_cases(listing)] == [("first", "ct_b.nii.gz"), ("second", "ct_d")]
    dataset = tmp_path / "dataset.json"
    dataset.write_text(json.dumps({"labels": {"1": "liver"}, "cases": [{"id": "p1", "image": "scans/ct_a.nii.gz"},
                                                                        {"image": "scans/ct_c.nrrd"}]}))
    assert [c.id for c in list_cases(dataset)] == ["p1", "ct_c"]
    twice = tmp_path / "twice.csv"
    twice.write_text("path\nscans/ct_a.nii.gz\nscans/ct_a.nii.gz\n")
    with pytest.raises(InputError, match="two cases named 'ct_a'"):
        list_cases(twice)
    missing = tmp_path / "missing.csv"
    missing.write_text("path\nscans/none.nii.gz\n")
    with pytest.raises(InputError, match="do not exist"):
        list_cases(missing)
    assert [c.id for c in shard(list_cases(scans), 1, 2)] == ["ct_b", "ct_d"]


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_torchrun_shards_the_cases_over_two_processes_with_the_outputs_of_one(tmp_path, phantom, tiny_model_dir):
    scans = _scans(tmp_path / "scans", phantom)
    single, sharded = tmp_path / "single", tmp_path / "sharded"
    assert cli.main(_args(scans, single, tiny_model_dir)) == 0
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    done = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nnodes", "1", "--nproc-per-node", "2",
                           "--master-addr", "127.0.0.1", "--master-port", str(_free_port()), "-m", "MedicalSAM3Core",
                           *_args(scans, sharded, tiny_model_dir)], cwd=tmp_path, env=env, capture_output=True,
                          text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "[rank 0/2]: 2 of 4 cases" in done.stderr and "[rank 1/2]: 2 of 4 cases" in done.stderr
    rows = _summary(sharded / "summary.csv")
    assert list(rows) == ["ct_a", "ct_b", "ct_c", "ct_d"] and all(r["status"] == "done" for r in rows.values())
    for case in rows:  # each case once, the single-process outputs
        np.testing.assert_array_equal(sitk.GetArrayFromImage(sitk.ReadImage(str(sharded / f"{case}.nii.gz"))),
                                      sitk.GetArrayFromImage(sitk.ReadImage(str(single / f"{case}.nii.gz"))))
    assert sorted(p.name for p in sharded.iterdir()) == sorted(p.name for p in single.iterdir())
