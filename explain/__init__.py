"""Heatmaps of what a model looks at: the evidence for its predicted class, and how much of it lies at the border.

Three methods, one per kind of model (``run.run_explain`` picks):
- ``cam``: the exact class activation map of a linear head (logreg, linsvm) on globally average-pooled
  features, from the backbone's last convolutional feature map (``feature_map.py``, a second ONNX export);
- ``occlusion``: occlusion sensitivity through onnxruntime, for every other saved head;
- ``gradcam``: Grad-CAM with TensorFlow on a fine-tuned model's model.keras.
``regions.py`` splits each map into the audit's central lung field, border frame and the ring between them.
The API function is ``cxr_transfer.explain_images(images, model, ...)``; ``run_explain`` is the same with
extraction settings. Importing the package loads no deep-learning framework.
"""
from __future__ import annotations

import importlib
from typing import Any


_EXPORTS = {"run_explain": "run", "explanation_sheet": "run", "mean_shares": "run", "Explanation": "run",
            "ExplainResult": "run", "load_explainer": "explainers", "region_masks": "regions",
            "evidence_shares": "regions"}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    """Import the explain modules (scikit-learn, OpenCV, matplotlib) only when one of their names is used."""
    if name in _EXPORTS:
        return getattr(importlib.import_module(f"{__name__}.{_EXPORTS[name]}"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")

