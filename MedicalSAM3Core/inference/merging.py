"""Semantic merging: per-prompt confidence maps -> one non-overlapping label map.

Rule (as in the Medical SAM3 paper): a voxel goes to the prompt with the highest confidence
among the prompts that claim it; confidence = instance score x mask probability, and a prompt
claims a voxel where its mask probability exceeds the mask threshold and its instance score
exceeds the score threshold. Tie rule: equal confidences go to the prompt given first.
The per-prompt masks (which may overlap) are kept too, bit-packed along x.

Arrays here are in the slicing layout ``(s, r, c)`` = (slice, row, column); the engine moves
axes back to ``(z, y, x)`` at the end. Torch-free (numpy/scipy).
"""

from __future__ import annotations

from typing import Optional, Sequence

import numpy as np
from scipy import ndimage


def merge_confidences(confidences: np.ndarray, prompt_values: Sequence[int]) -> tuple[np.ndarray, np.ndarray]:
    """Merge ``(K, ...)`` confidences (0 = not claimed) into labels.

    Returns ``(labels, best)``: ``labels`` holds ``prompt_values[k]`` of the winning prompt (0 where
    no prompt claims the voxel), ``best`` the winning confidence. ``argmax`` returns the first
    maximum, so ties go to the earliest prompt in ``confidences`` order.
    """
    values = np.asarray(prompt_values)
    winner = np.argmax(confidences, axis=0)
    best = np.take_along_axis(confidences, winner[None], axis=0)[0]
    labels = np.where(best > 0, values[winner], 0)
    return labels, best


class VolumeAccumulator:
    """Collects per-slice results of all prompts into the label map and per-prompt masks.

    ``exact=True`` when every call of :meth:`add` carries all prompts of its slices (slices mode,
    and propagate mode with one intensity group): merging is then exact and no volume-sized
    confidence map is kept. Otherwise a float16 best-confidence volume resolves prompts that
    arrive in separate passes (ties between passes keep the earlier pass).
    """

    def __init__(self, n_prompts: int, shape: tuple[int, int, int], label_dtype: np.dtype, exact: bool) -> None:
        self.shape = shape
        self.label_map = np.zeros(shape, dtype=label_dtype)
        self.packed = [np.zeros((shape[0], shape[1], (shape[2] + 7) // 8), dtype=np.uint8) for _ in range(n_prompts)]
        self.best = None if exact else np.zeros(shape, dtype=np.float16)
        self.score_sum = np.zeros(n_prompts)
        self.slices_found = np.zeros(n_prompts, dtype=np.int64)
        self.max_score = np.zeros(n_prompts)

    def add(self, first_slice: int, prompt_indices: Sequence[int], confidences: np.ndarray,
            scores: np.ndarray) -> None:
        """Add ``confidences`` ``(len(prompt_indices), b, rows, cols)`` and slice ``scores`` ``(P, b)``
        (0 where the prompt was not found) for slices ``first_slice .. first_slice + b - 1``."""
        b = confidences.shape[1]
        sl = slice(first_slice, first_slice + b)
        claimed = confidences > 0
        for j, k in enumerate(prompt_indices):
            self.packed[k][sl] = np.packbits(claimed[j], axis=-1)
            found = claimed[j].any(axis=(1, 2))
            self.slices_found[k] += int(found.sum())
            self.score_sum[k] += float(scores[j][found].sum())
            if found.any():
                self.max_score[k] = max(self.max_score[k], float(scores[j][found].max()))
        labels, best = merge_confidences(confidences, [k + 1 for k in prompt_indices])
        if self.best is None:
            self.label_map[sl] = labels
        else:
            update = best > self.best[sl]
            self.label_map[sl][update] = labels[update]
            self.best[sl][update] = best[update]


def clean_up(label_map: np.ndarray, masks: list[np.ndarray], min_voxels: int = 0,
             fill_holes: bool = False, largest: Optional[Sequence[bool]] = None) -> tuple[np.ndarray, list[np.ndarray]]:
    """Optional 3D clean-up of each prompt's mask, applied consistently to the label map.

    Where ``largest[k]`` is true, prompt ``k`` keeps only its largest connected component (26-connected;
    for a structure that is one organ, such as the liver or the aorta: far false blobs go). Then
    components smaller than ``min_voxels`` are removed; with
    ``fill_holes`` enclosed background cavities are filled, in the label map only where no other
    prompt already claims the voxel. ``masks`` are boolean ``(z, y, x)`` arrays, one per prompt,
    prompt ``k`` having label value ``k + 1``.
    """
    label_map = label_map.copy()
    cleaned = []
    structure = np.ones((3, 3, 3), dtype=bool)
    for k, mask in enumerate(masks):
        mask = mask.copy()
        if largest is not None and largest[k] and mask.any():
            components, n = ndimage.label(mask, structure=structure)
            if n > 1:
                sizes = np.bincount(components.ravel())
                sizes[0] = 0
                mask = components == int(np.argmax(sizes))
        if min_voxels > 0 and mask.any():
            components, n = ndimage.label(mask, structure=structure)
            sizes = np.bincount(components.ravel())
            small = np.nonzero(sizes < min_voxels)[0]
            small = small[small > 0]
            if small.size:
                mask &= ~np.isin(components, small)
        if fill_holes and mask.any():
            mask = ndimage.binary_fill_holes(mask)
        value = k + 1
        label_map[(label_map == value) & ~mask] = 0
        label_map[(label_map == 0) & mask] = value
        cleaned.append(mask)
    return label_map, cleaned


def label_capacity(dtype: np.dtype) -> int:
    return int(np.iinfo(dtype).max)

