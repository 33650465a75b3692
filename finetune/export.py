"""Save a fine-tuned model for predict: model.keras, model.onnx (checked against Keras) and model.json.

model.onnx is the whole model, raw RGB float32 [0, 255] NHWC in, class probabilities out (preprocessing is
inside, as in ``extract.onnx_export``), converted with ``tf2onnx.convert.from_function``. Its probabilities
are compared with Keras' on real test images; an absolute difference above ``MAX_PROBABILITY_ERROR`` is
refused. model.json tells predict what it needs: backbone, input size, class names, hashes, kind.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

import numpy as np

from cxr_transfer.classify.saved_model import MODEL_JSON, finetune_description_digest
from cxr_transfer.core.hashing import sha256_file
from cxr_transfer.core.record import library_versions, now_iso, write_json
from cxr_transfer.extract.onnx_export import DEFAULT_OPSET, export_checked
from cxr_transfer.extract.weights import WeightsSource

MODEL_KERAS = "model.keras"
MODEL_ONNX = "model.onnx"
MAX_PROBABILITY_ERROR = 1e-4


def export_onnx(model: Any, input_size: int, target: Path, check_images: np.ndarray,
                opset: int = DEFAULT_OPSET) -> float:
    """Convert the Keras model to ONNX at ``target``; return the max |p_onnx - p_keras| on check_images."""
    batch = np.asarray(check_images, dtype=np.float32)
    reference = model.predict(batch, batch_size=16, verbose=0) if len(batch) else batch
    return export_checked(lambda pixels: model(pixels, training=False), input_size, target, batch, reference,
                          lambda a, b: float(np.max(np.abs(a - b))), MAX_PROBABILITY_ERROR,
                          "the fine-tuned model (max probability error)", opset)


def save_model(run_dir: Path, model: Any, backbone: str, input_size: int, class_names: Sequence[str],
               source: WeightsSource, check_images: np.ndarray, model_kind: str,
               onnx: bool = True) -> dict[str, Any]:
    """Write model.keras, model.onnx (when ``onnx``) and model.json into run_dir; return model.json's content."""
    keras_path = run_dir / MODEL_KERAS
    model.save(keras_path)
    info: dict[str, Any] = {
        "kind": "finetune", "model": model_kind, "backbone": backbone, "input_size": input_size,
        "class_names": list(class_names), "input": "RGB float32 [0, 255], NHWC; preprocessing inside the model",
        "weights": source.describe(), "weights_sha256": source.sha256,
        "keras_file": MODEL_KERAS, "keras_sha256": sha256_file(keras_path),
        "onnx_file": None, "onnx_sha256": None, "onnx_max_probability_error": None,
        "created": now_iso(), "versions": library_versions()}
    if onnx:
        onnx_path = run_dir / MODEL_ONNX
        error = export_onnx(model, input_size, onnx_path, check_images)
        info.update(onnx_file=MODEL_ONNX, onnx_sha256=sha256_file(onnx_path), onnx_max_probability_error=error,
                    onnx_opset=DEFAULT_OPSET, onnx_checked_on=f"{len(check_images)} test images")
    info["description_sha256"] = finetune_description_digest(info)
    write_json(run_dir / MODEL_JSON, info)
    return info
