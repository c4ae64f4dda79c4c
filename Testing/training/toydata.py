"""A toy labelled dataset on disk (phantom CTs + label maps + dataset JSON) and a tiny training config."""

from __future__ import annotations

import json

import numpy as np


def write_toy_dataset(folder, n_cases: int = 3, shape=(6, 40, 48), seed: int = 0):
    """Phantom CTs whose 'liver' (1) and 'spleen' (2) labels are the phantom's two organs."""
    import SimpleITK as sitk

    from MedicalSAM3Core.common.volume import Geometry
    from MedicalSAM3Core.imaging.io import image_from_array

    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    cases = []
    for i in range(n_cases):
        z, y, x = np.meshgrid(*[np.linspace(-1, 1, n) for n in shape], indexing="ij")
        dy, dx = rng.uniform(-0.1, 0.1, 2)
        image = np.full(shape, -1000.0)
        label = np.zeros(shape, np.uint8)
        image[(y / 0.8) ** 2 + (x / 0.9) ** 2 < 1] = 20.0
        liver = ((y + 0.2 + dy) / 0.35) ** 2 + ((x + 0.35 + dx) / 0.3) ** 2 + (z / 0.9) ** 2 < 1
        spleen = ((y - 0.2 - dy) / 0.2) ** 2 + ((x - 0.4 - dx) / 0.2) ** 2 < 1
        image[liver], label[liver] = 60.0, 1
        image[spleen], label[spleen] = 200.0, 2
        image = (image + rng.normal(0, 10, shape)).astype(np.int16)
        geometry = Geometry(spacing=(1.5, 1.5, 5.0))
        sitk.WriteImage(image_from_array(image, geometry), str(folder / f"case{i}.nii.gz"))
        sitk.WriteImage(image_from_array(label, geometry), str(folder / f"case{i}_seg.nii.gz"))
        cases.append({"id": f"case{i}", "image": f"case{i}.nii.gz", "label": f"case{i}_seg.nii.gz",
                      "split": "val" if i == n_cases - 1 else "train"})
    dataset = {"name": "toy", "modality": "CT", "labels": {"1": "liver", "2": "spleen"}, "cases": cases}
    (folder / "dataset.json").write_text(json.dumps(dataset, indent=2))
    return folder / "dataset.json"


TINY_MODEL = {"image_size": 56, "global_attention": [1]}


def tiny_config(dataset, output, **train) -> dict:
    from Training.train import DEFAULTS

    import copy

    config = copy.deepcopy(DEFAULTS)
    config["model"].update(from_config=dict(TINY_MODEL), seed=0)
    config["data"].update(dataset=str(dataset), min_area=2)
    config["optim"].update(warmup_steps=2, lr_backbone=1e-3, lr_text=1e-3, lr_heads=1e-3)
    config["train"].update(steps=4, batch_size=2, epoch_steps=3, checkpoint_every=0, log_every=1,
                           output=str(output), device="cpu", val_every=0)
    config["train"].update(train)
    return config
