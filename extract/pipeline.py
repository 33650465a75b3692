"""From a dataset to cached embeddings: decode in threads, infer with onnxruntime, write the HDF5 cache.

``extract_features`` makes sure the cache holds an embedding for every readable image of the dataset and
returns a summary; ``load_features`` does the same and returns the embeddings aligned with the samples.
Only images whose sha256 is not cached yet are decoded and run through the network, by the engine the
settings name (``extract/engine.py``: this process, or a Ray cluster); planning, the cache and its merge are
the same for both.

Before any work: files whose name (or class, split, group) is not valid UTF-8 are skipped with a warning
(cache columns are UTF-8 text), the cache folder must be a folder, and when embeddings must be computed it
must be writable (a read-only cache that holds every embedding is used as is). The cache's lock (``core.locking``) is held from opening the cache to the last read, so
two runs on the same cache take turns. Non-finite embeddings are never cached: such images are skipped.
"""
from __future__ import annotations

import contextlib
import errno
import logging
import tempfile
import time
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np

from cxr_transfer.core.cache_keys import dataset_cache_id, model_key
from cxr_transfer.core.errors import CxrError
from cxr_transfer.core.io import cannot_write_error, printable, utf8_problem
from cxr_transfer.core.locking import DEFAULT_LOCK_TIMEOUT, file_lock
from cxr_transfer.core.params import COUNT, POSITIVE, check_params, param
from cxr_transfer.core.record import library_versions
from cxr_transfer.core.settings import DEFAULT_CACHE_DIR, BackboneSettings, UsesBackboneSettings
from cxr_transfer.extract.cache import MASK_ATTR, CacheRow, FeatureCache, read_cache, read_cache_attrs
from cxr_transfer.extract.dataset import Dataset, Sample
from cxr_transfer.extract.engine import Computed, EngineSettings, check_engine
from cxr_transfer.extract.engine_ray import embed_on_ray
from cxr_transfer.extract.images import ImageMask
from cxr_transfer.extract.onnx_export import DEFAULT_OPSET, OnnxBackbone, get_onnx_backbone
from cxr_transfer.extract.quantize import (
    Int8Sample,
    choose_int8_sample,
    get_int8_backbone,
    int8_info,
    precision_key,
)
from cxr_transfer.extract.registry import BackboneConfig, get_backbone
from cxr_transfer.extract.runtime import OnnxEmbedder, embed_batches
from cxr_transfer.extract.weights import WeightsSource, resolve_weights

log = logging.getLogger(__name__)

__all__ = ["DEFAULT_CACHE_DIR", "ExtractSettings", "ExtractResult", "FeatureSet", "ImageMask", "cache_file",
           "extract_features", "load_features"]


@dataclass(frozen=True)
class ExtractSettings(UsesBackboneSettings):
    """Everything that decides which features are computed and how fast: the shared backbone settings
    (``common``) plus what only extraction needs."""

    common: BackboneSettings = field(default_factory=BackboneSettings)
    batch_size: int = param(16, COUNT, "images per onnxruntime batch")
    decode_workers: int = param(2, COUNT, "threads decoding images ahead of the network", cli=False)
    flush_every: int = param(256, COUNT, "embeddings written to the cache per part file", cli=False)
    opset: int = DEFAULT_OPSET
    mask: ImageMask | None = None   # e.g. the audit's NO_CENTER: applied to every image, names the cache
    lock_timeout: float = param(DEFAULT_LOCK_TIMEOUT, POSITIVE, "seconds to wait for another run writing the "
                                                                "same cache", cli=False)
    int8_sample_digest: str | None = None   # int8: use the cached model of this int8 sample (e.g. a saved head's)
    engine: EngineSettings = field(default_factory=EngineSettings)   # who computes the missing embeddings

    def __post_init__(self) -> None:
        if not isinstance(self.common, BackboneSettings):
            raise TypeError(f"common must be a BackboneSettings, got {type(self.common).__name__} instead")
        if not isinstance(self.engine, EngineSettings):
            raise TypeError(f"engine must be an EngineSettings, got {type(self.engine).__name__} instead")
        check_params(self)

    @property
    def config(self) -> BackboneConfig:
        return get_backbone(self.backbone)

    def with_backbone(self, name: str) -> "ExtractSettings":
        """The same settings for another backbone."""
        return replace(self, common=self.common.with_backbone(name))

    def record(self) -> dict[str, object]:
        return {**self.common.record(), "input_size": self.config.input_size(self.input_size),
                "batch_size": self.batch_size, "decode_workers": self.decode_workers, "opset": self.opset,
                "mask": self.mask.name if self.mask else "full", "engine": self.engine.record()}


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
    precision: str = "float32"
    int8_sample_digest: str | None = None   # int8: the int8 sample the quantized model was made with
    engine_note: str = ""                   # what the engine reports (Ray: workers, shards run and failed)
    int8_sample_note: str = ""              # int8: said when the int8 sample is smaller than int8_sample_size

    @property
    def rate(self) -> float:
        return self.n_computed / self.seconds if self.seconds > 0 and self.n_computed else 0.0

    def summary_lines(self) -> list[str]:
        """The summary line and one line per skipped image."""
        return [self.summary()] + [f"  skipped {path}: {reason.split(': ', 1)[-1]}" for path, reason in self.failures]

    def summary(self) -> str:
        name = f"{self.backbone} int8" if self.precision == "int8" else self.backbone
        speed = f" ({self.rate:.1f} img/s)" if self.n_computed else ""   # nothing computed: no rate to report
        text = (f"{name}: {self.n_images} images, {self.n_cached} cached, {self.n_computed} computed{speed}, "
                f"{len(self.failures)} skipped -> {self.cache_path}")
        if self.int8_sample_note:
            text += f"; {self.int8_sample_note}"
        return f"{text} [{self.engine_note}]" if self.engine_note else text


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


def cache_file(dataset: Dataset, settings: ExtractSettings, weights_sha256: str,
               int8_sample_digest: str | None = None) -> Path:
    """Where a dataset's embeddings for these settings live (``core.cache_keys`` names it); int8 embeddings
    go to their own file per int8 sample, never mixed with float32 ones."""
    size = settings.config.input_size(settings.input_size)
    name = model_key(settings.config.name, size, weights_sha256, settings.mask.name if settings.mask else "",
                     precision_key(int8_sample_digest, settings.config.int8_variant)
                     if int8_sample_digest else "")
    return Path(settings.cache_dir) / dataset_cache_id(dataset.root) / f"{name}.h5"


def _progress(total: int, enabled: bool, label: str):
    from tqdm import tqdm

    return tqdm(total=total, unit="img", desc=label, disable=not enabled or total == 0, leave=False)


@dataclass(frozen=True)
class _Plan:
    """What one extraction is about: the backbone, its weights and the cache file they name."""

    config: BackboneConfig
    size: int
    source: WeightsSource
    identity: dict[str, object]
    path: Path
    mask_name: str
    sample: Int8Sample | None = None   # int8: the images to quantize with (None: use a cached model)
    digest: str | None = None          # int8: the int8 sample's hash (names the model and cache)


def _plan(dataset: Dataset, settings: ExtractSettings) -> _Plan:
    config = settings.config
    size = config.input_size(settings.input_size)
    source = resolve_weights(config, settings.weights_file, settings.weights_dir, settings.random_weights)
    mask_name = settings.mask.name if settings.mask else "full"
    identity = {"backbone": config.name, "input_size": size, MASK_ATTR: mask_name, "weights_sha256": source.sha256,
                "preprocessing": config.preprocessing_description}
    sample, digest = None, None
    if settings.precision == "int8":
        sample = None if settings.int8_sample_digest else choose_int8_sample(dataset.samples,
                                                                             settings.int8_sample_size)
        digest = settings.int8_sample_digest or sample.digest
    return _Plan(config, size, source, identity, cache_file(dataset, settings, source.sha256, digest), mask_name,
                 sample, digest)


def _prepare_folder(folder: Path, cache_dir: Path) -> None:
    """Create the dataset's cache folder; a --cache-dir that is a file or cannot be created is refused."""
    for parent in (Path(cache_dir), folder):
        if parent.exists() and not parent.is_dir():
            raise CxrError(f"`cache_dir`: {parent} is a file, not a folder; give a folder with `cache_dir`")
    if folder.is_dir():
        return
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise cannot_write_error(folder, exc) from None


def _check_writable(folder: Path) -> None:
    """Raise CxrError unless a file can be created in ``folder`` (checked before any computing)."""
    try:
        with tempfile.NamedTemporaryFile(dir=folder, prefix=".write-check-"):
            pass
    except OSError as exc:
        raise cannot_write_error(folder, exc) from None


@contextlib.contextmanager
def _cache_guard(plan: _Plan, settings: ExtractSettings):
    """Hold the cache's lock; yields False (read only, no lock) where no lock file can be made."""
    _prepare_folder(plan.path.parent, settings.cache_dir)
    with contextlib.ExitStack() as stack:
        try:
            stack.enter_context(file_lock(plan.path, settings.lock_timeout))
            locked = True
        except OSError as exc:
            if exc.errno not in (errno.EACCES, errno.EROFS, errno.EPERM):
                raise cannot_write_error(plan.path.parent, exc) from None
            log.debug("no lock on read-only %s (%s)", plan.path.parent, exc)
            locked = False
        yield locked


def named_samples(dataset: Dataset) -> tuple[list[Sample], list[tuple[Sample, str]]]:
    """(the samples whose path, class, split and group can be stored as UTF-8 text, the others with the reason);
    the others are skipped by every command that reads images."""
    named, problems = [], []
    for sample in dataset.samples:
        fields = {"path": dataset.relative(sample), "class": sample.label, "split": sample.split,
                  "group": sample.group}
        bad = [name for name, text in fields.items() if utf8_problem(text) is not None]
        if bad:
            reason = f"{printable(dataset.relative(sample))}: {' and '.join(bad)} not valid UTF-8 (rename it)"
            problems.append((sample, reason))
        else:
            named.append(sample)
    return named, problems


def extract_features(dataset: Dataset, settings: ExtractSettings, prune: bool = True) -> ExtractResult:
    """Fill the cache for every image of ``dataset`` (see module docstring); return what was done.

    ``prune=False`` keeps the cached rows of images not in ``dataset`` (``predict`` on a few files of a
    folder must not drop the folder's other embeddings) and leaves their columns as they were.
    """
    check_engine(settings.engine)
    plan = _plan(dataset, settings)
    with _cache_guard(plan, settings) as locked:
        return _extract(dataset, settings, plan, locked, prune)


def load_features(dataset: Dataset, settings: ExtractSettings,
                  prune: bool = True) -> tuple[FeatureSet, ExtractResult]:
    """Extract what is missing, then return the embeddings aligned with ``dataset``'s readable samples."""
    check_engine(settings.engine)
    plan = _plan(dataset, settings)
    with _cache_guard(plan, settings) as locked:
        result = _extract(dataset, settings, plan, locked, prune)
        embeddings, columns, attrs = read_cache(result.cache_path)
    row_of = {sha: i for i, sha in enumerate(columns["sha256"])}
    unreadable = {path for path, _ in result.failures}
    samples = [s for s in dataset.samples if s.sha256 in row_of and printable(dataset.relative(s)) not in unreadable]
    features = embeddings[[row_of[s.sha256] for s in samples]]
    return FeatureSet(features, samples, list(dataset.class_names), attrs, result.cache_path), result


def _extract(dataset: Dataset, settings: ExtractSettings, plan: _Plan, locked: bool, prune: bool) -> ExtractResult:
    started = time.perf_counter()
    config, size, source, path = plan.config, plan.size, plan.source, plan.path
    samples, failures = named_samples(dataset)
    for _, reason in failures:
        log.warning("skipped %s", reason)
    cache = FeatureCache(path, plan.identity)
    onnx: OnnxBackbone | None = None

    todo, seen = [], set()
    for sample in samples:
        if not cache.has(sample.sha256) and sample.sha256 not in seen:
            seen.add(sample.sha256)
            todo.append(sample)
    n_cached = sum(1 for s in samples if cache.has(s.sha256))
    read_only = False
    if todo:
        # New embeddings must be written: find out now, not after all the computing. (Without the lock the
        # folder refused the lock file, so the check below fails with the reason.)
        _check_writable(path.parent)
        if not locked:
            raise CxrError(f"`cache_dir`: cannot lock {path} for writing; give a writable folder with `cache_dir`")
    elif not cache.listing_matches(_rows(dataset, samples, cache, prune)):
        # Every embedding is there, only the row list changed: a read-only cache still serves them.
        try:
            _check_writable(path.parent)
            read_only = not locked
        except CxrError:
            read_only = True
        if read_only:
            log.warning("%s is read-only: using its embeddings without updating its row list", path)
    computed = Computed()
    if todo:
        onnx = get_onnx_backbone(config, size, source, settings.cache_dir, settings.opset, settings.lock_timeout)
        if plan.digest:
            onnx = get_int8_backbone(onnx, plan.sample, settings.cache_dir, settings.threads, plan.digest,
                                     settings.lock_timeout)
        compute = embed_on_ray if settings.engine.is_ray else _embed_local
        computed = compute(todo, onnx, cache, settings, f"{config.name} {plan.mask_name}")
        failures += computed.failures

    rows = _rows(dataset, samples, cache, prune)
    if not any(cache.has(s.sha256) for s in samples):
        raise CxrError(f"{dataset.root}: none of the {len(dataset)} images could be read")
    failed = [(printable(dataset.relative(s)), reason) for s, reason in failures]
    if not read_only and not cache.listing_matches(rows):
        onnx_attrs = _onnx_attrs(onnx, path)
        precision = {"precision": settings.precision}
        if plan.digest:
            precision.update(int8_sample_digest=plan.digest,
                             int8_fidelity=(int8_info(onnx).get("fidelity", {}) if onnx else {}))
        cache.write(rows, {**onnx_attrs, **precision, "dataset_root": printable(str(dataset.root)), "failed": failed,
                           "versions": library_versions(), "opset": settings.opset,
                           "engine": settings.engine.record()})
    return ExtractResult(path, config.name, len(dataset), n_cached, computed.n_embedded, failed,
                         time.perf_counter() - started, computed.inference_seconds, source,
                         onnx.sha256 if onnx else str(_onnx_attrs(None, path).get("onnx_sha256", "")),
                         settings.precision, plan.digest, computed.note,
                         _int8_sample_note(plan.sample, settings.int8_sample_size, onnx))


def _int8_sample_note(chosen: Int8Sample | None, requested: int, onnx: OnnxBackbone | None) -> str:
    """int8: 'int8 statistics from 23 of 64 requested images (the dataset has 30, 7 held back ...)' when the
    quantization saw fewer images than ``int8_sample_size``; empty otherwise (or for a cached model)."""
    if chosen is None:
        return ""
    picked = len(chosen.images)
    used = picked
    if onnx is not None:   # the sidecar of the model just made or checked counts the images that decoded
        info = int8_info(onnx)
        recorded = info.get("int8_sample") or info.get("calibration") or {}   # "calibration": sidecars before 2026-12
        used = int(recorded.get("n_images", picked))
    if used >= requested:
        return ""
    unreadable = f", {picked - used} unreadable" if used < picked else ""
    pool = picked + len(chosen.held_back)
    where = "its train split has" if {s.split for s in chosen.images} == {"train"} else "the dataset has"
    return (f"int8 statistics from {used} of {requested} requested images ({where} {pool}, "
            f"{len(chosen.held_back)} held back to check the int8 model{unreadable})")


def _embed_local(todo: list[Sample], onnx: OnnxBackbone, cache: FeatureCache, settings: ExtractSettings,
                 label: str) -> Computed:
    """The local engine: decode in threads, run onnxruntime in this process, flush part files as it goes."""
    embedder = OnnxEmbedder(onnx, settings.threads, spin=False)   # the decode threads share the cores
    computed = Computed()
    block_shas: list[str] = []
    block_rows: list[np.ndarray] = []
    with _progress(len(todo), settings.progress, label) as bar:
        for embedded, rows, bad, seconds in embed_batches(embedder, todo, settings.batch_size,
                                                          settings.decode_workers, settings.mask):
            computed.inference_seconds += seconds
            if embedded:
                block_rows.append(rows)
                block_shas += [s.sha256 for s in embedded]
                computed.n_embedded += len(embedded)
            for sample, reason in bad:
                log.warning("skipped %s", reason)
            computed.failures += bad
            if len(block_shas) >= settings.flush_every:
                cache.add_part(block_shas, np.concatenate(block_rows))
                block_shas, block_rows = [], []
            bar.update(len(embedded) + len(bad))
    if block_shas:
        cache.add_part(block_shas, np.concatenate(block_rows))
    return computed


def _rows(dataset: Dataset, samples: list[Sample], cache: FeatureCache, prune: bool) -> list[CacheRow]:
    """The rows the cache file must hold: the listing's cached images (after the kept rows when not pruning)."""
    listing = [CacheRow(s.sha256, dataset.relative(s), s.label, s.split, s.group)
               for s in samples if cache.has(s.sha256)]
    if prune:
        return listing
    kept = cache.stored_rows()
    stored = {r.sha256 for r in kept}
    return kept + [r for r in listing if r.sha256 not in stored]


def _onnx_attrs(onnx: OnnxBackbone | None, path: Path) -> dict[str, object]:
    if onnx is not None:
        return {"onnx_sha256": onnx.sha256, "onnx_max_relative_error": onnx.max_relative_error}
    if path.exists():
        attrs = read_cache_attrs(path)
        return {k: attrs[k] for k in ("onnx_sha256", "onnx_max_relative_error") if k in attrs}
    return {}


def align_feature_sets(features: dict[str, FeatureSet],
                       keep: set[str] | None = None) -> tuple[list[Sample], dict[str, np.ndarray]]:
    """The samples every backbone could read (restricted to the ``keep`` sha256 when given), in one order for
    all, and each backbone's embedding rows in that order."""
    common = set.intersection(*(set(f.sha256) for f in features.values()))
    if keep is not None:
        common &= keep
    reference = next(iter(features.values()))
    samples = [s for s in reference.samples if s.sha256 in common]
    arrays = {}
    for name, feature_set in features.items():
        row = {sha: i for i, sha in enumerate(feature_set.sha256)}
        arrays[name] = feature_set.embeddings[[row[s.sha256] for s in samples]]
    return samples, arrays
