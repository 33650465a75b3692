"""The backbone registry: one entry per architecture, the single source of truth for its facts.

Like timm's pretrained configs: each entry names the Keras application factory, its ImageNet input size,
its ``preprocess_input`` module (the mode is recorded), its pooled feature dimension, the file names a
weights directory is searched for, and the smallest input the architecture accepts. Adding a backbone is
one keyword ``BackboneConfig(...)`` entry in ``BACKBONES``.

Other backbones (a user's own ONNX model, ``extract/user_onnx.py``) join an in-memory registry only through
``register_backbone``, like timm's ``register_model``; ``get_backbone`` is a lookup with no side effects.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from types import MappingProxyType

from cxr_transfer.core.errors import CxrError
from cxr_transfer.core.settings import INT8_STATISTICS_BATCH


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
    int8_statistics: str = "minmax"      # int8: how onnxruntime turns activation statistics into ranges
    int8_float_convs: int = 0             # int8: the first N convolutions (and what precedes them) stay float32
    int8_bias_correction: bool = False    # int8: biases corrected to float32's channel means (bias_correction.py)

    @property
    def int8_variant(self) -> str:
        """How this backbone is quantized, as a file-name qualifier ("" for the default MinMax, all int8)."""
        # Histogram methods depend on how batches are merged ("b8": collected 8 images at a time); MinMax does not.
        parts = ([] if self.int8_statistics == "minmax" else [self.int8_statistics, f"b{INT8_STATISTICS_BATCH}"]) \
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
                   int8_statistics="percentile", int8_float_convs=2, int8_bias_correction=True),
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


USER_ONNX_PREFIX = "onnx:"      # ``onnx:PATH``: a user's own ONNX model file (``extract/user_onnx.py``)
USER_ONNX_NAME_PREFIX = "onnx-"  # the names user ONNX models are registered under

_REGISTERED: dict[str, BackboneConfig] = {}   # this process's backbones beyond BACKBONES; only register_backbone adds


def register_backbone(config: BackboneConfig) -> str:
    """Add ``config`` to this process's registry under ``config.name`` (replacing one of that name) and return
    the name. Used by ``user_onnx.register_onnx_backbone``; the built-in names cannot be replaced."""
    if config.name in BACKBONES:
        raise CxrError(f"backbone {config.name} is a built-in backbone; register under another name",
                       param="backbone")
    _REGISTERED[config.name] = config
    return config.name


def registered_backbones() -> MappingProxyType[str, BackboneConfig]:
    """The backbones registered in this process (``register_backbone``), by name; a read-only mapping."""
    return MappingProxyType(_REGISTERED)


def is_user_onnx(spec: str) -> bool:
    """True for ``onnx:PATH`` backbone specs."""
    return spec.strip().lower().startswith(USER_ONNX_PREFIX)


def get_backbone(name: str) -> BackboneConfig:
    """The config of a backbone: a built-in one by (case-insensitive) name, or one registered in this process
    (``register_backbone``) by its name; ``onnx:PATH`` is the one user ONNX model registered from that file.

    A lookup only: nothing is exported, run or written. A user ONNX model not registered yet is a ``CxrError``
    saying how to register it; other unknown names list the valid ones.
    """
    text = name.strip()
    if text in _REGISTERED:
        return _REGISTERED[text]
    key = text.lower().replace("-", "").replace("_", "")
    if key in BACKBONES:
        return BACKBONES[key]
    if is_user_onnx(text):
        path = Path(text[len(USER_ONNX_PREFIX):]).expanduser().resolve()
        found = [c for c in _REGISTERED.values() if c.is_user_onnx and c.source_path == path]
        if len(found) == 1:
            return found[0]
        if found:
            raise CxrError(f"backbone {text} names {len(found)} registered models "
                           f"({', '.join(c.name for c in found)}); give the name of the one you mean", param="backbone")
        raise CxrError(f"backbone {text} is not registered in this process; register the file with "
                       f"register_onnx_backbone(path, spec, cache_dir=...) and use the name it returns",
                       param="backbone")
    if text.startswith(USER_ONNX_NAME_PREFIX):
        raise CxrError(f"backbone {text} is a user ONNX model not registered in this process; register it with "
                       f"register_onnx_backbone(path, spec, cache_dir=...), or with register_cached_onnx_backbone("
                       f"name, cache_dir) when an earlier run registered it with that cache_dir", param="backbone")
    raise CxrError(f"unknown backbone '{name}'; choose from: {', '.join(BACKBONES)}, or onnx:PATH for your own "
                   f"ONNX model")


def split_backbone_spec(spec: str) -> list[str]:
    """The items of a comma list of backbones, stripped, empty ones dropped.

    A comma may be part of an ``onnx:`` path: an ``onnx:`` item takes the following comma-separated pieces too
    as long as that makes the longest path that names an existing file (``onnx:a,b.onnx,vgg16`` is the file
    ``a,b.onnx`` then vgg16 when ``a,b.onnx`` exists); when no such file exists the item ends at the next comma.
    """
    pieces = spec.split(",")
    items, i = [], 0
    while i < len(pieces):
        end = i + 1
        if is_user_onnx(pieces[i]):
            for j in range(len(pieces), i + 1, -1):
                joined = ",".join(pieces[i:j]).strip()
                if Path(joined[len(USER_ONNX_PREFIX):]).expanduser().is_file():
                    end = j
                    break
        item = ",".join(pieces[i:end]).strip()
        if item:
            items.append(item)
        i = end
    return items


def parse_backbone_list(spec: str) -> list[BackboneConfig]:
    """'vgg16,xception' or 'all' -> configs, in the order given, without repeats (commas in an ``onnx:`` path:
    ``split_backbone_spec``)."""
    names = list(BACKBONES) if spec.strip().lower() == "all" else split_backbone_spec(spec)
    if not names:
        raise CxrError("no backbone given (e.g. `backbone` vgg16 or `backbone` vgg16,xception)")
    configs = []
    for name in names:
        config = get_backbone(name)
        if config not in configs:
            configs.append(config)
    return configs
