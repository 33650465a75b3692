"""A saved head as an MLflow model: its pyfunc flavour predicts class probabilities from uint8 images.

The model folder carries the head exported as one ONNX file (``deploy.export_model``: the backbone, its
preprocessing and the head in one graph, its ``model_sha256`` checked on load) and that file's model card, so it
predicts with onnxruntime alone, without weights, caches or scikit-learn:

    model = mlflow.pyfunc.load_model("runs:/<child run id>/models/vgg16-logreg")
    model.predict(images)      # uint8 (N, H, W, 3) RGB -> DataFrame, one probability column per class

Images are stretched to the model's input exactly as ``embed_images`` does (``extract.images.resize_square``, after
``extract.runtime.rgb_array``). The signature says so (uint8, (-1, -1, -1, 3)); an input example is stored.
A head ``export_model`` refuses (one on concatenated backbones) is not logged as a model; one line says why.
"""
from __future__ import annotations

import json
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from cxr_transfer.core.errors import CxrError
from cxr_transfer.core.version import __version__
from cxr_transfer.deploy.export_model import export_model, read_exported
from cxr_transfer.extract.images import resize_square
from cxr_transfer.extract.pipeline import ExtractSettings
from cxr_transfer.extract.runtime import rgb_array

MODELS_FOLDER = "models"
"""Artifact folder of a child run holding its models: ``models/<backbone>-<head>``."""
MODEL_ARTIFACT, CARD_ARTIFACT = "model", "model_card"


@dataclass(frozen=True)
class HeadFile:
    """A saved head to log as a model, with the extraction settings of its run (weights, cache) to export it."""

    path: Path
    settings: ExtractSettings


class ExportedImagePredictor:
    """A file ``export_model`` wrote, in an onnxruntime session (its ``model_sha256`` checked):
    ``predict_proba(images)`` for uint8 (N, H, W, 3) or (N, H, W) images of any size."""

    def __init__(self, model_file: str | Path, threads: int | None = None, batch_size: int = 16) -> None:
        self.session, metadata = read_exported(model_file, threads)
        self.class_names = [str(name) for name in json.loads(metadata["class_names"])]
        self.size, self.batch_size = int(json.loads(metadata["input"])["size"]), batch_size

    def predict_proba(self, images: np.ndarray) -> np.ndarray:
        images = rgb_array(np.asarray(images))
        if len(images) == 0:
            return np.empty((0, len(self.class_names)), np.float32)
        return np.concatenate([self.session.run(["probabilities"], {"image": np.stack(
            [resize_square(np.ascontiguousarray(image), self.size) for image in images[i:i + self.batch_size]])})[0]
            for i in range(0, len(images), self.batch_size)])

    def predict_frame(self, images: np.ndarray) -> Any:
        import pandas as pd   # inside: pandas comes with MLflow (the `mlflow` extra)

        return pd.DataFrame(self.predict_proba(images).astype(np.float64), columns=self.class_names)


def python_model() -> Any:
    """The ``mlflow.pyfunc.PythonModel`` of a saved head (``load_context`` opens the exported file of the model's
    artifacts in an ``ExportedImagePredictor``). The class is made here because its base class is MLflow's."""
    import mlflow.pyfunc   # inside: MLflow is an optional extra, and `import cxr_transfer` stays light without it

    class CxrHeadModel(mlflow.pyfunc.PythonModel):
        """Class probabilities of a cxr-transfer head from uint8 images (N, H, W, 3)."""

        def load_context(self, context: Any) -> None:
            self.predictor = ExportedImagePredictor(context.artifacts[MODEL_ARTIFACT])

        def predict(self, context: Any, model_input: np.ndarray, params: dict | None = None) -> Any:
            # np.ndarray: a type hint MLflow infers no schema from (the signature is given when logging)
            return self.predictor.predict_frame(np.asarray(model_input))

    return CxrHeadModel()


def log_head_model(client: Any, run_id: str, head: HeadFile) -> str | None:
    """Log ``head`` as an MLflow model under ``models/<name>`` of the run; None when logged, else the reason
    it was not (a head MLflow cannot be given). MLflow's own failures raise."""
    import mlflow.pyfunc   # inside: MLflow is an optional extra, and `import cxr_transfer` stays light without it
    from mlflow.models import ModelSignature
    from mlflow.types import ColSpec, Schema, TensorSpec

    with tempfile.TemporaryDirectory(prefix="cxr-mlflow-model-") as folder:
        try:
            exported = export_model(head.path, Path(folder) / f"{head.path.stem}.onnx", head.settings)
        except CxrError as exc:
            return str(exc)
        artifacts = {MODEL_ARTIFACT: str(exported.path), CARD_ARTIFACT: str(exported.model_card)}
        ramp = np.linspace(0, 255, exported.input_size, dtype=np.float32)
        example = np.repeat(((ramp[:, None] + ramp[None, :]) / 2).astype(np.uint8)[None, ..., None], 3, axis=3)
        signature = ModelSignature(inputs=Schema([TensorSpec(np.dtype(np.uint8), (-1, -1, -1, 3))]),
                                   outputs=Schema([ColSpec("double", name) for name in exported.class_names]))
        path = Path(folder) / "pyfunc"
        mlflow.pyfunc.save_model(str(path), python_model=python_model(), artifacts=artifacts, signature=signature,
                                 input_example=example, pip_requirements=[f"cxr-transfer[mlflow]=={__version__}"])
        client.log_artifacts(run_id, str(path), f"{MODELS_FOLDER}/{head.path.stem}")
    return None
