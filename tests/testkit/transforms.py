"""The edits that turn one radiograph into a "near duplicate" of itself, as seen in public COVID-19 sets.

The same X-ray is often published twice: re-saved as JPEG, downscaled, trimmed, contrast-stretched or with
a caption ("L", "AP portable", a date) burnt in. These functions make such copies from a greyscale uint8
image; the duplicate detector must find every one of them (tests, and ``benchmarks/duplicate_thresholds.py`` on real images).
"""
from __future__ import annotations

import io
from typing import Callable

import cv2
import numpy as np
from PIL import Image


def reencode_jpeg(grey: np.ndarray, quality: int = 70) -> np.ndarray:
    """Round trip through JPEG at ``quality``."""
    buffer = io.BytesIO()
    Image.fromarray(grey).save(buffer, format="JPEG", quality=quality)
    buffer.seek(0)
    return np.asarray(Image.open(buffer).convert("L"))


def resize_half(grey: np.ndarray) -> np.ndarray:
    """Downscale both sides by 0.5 (area averaging)."""
    height, width = grey.shape[:2]
    return cv2.resize(grey, (max(2, width // 2), max(2, height // 2)), interpolation=cv2.INTER_AREA)


def crop_5(grey: np.ndarray) -> np.ndarray:
    """Cut 5% of the width and of the height away, split between the two edges (2.5% each side)."""
    height, width = grey.shape[:2]
    dy, dx = max(1, round(0.025 * height)), max(1, round(0.025 * width))
    return np.ascontiguousarray(grey[dy:height - dy, dx:width - dx])


def crop_5_corner(grey: np.ndarray) -> np.ndarray:
    """Cut 5% of the width and of the height away from one corner only (a shifted trim)."""
    height, width = grey.shape[:2]
    return np.ascontiguousarray(grey[round(0.05 * height):, round(0.05 * width):])


def crop_random(grey: np.ndarray) -> np.ndarray:
    """Cut a random 0-5% from each edge independently (seeded by the image content: deterministic)."""
    height, width = grey.shape[:2]
    top, bottom, left, right = np.random.default_rng(int(grey.sum()) % (2**32)).uniform(0.0, 0.05, 4)
    return np.ascontiguousarray(grey[round(top * height):height - round(bottom * height),
                                     round(left * width):width - round(right * width)])


def text_label(grey: np.ndarray) -> np.ndarray:
    """Burn a white caption into the top-left corner, scaled to the image (like a scanner's marker)."""
    out = grey.copy()
    height, width = out.shape[:2]
    scale = max(0.3, width / 600.0)
    thickness = max(1, round(width / 300))
    cv2.putText(out, "L  AP PORTABLE", (round(0.04 * width), round(0.08 * height)),
                cv2.FONT_HERSHEY_SIMPLEX, scale, 255, thickness, cv2.LINE_AA)
    return out


def equalise(grey: np.ndarray) -> np.ndarray:
    """Histogram equalisation (a common contrast change between two published copies)."""
    return cv2.equalizeHist(grey)


def combined(grey: np.ndarray) -> np.ndarray:
    """Caption, then crop, then half size, then JPEG q=70: several edits at once."""
    return reencode_jpeg(resize_half(crop_5(text_label(grey))))


TRANSFORMS: dict[str, Callable[[np.ndarray], np.ndarray]] = {
    "jpeg70": reencode_jpeg,
    "resize50": resize_half,
    "crop5": crop_5,
    "crop5corner": crop_5_corner,
    "croprandom": crop_random,
    "text": text_label,
    "equalise": equalise,
    "combined": combined,
}
"""Name -> edit; the brief's five (JPEG q=70, 0.5x, crop 5%, caption, equalisation) plus three harder ones."""


def save_grey(grey: np.ndarray, path, jpeg_quality: int = 95) -> None:
    """Write a greyscale array as PNG or JPEG (by suffix); JPEG at ``jpeg_quality``."""
    image = Image.fromarray(grey)
    if str(path).lower().endswith((".jpg", ".jpeg")):
        image.save(path, format="JPEG", quality=jpeg_quality)
    else:
        image.save(path)
