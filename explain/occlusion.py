"""Occlusion sensitivity (Zeiler & Fergus 2014) for any model that maps images to class probabilities.

A square patch, filled with the image's mean grey, slides over the network's input; the evidence at a pixel
is the mean drop of the explained class's probability over the patches that cover it (positive: hiding it
lowers the class; negative: hiding it raises it). Model-agnostic, so it serves every head that has no exact
class activation map (rbfsvm, knn, rf, hgb, mlp, heads on concatenated backbones). Cost: one forward pass per
patch position, ``(1 + (size - patch) / stride) ** 2`` per image (64 at the defaults).
"""
from __future__ import annotations

from collections.abc import Callable

import numpy as np

DEFAULT_PATCH_FRACTION = 1 / 8
"""Patch side as a fraction of the input side (28 px at 224)."""
DEFAULT_STRIDE_FRACTION = 1 / 8
"""Step between patch positions as a fraction of the input side (non-overlapping at the defaults)."""


def patch_starts(size: int, patch: int, stride: int) -> list[int]:
    """Top-left offsets along one side so that patches of ``patch`` px cover all ``size`` px."""
    if not 0 < patch <= size or stride < 1:
        raise ValueError(f"need 0 < patch <= size and stride >= 1, got patch={patch}, size={size}, "
                         f"stride={stride} instead")
    starts = list(range(0, size - patch + 1, stride))
    if starts[-1] + patch < size:
        starts.append(size - patch)
    return starts


def occlusion_map(image: np.ndarray, predict_proba: Callable[[np.ndarray], np.ndarray], class_index: int,
                  patch: int, stride: int, batch_size: int = 16) -> np.ndarray:
    """(H, W) mean drop of ``predict_proba(...)[:, class_index]`` when a patch covering each pixel is hidden.

    image: (H, W, 3) uint8 at the network's input size; predict_proba: uint8 batch -> (N, n_classes).
    """
    image = np.asarray(image)
    height, width = image.shape[:2]
    fill = np.round(image.reshape(-1, image.shape[-1]).mean(axis=0)).astype(image.dtype)
    boxes = [(y, x) for y in patch_starts(height, patch, stride) for x in patch_starts(width, patch, stride)]
    reference = float(predict_proba(image[None])[0, class_index])
    drop_sum = np.zeros((height, width))
    covered = np.zeros((height, width))
    for start in range(0, len(boxes), batch_size):
        chunk = boxes[start:start + batch_size]
        batch = np.repeat(image[None], len(chunk), axis=0)
        for k, (y, x) in enumerate(chunk):
            batch[k, y:y + patch, x:x + patch] = fill
        probabilities = predict_proba(batch)[:, class_index]
        for (y, x), p in zip(chunk, probabilities):
            drop_sum[y:y + patch, x:x + patch] += reference - float(p)
            covered[y:y + patch, x:x + patch] += 1
    return drop_sum / np.maximum(covered, 1)


def default_patch(size: int) -> tuple[int, int]:
    """(patch, stride) in pixels for an input of ``size`` px at the module's default fractions."""
    return max(1, round(size * DEFAULT_PATCH_FRACTION)), max(1, round(size * DEFAULT_STRIDE_FRACTION))
