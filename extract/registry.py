"""The backbone registry: one entry per architecture, the single source of truth for its facts.

Like timm's pretrained configs: each entry names the Keras application factory, its ImageNet input size,
its ``preprocess_input`` module (the mode is recorded), its pooled feature dimension, the file names a
weights directory is searched for, and the smallest input the architecture accepts. Adding a backbone is
one keyword ``BackboneConfig(...)`` entry in ``BACKBONES``.
"""
from __future__ import annotations

from dataclasses import dataclass

from cxr_transfer.core.errors import CxrError
from cxr_transfer.core.settings import INT8_CALIBRATION_BATCH


@dataclass(frozen=True)
class BackboneConfig:
    name: str                 # registry key, lower case, used on the command line and in file names
    keras_factory: str        # attribute of keras.applications
    keras_module: str         # submodule of keras.applications holding preprocess_input
    preprocessing: str        # Keras preprocess_input mode: "caffe" (BGR, mean), "tf" ([-1,1]), "torch"
    default_input_size: int   # ImageNet input size of the published weights
    feature_dim: int          # channels of the globally average-pooled last conv block
    min_input_size: int       # smallest square input Keras accepts with include_top=False
    keras_weights_file: str   # Keras' own cached file name for the headless ImageNet weights
    keras_weights_dir: str = ""  # folder of that file on Keras' download server (default: keras_module)
    keras_weights_md5: str | None = None  # the file hash Keras publishes; checked by keras.utils.get_file
    int8_calibration: str = "minmax"      # onnxruntime calibration for --precision int8 (docs/benchmarks.md)
    int8_float_convs: int = 0             # int8: the first N convolutions (and what precedes them) stay float32
    int8_bias_correction: bool = False    # int8: biases corrected to float32's channel means (bias_correction.py)

    @property
    def int8_variant(self) -> str:
        """How this backbone is quantized, as a file-name qualifier ("" for the default MinMax, all int8)."""
        # Histogram methods depend on how batches are merged ("b8": collected 8 images at a time); MinMax does not.
        parts = ([] if self.int8_calibration == "minmax" else [self.int8_calibration, f"b{INT8_CALIBRATION_BATCH}"]) \
            + ([f"f{self.int8_float_convs}"] if self.int8_float_convs else []) \
            + (["bc"] if self.int8_bias_correction else [])
        return "-".join(parts)

    @property
    def keras_weights_url(self) -> str:
        return f"{KERAS_WEIGHTS_BASE}{self.keras_weights_dir or self.keras_module}/{self.keras_weights_file}"

    @property
    def is_user_onnx(self) -> bool:
        """False here; True for a user's own ONNX model (``extract/user_onnx.py``)."""
        return False

    @property
    def preprocessing_description(self) -> str:
        """What turns raw pixels into the network's input (recorded in every feature cache)."""
        return f"keras.applications.{self.keras_module}.preprocess_input:{self.preprocessing}"

    def input_size(self, override: int | None = None) -> int:
        size = override or self.default_input_size
        if size < self.min_input_size:
            raise CxrError(f"{self.name}: input size {size} is below the architecture's minimum "
                           f"{self.min_input_size}")
        return size


KERAS_WEIGHTS_BASE = "https://storage.googleapis.com/tensorflow/keras-applications/"
BACKBONES: dict[str, BackboneConfig] = {c.name: c for c in (
    BackboneConfig(name="vgg16", keras_factory="VGG16", keras_module="vgg16", preprocessing="caffe",
                   default_input_size=224, feature_dim=512, min_input_size=32,
                   keras_weights_file="vgg16_weights_tf_dim_ordering_tf_kernels_notop.h5",
                   keras_weights_md5="6d6bbae143d832006294945121d1f1fc"),
    BackboneConfig(name="vgg19", keras_factory="VGG19", keras_module="vgg19", preprocessing="caffe",
                   default_input_size=224, feature_dim=512, min_input_size=32,
                   keras_weights_file="vgg19_weights_tf_dim_ordering_tf_kernels_notop.h5",
                   keras_weights_md5="253f8cb515780f3b799900260a226db6"),
    BackboneConfig(name="mobilenetv2", keras_factory="MobileNetV2", keras_module="mobilenet_v2", preprocessing="tf",
                   default_input_size=224, feature_dim=1280, min_input_size=32,
                   keras_weights_file="mobilenet_v2_weights_tf_dim_ordering_tf_kernels_1.0_224_no_top.h5",
                   keras_weights_dir="mobilenet_v2",
                   keras_weights_md5=None),  # Keras publishes no hash for MobileNetV2's files
    BackboneConfig(name="inceptionv3", keras_factory="InceptionV3", keras_module="inception_v3", preprocessing="tf",
                   default_input_size=299, feature_dim=2048, min_input_size=75,
                   keras_weights_file="inception_v3_weights_tf_dim_ordering_tf_kernels_notop.h5",
                   keras_weights_md5="bcbd6486424b2319ff4ef7d526e38f63"),
    BackboneConfig(name="xception", keras_factory="Xception", keras_module="xception", preprocessing="tf",
                   default_input_size=299, feature_dim=2048, min_input_size=71,
                   keras_weights_file="xception_weights_tf_dim_ordering_tf_kernels_notop.h5",
                   keras_weights_md5="b0042744bf5b25fce3cb969f33bebb97",
                   # held-back min cosine to float32 (docs/benchmarks.md): MinMax 0.944 (0.971 with the first two
                   # convs in float32), Percentile 0.9865, Percentile + first two convs in float32 0.989 (refused
                   # by the gate), the same with bias correction 0.9917 (0.9910 without the float32 convs)
                   int8_calibration="percentile", int8_float_convs=2, int8_bias_correction=True),
    BackboneConfig(name="inceptionresnetv2", keras_factory="InceptionResNetV2", keras_module="inception_resnet_v2",
                   preprocessing="tf", default_input_size=299, feature_dim=1536, min_input_size=75,
                   keras_weights_file="inception_resnet_v2_weights_tf_dim_ordering_tf_kernels_notop.h5",
                   keras_weights_md5="d19885ff4a710c122648d3b5c3b684e4"),
    BackboneConfig(name="densenet201", keras_factory="DenseNet201", keras_module="densenet", preprocessing="torch",
                   default_input_size=224, feature_dim=1920, min_input_size=32,
                   keras_weights_file="densenet201_weights_tf_dim_ordering_tf_kernels_notop.h5",
                   keras_weights_dir="densenet", keras_weights_md5="c13680b51ded0fb44dff2d8f86ac8bb1"),
    BackboneConfig(name="resnet152v2", keras_factory="ResNet152V2", keras_module="resnet_v2", preprocessing="tf",
                   default_input_size=224, feature_dim=2048, min_input_size=32,
                   keras_weights_file="resnet152v2_weights_tf_dim_ordering_tf_kernels_notop.h5",
                   keras_weights_dir="resnet", keras_weights_md5="ed17cf2e0169df9d443503ef94b23b33"),
    BackboneConfig(name="nasnetlarge", keras_factory="NASNetLarge", keras_module="nasnet", preprocessing="tf",
                   default_input_size=331, feature_dim=4032, min_input_size=32,
                   keras_weights_file="NASNet-large-no-top.h5",
                   keras_weights_md5="d81d89dc07e6e56530c4e77faddd61b5"),
)}

PAPER_BACKBONES: tuple[str, ...] = tuple(BACKBONES)


def get_backbone(name: str) -> BackboneConfig:
    """The config of a backbone by (case-insensitive) name; unknown names list the valid ones.

    ``onnx:PATH`` registers a user's ONNX model with default input settings (``extract/user_onnx.py``;
    the CLI registers it with its --channels/--preprocess flags first); its registered name finds it again.
    """
    from cxr_transfer.extract import user_onnx

    if user_onnx.is_user_onnx(name):
        return user_onnx.register_user_onnx(name.strip()[len(user_onnx.PREFIX):])
    if user_onnx.registered(name.strip()):
        return user_onnx.registered(name.strip())
    key = name.strip().lower().replace("-", "").replace("_", "")
    if key not in BACKBONES:
        raise CxrError(f"unknown backbone '{name}'; choose from: {', '.join(BACKBONES)}, or onnx:PATH for your own "
                       f"ONNX model")
    return BACKBONES[key]


def parse_backbone_list(spec: str) -> list[BackboneConfig]:
    """'vgg16,xception' or 'all' -> configs, in the order given, without repeats (commas in an ``onnx:`` path:
    ``user_onnx.split_backbone_spec``)."""
    from cxr_transfer.extract.user_onnx import split_backbone_spec

    names = list(BACKBONES) if spec.strip().lower() == "all" else split_backbone_spec(spec)
    if not names:
        raise CxrError("no backbone given (e.g. --backbone vgg16 or --backbone vgg16,xception)")
    configs = []
    for name in names:
        config = get_backbone(name)
        if config not in configs:
            configs.append(config)
    return configs
