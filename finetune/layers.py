"""The one custom Keras layer of a fine-tuned model: the backbone's own preprocessing, serialisable.

Importing this module registers the layer, so ``keras.saving.load_model("model.keras")`` can read a saved
fine-tuned model (``finetune.model.load_finetuned`` does the import).
"""
from __future__ import annotations

from typing import Any

import keras

from cxr_transfer.extract.onnx_export import keras_preprocess_input
from cxr_transfer.extract.registry import get_backbone


@keras.saving.register_keras_serializable(package="cxr_transfer", name="KerasPreprocess")
class KerasPreprocess(keras.layers.Layer):
    """Raw RGB [0, 255] -> the input a backbone expects, by ``keras.applications.<module>.preprocess_input``."""

    def __init__(self, backbone: str, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.backbone = backbone
        self._preprocess = keras_preprocess_input(get_backbone(backbone))

    def call(self, inputs):
        return self._preprocess(inputs)

    def compute_output_shape(self, input_shape):
        return input_shape

    def get_config(self) -> dict[str, Any]:
        return {**super().get_config(), "backbone": self.backbone}
