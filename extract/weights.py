"""Find a backbone's weights and build the headless Keras model with them.

Resolution order (the first that applies wins):
1. an explicit file (``--weights FILE``);
2. a weights directory (``--weights-dir DIR`` or the ``CXR_WEIGHTS_DIR`` environment variable), searched for
   ``<name>_*.h5`` / ``<name>.*`` / Keras' own file name (e.g. ``vgg16_imagenet_notop.weights.h5``);
3. Keras' ImageNet file in ``~/.keras/models``, downloaded there with ``keras.utils.get_file`` when online.
   The download happens while resolving, so a missing file fails before any model is built or trained.
Random weights only when asked for (``random_weights=True``, tests): never as a fallback. Every output
records the weights' identity: the file's sha256, or ``random:seed<N>``.
"""
from __future__ import annotations

import os
import re
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cxr_transfer.core.errors import CxrError, WeightsNotFoundError
from cxr_transfer.core.hashing import sha256_file
from cxr_transfer.core.quiet import start_tensorflow
from cxr_transfer.extract.registry import BACKBONES, BackboneConfig

WEIGHTS_DIR_ENV = "CXR_WEIGHTS_DIR"
WEIGHT_SUFFIXES = (".h5", ".keras")
RANDOM_SEED = 0


@dataclass(frozen=True)
class WeightsSource:
    """Where a backbone's weights come from: a file, Keras' ImageNet cache, or seeded random values."""

    kind: str                 # "file" | "imagenet" | "random"
    path: Path | None = None
    sha256: str = ""

    def describe(self) -> str:
        return {"file": f"file {self.path}", "imagenet": f"Keras ImageNet cache {self.path}",
                "random": f"random (seed {RANDOM_SEED})"}[self.kind]


def keras_cache_dir() -> Path:
    return Path(os.environ.get("KERAS_HOME", Path.home() / ".keras")) / "models"


def _candidates(config: BackboneConfig, directory: Path) -> list[Path]:
    found = []
    for path in sorted(directory.iterdir()):
        lower = path.name.lower()
        if not path.is_file() or not lower.endswith(WEIGHT_SUFFIXES):
            continue
        stem = lower.split(".")[0]
        if lower == config.keras_weights_file.lower() or stem == config.name or stem.startswith(config.name + "_"):
            found.append(path)
    return found


def _missing_message(config: BackboneConfig, weights_dir: Path | None) -> str:
    where = f"{weights_dir}" if weights_dir else f"a folder you pass as `weights_dir` (or ${WEIGHTS_DIR_ENV})"
    return (f"no weights for {config.name} and they cannot be downloaded here: put the headless Keras weights file "
            f"{config.name}_imagenet_notop.weights.h5 (or Keras' {config.keras_weights_file}) in {where}, "
            f"or pass `weights` FILE, or place Keras' file in {keras_cache_dir()}")


def _download_imagenet(config: BackboneConfig, weights_dir: Path | None) -> Path:
    """Keras' own download into ~/.keras/models; a clear WeightsNotFoundError when offline."""
    start_tensorflow()
    import keras

    try:
        return Path(keras.utils.get_file(config.keras_weights_file, config.keras_weights_url, cache_subdir="models",
                                         file_hash=config.keras_weights_md5))
    except Exception as exc:  # offline: URLError, OSError, ... depending on where it fails
        raise WeightsNotFoundError(_missing_message(config, weights_dir)) from exc


def resolve_weights(config: BackboneConfig, weights_file: str | Path | None = None,
                    weights_dir: str | Path | None = None, random_weights: bool = False,
                    allow_download: bool = True) -> WeightsSource:
    """Decide where the weights come from (module docstring order) without building the model."""
    if config.is_user_onnx:  # a user's ONNX model: the file is the weights (extract/user_onnx.py)
        return WeightsSource("file", config.source_path, config.source_sha256)
    if random_weights:
        return WeightsSource("random", None, f"random:seed{RANDOM_SEED}")
    if weights_file is not None:
        path = Path(weights_file).expanduser()
        if not path.is_file():
            raise WeightsNotFoundError(f"weights file {path} does not exist")
        return WeightsSource("file", path.resolve(), sha256_file(path))
    directory = weights_dir or os.environ.get(WEIGHTS_DIR_ENV)
    directory = Path(directory).expanduser() if directory else None
    if directory is not None:
        if not directory.is_dir():
            raise WeightsNotFoundError(f"weights directory {directory} does not exist")
        found = _candidates(config, directory)
        if found:
            return WeightsSource("file", found[0].resolve(), sha256_file(found[0]))
    cached = keras_cache_dir() / config.keras_weights_file
    if not cached.is_file():
        if not allow_download:
            raise WeightsNotFoundError(_missing_message(config, directory))
        cached = _download_imagenet(config, directory)
    return WeightsSource("imagenet", cached, sha256_file(cached))


def build_keras_backbone(config: BackboneConfig, input_size: int, source: WeightsSource) -> Any:
    """The headless Keras model (global average pooling) with the resolved weights loaded.

    Raises CxrError when a file does not fit the architecture (e.g. Xception weights given for VGG16).
    """
    if config.is_user_onnx:
        raise CxrError(f"{config.name} is an ONNX model: this step needs one of the Keras backbones "
                       f"({', '.join(BACKBONES)})")
    start_tensorflow()
    import keras

    factory = getattr(keras.applications, config.keras_factory)
    shape = (input_size, input_size, 3)
    if source.kind == "random":
        keras.utils.set_random_seed(RANDOM_SEED)
        return factory(include_top=False, weights=None, input_shape=shape, pooling="avg")
    model = factory(include_top=False, weights=None, input_shape=shape, pooling="avg")
    try:
        with warnings.catch_warnings():
            # Keras 3 files written by older Keras carry no entries for internal op containers; harmless.
            warnings.filterwarnings("ignore", message="Skipping nested container")
            model.load_weights(str(source.path))
    except Exception as exc:
        text = str(exc).strip()
        counted = re.search(r"A total of (\d+) objects could not be loaded", text)
        detail = (f"{counted.group(1)} layers could not be loaded from it" if counted
                  else (text.splitlines()[0][:160] if text else type(exc).__name__))
        raise CxrError(f"{source.path} does not fit {config.name} ({detail}): is it another architecture's "
                       f"weights file?") from exc
    return model
