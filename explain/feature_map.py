"""A backbone exported to ONNX with two outputs: its last convolutional feature map and the pooled embedding.

The class activation map of a linear head needs the tensor that global average pooling averages (VGG16:
``block5_pool``, 7 x 7 x 512 at 224 px). ``extract.onnx_export`` writes the pooled embedding only; this module
writes a second file per (backbone, weights, input size, opset) with outputs ``(feature_map, embedding)``,
through the same ``export_checked`` (raw RGB pixels in, Keras' own ``preprocess_input`` inside). The feature
map is checked against Keras by ``export_checked`` and the embedding against Keras' pooled output here, each
refused above ``MAX_RELATIVE_ERROR``. Like the backbones' exports it runs in a fresh process. Files: ``<cache_dir>/onnx/<model_key(..., opset, "featuremap")>.onnx``
with a JSON sidecar.
"""
from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from cxr_transfer.core.cache_keys import model_key
from cxr_transfer.core.errors import CxrError
from cxr_transfer.core.fresh_process import call_in_fresh_process
from cxr_transfer.core.hashing import sha256_file
from cxr_transfer.core.quiet import start_tensorflow
from cxr_transfer.core.record import library_versions, now_iso, write_json
from cxr_transfer.extract.onnx_export import (
    DEFAULT_OPSET,
    MAX_RELATIVE_ERROR,
    export_checked,
    keras_preprocess_input,
    relative_error,
)
from cxr_transfer.extract.registry import BackboneConfig
from cxr_transfer.extract.runtime import open_session
from cxr_transfer.extract.weights import WeightsSource, build_keras_backbone

log = logging.getLogger(__name__)

QUALIFIER = "featuremap"


@dataclass(frozen=True)
class FeatureMapBackbone:
    """An exported two-output backbone on disk."""

    config: BackboneConfig
    input_size: int
    path: Path
    sha256: str
    weights_sha256: str
    layer: str                 # the Keras layer whose output is the feature map
    max_relative_error: float


def feature_map_path(cache_dir: str | Path, config: BackboneConfig, input_size: int, weights_sha256: str,
                     opset: int = DEFAULT_OPSET) -> Path:
    key = model_key(config.name, input_size, weights_sha256, f"opset{opset}", QUALIFIER)
    return Path(cache_dir) / "onnx" / f"{key}.onnx"


def pooled_tensor(model: Any) -> tuple[Any, str]:
    """(the symbolic tensor the final global average pooling averages, the name of the layer that makes it).

    Checked, not assumed: a model that does not end in global average pooling has no exact CAM.
    """
    start_tensorflow()
    import keras

    pooling = model.layers[-1]
    if not isinstance(pooling, keras.layers.GlobalAveragePooling2D):
        raise TypeError(f"{model.name} does not end in global average pooling (last layer "
                         f"{type(pooling).__name__} instead); a class activation map needs one")
    tensor = pooling.input
    return tensor, tensor._keras_history.operation.name


def _export(config: BackboneConfig, input_size: int, source: WeightsSource, target: Path,
            opset: int) -> tuple[float, str]:
    """The export in a fresh process, as the backbones' (``extract.onnx_export._export``): (error, layer)."""
    (error, layer), _ = call_in_fresh_process(_export_here, config, input_size, source, target, opset,
                                              what=f"exporting {config.name}'s feature map to ONNX")
    return error, layer


def _export_here(config: BackboneConfig, input_size: int, source: WeightsSource, target: Path,
                 opset: int) -> tuple[float, str]:
    start_tensorflow()
    import keras

    backbone = build_keras_backbone(config, input_size, source)
    feature_map, layer = pooled_tensor(backbone)
    model = keras.Model(backbone.inputs, [feature_map, backbone.output])
    preprocess_input = keras_preprocess_input(config)
    batch = np.random.default_rng(0).uniform(0, 255, size=(2, input_size, input_size, 3)).astype(np.float32)
    reference_map, reference_pooled = model.predict(preprocess_input(batch.copy()), verbose=0)
    error = export_checked(lambda pixels: model(preprocess_input(pixels), training=False), input_size, target,
                           batch, reference_map, relative_error, MAX_RELATIVE_ERROR,
                           f"{config.name}'s feature map", opset)
    pooled_error = relative_error(reference_pooled, _run(target, batch)[1])
    if not np.isfinite(pooled_error) or pooled_error > MAX_RELATIVE_ERROR:
        target.unlink(missing_ok=True)
        raise CxrError(f"ONNX export of {config.name}'s pooled output differs from Keras: error "
                       f"{pooled_error:.2e} > {MAX_RELATIVE_ERROR:.0e}")
    return max(error, pooled_error), layer


def _run(path: Path, batch: np.ndarray) -> list[np.ndarray]:
    session = open_session(path)
    return session.run(None, {session.get_inputs()[0].name: np.asarray(batch, np.float32)})


def get_feature_map_backbone(config: BackboneConfig, input_size: int, source: WeightsSource,
                             cache_dir: str | Path, opset: int = DEFAULT_OPSET) -> FeatureMapBackbone:
    """The cached two-output ONNX file for these weights and size, exporting and verifying it first if needed."""
    target = feature_map_path(cache_dir, config, input_size, source.sha256, opset)
    sidecar = target.with_suffix(".json")
    if target.is_file() and sidecar.is_file():
        info = json.loads(sidecar.read_text())
        return FeatureMapBackbone(config, input_size, target, info["onnx_sha256"], source.sha256, info["layer"],
                                  info["max_relative_error"])
    target.parent.mkdir(parents=True, exist_ok=True)
    log.info("exporting %s's feature map (%d px, weights %s) to ONNX", config.name, input_size, source.describe())
    started = time.perf_counter()
    error, layer = _export(config, input_size, source, target, opset)
    onnx_sha = sha256_file(target)
    write_json(sidecar, {"backbone": config.name, "input_size": input_size, "opset": opset, "layer": layer,
                         "outputs": ["feature_map (N, h, w, C)", "embedding (N, C)"],
                         "weights_sha256": source.sha256, "weights": source.describe(), "onnx_sha256": onnx_sha,
                         "max_relative_error": error, "export_seconds": round(time.perf_counter() - started, 1),
                         "created": now_iso(), "versions": library_versions()})
    return FeatureMapBackbone(config, input_size, target, onnx_sha, source.sha256, layer, error)


class FeatureMapRunner:
    """An onnxruntime session of a two-output export: ``run(images)`` -> (feature maps, embeddings)."""

    def __init__(self, backbone: FeatureMapBackbone, threads: int | None = None) -> None:
        self.backbone = backbone
        self.session = open_session(backbone.path, threads)
        self.input_name = self.session.get_inputs()[0].name

    def run(self, images: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        feature_map, pooled = self.session.run(None, {self.input_name: np.ascontiguousarray(images, np.float32)})
        return feature_map.astype(np.float32, copy=False), pooled.astype(np.float32, copy=False)
