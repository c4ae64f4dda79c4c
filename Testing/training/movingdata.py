"""A moving phantom for the tracker: two identical discs crossing a volume slice by slice, in opposite directions."""

from __future__ import annotations

import json

import numpy as np


def write_moving_discs(folder, n_cases: int = 2, shape=(8, 48, 48), step: float = 3.0, radius: float = 6.0,
                       intensities=(150.0, 60.0), discs: int = 2, seed: int = 0):
    """Cases whose label 1 and label 2 are two discs, both 'Lesion' (two instances of one concept): which one
    to segment on an unprompted slice is known only from the memory of the prompted one. Disc 1 moves right
    by ``step`` pixels per slice along the upper row, disc 2 left along the lower row; ``intensities`` in HU
    (equal: the discs differ only by where they are). ``discs=1``: disc 1 alone."""
    import SimpleITK as sitk

    from MedicalSAM3Core.common.volume import Geometry
    from MedicalSAM3Core.imaging.io import image_from_array

    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    cases = []
    yy, xx = np.mgrid[:shape[1], :shape[2]]
    for i in range(n_cases):
        image = np.full(shape, -100.0)
        label = np.zeros(shape, np.uint8)
        start = rng.uniform(8, 12)
        for z in range(shape[0]):
            for value, (cy, cx) in ((1, (15, start + step * z)), (2, (33, shape[2] - 1 - start - step * z)))[:discs]:
                disc = (yy - cy) ** 2 + (xx - cx) ** 2 < radius ** 2
                image[z][disc], label[z][disc] = intensities[value - 1], value
        image = (image + rng.normal(0, 5, shape)).astype(np.int16)
        geometry = Geometry(spacing=(1.0, 1.0, 2.0))
        sitk.WriteImage(image_from_array(image, geometry), str(folder / f"disc{i}.nii.gz"))
        sitk.WriteImage(image_from_array(label, geometry), str(folder / f"disc{i}_seg.nii.gz"))
        cases.append({"id": f"disc{i}", "image": f"disc{i}.nii.gz", "label": f"disc{i}_seg.nii.gz", "split": "train"})
    labels = {"1": "lesion", "2": "lesion"} if discs == 2 else {"1": "lesion"}
    dataset = {"name": "moving discs", "modality": "CT", "labels": labels, "cases": cases}
    (folder / "dataset.json").write_text(json.dumps(dataset, indent=2))
    return folder / "dataset.json"
