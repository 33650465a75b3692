"""int8 backbones: static quantization of the float32 ONNX export, its activation ranges measured on a sample
of the dataset's own images (the int8 sample), gated by fidelity to float32, cached and verified by hash.

Why static QDQ int8 (docs/benchmarks.md, "int8"): these CPUs have AVX-512 VNNI, four times the int8
multiply-adds of float32 FMAs; onnxruntime runs a QDQ graph with fused integer convolutions and matmuls.
Settings (measured on VGG16 and Xception with real weights; see the docs for the numbers):
- QDQ format, int8 per-channel weights (per-channel keeps the cosine to float32 high on depthwise layers),
  uint8 activations, MinMax ranges (Entropy/Percentile were not better at the fidelity gate and are slower); the
  int8 statistics are collected one batch at a time, so memory does not grow with `int8_sample_size`;
- every operator type onnxruntime can quantize (Conv, MatMul, pooling, Add, ...), except that a backbone may keep
  its first N convolutions (and the input preprocessing before them) in float32
  (``BackboneConfig.int8_float_convs``: Xception keeps 2, at 7% of its int8 speed);
- a backbone may have its int8 biases corrected to float32's per-channel means on the int8 sample
  (``BackboneConfig.int8_bias_correction``, ``bias_correction.py``): Xception, whose held-back min cosine on the
  paper's dataset goes from 0.989 (refused by the gate) to 0.992, at the same int8 speed (docs/benchmarks.md).

The int8 sample is a deterministic sample of the dataset (the images with the smallest sha256, from
``train/`` when the dataset has that split; labels are never used). The next images in that order are held
back: the quantized model is refused unless every held-back embedding has a cosine of at least
``FIDELITY_MIN_COSINE`` to its float32 embedding. The int8 file is cached by (backbone, input size, weights
sha256, opset, "int8", int8 sample hash) and its sha256 is checked against its sidecar before each use.
"""
from __future__ import annotations

import contextlib
import io
import json
import logging
import shutil
import tempfile
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Sequence

import numpy as np

from cxr_transfer.core.cache_keys import model_key
from cxr_transfer.core.errors import CxrError, Int8RefusedError
from cxr_transfer.core.hashing import sha256_file, sha256_strings
from cxr_transfer.core.io import atomic_path, cannot_write_error, no_space_error, remove_leftovers
from cxr_transfer.core.locking import DEFAULT_LOCK_TIMEOUT, file_lock
from cxr_transfer.core.record import library_versions, now_iso, write_json
from cxr_transfer.core.settings import INT8_STATISTICS_BATCH
from cxr_transfer.extract.bias_correction import MIN_SLOPE, correct_biases
from cxr_transfer.extract.dataset import Sample
from cxr_transfer.extract.images import ImageDecodeError, read_rgb
from cxr_transfer.extract.onnx_export import OnnxBackbone
from cxr_transfer.extract.runtime import open_session

log = logging.getLogger(__name__)

FIDELITY_MIN_COSINE = 0.99
"""The int8 model is refused when any held-back image's embedding has a lower cosine to float32."""
MAX_HELD_BACK = 16
QUANTIZATION = {"format": "QDQ", "weights": "int8 per-channel", "activations": "uint8",
                "operators": "all quantizable"}


@dataclass(frozen=True)
class Int8Sample:
    """The images a quantized model's int8 statistics are collected on and those held back to check it;
    ``digest`` names it."""

    images: list[Sample]
    held_back: list[Sample]

    @property
    def digest(self) -> str:
        return sha256_strings(sorted(s.sha256 for s in self.images))


def precision_key(digest: str, variant: str = "") -> str:
    """The file-name qualifier for an int8 model / embeddings of an int8 sample and a backbone's quantization
    variant (``BackboneConfig.int8_variant``: statistics method, float32 convolutions). "cal" is the name it
    was written under before, kept so that existing int8 models and caches are found."""
    return f"int8-cal{digest[:12]}" + (f"-{variant}" if variant else "")


def choose_int8_sample(samples: Sequence[Sample], size: int) -> Int8Sample:
    """A deterministic, order-independent sample: images sorted by sha256, ``train`` split first when present.

    The first ``min(16, max(2, n // 4))`` are held back for the fidelity check, the next ``size`` are the sample.
    """
    if size < 1:
        raise CxrError(f"`int8_sample_size` must be at least 1, got {size}")
    unique = {s.sha256: s for s in samples}
    pool = [s for s in unique.values() if s.split == "train"] or list(unique.values())
    pool.sort(key=lambda s: s.sha256)
    n_held = min(MAX_HELD_BACK, max(2, len(pool) // 4))
    if len(pool) < n_held + 1:
        raise CxrError(f"int8 needs at least {n_held + 1} images to measure and check the quantized model; "
                       f"the dataset has {len(pool)}")
    return Int8Sample(images=pool[n_held:n_held + size], held_back=pool[:n_held])


def int8_path(backbone: OnnxBackbone, digest: str, cache_dir: str | Path) -> Path:
    key = model_key(backbone.config.name, backbone.input_size, backbone.weights_sha256, f"opset{backbone.opset}",
                    precision_key(digest, backbone.config.int8_variant))
    return Path(cache_dir) / "onnx" / f"{key}.onnx"


def _decode(samples: Sequence[Sample], size: int) -> np.ndarray:
    images = []
    for sample in samples:
        try:
            images.append(read_rgb(sample.path, size))
        except ImageDecodeError as exc:
            log.warning("int8 sample: skipped %s", exc)
    if not images:
        raise CxrError("int8: none of the int8 sample's images could be read")
    return np.stack(images).astype(np.float32)


def _embed(path: Path, images: np.ndarray, threads: int | None) -> np.ndarray:
    session = open_session(path, threads)
    name = session.get_inputs()[0].name
    return np.concatenate([session.run(None, {name: images[i:i + 8]})[0] for i in range(0, len(images), 8)])


def cosine_rows(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Cosine similarity of matching rows (1.0 for two zero rows)."""
    norms = np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1)
    dots = (a * b).sum(axis=1)
    return np.where(norms > 0, dots / np.where(norms > 0, norms, 1), 1.0)


def float_prefix_nodes(model, n_convs: int) -> list[str]:
    """Names of the nodes before the (n_convs + 1)-th convolution, in graph order: the input preprocessing and
    the first ``n_convs`` convolutions with their activations, which ``_quantize`` keeps in float32.

    Defined by position in the graph, not by node names, which change from one tf2onnx export to another.
    """
    if n_convs <= 0:
        return []
    names, seen = [], 0
    for node in model.graph.node:
        if node.op_type == "Conv":
            seen += 1
            if seen > n_convs:
                return names
        names.append(node.name)
    return names


def _quantize(float_path: Path, images: np.ndarray, out: Path, method: str = "minmax",
              float_convs: int = 0, bias_correction: bool = False, threads: int | None = None) -> dict[str, object]:
    """Write the static QDQ int8 model of ``float_path`` to ``out``; returns what was done, for the sidecar
    (the nodes kept in float32, the convolutions whose biases were corrected on ``images``)."""
    from onnxruntime.quantization import (
        CalibrationDataReader,
        CalibrationMethod,
        QuantFormat,
        QuantType,
        quant_pre_process,
        quantize_static,
    )

    class Reader(CalibrationDataReader):
        """Batches of INT8_STATISTICS_BATCH images; ``set_range`` lets onnxruntime collect them one at a time."""

        def __init__(self, input_name: str) -> None:
            step = INT8_STATISTICS_BATCH
            self.batches = [{input_name: images[i:i + step]} for i in range(0, len(images), step)]
            self.pending = iter(self.batches)

        def __len__(self) -> int:
            return len(self.batches)

        def set_range(self, start_index: int, end_index: int) -> None:
            self.pending = iter(self.batches[start_index:end_index])

        def get_next(self):
            return next(self.pending, None)

    import onnx

    input_name = onnx.load(str(float_path), load_external_data=False).graph.input[0].name
    with tempfile.TemporaryDirectory(dir=out.parent, prefix=f"{out.name}.") as work:   # named after ``out``: a
        # killed run's folder is found and removed by the next (get_int8_backbone)
        prepared = Path(work) / "prepared.onnx"
        quant_pre_process(str(float_path), str(prepared), skip_symbolic_shape=False)
        kept_float = float_prefix_nodes(onnx.load(str(prepared)), float_convs)
        with contextlib.redirect_stdout(io.StringIO()):     # onnxruntime print()s each collection step
            quantize_static(str(prepared), str(out), Reader(input_name), quant_format=QuantFormat.QDQ,
                            per_channel=True, activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8,
                            calibrate_method={"minmax": CalibrationMethod.MinMax,
                                              "percentile": CalibrationMethod.Percentile,
                                              "entropy": CalibrationMethod.Entropy}[method],
                            nodes_to_exclude=kept_float,
                            # one batch per collection step (any method, despite the option's name): onnxruntime's
                            # histogram calibrators otherwise keep every batch's activations until the end (128
                            # Xception images at 299 px: killed at 24 GB); MinMax gives the same ranges either way.
                            extra_options={"CalibTensorRangeSymmetric": False, "CalibStridedMinMax": 1})
        corrected = 0
        if bias_correction:
            quantized = onnx.load(str(out))
            corrected = correct_biases(quantized, onnx.load(str(prepared)), images,
                                       lambda model: open_session(model, threads))
            if not corrected:
                log.warning("int8 bias correction is configured but found no convolution to correct in %s "
                            "(its convolutions need unique node names)", float_path.name)
            onnx.save(quantized, str(out))
    return {"float32_nodes": kept_float, "bias_corrected_convolutions": corrected,
            **({"bias_correction_min_slope": MIN_SLOPE} if bias_correction else {})}


def _cached(path: Path, backbone: OnnxBackbone) -> OnnxBackbone | None:
    sidecar = path.with_suffix(".json")
    if not (path.is_file() and sidecar.is_file()):
        return None
    try:
        info = json.loads(sidecar.read_text(encoding="utf-8"))
        recorded = info["sha256"]
    except (OSError, ValueError, KeyError):
        log.warning("%s: unreadable sidecar; quantizing again", sidecar)
        return None
    actual = sha256_file(path)
    if actual != recorded or info.get("float_onnx_sha256") != backbone.sha256:
        log.warning("%s: sha256 %s... is not the %s... recorded at quantization (or the float32 export changed); "
                    "quantizing again", path, actual[:12], str(recorded)[:12])
        return None
    return replace(backbone, path=path, sha256=actual)


def get_int8_backbone(backbone: OnnxBackbone, sample: Int8Sample | None, cache_dir: str | Path,
                      threads: int | None = None, digest: str | None = None,
                      lock_timeout: float = DEFAULT_LOCK_TIMEOUT) -> OnnxBackbone:
    """The int8 version of a float32 export (cached, hash-checked), quantizing and gating it when needed.

    ``digest`` instead of ``sample`` looks up an existing model (e.g. the one a saved head was trained on).
    Quantization holds the model's file lock: a second run that needs the same model waits, then uses it.
    """
    digest = digest or (sample.digest if sample else None)
    if digest is None:
        raise ValueError("give an int8 sample or the digest of an existing one")
    path = int8_path(backbone, digest, cache_dir)
    found = _cached(path, backbone)
    if found is not None:
        return found
    if sample is None:
        raise CxrError(f"the int8 model {path.name} (int8 sample {digest[:12]}) is not in {path.parent}; "
                       f"extract the dataset it was quantized on with `precision` int8 into this `cache_dir` first")
    # quantization writes a prepared float32 copy and its shape-inferred twin (in a work folder beside the model),
    # then the int8 model (about a quarter of the float32 size)
    needed = 2 * backbone.path.stat().st_size + backbone.path.stat().st_size // 4
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with file_lock(path, lock_timeout):
            remove_leftovers(path)                       # the model and work folder of a killed run
            remove_leftovers(path.with_suffix(".json"))  # and its half-written sidecar
            found = _cached(path, backbone)                  # quantized by another run while this one waited
            if found is not None:
                return found
            if shutil.disk_usage(path.parent).free < needed:  # onnx's shape inference truncates its file on a
                raise no_space_error(path.parent, needed)     # full disk instead of failing: check first
            return _quantize_gated(backbone, sample, path, threads)
    except OSError as exc:   # a full disk or an unwritable folder
        raise cannot_write_error(path.parent, exc, "ONNX folder", needed) from None


def _quantize_gated(backbone: OnnxBackbone, sample: Int8Sample, path: Path,
                    threads: int | None) -> OnnxBackbone:
    """Quantize into a temporary file, gate it against float32 on the held-back images, then install it at
    ``path`` with its sidecar. Refused, a full disk, Ctrl-C: no model is left (the caller holds the lock)."""
    started = time.perf_counter()
    size = backbone.input_size
    sample_images = _decode(sample.images, size)
    held_images = _decode(sample.held_back, size)
    config = backbone.config
    with atomic_path(path) as tmp:
        done = _quantize(backbone.path, sample_images, tmp, config.int8_statistics, config.int8_float_convs,
                         config.int8_bias_correction, threads)
        cosines = cosine_rows(_embed(backbone.path, held_images, threads), _embed(tmp, held_images, threads))
        fidelity = {"min_cosine": float(cosines.min()), "mean_cosine": float(cosines.mean()),
                    "n_held_back": int(len(cosines)), "threshold": FIDELITY_MIN_COSINE}
        if not np.all(np.isfinite(cosines)) or cosines.min() < FIDELITY_MIN_COSINE:
            raise Int8RefusedError(f"int8 {backbone.config.name} refused: its embeddings of {len(cosines)} "
                                   f"held-back images have a min cosine of {cosines.min():.4f} to float32, below "
                                   f"{FIDELITY_MIN_COSINE}; use `precision` float32")
    try:
        _write_sidecar(path, backbone, sample, done, fidelity, len(sample_images), started)
    except BaseException:        # a full disk or Ctrl-C: no model without its sidecar (this run holds the lock)
        path.unlink(missing_ok=True)
        raise
    log.info("int8 %s: min cosine %.4f on %d held-back images", backbone.config.name, cosines.min(), len(cosines))
    return replace(backbone, path=path, sha256=sha256_file(path))


def _write_sidecar(path: Path, backbone: OnnxBackbone, sample: Int8Sample, done: dict[str, object],
                   fidelity: dict[str, object], n_images: int, started: float) -> None:
    config = backbone.config
    write_json(path.with_suffix(".json"), {
        "backbone": config.name, "input_size": backbone.input_size, "precision": "int8", "sha256": sha256_file(path),
        "float_onnx_sha256": backbone.sha256, "weights_sha256": backbone.weights_sha256, "opset": backbone.opset,
        "quantization": {**QUANTIZATION, "statistics_method": config.int8_statistics,
                         "float32_convolutions": config.int8_float_convs, **done},
        "int8_sample": {"digest": sample.digest, "n_images": n_images,
                        "sha256": sorted(s.sha256 for s in sample.images)},
        "held_back_sha256": sorted(s.sha256 for s in sample.held_back), "fidelity": fidelity,
        "seconds": round(time.perf_counter() - started, 1), "created": now_iso(), "versions": library_versions()})


def int8_info(backbone: OnnxBackbone) -> dict[str, object]:
    """The sidecar of an int8 model (fidelity, int8 sample), for run records."""
    try:
        return json.loads(backbone.path.with_suffix(".json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
