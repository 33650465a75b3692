"""The one rule that names cached artefacts: ONNX exports, HDF5 embeddings, finetune banks, hash caches.

A cached file is valid for one (backbone, input size, weights) and, where it matters, a few more facts
(opset, image mask, augmentation). Every cache file name starts with ``model_key(...)`` so that files of
different weights or sizes can never be confused, and each dataset's caches live in ``dataset_cache_id``.
"""
from __future__ import annotations

import hashlib
from pathlib import Path


def model_key(backbone: str, input_size: int, weights_sha256: str, *qualifiers: str) -> str:
    """``<backbone>-<size>-<weights sha256[:16]>[-<qualifier>...]`` (empty qualifiers are left out)."""
    weights = weights_sha256.replace(":", "-")[:16]
    return "-".join([backbone, str(int(input_size)), weights, *[q for q in qualifiers if q]])


NAME_BYTES = 96
"""The dataset folder's name is cut to this many UTF-8 bytes in cache folder names: file systems allow 255
bytes per name, and the hash suffix, not the name, is what keeps two datasets apart."""


def dataset_cache_id(root: str | Path) -> str:
    """A folder name for one dataset's caches: its folder name (at most ``NAME_BYTES`` bytes) plus a hash of
    its absolute path."""
    root = Path(root)
    name = root.name.encode("utf-8", "surrogateescape")[:NAME_BYTES].decode("utf-8", "surrogateescape")
    return f"{name}-{hashlib.sha256(str(root).encode('utf-8', 'surrogateescape')).hexdigest()[:8]}"
