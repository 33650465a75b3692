"""onnxruntime in one place: ``open_session`` is the only way the library opens a model (one set of session
options), ``OnnxEmbedder`` runs an exported backbone on batches of RGB uint8 images, and ``embed_batches`` is
the decode -> embed -> finite-filter loop of both extraction engines (``extract/engine.py``)."""
from __future__ import annotations

import os
import time
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from cxr_transfer.extract.images import ImageMask, decoded_batches, resize_square

if TYPE_CHECKING:
    from cxr_transfer.extract.dataset import Sample
    from cxr_transfer.extract.onnx_export import OnnxBackbone


def default_threads() -> int:
    return max(1, len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1)


def session_options(threads: int | None = None, spin: bool = True):
    """onnxruntime options for inference on this machine: intra-op threads (default: all cores), full graph
    optimization, one inter-op thread (the graph is a chain).

    spin=False stops idle intra-op threads from busy-waiting between operators: where decode threads share the
    cores with the network (extraction), a spinning thread takes CPU the decoders need (docs/benchmarks.md,
    "End to end").
    """
    import onnxruntime as ort   # deferred: onnxruntime stays out of `import cxr_transfer`

    options = ort.SessionOptions()
    options.intra_op_num_threads = threads or default_threads()
    options.inter_op_num_threads = 1
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    if not spin:
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    return options


def open_session(model: str | Path | bytes, threads: int | None = None, spin: bool = True) -> Any:
    """An onnxruntime CPU session of ``model`` (a file, or a serialized model's bytes) with ``session_options``:
    ``threads`` intra-op threads (None: all cores), ``spin=False`` where other threads share the cores."""
    import onnxruntime as ort   # deferred: onnxruntime stays out of `import cxr_transfer`

    if not isinstance(model, (str, Path, bytes)):
        raise TypeError(f"model must be a path or a serialized model's bytes, got {type(model).__name__} instead")
    source = model if isinstance(model, bytes) else str(model)
    return ort.InferenceSession(source, session_options(threads, spin), providers=["CPUExecutionProvider"])


class OnnxEmbedder:
    """An onnxruntime session for one backbone: ``embed(images)`` -> float32 (N, feature_dim).

    images: uint8 or float32 RGB (N, size, size, 3) in [0, 255]; preprocessing is inside the graph.
    """

    def __init__(self, backbone: OnnxBackbone, threads: int | None = None, spin: bool = True) -> None:
        self.backbone = backbone
        self.session = open_session(backbone.path, threads, spin)
        self.input_name = self.session.get_inputs()[0].name

    @property
    def input_size(self) -> int:
        return self.backbone.input_size

    def embed(self, images: np.ndarray) -> np.ndarray:
        batch = np.ascontiguousarray(images, dtype=np.float32)
        return self.session.run(None, {self.input_name: batch})[0].astype(np.float32, copy=False)


def rgb_array(images: np.ndarray) -> np.ndarray:
    """Images already in memory checked and made RGB: uint8 (N, H, W, 3), or grey (N, H, W) repeated to 3
    channels; TypeError / ValueError saying what was given otherwise."""
    if not isinstance(images, np.ndarray):
        raise TypeError(f"images must be a numpy array, got {type(images).__name__} instead")
    if images.dtype != np.uint8:
        raise TypeError(f"images must be uint8 pixels in [0, 255], got dtype {images.dtype} instead")
    if images.ndim == 3:
        images = np.repeat(images[..., None], 3, axis=3)
    if images.ndim != 4 or images.shape[3] != 3 or min(images.shape[1:3]) < 2:
        raise ValueError(f"images must have shape (N, H, W, 3) or (N, H, W), got {images.shape} instead")
    return images


def embed_pixels(embedder: OnnxEmbedder, images: np.ndarray, batch_size: int = 16) -> np.ndarray:
    """Embeddings of images in memory (``rgb_array``): each stretched to the backbone's input with the same
    rule as image files (``images.resize_square``), in batches -> float32 (N, feature_dim). Used by
    ``embed_images``."""
    images = rgb_array(images)
    size = embedder.input_size
    if len(images) == 0:
        return np.empty((0, embedder.backbone.config.feature_dim), np.float32)
    rows = [embedder.embed(np.stack([resize_square(np.ascontiguousarray(image), size)
                                     for image in images[start:start + batch_size]]))
            for start in range(0, len(images), batch_size)]
    return np.concatenate(rows)


def embed_batches(embedder: OnnxEmbedder, samples: list[Sample], batch_size: int, decode_workers: int,
                  mask: ImageMask | None = None) -> Iterator[tuple[list[Sample], np.ndarray, list[tuple[Sample, str]],
                                                                   float]]:
    """Decode ``samples`` in batches (``images.decoded_batches``) and embed each one; per batch yields (the samples
    embedded, their embeddings, the samples skipped with the reason: unreadable or a non-finite embedding, the
    seconds spent in onnxruntime). Non-finite embeddings are never returned."""
    for good, batch, bad in decoded_batches(samples, embedder.input_size, batch_size, decode_workers, mask):
        if not len(good):
            yield [], np.empty((0, 0), np.float32), bad, 0.0
            continue
        tick = time.perf_counter()
        embedded = embedder.embed(batch)
        seconds = time.perf_counter() - tick
        finite = np.isfinite(embedded).all(axis=1)
        bad = bad + [(s, f"{s.path}: non-finite embedding from {embedder.backbone.path.name}")
                     for s, ok in zip(good, finite) if not ok]
        yield [s for s, ok in zip(good, finite) if ok], embedded[finite], bad, seconds
