"""Grad-CAM (Selvaraju et al. 2017) of a fine-tuned model (finetune/model.py) with TensorFlow.

The model is ``pixels -> KerasPreprocess -> frozen body ending in global average pooling -> head``. The
explained score is the predicted class's logit (the head's last Dense before its softmax), the feature map
the tensor the body's pooling averages (``feature_map.pooled_tensor``). Channel weights are the gradients
averaged over positions, and the map ``sum_c alpha_c F_c`` is kept signed (its positive part is the evidence;
Grad-CAM's ReLU is the same thing). For this architecture the gradient does not depend on the position, so
the map sums to ``grad(logit, pooled) . pooled``: the first-order contribution of the pooled features.
"""
from __future__ import annotations

from typing import Any

import numpy as np

from cxr_transfer.core.quiet import start_tensorflow
from cxr_transfer.explain.feature_map import pooled_tensor
from cxr_transfer.finetune.model import HEAD_NAME


class GradCam:
    """Grad-CAM on a loaded fine-tuned Keras model: ``maps(images) -> (signed maps (N, h, w), probabilities)``."""

    def __init__(self, model: Any) -> None:
        start_tensorflow()
        import keras

        from cxr_transfer.finetune.layers import KerasPreprocess   # imports Keras: only once TensorFlow is wanted

        self.preprocess = next(layer for layer in model.layers if isinstance(layer, KerasPreprocess))
        self.body = next(layer for layer in model.layers if isinstance(layer, keras.Model)
                         and layer.name != HEAD_NAME)
        self.head = model.get_layer(HEAD_NAME)
        feature_map, self.layer = pooled_tensor(self.body)
        self.feature_model = keras.Model(self.body.inputs, feature_map)
        self.pooling = self.body.layers[-1]
        self.hidden = self.head.layers[1:-1]      # after the Input: Dense(relu), Dropout
        self.output = self.head.layers[-1]        # Dense(softmax): its logits are the explained scores

    def logits(self, pooled: Any) -> Any:
        import tensorflow as tf

        x = pooled
        for layer in self.hidden:
            x = layer(x, training=False)
        return tf.matmul(x, self.output.kernel) + self.output.bias

    def maps(self, images: np.ndarray, classes: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
        """Signed Grad-CAM maps of ``classes`` (default: the predicted ones) and the softmax probabilities."""
        import tensorflow as tf

        pixels = tf.convert_to_tensor(np.asarray(images, np.float32))
        feature_map = self.feature_model(self.preprocess(pixels), training=False)
        with tf.GradientTape() as tape:
            tape.watch(feature_map)
            logits = self.logits(self.pooling(feature_map))
            chosen = tf.argmax(logits, axis=1) if classes is None else tf.constant(np.asarray(classes, np.int64))
            score = tf.reduce_sum(tf.gather(logits, chosen, axis=1, batch_dims=1))
        gradients = tape.gradient(score, feature_map)
        alpha = tf.reduce_mean(gradients, axis=(1, 2))
        maps = tf.einsum("nhwc,nc->nhw", feature_map, alpha)
        return maps.numpy().astype(np.float64), tf.nn.softmax(logits, axis=1).numpy().astype(np.float64)
