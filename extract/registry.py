"""The backbone registry: one entry per architecture, the single source of truth for its facts.

Like timm's pretrained configs: each entry names the Keras application factory, its ImageNet input size,
its ``preprocess_input`` module (the mode is recorded), its pooled feature dimension, the file names a
weights directory is searched for, and the smallest input the architecture accepts. Adding a backbone is
one ``BackboneConfig`` line in ``BACKBONES``.
"""
from __future__ import annotations

from dataclasses import dataclass

from core.errors import CxrError


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

    @property
    def keras_weights_url(self) -> str:
        return f"{KERAS_WEIGHTS_BASE}{self.keras_weights_dir or self.keras_module}/{self.keras_weights_file}"

    def input_size(self, override: int | None = None) -> int:
        size = override or self.default_input_size
        if size < self.min_input_size:
            raise CxrError(f"{self.name}: input size {size} is below the architecture's minimum "
                           f"{self.min_input_size}")
        return size


KERAS_WEIGHTS_BASE = "https://storage.googleapis.com/tensorflow/keras-applications/"
BACKBONES: dict[str, BackboneConfig] = {c.name: c for c in (
    BackboneConfig("vgg16", "VGG16", "vgg16", "caffe", 224, 512, 32,
                   "vgg16_weights_tf_dim_ordering_tf_kernels_notop.h5"),
    BackboneConfig("vgg19", "VGG19", "vgg19", "caffe", 224, 512, 32,
                   "vgg19_weights_tf_dim_ordering_tf_kernels_notop.h5"),
    BackboneConfig("mobilenetv2", "MobileNetV2", "mobilenet_v2", "tf", 224, 1280, 32,
                   "mobilenet_v2_weights_tf_dim_ordering_tf_kernels_1.0_224_no_top.h5", "mobilenet_v2"),
    BackboneConfig("inceptionv3", "InceptionV3", "inception_v3", "tf", 299, 2048, 75,
                   "inception_v3_weights_tf_dim_ordering_tf_kernels_notop.h5"),
    BackboneConfig("xception", "Xception", "xception", "tf", 299, 2048, 71,
                   "xception_weights_tf_dim_ordering_tf_kernels_notop.h5"),
    BackboneConfig("inceptionresnetv2", "InceptionResNetV2", "inception_resnet_v2", "tf", 299, 1536, 75,
                   "inception_resnet_v2_weights_tf_dim_ordering_tf_kernels_notop.h5"),
    BackboneConfig("densenet201", "DenseNet201", "densenet", "torch", 224, 1920, 32,
                   "densenet201_weights_tf_dim_ordering_tf_kernels_notop.h5", "densenet"),
    BackboneConfig("resnet152v2", "ResNet152V2", "resnet_v2", "tf", 224, 2048, 32,
                   "resnet152v2_weights_tf_dim_ordering_tf_kernels_notop.h5", "resnet"),
    BackboneConfig("nasnetlarge", "NASNetLarge", "nasnet", "tf", 331, 4032, 32,
                   "NASNet-large-no-top.h5"),
)}

PAPER_BACKBONES: tuple[str, ...] = tuple(BACKBONES)


def get_backbone(name: str) -> BackboneConfig:
    """The config of a backbone by (case-insensitive) name; unknown names list the valid ones."""
    key = name.strip().lower().replace("-", "").replace("_", "")
    if key not in BACKBONES:
        raise CxrError(f"unknown backbone '{name}'; choose from: {', '.join(BACKBONES)}")
    return BACKBONES[key]


def parse_backbone_list(spec: str) -> list[BackboneConfig]:
    """'vgg16,xception' or 'all' -> configs, in the order given, without repeats."""
    names = list(BACKBONES) if spec.strip().lower() == "all" else [n for n in spec.split(",") if n.strip()]
    if not names:
        raise CxrError("no backbone given (e.g. --backbone vgg16 or --backbone vgg16,xception)")
    configs = []
    for name in names:
        config = get_backbone(name)
        if config not in configs:
            configs.append(config)
    return configs
