"""A saved head as an MLflow model: its pyfunc flavour predicts class probabilities from uint8 images.

The model folder carries the saved head (``NAME.joblib`` and its ``NAME.json``, checked by ``load_head`` as
``predict`` checks them) and the float32 ONNX export of each backbone it was trained on (preprocessing inside
the graph; its sha256 checked against the head's record), so it predicts without weights, caches or a dataset:

    model = mlflow.pyfunc.load_model("runs:/<child run id>/models/vgg16-logreg")
    model.predict(images)      # uint8 (N, H, W, 3) RGB -> DataFrame, one probability column per class

Images are stretched to the backbone's input exactly as ``embed_images`` does (``extract.runtime.embed_pixels``,
the same code). The signature says so (uint8, (-1, -1, -1, 3)); an input example of one image is stored.
Heads on int8 embeddings and on your own ONNX backbones are not logged as models (one line says so).
"""
from __future__ import annotations

import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from cxr_transfer.classify.saved_model import load_saved_model
from cxr_transfer.core.errors import CxrError
from cxr_transfer.core.hashing import sha256_file
from cxr_transfer.core.version import __version__
from cxr_transfer.extract.onnx_export import DEFAULT_OPSET, OnnxBackbone, onnx_cache_path
from cxr_transfer.extract.registry import get_backbone
from cxr_transfer.extract.runtime import OnnxEmbedder, embed_pixels, rgb_array

MODELS_FOLDER = "models"
"""Artifact folder of a child run holding its models: ``models/<backbone>-<head>``."""
HEAD_ARTIFACT, SIDECAR_ARTIFACT = "head", "head_json"


@dataclass(frozen=True)
class HeadFile:
    """A saved head to log as a model, and the cache folder holding its backbones' ONNX exports."""

    path: Path
    cache_dir: Path


def _backbone_key(index: int) -> str:
    return f"backbone{index:02d}"


class HeadImagePredictor:
    """A saved head (checked by ``load_head``) and the ONNX files of its backbones, in onnxruntime sessions:
    ``predict_proba(images)`` for uint8 (N, H, W, 3) or (N, H, W) images."""

    def __init__(self, head: str | Path, backbone_files: list[str | Path], threads: int | None = None) -> None:
        saved = load_saved_model(Path(head), own_run=True)   # an artifacts folder, not a run folder
        self.model, info = saved.model, saved.info
        self.class_names = [str(info["class_names"][int(c)]) for c in self.model.classes_]
        parts = info["backbones"]
        if len(parts) != len(backbone_files):
            raise CxrError(f"{head}: the head was trained on {len(parts)} backbone(s), got "
                           f"{len(backbone_files)} ONNX file(s) instead")
        self.embedders = []
        for part, path in zip(parts, backbone_files):
            digest = sha256_file(path)
            if part.get("onnx_sha256") and digest != part["onnx_sha256"]:
                raise CxrError(f"{path}: sha256 {digest[:12]}... is not the {part['onnx_sha256'][:12]}... of the "
                               f"{part['backbone']} export the head was trained on")
            backbone = OnnxBackbone(get_backbone(part["backbone"]), int(part["input_size"]), Path(path), digest,
                                    part["weights_sha256"], DEFAULT_OPSET, 0.0)
            self.embedders.append(OnnxEmbedder(backbone, threads))

    def predict_proba(self, images: np.ndarray) -> np.ndarray:
        images = rgb_array(np.asarray(images))
        features = np.hstack([embed_pixels(embedder, images) for embedder in self.embedders])
        return self.model.predict_proba(features)

    def predict_frame(self, images: np.ndarray) -> Any:
        import pandas as pd   # inside: pandas comes with MLflow (the `mlflow` extra)

        return pd.DataFrame(self.predict_proba(images), columns=self.class_names)


def python_model() -> Any:
    """The ``mlflow.pyfunc.PythonModel`` of a saved head (``load_context`` builds a ``HeadImagePredictor``
    from the model's artifacts). The class is made here because its base class is MLflow's."""
    import mlflow.pyfunc   # inside: MLflow is an optional extra, and `import cxr_transfer` stays light without it

    class CxrHeadModel(mlflow.pyfunc.PythonModel):
        """Class probabilities of a cxr-transfer head from uint8 images (N, H, W, 3)."""

        def load_context(self, context: Any) -> None:
            artifacts = context.artifacts
            backbones = [artifacts[key] for key in sorted(k for k in artifacts if k.startswith("backbone"))]
            self.predictor = HeadImagePredictor(artifacts[HEAD_ARTIFACT], backbones)

        def predict(self, context: Any, model_input: np.ndarray, params: dict | None = None) -> Any:
            # np.ndarray: a type hint MLflow infers no schema from (the signature is given when logging)
            return self.predictor.predict_frame(np.asarray(model_input))

    return CxrHeadModel()


def backbone_files(head: HeadFile, info: dict[str, Any]) -> list[Path]:
    """The cached float32 ONNX export of each backbone of a saved head; CxrError saying why a head cannot be
    logged as a model (int8 embeddings, your own ONNX backbone, an export no longer in the cache)."""
    files = []
    for part in info["backbones"]:
        if part.get("precision", "float32") != "float32":
            raise CxrError(f"a head on {part['precision']} embeddings (only float32 heads are logged as models)")
        config = get_backbone(part["backbone"])
        if config.is_user_onnx:
            raise CxrError("a head on your own ONNX backbone (not logged as a model)")
        path = onnx_cache_path(head.cache_dir, config, int(part["input_size"]), part["weights_sha256"],
                               DEFAULT_OPSET)
        if not path.is_file():
            raise CxrError(f"the {config.name} ONNX export is not in {head.cache_dir} any more")
        files.append(path)
    return files


def log_head_model(client: Any, run_id: str, head: HeadFile) -> str | None:
    """Log ``head`` as an MLflow model under ``models/<name>`` of the run; None when logged, else the reason
    it was not (a head MLflow cannot be given). MLflow's own failures raise."""
    import mlflow.pyfunc   # inside: MLflow is an optional extra, and `import cxr_transfer` stays light without it
    from mlflow.models import ModelSignature
    from mlflow.types import ColSpec, Schema, TensorSpec

    try:
        saved = load_saved_model(head.path, own_run=True)
        files = backbone_files(head, saved.info)
    except CxrError as exc:
        return str(exc)
    classes = [str(saved.info["class_names"][int(c)]) for c in saved.model.classes_]
    artifacts = {HEAD_ARTIFACT: str(head.path), SIDECAR_ARTIFACT: str(head.path.with_suffix(".json")),
                 **{_backbone_key(i): str(path) for i, path in enumerate(files)}}
    size = int(saved.info["backbones"][0]["input_size"])
    ramp = np.linspace(0, 255, size, dtype=np.float32)
    example = np.repeat(((ramp[:, None] + ramp[None, :]) / 2).astype(np.uint8)[None, ..., None], 3, axis=3)
    signature = ModelSignature(inputs=Schema([TensorSpec(np.dtype(np.uint8), (-1, -1, -1, 3))]),
                               outputs=Schema([ColSpec("double", name) for name in classes]))
    with tempfile.TemporaryDirectory(prefix="cxr-mlflow-model-") as folder:
        path = Path(folder) / head.path.stem
        mlflow.pyfunc.save_model(str(path), python_model=python_model(), artifacts=artifacts, signature=signature,
                                 input_example=example, pip_requirements=[f"cxr-transfer[mlflow]=={__version__}"])
        client.log_artifacts(run_id, str(path), f"{MODELS_FOLDER}/{head.path.stem}")
    return None
