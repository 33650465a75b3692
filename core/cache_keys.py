"""The one rule that names cached artefacts: ONNX exports, HDF5 embeddings, finetune view banks, hash caches.

A cached file is valid for one (backbone, input size, weights) and, where it matters, a few more facts
(opset, image view, augmentation). Every cache file name starts with ``model_key(...)`` so that files of
different weights or sizes can never be confused, and each dataset's caches live in ``dataset_cache_id``.
"""
from __future__ import annotations

import hashlib
from pathlib import Path


def model_key(backbone: str, input_size: int, weights_sha256: str, *qualifiers: str) -> str:
    """``<backbone>-<size>-<weights sha256[:16]>[-<qualifier>...]`` (empty qualifiers are left out)."""
    weights = weights_sha256.replace(":", "-")[:16]
    return "-".join([backbone, str(int(input_size)), weights, *[q for q in qualifiers if q]])


_NAME_BYTES = 96   # of the dataset folder's name kept in its cache folder's name (file names: 255 bytes)


def dataset_cache_id(root: str | Path) -> str:
    """A folder name for one dataset's caches: its folder name (at most 96 bytes of it) plus a hash of its
    absolute path, so a 250-character dataset folder still gives a valid name."""
    root = Path(root)
    name = root.name
    while len(name.encode("utf-8", "surrogateescape")) > _NAME_BYTES:
        name = name[:-1]
    return f"{name}-{hashlib.sha256(str(root).encode('utf-8', 'surrogateescape')).hexdigest()[:8]}"
