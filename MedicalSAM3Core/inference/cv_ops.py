"""Offline replacements for the hub-fetched ``kernels-community/cv-utils`` used by SAM3 video.

transformers' ``Sam3VideoModel`` runs mask NMS, hole filling and sprinkle removal through the
``kernels`` package, which downloads code from the Hugging Face hub at run time and silently
skips all three when it cannot (always, on an offline hospital machine). We provide the same
two primitives, ``generic_nms`` and ``cc_2d``, with torch and scipy, and install them in place
of the kernel so the video model behaves the same with no network. We also replace its mask IoU,
whose broadcast form needs memory quadratic in the number of detections times the mask area.
"""

from __future__ import annotations

import numpy as np
import torch
from scipy import ndimage

_EIGHT_CONNECTED = np.ones((3, 3), dtype=bool)


class OfflineCvUtils:
    """Drop-in for the two functions of ``kernels-community/cv-utils`` that SAM3 video calls."""

    @staticmethod
    def generic_nms(ious: torch.Tensor, scores: torch.Tensor, iou_threshold: float,
                    use_iou_matrix: bool = True) -> torch.Tensor:
        """Greedy NMS on a precomputed ``(N, N)`` IoU matrix; returns kept indices, best first."""
        if not use_iou_matrix:
            raise NotImplementedError("only the IoU-matrix form is used by SAM3 video")
        order = torch.argsort(scores, descending=True).tolist()
        over = (ious > iou_threshold).cpu().numpy()
        suppressed = np.zeros(len(order), dtype=bool)
        keep = []
        for index in order:
            if suppressed[index]:
                continue
            keep.append(index)
            suppressed |= over[index]
        return torch.tensor(keep, dtype=torch.int64, device=scores.device)

    @staticmethod
    def cc_2d(mask: torch.Tensor, get_counts: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
        """8-connected components of a ``(N, 1, H, W)`` mask.

        Returns per-pixel component labels and, per pixel, the area of its component (0 on
        background), like cc_torch.
        """
        array = mask.detach().to("cpu").numpy().astype(bool)
        labels = np.zeros(array.shape, dtype=np.int32)
        counts = np.zeros(array.shape, dtype=np.int32)
        for n in range(array.shape[0]):
            for c in range(array.shape[1]):
                lab, num = ndimage.label(array[n, c], structure=_EIGHT_CONNECTED)
                if num:
                    areas = np.bincount(lab.ravel()).astype(np.int32)
                    areas[0] = 0
                    labels[n, c] = lab
                    counts[n, c] = areas[lab]
        return torch.from_numpy(labels).to(mask.device), torch.from_numpy(counts).to(mask.device)


def mask_iou(pred_masks: torch.Tensor, gt_masks: torch.Tensor) -> torch.Tensor:
    """IoU matrix ``(N, M)`` of binary masks ``(N, H, W)`` and ``(M, H, W)``, as transformers'
    ``mask_iou`` but as a matrix product: transformers broadcasts to an ``(N, M, H*W)`` tensor,
    which for 200 detections on 288 x 288 masks asks for tens of GB."""
    with torch.autocast(device_type=pred_masks.device.type, enabled=False):
        pred = pred_masks.flatten(1).to(torch.float32)
        gt = gt_masks.flatten(1).to(torch.float32)
        intersection = pred @ gt.T  # exact: counts stay far below 2**24
        union = pred.sum(1)[:, None] + gt.sum(1)[None, :] - intersection
    return intersection / union.clamp(min=1)


def install_offline_cv_ops() -> None:
    """Make transformers' SAM3 video post-processing use :class:`OfflineCvUtils` and a
    memory-bounded :func:`mask_iou` (idempotent)."""
    from transformers.models.sam3_video import modeling_sam3_video

    if not isinstance(modeling_sam3_video.cv_utils_kernel, OfflineCvUtils):
        modeling_sam3_video.cv_utils_kernel = OfflineCvUtils()
    modeling_sam3_video.mask_iou = mask_iou
