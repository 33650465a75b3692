"""Shared fixtures: small synthetic X-ray-like images in the layouts cxr-transfer reads."""
from __future__ import annotations

import os
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

SHARED = ROOT.parent / "shared"
SHARED_DATA = SHARED / "data" / "covid19-xray"
SHARED_WEIGHTS = SHARED / "weights"


def synthetic_xray(seed: int, size: int = 48, label_index: int = 0) -> np.ndarray:
    """A grey 'radiograph': dark background, two bright lung-shaped blobs whose shape depends on the class."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:size, 0:size] / size
    lungs = np.exp(-(((xx - 0.3) ** 2) / 0.02 + ((yy - 0.5) ** 2) / 0.08))
    lungs += np.exp(-(((xx - 0.7) ** 2) / 0.02 + ((yy - 0.5) ** 2) / 0.08))
    stripes = 0.3 * np.sin(2 * np.pi * (label_index + 1) * 3 * yy)
    image = 60 + 150 * lungs + 40 * stripes + rng.normal(0, 8, size=(size, size))
    return np.clip(image, 0, 255).astype(np.uint8)


def write_class_tree(root: Path, classes=("covid", "normal", "pneumonia"), per_class: int = 4,
                     splits: tuple[str, ...] = (), size: int = 48, fmt: str = "png", seed: int = 0) -> Path:
    """Write ROOT[/split]/class/img_NNN.fmt synthetic images; returns ROOT."""
    for split_index, split in enumerate(splits or ("",)):
        for label_index, label in enumerate(classes):
            folder = root / split / label if split else root / label
            folder.mkdir(parents=True, exist_ok=True)
            for i in range(per_class):
                array = synthetic_xray(seed + 1000 * split_index + 100 * label_index + i, size, label_index)
                Image.fromarray(array).save(folder / f"img_{i:03d}.{fmt}")
    return root


@pytest.fixture
def class_tree(tmp_path: Path) -> Path:
    return write_class_tree(tmp_path / "data")


@pytest.fixture(scope="session")
def shared_data() -> Path:
    if not SHARED_DATA.is_dir():
        pytest.skip("../shared/data/covid19-xray is not beside the repository")
    return SHARED_DATA


@pytest.fixture(scope="session")
def shared_weights() -> Path:
    if not (SHARED_WEIGHTS / "vgg16_imagenet_notop.weights.h5").is_file():
        pytest.skip("../shared/weights is not beside the repository")
    return SHARED_WEIGHTS
