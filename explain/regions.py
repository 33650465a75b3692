"""Where evidence lies: the audit's central box and border frame, applied to a heatmap.

The regions are the ones the audit's pixel-shortcut masks cover (one definition: ``extract.images``' mask
functions): ``center`` is the box that the no-center mask blacks out (``CENTER_FRACTION`` of each side: the
lung fields and heart), ``border`` the frame that the border-only mask keeps (``BORDER_FRACTION`` of the side
wide: corners, edges, burnt-in markers), and ``middle`` the ring between them. The three partition the image,
so the three shares of positive evidence sum to 1.
"""
from __future__ import annotations

import numpy as np

from cxr_transfer.extract.images import border_only, mask_center

REGIONS = ("center", "middle", "border")


def region_masks(height: int, width: int) -> dict[str, np.ndarray]:
    """Boolean (height, width) masks of the three regions; every pixel is in exactly one."""
    if height < 2 or width < 2:
        raise ValueError(f"a region split needs at least 2 x 2 pixels, got {height} x {width} instead")
    ones = np.ones((height, width), np.uint8)
    center = mask_center(ones) == 0
    border = border_only(ones) != 0
    return {"center": center, "middle": ~center & ~border, "border": border}


def evidence_shares(heatmap: np.ndarray, size: int | None = None) -> dict[str, float]:
    """Share of the positive evidence (sum of max(heatmap, 0)) in each region; the three sum to 1.

    size: first spread each cell of a coarse map evenly over the pixels it covers in a size x size frame
    (the network's input), so that a 7 x 7 map is split by the 5 % frame in proportion to area.
    All shares are NaN when the map has no positive value (no evidence to share out).
    """
    heatmap = np.asarray(heatmap, dtype=np.float64)
    if heatmap.ndim != 2:
        raise ValueError(f"heatmap must be 2-D, got shape {heatmap.shape} instead")
    if size is not None and heatmap.shape != (size, size):
        rows = np.minimum(np.arange(size) * heatmap.shape[0] // size, heatmap.shape[0] - 1)
        cols = np.minimum(np.arange(size) * heatmap.shape[1] // size, heatmap.shape[1] - 1)
        heatmap = heatmap[np.ix_(rows, cols)]
    positive = np.clip(np.nan_to_num(heatmap), 0, None)
    total = float(positive.sum())
    masks = region_masks(*heatmap.shape)
    if total <= 0:
        return {name: float("nan") for name in REGIONS}
    return {name: float(positive[mask].sum() / total) for name, mask in masks.items()}


def upsample(heatmap: np.ndarray, height: int, width: int) -> np.ndarray:
    """A coarse (h, w) map stretched to (height, width) bilinearly, cell centres aligned (as CAM papers do)."""
    import cv2

    heatmap = np.asarray(heatmap, dtype=np.float32)
    if heatmap.shape == (height, width):
        return heatmap
    return cv2.resize(heatmap, (width, height), interpolation=cv2.INTER_LINEAR)
