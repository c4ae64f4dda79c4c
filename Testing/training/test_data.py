"""Training data: dataset validation, the engine's own preprocessing, masks/boxes, balanced sampling."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch

from MedicalSAM3Core.common.errors import InputError
from Training.data import Augment, BalancedSampler, SliceDataset, load_dataset, masks_to_boxes

PREPROCESS = {"image_size": 56, "mean": [0.5, 0.5, 0.5], "std": [0.5, 0.5, 0.5]}


def _edit(toy_dataset, tmp_path, change):
    folder = tmp_path / "ds"
    shutil.copytree(toy_dataset.parent, folder)
    data = json.loads((folder / "dataset.json").read_text())
    change(data, folder)
    (folder / "dataset.json").write_text(json.dumps(data))
    return folder / "dataset.json"


def test_every_problem_is_listed_at_once(toy_dataset, tmp_path):
    def break_it(data, folder):
        data["labels"]["3"] = "livr"  # typo
        data["labels"]["x"] = "spleen"
        data["cases"].append(dict(data["cases"][0]))  # duplicate id
        data["cases"][1]["image"] = "missing.nii.gz"
        data["cases"][2]["split"] = "test"

    with pytest.raises(InputError) as error:
        load_dataset(_edit(toy_dataset, tmp_path, break_it))
    message = str(error.value)
    for expected in ("'livr' is not a concept", "did you mean Liver", "'x' is not a positive integer",
                     "appears twice", "missing.nii.gz does not exist", "split must be"):
        assert expected in message, message
    assert "5 problem(s)" in message or "6 problem(s)" in message


def test_geometry_mismatch_and_unmapped_values(toy_dataset, tmp_path):
    import SimpleITK as sitk

    def break_it(data, folder):
        label = sitk.ReadImage(str(folder / "case0_seg.nii.gz"))
        label.SetOrigin((5.0, 0.0, 0.0))
        sitk.WriteImage(label, str(folder / "case0_seg.nii.gz"))
        del data["labels"]["2"]

    with pytest.raises(InputError) as error:
        load_dataset(_edit(toy_dataset, tmp_path, break_it))
    assert "not on the same grid" in str(error.value) and "label values [2] are not in 'labels'" in str(error.value)


def test_pixels_are_exactly_what_the_engine_feeds_the_model(toy_dataset, tiny_model):
    from MedicalSAM3Core.common.options import SegmentOptions
    from MedicalSAM3Core.imaging.io import read_volume
    from MedicalSAM3Core.inference.engine import Segmenter
    from MedicalSAM3Core.preprocessing.intensity import to_model_input

    spec = load_dataset(toy_dataset)
    dataset = SliceDataset(spec, spec.cases[:1], PREPROCESS)
    item_index = next(i for i, t in enumerate(dataset.triplets) if t.concept == "Spleen" and t.slice == 2)
    item = dataset[item_index]
    volume = read_volume(spec.cases[0].image)
    segmenter = Segmenter(tiny_model)
    resolved = segmenter.dictionary.resolve_all(["spleen"])
    (group,) = segmenter._intensity_groups(volume, resolved, SegmentOptions())
    engine_input = to_model_input(torch.from_numpy(volume.array[2:3].astype(np.float32)), group.spec,
                                  tiny_model.image_size, tiny_model.mean, tiny_model.std, group.layout)[0]
    torch.testing.assert_close(item["pixel_values"], engine_input)
    assert item["text"] == "Spleen" and item["masks"].shape[0] == 1
    torch.testing.assert_close(item["boxes"], masks_to_boxes(item["masks"]))


def test_masks_boxes_and_negatives(toy_dataset):
    spec = load_dataset(toy_dataset)
    dataset = SliceDataset(spec, spec.cases[:1], {**PREPROCESS, "field_of_view_mm": 120.0},
                           augment=Augment(scale=(0.8, 1.25), shift=0.1, window_jitter=0.1, noise=0.02))
    positives = [i for i, t in enumerate(dataset.triplets) if t.positive]
    negatives = [i for i, t in enumerate(dataset.triplets) if not t.positive]
    assert positives and negatives
    for index in positives[:4]:
        item = dataset[index]
        assert item["masks"].dtype == torch.bool and item["masks"].shape[1:] == (56, 56)
        for mask, box in zip(item["masks"], item["boxes"]):
            rows, cols = torch.nonzero(mask, as_tuple=True)
            expected = [int(cols.min()) / 56, int(rows.min()) / 56, (int(cols.max()) + 1) / 56, (int(rows.max()) + 1) / 56]
            assert box.tolist() == pytest.approx(expected)
    item = dataset[negatives[0]]
    assert item["masks"].shape == (0, 56, 56) and item["boxes"].shape == (0, 4)
    again = dataset[positives[0]]
    torch.testing.assert_close(again["pixel_values"], dataset[positives[0]]["pixel_values"])  # seeded


def test_balanced_sampler_shards_one_stream(toy_dataset):
    spec = load_dataset(toy_dataset)
    dataset = SliceDataset(spec, [c for c in spec.cases if c.split == "train"], PREPROCESS)
    single = BalancedSampler(dataset, 400, seed=3, positive_fraction=0.7)
    draws = list(single)
    concepts = [dataset.triplets[i].concept for i in draws]
    assert abs(concepts.count("Liver") - 200) < 40
    liver = [dataset.triplets[i].positive for i in draws if dataset.triplets[i].concept == "Liver"]
    assert 0.6 < np.mean(liver) < 0.8  # 0.7 positives where negatives exist (liver ends before the last slices)
    assert all(dataset.triplets[i].positive for i in draws if dataset.triplets[i].concept == "Spleen")  # on every slice
    ranks = [list(BalancedSampler(dataset, 200, seed=3, rank=r, world_size=2)) for r in range(2)]
    interleaved = [x for pair in zip(*ranks) for x in pair]
    assert interleaved == draws
    single.set_epoch(1)
    assert list(single) != draws


def test_sampler_concept_weights(toy_dataset):
    """``concept_weights`` draws concepts in proportion to their weights (unnamed ones weigh 1); names
    outside the dataset and weights that are not positive numbers are refused by name."""
    spec = load_dataset(toy_dataset)
    dataset = SliceDataset(spec, [c for c in spec.cases if c.split == "train"], PREPROCESS)
    assert sorted(spec.concepts) == ["Liver", "Spleen"]
    draws = list(BalancedSampler(dataset, 2000, seed=3, concept_weights={"liver": 3}))  # dictionary names
    share = np.mean([dataset.triplets[i].concept == "Liver" for i in draws])
    assert abs(share - 0.75) < 0.04, share
    uniform = list(BalancedSampler(dataset, 400, seed=3))
    assert list(BalancedSampler(dataset, 400, seed=3, concept_weights={})) == uniform
    with pytest.raises(InputError, match="'Kidney'.*not a concept of the dataset"):
        BalancedSampler(dataset, 10, concept_weights={"Kidney": 2})
    for bad in (0, -1.0, float("nan"), "2", True):
        with pytest.raises(InputError, match="positive numbers"):
            BalancedSampler(dataset, 10, concept_weights={"Spleen": bad})


def test_2d_images_and_coco_annotations(tmp_path):
    """2D cases (PNG image + PNG label map) and a COCO file (polygon + RLE) in one dataset."""
    import SimpleITK as sitk
    from pycocotools import mask as coco

    image = np.zeros((40, 50), np.uint8)
    image[10:30, 10:25] = 180
    label = (image > 0).astype(np.uint8)
    sitk.WriteImage(sitk.GetImageFromArray(image), str(tmp_path / "img0.png"))
    sitk.WriteImage(sitk.GetImageFromArray(label), str(tmp_path / "lab0.png"))
    rgb = np.stack([image] * 3, axis=-1)
    (tmp_path / "coco").mkdir()
    sitk.WriteImage(sitk.GetImageFromArray(rgb, isVector=True), str(tmp_path / "coco" / "photo.png"))
    second = np.zeros((40, 50), np.uint8, order="F")
    second[5:9, 30:45] = 1
    rle = coco.encode(np.asfortranarray(second))
    rle["counts"] = rle["counts"].decode()
    annotations = {"images": [{"id": 7, "file_name": "photo.png", "height": 40, "width": 50}],
                   "categories": [{"id": 1, "name": "polyp"}, {"id": 2, "name": "skin lesion"}],
                   "annotations": [{"id": 1, "image_id": 7, "category_id": 1,
                                    "segmentation": [[10, 10, 25, 10, 25, 30, 10, 30]]},
                                   {"id": 2, "image_id": 7, "category_id": 1, "segmentation": rle}]}
    (tmp_path / "coco" / "train.json").write_text(json.dumps(annotations))
    dataset_json = tmp_path / "dataset.json"
    (tmp_path / "imgs").mkdir(), (tmp_path / "masks").mkdir()
    (tmp_path / "img0.png").rename(tmp_path / "imgs" / "png.png")
    (tmp_path / "lab0.png").rename(tmp_path / "masks" / "png.png")
    dataset_json.write_text(json.dumps({
        "labels": {"1": "polyp"}, "folders": {"images": "imgs", "masks": "masks"},
        "coco": {"annotations": "coco/train.json", "images": "coco"}}))
    spec = load_dataset(dataset_json)
    assert spec.concepts == ["Polyp", "Skin Lesion"] and len(spec.cases) == 2
    dataset = SliceDataset(spec, spec.cases, PREPROCESS)
    positive = {(dataset.cases[t.case].id, t.concept): i for i, t in enumerate(dataset.triplets) if t.positive}
    assert set(positive) == {("png", "Polyp"), ("train:7", "Polyp")}
    png_item, coco_item = dataset[positive[("png", "Polyp")]], dataset[positive[("train:7", "Polyp")]]
    assert png_item["masks"].shape[0] == 1 and coco_item["masks"].shape[0] == 2  # two instances
    torch.testing.assert_close(png_item["pixel_values"], coco_item["pixel_values"], atol=0.02, rtol=0)  # luminance
    # the polygon covers the same pixels as the PNG label (within the polygon's edge convention)
    overlap = (png_item["masks"][0] & coco_item["masks"][0]).sum() / png_item["masks"][0].sum()
    assert overlap > 0.85
    bad = tmp_path / "bad.json"
    annotations["categories"][1]["name"] = "skin lesoin"
    (tmp_path / "coco" / "bad.json").write_text(json.dumps(annotations))
    bad.write_text(json.dumps({"coco": {"annotations": "coco/bad.json", "images": "coco"}}))
    with pytest.raises(InputError, match="'skin lesoin' is not a concept"):
        load_dataset(bad)
    sitk.WriteImage(sitk.GetImageFromArray(image), str(tmp_path / "imgs" / "unpaired.png"))
    with pytest.raises(InputError, match="unpaired: found in only one"):
        load_dataset(dataset_json)


def test_training_slices_follow_the_same_orientation(tmp_path):
    """A case stored RAS-wise gives the model exactly the pixels and masks of its LPS twin."""
    import dataclasses

    import SimpleITK as sitk

    from MedicalSAM3Core.common.volume import Volume
    from MedicalSAM3Core.imaging.io import image_from_array, read_volume
    from phantoms import stored_ras_wise
    from toydata import write_toy_dataset

    dataset = write_toy_dataset(tmp_path / "toy", n_cases=1)
    spec = load_dataset(dataset)
    case = spec.cases[0]
    image, label = read_volume(case.image), read_volume(case.label)
    for path, volume in ((case.image, image), (case.label, label)):  # rewrite the case RAS-wise
        twin = stored_ras_wise(Volume(volume.array, volume.geometry))
        sitk.WriteImage(image_from_array(twin.array, twin.geometry), str(path).replace(".nii.gz", "_ras.nii.gz"))
    ras = dataclasses.replace(case, id="ras", image=type(case.image)(str(case.image).replace(".nii.gz", "_ras.nii.gz")),
                              label=type(case.label)(str(case.label).replace(".nii.gz", "_ras.nii.gz")))
    preprocess = {"image_size": 56, "mean": [0.5] * 3, "std": [0.5] * 3, "orientation": "radiological"}
    original, flipped = SliceDataset(spec, [case], preprocess), SliceDataset(spec, [ras], preprocess)
    for i, t in enumerate(original.triplets):
        j = next(j for j, u in enumerate(flipped.triplets) if (u.slice, u.concept) == (t.slice, t.concept))
        x, y = original[i], flipped[j]
        torch.testing.assert_close(x["pixel_values"], y["pixel_values"])
        assert torch.equal(x["masks"], y["masks"])


def test_sampler_runs_of_one_slice_with_several_concepts(toy_dataset):
    """``concepts_per_slice``: runs of K samples share a slice, with K different concepts, present
    and absent ones mixed; still one deterministic stream sharded across ranks."""
    spec = load_dataset(toy_dataset)
    dataset = SliceDataset(spec, [c for c in spec.cases if c.split == "train"], PREPROCESS)
    k = min(2, len(spec.concepts))
    sampler = BalancedSampler(dataset, 300, seed=5, concepts_per_slice=k)
    draws = list(sampler)
    assert len(draws) == 300
    mixed = 0
    for start in range(0, 300, k):
        run = [dataset.triplets[i] for i in draws[start:start + k]]
        assert len({(t.case, t.slice) for t in run}) == 1 and len({t.concept for t in run}) == len(run)
        mixed += len({t.positive for t in run}) > 1
    assert mixed > 0  # a slice seen with a concept it contains and one it lacks
    ranks = [list(BalancedSampler(dataset, 150, seed=5, rank=r, world_size=2, concepts_per_slice=k)) for r in range(2)]
    assert [x for pair in zip(*ranks) for x in pair] == draws
    with pytest.raises(InputError, match="concepts_per_slice"):
        BalancedSampler(dataset, 10, concepts_per_slice=len(spec.concepts) + 1)


@pytest.mark.parametrize("orientation", ["stored", "radiological"])
def test_contrast_augmentation_brightens_the_labelled_structure_only(toy_dataset, orientation):
    """``augment.contrast``: the listed structure is raised by its drawn offset (here exactly 100 HU),
    found from the label map in the model's orientation; other pixels and the masks are untouched;
    MR is never changed."""
    from scipy.ndimage import binary_dilation, binary_erosion

    spec = load_dataset(toy_dataset)
    preprocess = {**PREPROCESS, "orientation": orientation}
    contrast = Augment(contrast={"probability": 1.0, "offsets_hu": {"liver": [100, 100]}})
    plain = SliceDataset(spec, spec.cases[:1], preprocess)
    enhanced = SliceDataset(spec, spec.cases[:1], preprocess, augment=contrast)
    for concept in ("Liver", "Spleen"):  # every concept's input shows the enhanced liver
        index = next(i for i, t in enumerate(plain.triplets) if t.concept == concept and t.slice == 2)
        before, after = plain[index], enhanced[index]
        liver = plain[next(i for i, t in enumerate(plain.triplets) if t.concept == "Liver" and t.slice == 2)]["masks"][0].numpy()
        torch.testing.assert_close(before["masks"], after["masks"])
        diff = (after["pixel_values"] - before["pixel_values"]).numpy()
        # the abdomen window is 400 HU wide, mapped to [-1, 1]: +100 HU is +0.5
        inner = diff[:, binary_erosion(liver, iterations=4)]  # the edges are softened (sigma 1 pixel)
        assert inner.size and np.allclose(inner, 0.5, atol=0.03) and abs(np.median(inner) - 0.5) < 0.01
        assert np.abs(diff[:, ~binary_dilation(liver, iterations=6)]).max() < 2e-3  # < 0.4 HU beyond the soft edge
    mr = SliceDataset(load_dataset(toy_dataset), spec.cases[:1], preprocess, augment=contrast)
    mr.spec.modality = "MR"
    mr_plain = SliceDataset(mr.spec, spec.cases[:1], preprocess)
    torch.testing.assert_close(mr[3]["pixel_values"], mr_plain[3]["pixel_values"])


def test_contrast_augmentation_is_validated(toy_dataset):
    for bad, expected in (({"probability": 2, "offsets_hu": {"liver": [0, 1]}}, "probability must be"),
                          ({"offsets_hu": {"liver": [50, 10]}}, "low <= high"),
                          ({"offsets_hu": {"liver": [0, "a"]}}, "must be [low, high]"),
                          ({"offsets_hu": {}}, "at least one concept"),
                          ({"offsets": {"liver": [0, 1]}}, "augment.contrast must be")):
        with pytest.raises(InputError, match=expected.replace("[", r"\[").replace("]", r"\]")):
            Augment(contrast=bad)
    spec = load_dataset(toy_dataset)
    with pytest.raises(InputError) as error:
        SliceDataset(spec, spec.cases[:1], PREPROCESS,
                     augment=Augment(contrast={"offsets_hu": {"aorta": [0, 300], "livr": [0, 80], "hepar": [0, 80]}}))
    message = str(error.value)
    assert "'aorta' (no label of this dataset)" in message and "'livr' (not a concept" in message
    assert "hepar" not in message  # a synonym of Liver, which the dataset labels


@pytest.mark.parametrize("orientation", ["stored", "radiological"])
def test_removal_augmentation_fills_the_structure_and_makes_a_negative(toy_dataset, orientation):
    """``augment.remove``: a listed concept's sample loses the structure (its pixels now look like
    the tissue around it, not like the 200 HU spleen) and becomes a negative (no masks, so presence
    0); pixels away from it, unlisted concepts and probability 0 are unchanged."""
    from scipy.ndimage import binary_dilation

    spec = load_dataset(toy_dataset)
    preprocess = {**PREPROCESS, "orientation": orientation}
    plain = SliceDataset(spec, spec.cases[:1], preprocess)
    removal = SliceDataset(spec, spec.cases[:1], preprocess,
                           augment=Augment(remove={"probability": 1.0, "concepts": ["spleen"]}))
    never = SliceDataset(spec, spec.cases[:1], preprocess, augment=Augment(remove={"probability": 0.0, "concepts": ["spleen"]}))
    spleen_i = next(i for i, t in enumerate(plain.triplets) if t.concept == "Spleen" and t.slice == 2)
    liver_i = next(i for i, t in enumerate(plain.triplets) if t.concept == "Liver" and t.slice == 2)
    before, after = plain[spleen_i], removal[spleen_i]
    assert before["masks"].shape[0] == 1 and after["masks"].shape[0] == 0 and after["boxes"].shape == (0, 4)
    spleen = before["masks"][0].numpy()
    ring = binary_dilation(spleen, iterations=6) & ~binary_dilation(spleen, iterations=3)
    # abdomen window 400 HU wide mapped to [-1, 1]: 0.1 is 20 HU; spleen 200 HU, body 20 HU
    inside_before, inside_after = before["pixel_values"][0].numpy()[spleen], after["pixel_values"][0].numpy()[spleen]
    ring_level = float(np.median(before["pixel_values"][0].numpy()[ring]))
    assert np.median(inside_before) - ring_level > 0.8
    assert abs(np.median(inside_after) - ring_level) < 0.1
    far = ~binary_dilation(spleen, iterations=6)
    diff = (after["pixel_values"] - before["pixel_values"]).numpy()
    assert np.abs(diff[:, far]).max() < 1e-5
    torch.testing.assert_close(removal[liver_i]["pixel_values"], plain[liver_i]["pixel_values"])
    torch.testing.assert_close(removal[liver_i]["masks"], plain[liver_i]["masks"])
    torch.testing.assert_close(never[spleen_i]["pixel_values"], before["pixel_values"])
    torch.testing.assert_close(never[spleen_i]["masks"], before["masks"])


def test_fill_from_surroundings_leaves_the_rest_and_its_input_alone():
    from Training.data import fill_from_surroundings

    rng = np.random.default_rng(0)
    raw = rng.normal(40.0, 5.0, (32, 32)).astype(np.float32)
    raw[10:20, 12:22] = 300.0
    region = raw > 200
    copy = raw.copy()
    out = fill_from_surroundings(raw, region, np.random.default_rng(1))
    np.testing.assert_array_equal(raw, copy)  # a new array, the cached volume is not touched
    assert abs(float(np.median(out[region])) - 40.0) < 5.0 and float(out[region].max()) < 80.0
    grown = np.zeros_like(region)
    grown[8:22, 10:24] = True  # the region dilated by its 2-pixel margin
    np.testing.assert_array_equal(out[~grown], raw[~grown])
    assert 2.0 < float(np.std(out[region])) < 10.0  # the surroundings' grain (5), not a flat patch


def test_removal_augmentation_is_validated(toy_dataset):
    for bad, expected in (({"probability": -1, "concepts": ["liver"]}, "probability must be"),
                          ({"concepts": []}, "at least one concept"),
                          ({"concepts": "liver"}, "at least one concept"),
                          ({"organs": ["liver"]}, "augment.remove must be")):
        with pytest.raises(InputError, match=expected):
            Augment(remove=bad)
    spec = load_dataset(toy_dataset)
    with pytest.raises(InputError) as error:
        SliceDataset(spec, spec.cases[:1], PREPROCESS, augment=Augment(remove={"concepts": ["aorta", "spleen", "kidny"]}))
    message = str(error.value)
    assert "augment.remove.concepts" in message and "'aorta' (no label of this dataset)" in message
    assert "'kidny' (not a concept" in message and "'spleen'" not in message


def test_sampler_hard_negatives():
    """``hard_negative_fraction`` f draws that share of a concept's negatives among the slices within
    ``hard_negative_slices`` of one containing it (same case only); f = 0 keeps the default stream;
    bad values are refused by name."""
    from types import SimpleNamespace

    from Training.data import Triplet

    # case 0: liver on slices 10-19 of 30, spleen everywhere; case 1: no liver at all (all its negatives easy)
    triplets = [Triplet(0, k, "Liver", 10 <= k < 20) for k in range(30)] + [Triplet(0, k, "Spleen", True) for k in range(30)]
    triplets += [Triplet(1, k, "Liver", False) for k in range(30)] + [Triplet(1, k, "Spleen", True) for k in range(30)]
    dataset = SimpleNamespace(triplets=triplets)
    hard = {(0, k) for k in (7, 8, 9, 20, 21, 22)}

    def negatives(sampler):
        return [(t.case, t.slice) for t in (triplets[i] for i in sampler) if t.concept == "Liver" and not t.positive]

    always = negatives(BalancedSampler(dataset, 3000, seed=1, hard_negative_fraction=1.0, hard_negative_slices=3))
    assert len(always) > 300 and set(always) == hard
    half = negatives(BalancedSampler(dataset, 3000, seed=1, hard_negative_fraction=0.5, hard_negative_slices=3))
    share = np.mean([n in hard for n in half])
    assert 0.5 < share < 0.6, share  # 0.5 drawn among them + 0.5 x 6/50 that land there anyway
    assert list(BalancedSampler(dataset, 400, seed=1, hard_negative_fraction=0.0)) == list(BalancedSampler(dataset, 400, seed=1))
    for bad in (-0.1, 1.5, "0.5", True):
        with pytest.raises(InputError, match="hard_negative_fraction"):
            BalancedSampler(dataset, 10, hard_negative_fraction=bad)
    for bad in (0, 2.5, True):
        with pytest.raises(InputError, match="hard_negative_slices"):
            BalancedSampler(dataset, 10, hard_negative_fraction=0.5, hard_negative_slices=bad)


def test_instance_groups_make_one_instance_of_several_label_values(toy_dataset, tmp_path):
    """Lung lobes (several label values of one concept) taught as ONE lung each: without
    ``instance_groups`` every value is an instance of its own (the liver cut in two gives two), with it
    the group is one instance covering both parts."""
    import SimpleITK as sitk

    def split_liver(data, folder):
        for case in data["cases"]:
            image = sitk.ReadImage(str(folder / case["label"]))
            label = sitk.GetArrayFromImage(image)
            rows = np.nonzero((label == 1).any(axis=(0, 2)))[0]
            lower = np.zeros_like(label, bool)
            lower[:, (rows.min() + rows.max()) // 2:] = True
            label[(label == 1) & lower] = 3
            split = sitk.GetImageFromArray(label)
            split.CopyInformation(image)
            sitk.WriteImage(split, str(folder / case["label"]))
        data["labels"]["3"] = "liver"

    separate = _edit(toy_dataset, tmp_path / "separate", split_liver)

    def grouped_too(data, folder):
        split_liver(data, folder)
        data["instance_groups"] = [[1, 3]]

    grouped = _edit(toy_dataset, tmp_path / "grouped", grouped_too)
    counts = {}
    for name, path in (("separate", separate), ("grouped", grouped)):
        spec = load_dataset(path)
        dataset = SliceDataset(spec, spec.cases[:1], PREPROCESS)
        index = next(i for i, t in enumerate(dataset.triplets) if t.concept == "Liver" and t.slice == 3)
        counts[name] = dataset[index]["masks"]
    assert counts["separate"].shape[0] == 2 and counts["grouped"].shape[0] == 1
    torch.testing.assert_close(counts["grouped"][0], counts["separate"].any(dim=0))
    assert load_dataset(grouped).instances_of("Liver") == [(1, 3)]


def test_instance_groups_are_validated(toy_dataset, tmp_path):
    def bad_groups(data, folder):
        data["labels"]["3"] = "liver"
        data["instance_groups"] = [[1, 2], [1, 3], [3, 1], [7, 1], [1], "x"]

    with pytest.raises(InputError) as error:
        load_dataset(_edit(toy_dataset, tmp_path, bad_groups), check_images=False)
    message = str(error.value)
    for expected in ("#0 mixes concepts (Liver, Spleen)", "#2: label values [1, 3] are in more than one group",
                     "#3: label values [7] are not in 'labels'", "#4 must list two or more", "#5 must list"):
        assert expected in message, message
