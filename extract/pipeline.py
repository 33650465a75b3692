"""From a dataset to cached embeddings: decode in threads, infer with onnxruntime, write the HDF5 cache.

``extract_features`` makes sure the cache holds an embedding for every readable image of the dataset and
returns a summary; ``load_features`` does the same and returns the embeddings aligned with the samples.
Only images whose sha256 is not cached yet are decoded and run through the network.
"""
from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np

from cxr_transfer.core.cache_keys import dataset_cache_id, model_key
from cxr_transfer.core.errors import CxrError
from cxr_transfer.core.record import library_versions
from cxr_transfer.core.settings import (
    DEFAULT_CACHE_DIR,
    BackboneSettings,
    UsesBackboneSettings,
)
from cxr_transfer.extract.cache import (
    CacheRow,
    FeatureCache,
    read_cache,
    read_cache_attrs,
)
from cxr_transfer.extract.dataset import Dataset, Sample
from cxr_transfer.extract.images import ImageView, decoded_batches
from cxr_transfer.extract.onnx_export import (
    DEFAULT_OPSET,
    OnnxBackbone,
    get_onnx_backbone,
)
from cxr_transfer.extract.registry import BackboneConfig, get_backbone
from cxr_transfer.extract.runner import OnnxEmbedder
from cxr_transfer.extract.weights import WeightsSource, resolve_weights

log = logging.getLogger(__name__)

__all__ = ["DEFAULT_CACHE_DIR", "ExtractSettings", "ExtractResult", "FeatureSet", "ImageView", "cache_file",
           "extract_features", "load_features"]


@dataclass(frozen=True)
class ExtractSettings(UsesBackboneSettings):
    """Everything that decides which features are computed and how fast: the shared backbone settings
    (``common``) plus what only extraction needs."""

    common: BackboneSettings = field(default_factory=BackboneSettings)
    batch_size: int = 16
    decode_workers: int = 2
    flush_every: int = 256
    opset: int = DEFAULT_OPSET
    view: ImageView | None = None

    @property
    def config(self) -> BackboneConfig:
        return get_backbone(self.backbone)

    def with_backbone(self, name: str) -> "ExtractSettings":
        """The same settings for another backbone."""
        return replace(self, common=self.common.with_backbone(name))

    def record(self) -> dict[str, object]:
        return {**self.common.record(), "input_size": self.config.input_size(self.input_size),
                "batch_size": self.batch_size, "decode_workers": self.decode_workers, "opset": self.opset,
                "view": self.view.name if self.view else "full"}


@dataclass
class ExtractResult:
    """What one extraction run did."""

    cache_path: Path
    backbone: str
    n_images: int
    n_cached: int
    n_computed: int
    failures: list[tuple[str, str]]
    seconds: float
    inference_seconds: float
    weights: WeightsSource
    onnx_sha256: str

    @property
    def rate(self) -> float:
        return self.n_computed / self.seconds if self.seconds > 0 and self.n_computed else 0.0

    def summary(self) -> str:
        text = (f"{self.backbone}: {self.n_images} images, {self.n_cached} cached, {self.n_computed} computed"
                f" ({self.rate:.1f} img/s), {len(self.failures)} skipped -> {self.cache_path}")
        return text


@dataclass
class FeatureSet:
    """Embeddings aligned with the samples they came from (unreadable images left out)."""

    embeddings: np.ndarray
    samples: list[Sample]
    class_names: list[str]
    attrs: dict[str, object] = field(default_factory=dict)
    cache_path: Path | None = None

    @property
    def labels(self) -> np.ndarray:
        index = {name: i for i, name in enumerate(self.class_names)}
        return np.array([index[s.label] for s in self.samples], dtype=np.int64)

    @property
    def groups(self) -> np.ndarray:
        return np.array([s.group for s in self.samples])

    @property
    def splits(self) -> np.ndarray:
        return np.array([s.split for s in self.samples])

    @property
    def sha256(self) -> list[str]:
        return [s.sha256 for s in self.samples]


def cache_file(dataset: Dataset, settings: ExtractSettings, weights_sha256: str) -> Path:
    """Where a dataset's embeddings for these settings live (``core.cache_keys`` names it)."""
    size = settings.config.input_size(settings.input_size)
    name = model_key(settings.config.name, size, weights_sha256, settings.view.name if settings.view else "")
    return Path(settings.cache_dir) / dataset_cache_id(dataset.root) / f"{name}.h5"


def _progress(total: int, enabled: bool, label: str):
    from tqdm import tqdm

    return tqdm(total=total, unit="img", desc=label, disable=not enabled or total == 0, leave=False)


def extract_features(dataset: Dataset, settings: ExtractSettings) -> ExtractResult:
    """Fill the cache for every image of ``dataset`` (see module docstring); return what was done."""
    started = time.perf_counter()
    config = settings.config
    size = config.input_size(settings.input_size)
    source = resolve_weights(config, settings.weights_file, settings.weights_dir, settings.random_weights)
    onnx: OnnxBackbone | None = None
    view_name = settings.view.name if settings.view else "full"
    identity = {"backbone": config.name, "input_size": size, "view": view_name, "weights_sha256": source.sha256,
                "preprocessing": config.preprocessing_description}
    path = cache_file(dataset, settings, source.sha256)
    cache = FeatureCache(path, identity)

    todo, seen = [], set()
    for sample in dataset.samples:
        if not cache.has(sample.sha256) and sample.sha256 not in seen:
            seen.add(sample.sha256)
            todo.append(sample)
    n_cached = sum(1 for s in dataset.samples if cache.has(s.sha256))
    failures: list[tuple[Sample, str]] = []
    inference_seconds = 0.0
    if todo:
        onnx = onnx or get_onnx_backbone(config, size, source, settings.cache_dir, settings.opset)
        embedder = OnnxEmbedder(onnx, settings.threads)
        block_shas: list[str] = []
        block_rows: list[np.ndarray] = []
        with _progress(len(todo), settings.progress, f"{config.name} {view_name}") as bar:
            for good, batch, bad in decoded_batches(todo, size, settings.batch_size, settings.decode_workers,
                                                    settings.view):
                for sample, reason in bad:
                    log.warning("skipped %s", reason)
                failures += bad
                if len(good):
                    tick = time.perf_counter()
                    block_rows.append(embedder.embed(batch))
                    inference_seconds += time.perf_counter() - tick
                    block_shas += [s.sha256 for s in good]
                if len(block_shas) >= settings.flush_every:
                    cache.add_part(block_shas, np.concatenate(block_rows))
                    block_shas, block_rows = [], []
                bar.update(len(good) + len(bad))
        if block_shas:
            cache.add_part(block_shas, np.concatenate(block_rows))

    rows = [CacheRow(s.sha256, dataset.relative(s), s.label, s.split, s.group)
            for s in dataset.samples if cache.has(s.sha256)]
    if not rows:
        raise CxrError(f"{dataset.root}: none of the {len(dataset)} images could be read")
    failed = [(dataset.relative(s), reason) for s, reason in failures]
    if not cache.listing_matches(rows):
        onnx_attrs = _onnx_attrs(onnx, path)
        cache.write(rows, {**onnx_attrs, "dataset_root": str(dataset.root), "failed": failed,
                           "versions": library_versions(), "opset": settings.opset})
    return ExtractResult(path, config.name, len(dataset), n_cached, len(todo) - len(failures), failed,
                         time.perf_counter() - started, inference_seconds, source,
                         onnx.sha256 if onnx else str(_onnx_attrs(None, path).get("onnx_sha256", "")))


def _onnx_attrs(onnx: OnnxBackbone | None, path: Path) -> dict[str, object]:
    if onnx is not None:
        return {"onnx_sha256": onnx.sha256, "onnx_max_relative_error": onnx.max_relative_error}
    if path.exists():
        attrs = read_cache_attrs(path)
        return {k: attrs[k] for k in ("onnx_sha256", "onnx_max_relative_error") if k in attrs}
    return {}


def load_features(dataset: Dataset, settings: ExtractSettings) -> tuple[FeatureSet, ExtractResult]:
    """Extract what is missing, then return the embeddings aligned with ``dataset``'s readable samples."""
    result = extract_features(dataset, settings)
    embeddings, columns, attrs = read_cache(result.cache_path)
    row_of = {sha: i for i, sha in enumerate(columns["sha256"])}
    samples = [s for s in dataset.samples if s.sha256 in row_of]
    features = embeddings[[row_of[s.sha256] for s in samples]]
    return FeatureSet(features, samples, list(dataset.class_names), attrs, result.cache_path), result
