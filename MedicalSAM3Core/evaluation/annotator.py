"""A simulated annotator, as the SAM and nnInteractive evaluations use it: each click goes to the centre of
the largest error region, positive where the structure was missed, negative where it was wrongly claimed.

One rule for training (``Training/tracker.py`` corrects clips on the model canvas) and for evaluation
(``Resources/demo_model/evaluation/simulate_annotator.py`` clicks on volumes). Torch-free.
"""

from __future__ import annotations

from typing import Optional, Sequence

import numpy as np
from scipy.ndimage import distance_transform_edt, label as connected


def next_click(predicted: np.ndarray, truth: np.ndarray,
               sampling: Optional[Sequence[float]] = None) -> Optional[tuple[tuple[int, ...], int]]:
    """The next click: ``(index, label)`` with ``index`` the voxel (any dimensionality, array order, e.g.
    ``(z, y, x)`` or ``(y, x)``) farthest from the border of the largest error region (face-connected),
    measured in ``sampling`` units (the voxel spacing in array order; default 1), and ``label`` 1 when
    the region is missed structure, 0 when it is false structure. None when there is no error.

    Ties: the larger region wins, a missed region before a false one at equal size; the first voxel in
    array order at the same distance."""
    predicted, truth = np.asarray(predicted, bool), np.asarray(truth, bool)
    if predicted.shape != truth.shape:
        raise ValueError(f"predicted {predicted.shape} and truth {truth.shape} differ in shape")
    best = None
    for positive, error in ((1, truth & ~predicted), (0, predicted & ~truth)):
        if not error.any():
            continue
        regions, n = connected(error)
        sizes = np.bincount(regions.ravel(), minlength=n + 1)[1:]
        k = int(np.argmax(sizes)) + 1
        if best is None or sizes[k - 1] > best[0]:
            best = (int(sizes[k - 1]), regions == k, positive)
    if best is None:
        return None
    region = np.pad(best[1], 1)
    inner = tuple(slice(1, -1) for _ in range(region.ndim))
    distance = distance_transform_edt(region, sampling=sampling)[inner]
    index = np.unravel_index(int(np.argmax(distance)), distance.shape)
    return tuple(int(i) for i in index), best[2]
