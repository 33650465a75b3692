"""The settings every stage shares (one object, built once by the CLI from its common flags).

Extract, compare, finetune, audit and predict all need to know which backbone with which weights at which
input size, where caches live, how many threads to use and whether to show progress. ``BackboneSettings``
holds exactly that; each stage's own settings embed it as ``.common`` and add what only that stage needs.
"""
from __future__ import annotations

from dataclasses import dataclass, fields, replace
from pathlib import Path
from typing import Any

from cxr_transfer.core.params import COUNT, INPUT_SIZE, Options, check_params, param

DEFAULT_CACHE_DIR = Path("features")
PRECISIONS = ("float32", "int8")
INT8_STATISTICS_BATCH = 8
"""int8 quantization feeds onnxruntime this many images of the int8 sample per collection step, one step at a
time, so that its activation statistics (min/max, or histograms merged step by step) need memory for one batch,
not for all."""
EXPORT_FORMATS = ("parquet", "npy")   # ``export --format`` (extract/export_table.py)


@dataclass(frozen=True)
class BackboneSettings:
    """Which network, which weights, what input size, where caches go, how fast, how chatty."""

    backbone: str = param("vgg16", help="backbone name (see `cxr-transfer backbones`)")
    weights_file: str | Path | None = param(None, help="weights file for the (single) backbone", flag="--weights")
    weights_dir: str | Path | None = param(None, help="folder searched for <backbone>_*.h5; default $CXR_WEIGHTS_DIR, "
                                                      "else ../shared/weights")
    random_weights: bool = param(False, help="random weights (tests only, never a fallback)")
    allow_download: bool = param(True, help="let Keras fetch ImageNet weights when nothing local is found", cli=False)
    input_size: int | None = param(None, INPUT_SIZE, "square input side (default: the backbone's own)",
                                   none_means="the backbone's own size")
    cache_dir: Path = param(DEFAULT_CACHE_DIR, help="ONNX exports, HDF5 embeddings, hash caches")
    threads: int | None = param(None, COUNT, "onnxruntime threads (default: all cores)", none_means="all cores")
    progress: bool = param(True, help="progress bars / per-epoch lines on stderr")
    precision: str = param("float32", Options(PRECISIONS),
                           "float32, or int8: a statically quantized export, its ranges measured on the "
                           "dataset's own images, refused when its embeddings drift from float32 (predict: the "
                           "model's own)")
    int8_sample_size: int = param(64, COUNT, "int8: dataset images its int8 statistics are collected on")

    def __post_init__(self) -> None:
        if not isinstance(self.backbone, str) or not self.backbone.strip():
            raise TypeError(f"backbone must be a non-empty str, got {self.backbone!r} instead")
        check_params(self)   # the same constraints make the command line's flags (cli.py)
        object.__setattr__(self, "cache_dir", Path(self.cache_dir))

    def with_backbone(self, name: str) -> "BackboneSettings":
        """The same settings for another backbone (a weights file belongs to one backbone, so it is dropped
        when the name changes)."""
        if name == self.backbone:
            return self
        return replace(self, backbone=name, weights_file=None)

    def record(self) -> dict[str, object]:
        """JSON-ready form for run records."""
        return {"backbone": self.backbone, "weights_file": str(self.weights_file or ""),
                "weights_dir": str(self.weights_dir or ""), "random_weights": self.random_weights,
                "input_size": self.input_size, "cache_dir": str(self.cache_dir), "threads": self.threads,
                "precision": self.precision,
                **({"int8_sample_size": self.int8_sample_size} if self.precision == "int8" else {})}


class UsesBackboneSettings:
    """Read-only shortcuts (``settings.backbone``, ``settings.cache_dir``, ...) to an embedded ``common``,
    and ``from_options`` to build a stage's settings from flat keywords."""

    common: BackboneSettings

    @classmethod
    def from_options(cls, common: BackboneSettings | None = None, **options: Any):
        """``ExtractSettings.from_options(backbone="xception", random_weights=True, batch_size=8)``: shared
        keywords go to ``common`` (``weights`` is short for ``weights_file``; keywords override ``common``), the
        rest to the stage; unknown keywords raise TypeError."""
        if "weights" in options:
            if "weights_file" in options:
                raise TypeError("give weights or weights_file, not both")
            options["weights_file"] = options.pop("weights")
        if common is not None and not isinstance(common, BackboneSettings):
            raise TypeError(f"common must be a BackboneSettings, got {type(common).__name__} instead")
        shared = {k: options.pop(k) for k in list(options) if k in SHARED_FIELDS}
        own_names = {f.name for f in fields(cls)} - {"common"}
        unknown = sorted(set(options) - own_names)
        if unknown:
            valid = sorted(own_names | SHARED_FIELDS | {"weights"})
            raise TypeError(f"unknown setting(s) {', '.join(unknown)} for {cls.__name__}; valid: {', '.join(valid)}")
        return cls(common=replace(common or BackboneSettings(), **shared), **options)

    def __getattr__(self, name: str) -> Any:
        """``settings.cache_dir`` and every other BackboneSettings field, read from ``common``."""
        if name in SHARED_FIELDS:
            return getattr(object.__getattribute__(self, "common"), name)
        raise AttributeError(f"{type(self).__name__!r} object has no attribute {name!r}")


SHARED_FIELDS = frozenset(f.name for f in fields(BackboneSettings))
