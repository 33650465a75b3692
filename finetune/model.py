"""The paper's fine-tuning model: frozen ImageNet body -> new fully connected head (section 3.4, figure 1).

The paper removes the original top (FC layers + softmax), keeps the body up to its last POOL layer frozen,
and trains a new, randomly initialised FC head with ReLU, Dropout 0.5 and a softmax over the 3 classes. It
does not give the width of the hidden FC layer; ``PAPER_DENSE_UNITS = 64`` is the width of the head in the
widely copied Keras COVID-19 fine-tuning recipe the paper's text and hyper-parameters follow (Adam 1e-3,
batch 8, Dropout 0.5, ``ImageDataGenerator``; PyImageSearch, March 2020). The pooled output is the body's
global average pooling (``build_keras_backbone(..., pooling="avg")``), a vector, so the head's "flatten" is
the identity and is left out.

Head: ``Dense(dense_units, relu) -> Dropout(dropout) -> Dense(num_classes, softmax)``, kernels Glorot-uniform
seeded with ``seed``, biases zero, so the full model's head and the standalone head (the fast path) start
from the same weights for the same seed.

Preprocessing lives in one place: the ``KerasPreprocess`` layer at the model's input runs the architecture's
own ``keras.applications.<module>.preprocess_input``; the saved model takes raw RGB in [0, 255].
"""
from __future__ import annotations

from typing import Any

from cxr_transfer.core.quiet import start_tensorflow
from cxr_transfer.extract.registry import BackboneConfig
from cxr_transfer.extract.weights import WeightsSource, build_keras_backbone

PAPER_DENSE_UNITS = 64
PAPER_DROPOUT = 0.5
NUM_CLASSES = 3
HEAD_NAME = "head"


def _keras():
    start_tensorflow()   # without TensorFlow's start-up notices on stderr (core/quiet.py)
    import keras

    return keras


def load_finetuned(path: str) -> Any:
    """Load a saved fine-tuned model (.keras) with its custom preprocessing layer registered."""
    keras = _keras()   # first: the layers module imports Keras at its top
    import cxr_transfer.finetune.layers  # noqa: F401  (imports Keras; registers KerasPreprocess)

    return keras.saving.load_model(path)


def build_head(feature_dim: int, dense_units: int = PAPER_DENSE_UNITS, dropout: float = PAPER_DROPOUT,
               num_classes: int = NUM_CLASSES, seed: int = 0) -> Any:
    """The new FC head as a standalone Keras model on pooled feature vectors (N, feature_dim)."""
    keras = _keras()
    layers = keras.layers
    inputs = keras.Input((feature_dim,), name="features")
    x = layers.Dense(dense_units, activation="relu", name="fc",
                     kernel_initializer=keras.initializers.GlorotUniform(seed=seed))(inputs)
    x = layers.Dropout(dropout, seed=seed, name="dropout")(x)
    outputs = layers.Dense(num_classes, activation="softmax", name="predictions",
                           kernel_initializer=keras.initializers.GlorotUniform(seed=seed + 1))(x)
    return keras.Model(inputs, outputs, name=HEAD_NAME)


def assemble(config: BackboneConfig, input_size: int, body: Any, head: Any) -> Any:
    """raw pixels -> KerasPreprocess -> frozen body (inference mode) -> head."""
    keras = _keras()
    body.trainable = False
    inputs = keras.Input((input_size, input_size, 3), name="pixels")
    from cxr_transfer.finetune.layers import KerasPreprocess   # imports Keras: only once TensorFlow is wanted

    x = KerasPreprocess(config.name, name="preprocess")(inputs)
    x = body(x, training=False)
    outputs = head(x)
    return keras.Model(inputs, outputs, name=f"finetune_{config.name}")


def build_finetune_model(config: BackboneConfig, input_size: int, source: WeightsSource,
                         dense_units: int = PAPER_DENSE_UNITS, dropout: float = PAPER_DROPOUT,
                         num_classes: int = NUM_CLASSES, seed: int = 0, head: Any = None) -> Any:
    """The full model: frozen ImageNet body (``build_keras_backbone``) + the paper's head.

    head: an already built (e.g. trained) ``build_head`` model to put on top instead of a new one.
    Raises the errors of ``build_keras_backbone`` (missing weights, weights that do not fit).
    """
    body = build_keras_backbone(config, input_size, source)
    if head is None:
        head = build_head(config.feature_dim, dense_units, dropout, num_classes, seed)
    return assemble(config, input_size, body, head)


def compile_model(model: Any, lr: float) -> Any:
    """Adam(lr), categorical cross-entropy, accuracy: the paper's training setup (section 4.2)."""
    keras = _keras()
    model.compile(optimizer=keras.optimizers.Adam(learning_rate=lr), loss="categorical_crossentropy",
                  metrics=["accuracy"])
    return model
