"""Drawing an explanation: the X-ray, the positive evidence for the predicted class over it, the audit regions.

The heatmap lives in the network's square input frame, which is the whole image stretched, so it is
stretched back onto the image at its own aspect ratio. Only positive evidence is coloured (scaled to its
maximum, transparent where there is none); dashed lines mark the central box and the inner edge of the
border frame (``regions.region_masks``). Figures use ``core.plotting.subplots`` (no pyplot).
"""
from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from cxr_transfer.core.plotting import subplots
from cxr_transfer.explain.regions import region_masks, upsample

DISPLAY_SIDE = 512
"""Longest side, in pixels, an image is shown at."""
COLORMAP = "jet"
MAX_ALPHA = 0.55


def display_image(rgb: np.ndarray, side: int = DISPLAY_SIDE) -> np.ndarray:
    """The image shrunk (area-averaged) so that its longest side is at most ``side``."""
    import cv2

    height, width = rgb.shape[:2]
    scale = side / max(height, width)
    if scale >= 1:
        return rgb
    return cv2.resize(rgb, (max(2, round(width * scale)), max(2, round(height * scale))), interpolation=cv2.INTER_AREA)


def _box(mask: np.ndarray) -> tuple[float, float, float, float]:
    rows, cols = np.flatnonzero(mask.any(axis=1)), np.flatnonzero(mask.any(axis=0))
    return cols[0] - 0.5, rows[0] - 0.5, cols[-1] - cols[0] + 1, rows[-1] - rows[0] + 1


def draw_explanation(ax: Any, rgb: np.ndarray, heatmap: np.ndarray, title: str = "") -> None:
    """Draw one explanation on a matplotlib Axes: image, positive evidence, region outlines, title."""
    import matplotlib
    from matplotlib.colors import Normalize
    from matplotlib.patches import Rectangle

    height, width = rgb.shape[:2]
    positive = np.clip(upsample(heatmap, height, width), 0, None)
    peak = float(positive.max())
    ax.imshow(rgb, interpolation="bilinear")
    if peak > 0:
        strength = positive / peak
        colours = matplotlib.colormaps[COLORMAP](Normalize(0, 1)(strength))
        colours[..., 3] = MAX_ALPHA * strength
        ax.imshow(colours, interpolation="bilinear")
    masks = region_masks(height, width)
    for mask, colour in ((masks["center"], "white"), (~masks["border"], "yellow")):
        x, y, w, h = _box(mask)
        ax.add_patch(Rectangle((x, y), w, h, fill=False, edgecolor=colour, linestyle="--", linewidth=0.8))
    ax.set_title(title, fontsize=8)
    ax.set_axis_off()


def write_overlay(path: str | Path, rgb: np.ndarray, heatmap: np.ndarray, title: str = "") -> Path:
    """One explanation as a PNG."""

    image = display_image(rgb)
    figure, ax = subplots(figsize=(5, 5 * image.shape[0] / image.shape[1] + 0.4), dpi=110, layout="tight")
    draw_explanation(ax, image, heatmap, title)
    path = Path(path)
    figure.savefig(path)
    return path


def write_sheet(path: str | Path, images: Sequence[np.ndarray], heatmaps: Sequence[np.ndarray],
                titles: Sequence[str], columns: int = 4) -> Path:
    """Several explanations on one PNG, ``columns`` per row."""

    if not len(images) == len(heatmaps) == len(titles):
        raise ValueError(f"images, heatmaps and titles must have the same length, got {len(images)}, "
                         f"{len(heatmaps)} and {len(titles)} instead")
    if not images:
        raise ValueError("a sheet needs at least one image")
    columns = max(1, min(columns, len(images)))
    rows = -(-len(images) // columns)
    figure, axes = subplots(rows, columns, figsize=(3.2 * columns, 3.4 * rows), dpi=110, squeeze=False,
                            layout="tight")
    for ax in axes.ravel()[len(images):]:
        ax.set_axis_off()
    for ax, image, heatmap, title in zip(axes.ravel(), images, heatmaps, titles):
        draw_explanation(ax, display_image(image, 384), heatmap, title)
    path = Path(path)
    figure.savefig(path)
    return path
