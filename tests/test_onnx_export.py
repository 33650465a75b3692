"""ONNX export: all nine backbones export and match Keras; embeddings equal Keras' own predict."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from cxr_transfer.extract.dataset import load_dataset
from cxr_transfer.extract.images import read_rgb
from cxr_transfer.extract.onnx_export import get_onnx_backbone, keras_preprocess_input
from cxr_transfer.extract.registry import BACKBONES, get_backbone
from cxr_transfer.extract.runner import OnnxEmbedder
from cxr_transfer.extract.weights import build_keras_backbone, resolve_weights


def cosine_per_row(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return (a * b).sum(1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))


_EXPORT_ONE = """
import sys
from pathlib import Path
import numpy as np
from cxr_transfer.extract.onnx_export import get_onnx_backbone
from cxr_transfer.extract.registry import get_backbone
from cxr_transfer.extract.runner import OnnxEmbedder
from cxr_transfer.extract.weights import resolve_weights
config = get_backbone({name!r})
source = resolve_weights(config, random_weights=True)
exported = get_onnx_backbone(config, config.min_input_size, source, Path({cache!r}))
assert exported.max_relative_error <= 1e-4, exported.max_relative_error
assert exported.path.is_file() and exported.path.with_suffix(".json").is_file()
again = get_onnx_backbone(config, config.min_input_size, source, Path({cache!r}))   # from the disk cache
assert again.sha256 == exported.sha256
out = OnnxEmbedder(exported, threads=1).embed(np.zeros((1, config.min_input_size, config.min_input_size, 3)))
assert out.shape == (1, config.feature_dim), out.shape
print("ok", exported.max_relative_error)
"""


@pytest.mark.slow
@pytest.mark.parametrize("name", list(BACKBONES))
def test_every_backbone_exports_and_matches_keras(name: str, tmp_path: Path):
    # One process per backbone: tf2onnx on NASNetLarge alone peaks near 20 GB; in a fresh process that
    # memory is returned at exit instead of adding to what the test session already holds.
    script = _EXPORT_ONE.format(name=name, cache=str(tmp_path))
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                          env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3"})
    assert done.returncode == 0 and "ok" in done.stdout, done.stderr[-2000:]


def _keras_vs_onnx(config, size: int, source, images: np.ndarray, cache: Path) -> np.ndarray:
    model = build_keras_backbone(config, size, source)
    reference = model.predict(keras_preprocess_input(config)(images.astype(np.float32)), verbose=0)
    onnx = OnnxEmbedder(get_onnx_backbone(config, size, source, cache)).embed(images)
    return cosine_per_row(reference, onnx)


def test_onnx_equals_keras_predict_on_decoded_images(class_tree: Path, tmp_path: Path):
    config = get_backbone("vgg16")
    images = np.stack([read_rgb(s.path, 32) for s in load_dataset(class_tree).samples])
    cosines = _keras_vs_onnx(config, 32, resolve_weights(config, random_weights=True), images, tmp_path)
    assert cosines.min() >= 0.9999


@pytest.mark.parametrize("name", ["vgg16", "xception"])
def test_real_weights_on_real_images(name: str, shared_data: Path, shared_weights: Path, tmp_path: Path):
    config = get_backbone(name)
    samples = load_dataset(shared_data, split="test").samples[::15]   # 6 images of all three classes
    size = config.default_input_size
    images = np.stack([read_rgb(s.path, size) for s in samples])
    source = resolve_weights(config, weights_dir=shared_weights)
    cosines = _keras_vs_onnx(config, size, source, images, tmp_path)
    assert cosines.min() >= 0.9999, cosines
