"""The fast path's bank: embeddings of K augmented copies of every training image through the frozen ONNX body.

The body is frozen and deterministic, so ``head(body(augment(x)))`` only needs ``body(augment(x))`` once per
copy. Copy 0 is the un-augmented image; copies 1..K-1 are augmented with a generator that depends only on the
image's sha256 and the copy number (``augment.copy_rng``), never on the run's seed or split. So a copy cached
by one run is exactly the copy another run would compute, and the bank is shared by all seeds: it is stored
under ``<cache_dir>/finetune-bank/`` keyed by backbone, input size, weights and augmentation parameters,
holding per image sha256 the copies computed so far (copy k does not depend on K either: a bank built with
K=10 serves K=5 for free). Test images only need copy 0.
"""
from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

import numpy as np

from cxr_transfer.core.cache_keys import model_key
from cxr_transfer.core.io import atomic_write
from cxr_transfer.extract.onnx_export import OnnxBackbone
from cxr_transfer.extract.runtime import OnnxEmbedder
from cxr_transfer.finetune.augment import AugmentParams, augment_image, copy_rng

log = logging.getLogger(__name__)

BANK_DIR = "finetune-bank"


@dataclass
class BankStats:
    """What a bank request cost: copies computed now vs found in the cache, and seconds spent."""

    computed: int
    cached: int
    seconds: float
    path: Path


def bank_path(cache_dir: str | Path, backbone: OnnxBackbone, params: AugmentParams) -> Path:
    key = model_key(backbone.config.name, backbone.input_size, backbone.weights_sha256, f"aug{params.fingerprint()}")
    name = f"{key}.npz"
    return Path(cache_dir) / BANK_DIR / name


def _load(path: Path, copies: int, dim: int) -> dict[str, np.ndarray]:
    """sha256 -> (max(copies, stored), dim) array with NaN rows for copies not computed yet."""
    if not path.is_file():
        return {}
    with np.load(path, allow_pickle=False) as data:
        shas, feats = data["sha256"], data["features"]
    if feats.ndim != 3 or feats.shape[2] != dim:
        log.warning("ignoring %s: shape %s does not fit (copies, %d)", path, feats.shape, dim)
        return {}
    if feats.shape[1] < copies:
        feats = np.concatenate([feats, np.full((len(feats), copies - feats.shape[1], dim), np.nan, np.float32)], 1)
    return {str(s): f for s, f in zip(shas, feats)}


def _save(path: Path, bank: dict[str, np.ndarray]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    shas = sorted(bank)
    with atomic_write(path) as handle:
        np.savez(handle, sha256=np.array(shas), features=np.stack([bank[s] for s in shas]))


def augmented_copy(image: np.ndarray, sha256: str, copy: int, params: AugmentParams) -> np.ndarray:
    """Copy number ``copy`` of an image: itself for 0, else its deterministic augmentation."""
    return image if copy == 0 else augment_image(image, copy_rng(sha256, copy), params)


def bank_features(backbone: OnnxBackbone, shas: Sequence[str], images: np.ndarray, copies_needed: Sequence[int],
                  copies: int, params: AugmentParams, cache_dir: str | Path, batch_size: int = 16,
                  threads: int | None = None,
                  progress: Callable[[int, int], None] | None = None) -> tuple[np.ndarray, BankStats]:
    """Embeddings (N, copies, D) of copies 0..copies_needed[i]-1 of each image (other entries NaN).

    Missing copies are computed with the ONNX body and added to the cache file, which is also written
    when the computation is interrupted, so the work done is kept.
    """
    started = time.perf_counter()
    dim = backbone.config.feature_dim
    path = bank_path(cache_dir, backbone, params)
    bank = _load(path, copies, dim)
    stored = max([copies] + [len(f) for f in bank.values()])
    todo = [(i, k) for i, (sha, need) in enumerate(zip(shas, copies_needed)) for k in range(need)
            if sha not in bank or not np.isfinite(bank[sha][k]).all()]
    cached = int(sum(copies_needed)) - len(todo)
    embedder = OnnxEmbedder(backbone, threads) if todo else None
    try:
        for start in range(0, len(todo), batch_size):
            chunk = todo[start:start + batch_size]
            batch = np.stack([augmented_copy(images[i], shas[i], k, params) for i, k in chunk])
            feats = embedder.embed(batch)
            for (i, k), f in zip(chunk, feats):
                bank.setdefault(shas[i], np.full((stored, dim), np.nan, np.float32))[k] = f
            if progress:
                progress(min(start + batch_size, len(todo)), len(todo))
    finally:
        if todo:
            _save(path, bank)
    out = np.full((len(shas), copies, dim), np.nan, np.float32)
    for i, sha in enumerate(shas):
        if sha in bank:
            out[i] = bank[sha][:copies]
    return out, BankStats(len(todo), cached, time.perf_counter() - started, path)
