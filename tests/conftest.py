"""Shared fixtures: synthetic datasets, ../shared when it is beside the repository."""
from __future__ import annotations

import os
from pathlib import Path

import pytest

from cxr_transfer.core.synthetic import write_class_tree

ROOT = Path(__file__).resolve().parent.parent
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

SHARED = ROOT.parent / "shared"
SHARED_DATA = SHARED / "data" / "covid19-xray"
SHARED_WEIGHTS = SHARED / "weights"


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
