"""Load a saved model as an explainer: ``explain(pixels) -> (signed heatmaps, class probabilities)``.

Which method serves which model (``method="auto"``):
- a head saved by ``compare --save`` that is linear on one backbone's pooled features (logreg, linsvm):
  ``cam``, the exact class activation map, from the backbone's two-output ONNX export (``feature_map``);
- any other saved head (rbfsvm, knn, rf, hgb, mlp, concatenated backbones): ``occlusion`` through the
  backbones' ONNX exports (``extract.onnx_export``) and the head;
- a fine-tuned model (finetune run folder, model.json or model.onnx): ``gradcam`` with TensorFlow on
  model.keras. ``occlusion`` also works for it, through model.onnx.
Weights are found and checked as predict does (``classify.predict.check_weights``); model files are checked
against the sha256 recorded when they were saved. A head trained on int8 embeddings runs through the int8
model of its int8 sample (occlusion: the exact CAM needs the float32 feature-map export).
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from cxr_transfer.classify.predict import check_input_size, check_weights
from cxr_transfer.classify.saved_model import SavedFinetuned, SavedHead, load_saved_model
from cxr_transfer.core.errors import CxrError
from cxr_transfer.explain.cam import class_activation_maps, linear_scores, unwrap
from cxr_transfer.explain.feature_map import FeatureMapRunner, get_feature_map_backbone
from cxr_transfer.explain.gradcam import GradCam
from cxr_transfer.explain.occlusion import default_patch, occlusion_map
from cxr_transfer.extract.images import resize_square
from cxr_transfer.extract.onnx_export import get_onnx_backbone
from cxr_transfer.extract.pipeline import ExtractSettings
from cxr_transfer.extract.quantize import get_int8_backbone
from cxr_transfer.extract.runtime import OnnxEmbedder
from cxr_transfer.extract.weights import resolve_weights
from cxr_transfer.finetune.model import load_finetuned

METHODS = ("auto", "cam", "occlusion", "gradcam")


@dataclass
class Explainer:
    """A model ready to explain: ``explain(uint8 (N, S, S, 3))`` -> (signed maps (N, h, w), probabilities (N, K))."""

    method: str
    input_size: int
    class_names: list[str]            # one per probability column
    explain: Callable[[np.ndarray], tuple[np.ndarray, np.ndarray]]
    details: dict[str, Any] = field(default_factory=dict)


def _resized(images: np.ndarray, size: int) -> np.ndarray:

    if images.shape[1] == size:
        return images
    return np.stack([resize_square(np.ascontiguousarray(image), size) for image in images])


def _occlusion(predict_proba: Callable[[np.ndarray], np.ndarray], size: int, batch_size: int):

    patch, stride = default_patch(size)

    def explain(images: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        proba = predict_proba(images)
        maps = np.stack([occlusion_map(image, predict_proba, int(np.argmax(p)), patch, stride, batch_size)
                         for image, p in zip(images, proba)])
        return maps, proba

    return explain, {"patch_px": patch, "stride_px": stride}


def _head_explainer(saved: SavedHead, settings: ExtractSettings, method: str,
                    precision: str | None = None) -> Explainer:

    model_path, head, info = saved.path, saved.model, saved.info
    parts = [check_weights(part, settings, precision) for part in info["backbones"]]
    classes = [info["class_names"][int(c)] for c in unwrap(head).classes_]
    sources = [resolve_weights(p.config, p.weights_file, p.weights_dir, p.random_weights) for p in parts]
    sizes = [p.config.input_size(p.input_size) for p in parts]
    scores = linear_scores(head) if len(parts) == 1 else None
    no_cam = _why_no_exact_cam(parts[0]) if scores is not None else None
    if no_cam:   # auto: occlusion, through the model the head's embeddings came from
        if method == "cam":
            raise CxrError(f"{model_path}: no exact class activation map for a head {no_cam}; use `method` occlusion")
        scores = None
    if method == "cam" and scores is None:
        raise CxrError(f"{model_path}: no exact class activation map for this head (it is not linear on one "
                       f"backbone's pooled features); use `method` occlusion")
    if method == "gradcam":
        raise CxrError(f"{model_path}: Grad-CAM is for fine-tuned models; a saved head takes cam or occlusion")
    if method in ("auto", "cam") and scores is not None:

        exported = get_feature_map_backbone(parts[0].config, sizes[0], sources[0], parts[0].cache_dir,
                                            parts[0].opset)
        runner = FeatureMapRunner(exported, parts[0].threads)

        def explain(images: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
            feature_maps, pooled = runner.run(images)
            proba = head.predict_proba(pooled)
            return class_activation_maps(feature_maps, scores, np.argmax(proba, axis=1)), proba

        return Explainer("cam", sizes[0], classes, explain,
                         {"score": scores.kind, "layer": exported.layer, "onnx": str(exported.path)})

    embedders = [OnnxEmbedder(_backbone_as_trained(p, get_onnx_backbone(p.config, size, source, p.cache_dir,
                                                                          p.opset)), p.threads)
                 for p, size, source in zip(parts, sizes, sources)]

    def predict_proba(images: np.ndarray) -> np.ndarray:
        return head.predict_proba(np.hstack([e.embed(_resized(images, e.input_size)) for e in embedders]))

    size = max(sizes)   # concatenated backbones: occlude at the largest input, stretched to each one's
    explain, details = _occlusion(predict_proba, size, settings.batch_size)
    return Explainer("occlusion", size, classes, explain, details)


def _why_no_exact_cam(part: ExtractSettings) -> str | None:
    """Why a linear head on one backbone still has no exact CAM (its embeddings are not the float32 pooled
    features of the feature-map export), or None when it has one."""
    if part.config.is_user_onnx:
        return "on your own ONNX model (its wrapped graph pools the feature map inside)"
    if part.precision == "int8":
        return "trained on int8 embeddings (the feature-map export is float32)"
    return None


def _backbone_as_trained(part: ExtractSettings, backbone: Any) -> Any:
    """The float32 export, or for a head trained on int8 embeddings the int8 model of its int8 sample."""
    if part.precision != "int8":
        return backbone

    return get_int8_backbone(backbone, None, part.cache_dir, part.threads, digest=part.int8_sample_digest,
                             lock_timeout=part.lock_timeout)


def _finetuned_explainer(saved: SavedFinetuned, settings: ExtractSettings, method: str) -> Explainer:

    check_input_size(settings.input_size, saved.input_size)
    size, classes = saved.input_size, saved.class_names
    if method == "cam":
        raise CxrError(f"{saved.info_path}: the exact CAM is for linear saved heads; a fine-tuned model takes "
                       f"gradcam or occlusion")
    if method == "occlusion":
        proba = saved.onnx_probabilities(settings.threads)

        def predict_proba(images: np.ndarray) -> np.ndarray:
            return proba(images).astype(np.float64)

        explain, details = _occlusion(predict_proba, size, settings.batch_size)
        return Explainer("occlusion", size, classes, explain, details)
    gradcam = GradCam(load_finetuned(str(saved.checked_file("keras"))))
    return Explainer("gradcam", size, classes, gradcam.maps, {"layer": gradcam.layer})


def load_explainer(model_path: str | Path, settings: ExtractSettings, method: str = "auto",
                   precision: str | None = None, own_run: bool = False) -> Explainer:
    """The explainer for a saved head (.joblib) or a fine-tuned model (run folder, model.json, model.onnx).

    A head is run at the precision it was trained on (an int8 head through its int8 model, by occlusion);
    ``precision`` other than that one is refused, as in predict. ``own_run``: see ``load_saved_model``."""
    if method not in METHODS:
        raise CxrError(f"unknown explanation method '{method}'; choose from: {', '.join(METHODS)}")
    saved = load_saved_model(model_path, own_run)
    if isinstance(saved, SavedFinetuned):
        return _finetuned_explainer(saved, settings, method)
    return _head_explainer(saved, settings, method, precision)
