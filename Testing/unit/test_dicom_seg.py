"""DICOM SEG output (issue #29, part 4): a result on a DICOM series goes back to PACS as a DICOM
Segmentation that references the series, one segment per label with its SNOMED CT codes and the
algorithm identification; read back with highdicom and, independently, with pydicom, its masks
and geometry are the label map's. Geometry is LPS; arrays are ``(z, y, x)``.
"""

import numpy as np
import pydicom
import pytest

highdicom = pytest.importorskip("highdicom")

from MedicalSAM3Core import cli  # noqa: E402
from MedicalSAM3Core.common.errors import InputError  # noqa: E402
from MedicalSAM3Core.common.prompts import default_dictionary  # noqa: E402
from MedicalSAM3Core.common.result import LabelInfo, SegmentationResult  # noqa: E402
from MedicalSAM3Core.imaging.io import read_volume  # noqa: E402
from MedicalSAM3Core.imaging.outputs import OutputPaths, write_result  # noqa: E402
from test_dicom_series import AXIAL, UID_A, _oblique, _stack, _write_series  # noqa: E402

SEGMENTATION_STORAGE = "1.2.840.10008.5.1.4.1.1.66.4"


def _label(value, prompt, dictionary=default_dictionary()):
    resolved = dictionary.resolve(prompt)
    concept = resolved.concept
    return LabelInfo(value=value, name=resolved.name, prompt=prompt, model_text=resolved.model_text,
                     color=resolved.color, known_concept=concept is not None,
                     terminology=concept.terminology() if concept else None)


def _result(volume, label_map):
    labels = [_label(1, "left kidney"), _label(2, "liver"), _label(3, "my structure"), _label(4, "spleen")]
    return SegmentationResult(label_map=label_map, geometry=volume.geometry, labels=labels, model_id="/models/demo_model")


@pytest.mark.parametrize("orientation", [AXIAL, _oblique()], ids=["axial", "oblique"])
def test_a_dicom_seg_references_the_series_and_holds_the_label_map(tmp_path, orientation):
    positions = _stack(6, spacing=2.5, orientation=orientation)
    folder = _write_series(tmp_path / "ct", positions[::-1], [orientation] * 6, rows=8, columns=7,
                           pixels=np.random.default_rng(0).integers(-100, 100, (6, 8, 7)))
    volume = read_volume(folder)
    label_map = np.zeros(volume.shape, np.uint8)
    label_map[1:4, 2:5, 1:3] = 1
    label_map[0:2, 5:8, 4:7] = 2
    label_map[5, 0, 0] = 3  # label 4 (spleen) found nothing: described, no frame
    paths = OutputPaths.beside(tmp_path / "out" / "seg.nii.gz", dicom_seg=True)
    paths.label_map.parent.mkdir()
    write_result(_result(volume, label_map), paths, volume)
    assert paths.dicom_seg.name == "seg.seg.dcm"

    seg = highdicom.seg.segread(paths.dicom_seg)
    sources = [pydicom.dcmread(f) for f in volume.dicom_files]
    assert seg.SOPClassUID == SEGMENTATION_STORAGE and seg.Modality == "SEG"
    assert seg.StudyInstanceUID == sources[0].StudyInstanceUID
    assert seg.FrameOfReferenceUID == sources[0].FrameOfReferenceUID
    assert seg.ReferencedSeriesSequence[0].SeriesInstanceUID == UID_A
    referenced = {item.ReferencedSOPInstanceUID for item in seg.ReferencedSeriesSequence[0].ReferencedInstanceSequence}
    assert referenced == {s.SOPInstanceUID for s in sources}

    # segments: number = label value, the dictionary's codes, laterality nested as DICOM nests it
    segments = {item.SegmentNumber: item for item in seg.SegmentSequence}
    assert sorted(segments) == [1, 2, 3, 4]
    kidney = segments[1]
    assert kidney.SegmentLabel == "Left kidney" and kidney.SegmentAlgorithmType == "AUTOMATIC"
    kind = kidney.SegmentedPropertyTypeCodeSequence[0]
    assert (kind.CodeValue, kind.CodingSchemeDesignator) == ("64033007", "SCT")
    assert kind.SegmentedPropertyTypeModifierCodeSequence[0].CodeValue == "7771000"
    assert kidney.SegmentedPropertyCategoryCodeSequence[0].CodeValue == "123037004"
    algorithm = kidney.SegmentationAlgorithmIdentificationSequence[0]
    assert algorithm.AlgorithmName == "Medical SAM3 demo_model"
    assert algorithm.AlgorithmFamilyCodeSequence[0].CodeMeaning == "Artificial Intelligence"
    free = segments[3].SegmentedPropertyTypeCodeSequence[0]
    assert (free.CodingSchemeDesignator, free.CodeMeaning) == ("99MEDSAM3", "my structure")
    assert segments[2].SegmentedPropertyTypeCodeSequence[0].CodeValue == "10200004"

    # highdicom's reading: the label map back, slice by slice on the source instances
    uids = [s.SOPInstanceUID for s in sources]
    back = seg.get_pixels_by_source_instance(uids, combine_segments=True, ignore_spatial_locations=True)
    np.testing.assert_array_equal(back, label_map)

    # pydicom's reading, independent of highdicom: every frame's position and orientation is its
    # slice's, and its bits are that slice's mask of its segment
    raw = pydicom.dcmread(paths.dicom_seg)
    frames = raw.pixel_array.reshape(-1, 8, 7)
    position_of = {tuple(np.round(np.asarray(s.ImagePositionPatient, float), 3)): k
                   for k, s in enumerate(sources)}
    orientation_read = raw.SharedFunctionalGroupsSequence[0].PlaneOrientationSequence[0].ImageOrientationPatient
    np.testing.assert_allclose(np.asarray(orientation_read, float), np.ravel(orientation), atol=1e-5)
    spacing = raw.SharedFunctionalGroupsSequence[0].PixelMeasuresSequence[0]
    np.testing.assert_allclose([float(v) for v in spacing.PixelSpacing], [0.75, 0.5], atol=1e-6)  # rows, columns
    rebuilt = np.zeros_like(label_map)
    for frame, group in zip(frames, raw.PerFrameFunctionalGroupsSequence):
        k = position_of[tuple(np.round(np.asarray(group.PlanePositionSequence[0].ImagePositionPatient, float), 3))]
        number = group.SegmentIdentificationSequence[0].ReferencedSegmentNumber
        rebuilt[k][frame.astype(bool)] = number
    np.testing.assert_array_equal(rebuilt, label_map)
    assert len(frames) == 3 + 2 + 1  # empty frames omitted


def test_a_result_off_the_series_grid_is_refused_and_nothing_is_written(tmp_path):
    folder = _write_series(tmp_path / "ct", _stack(4), rows=6, columns=5)
    volume = read_volume(folder)
    moved = SegmentationResult(label_map=np.ones(volume.shape, np.uint8), labels=[_label(1, "liver")],
                               geometry=type(volume.geometry)(origin=(0.0, 0.0, 0.0), spacing=volume.geometry.spacing,
                                                              direction=volume.geometry.direction))
    paths = OutputPaths.beside(tmp_path / "seg.nii.gz", dicom_seg=True)
    with pytest.raises(InputError, match="not the same grid"):
        write_result(moved, paths, volume)
    assert not any(p.exists() for p in paths.all())


def test_cli_writes_a_dicom_seg_for_a_series_and_refuses_it_for_a_file(tmp_path, tiny_model_dir, phantom, capsys):
    scan = phantom[:4]
    folder = _write_series(tmp_path / "ct", _stack(len(scan)), pixels=scan)
    out = tmp_path / "seg.nii.gz"
    code = cli.main(["segment", str(folder), "-p", "liver, kidneys", "--model", str(tiny_model_dir), "-o", str(out),
                     "--dicom-seg", "--quiet", "--mode", "slices"])
    assert code == 0
    seg = highdicom.seg.segread(tmp_path / "seg.seg.dcm")
    assert [item.SegmentLabel for item in seg.SegmentSequence] == ["Liver", "Left kidney", "Right kidney"]
    assert f"wrote {tmp_path / 'seg.seg.dcm'}" in capsys.readouterr().out

    nifti = tmp_path / "scan.nii.gz"
    import SimpleITK as sitk

    sitk.WriteImage(sitk.GetImageFromArray(scan), str(nifti))
    code = cli.main(["segment", str(nifti), "-p", "liver", "--model", str(tmp_path / "no-such-model"),
                     "-o", str(tmp_path / "n.nii.gz"), "--dicom-seg", "--quiet"])
    assert code == 2
    err = capsys.readouterr().err
    assert "--dicom-seg needs a DICOM series" in err and "no-such-model" not in err  # refused before the model
    assert not (tmp_path / "n.seg.dcm").exists() and not (tmp_path / "n.nii.gz").exists()


def test_blank_sop_uids_come_from_the_file_meta_and_a_series_without_study_uid_is_refused_before_the_model(
        tmp_path, tiny_model_dir, phantom, capsys):
    """De-identification tools may blank UIDs (the sample set's DICOM series has no Study, Series,
    SOP Class or SOP Instance UID in its datasets). The SOP UIDs equal the file meta's Media Storage
    SOP UIDs by definition and are taken from there; a missing Study UID cannot be made up."""
    scan = phantom[:4]
    folder = _write_series(tmp_path / "ct", _stack(len(scan)), pixels=scan)
    for path in sorted(folder.iterdir()):
        dataset = pydicom.dcmread(path)
        dataset.SOPInstanceUID, dataset.SOPClassUID = "", ""
        dataset.save_as(path)
    out = tmp_path / "seg.nii.gz"
    args = ["segment", str(folder), "-p", "liver", "--model", str(tiny_model_dir), "-o", str(out), "--dicom-seg",
            "--quiet", "--mode", "slices"]
    assert cli.main(args) == 0
    seg = highdicom.seg.segread(tmp_path / "seg.seg.dcm")
    referenced = {i.ReferencedSOPInstanceUID for i in seg.ReferencedSeriesSequence[0].ReferencedInstanceSequence}
    assert referenced == {pydicom.dcmread(p).file_meta.MediaStorageSOPInstanceUID for p in folder.iterdir()}

    for path in sorted(folder.iterdir()):
        dataset = pydicom.dcmread(path)
        dataset.StudyInstanceUID = ""
        dataset.save_as(path)
    args[1 + args.index("--model")] = str(tmp_path / "no-such-model")  # refused before the model would load
    assert cli.main(args[:7] + [str(tmp_path / "again.nii.gz")] + args[8:]) == 2
    err = capsys.readouterr().err
    assert "has no StudyInstanceUID" in err and "no-such-model" not in err
    assert not (tmp_path / "again.nii.gz").exists()


def test_evaluate_takes_a_dicom_seg_as_prediction_or_as_ground_truth(tmp_path, capsys):
    """``medsam3 evaluate`` places a SEG on the other side's grid (here a NIfTI stored with its axes
    flipped, as RAS exporters write): the SEG of a label map scores Dice 1 against that label map,
    either way round, and its segment labels name the prediction's values."""
    import csv

    import SimpleITK as sitk

    from MedicalSAM3Core.imaging.io import image_from_array

    folder = _write_series(tmp_path / "ct", _stack(5, orientation=_oblique()), [_oblique()] * 5, rows=8, columns=7)
    volume = read_volume(folder)
    label_map = np.zeros(volume.shape, np.uint8)
    label_map[1:4, 2:6, 1:5] = 1
    label_map[0:2, 6:8, 4:7] = 2
    paths = OutputPaths.beside(tmp_path / "pred" / "case.nii.gz", dicom_seg=True)
    paths.label_map.parent.mkdir()
    write_result(_result(volume, label_map), paths, volume)
    truth_values = np.where(label_map == 1, 7, np.where(label_map == 2, 9, 0)).astype(np.uint8)
    flipped = sitk.Flip(image_from_array(truth_values, volume.geometry), [True, True, False])  # same voxel centres
    (tmp_path / "gt").mkdir()
    sitk.WriteImage(flipped, str(tmp_path / "gt" / "case.nii.gz"))

    def scores(pred, gt, labels, out):
        assert cli.main(["evaluate", "--pred", str(pred), "--gt", str(gt), "--labels", labels, "-o", str(out)]) == 0
        return {r["structure"]: float(r["dice"]) for r in csv.DictReader((out / "metrics.csv").open())}

    # prediction values from the SEG's segment labels (no sidecar consulted: PRED left out)
    assert scores(paths.dicom_seg, tmp_path / "gt" / "case.nii.gz", "left kidney=:7,liver=:9", tmp_path / "e1") == \
        {"left kidney": 1.0, "liver": 1.0}
    # the SEG as ground truth for the NIfTI prediction (values 1, 2 on both sides)
    assert scores(paths.label_map, paths.dicom_seg, "left kidney=1:1,liver=2:2", tmp_path / "e2") == \
        {"left kidney": 1.0, "liver": 1.0}
    # a SEG on another grid is refused, naming the frame
    other = read_volume(_write_series(tmp_path / "other", _stack(5, spacing=4.0), rows=8, columns=7))
    sitk.WriteImage(image_from_array(truth_values, other.geometry), str(tmp_path / "other.nii.gz"))
    assert cli.main(["evaluate", "--pred", str(paths.dicom_seg), "--gt", str(tmp_path / "other.nii.gz"), "--labels",
                     "liver=2:9", "-o", str(tmp_path / "e3")]) == 2
    assert "frame 1 does not lie on the voxel grid" in capsys.readouterr().err
