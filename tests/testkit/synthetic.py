"""Small synthetic X-ray-like images in the layouts cxr-transfer reads: for tests, demos and benchmarks.

They let every code path run without real data or real weights (a few kB per image, classes that a
linear head separates).
"""
from __future__ import annotations

from pathlib import Path

import numpy as np


def synthetic_xray(seed: int, size: int = 48, label_index: int = 0) -> np.ndarray:
    """A grey 'radiograph': dark background, two bright lung-shaped blobs whose texture depends on the class."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:size, 0:size] / size
    lungs = np.exp(-(((xx - 0.3) ** 2) / 0.02 + ((yy - 0.5) ** 2) / 0.08))
    lungs += np.exp(-(((xx - 0.7) ** 2) / 0.02 + ((yy - 0.5) ** 2) / 0.08))
    stripes = 0.3 * np.sin(2 * np.pi * (label_index + 1) * 3 * yy)
    image = 60 + 150 * lungs + 40 * stripes + rng.normal(0, 8, size=(size, size))
    return np.clip(image, 0, 255).astype(np.uint8)


def write_class_tree(root: str | Path, classes: tuple[str, ...] = ("covid", "normal", "pneumonia"),
                     per_class: int = 4, splits: tuple[str, ...] = (), size: int = 48, fmt: str = "png",
                     seed: int = 0) -> Path:
    """Write ROOT[/split]/class/img_NNN.fmt synthetic images; returns ROOT."""
    from PIL import Image

    root = Path(root)
    for split_index, split in enumerate(splits or ("",)):
        for label_index, label in enumerate(classes):
            folder = root / split / label if split else root / label
            folder.mkdir(parents=True, exist_ok=True)
            for i in range(per_class):
                array = synthetic_xray(seed + 1000 * split_index + 100 * label_index + i, size, label_index)
                Image.fromarray(array).save(folder / f"img_{i:03d}.{fmt}")
    return root
