"""Export a headless Keras backbone to ONNX with tf2onnx, verify it, and cache the file.

The exported graph takes raw RGB pixels as float32 in [0, 255] (N, H, W, 3) and contains the
architecture's own Keras ``preprocess_input``: preprocessing lives in exactly one place, Keras' code, and
the ONNX file cannot be fed the wrong normalisation. Output: the globally average-pooled embedding.

Files are cached under ``<cache_dir>/onnx/`` by (architecture, weights sha256, input size, opset), with a
JSON sidecar holding the verification result and the file's sha256. At export the ONNX output is compared
with Keras on a random batch; a max relative error above ``MAX_RELATIVE_ERROR`` is refused. Before a cached
export is used its sha256 is checked against the sidecar: a damaged or truncated file (or sidecar) is
removed and exported again. Exports are made under the file's lock (``core.locking``), one process at a time.

Each export runs in a fresh Python process (``core.fresh_process``), so TensorFlow's memory is returned when it
ends; the sidecar records that process's peak RSS (``export_peak_rss_mb``). The conversion keeps it low: no
grappler pass, and tf2onnx's optimizer without its per-pass copies (``_convert``, docs/benchmarks.md).
"""
from __future__ import annotations

import contextlib
import errno
import json
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from cxr_transfer.core.cache_keys import model_key
from cxr_transfer.core.errors import CxrError
from cxr_transfer.core.fresh_process import call_in_fresh_process
from cxr_transfer.core.hashing import sha256_file
from cxr_transfer.core.io import atomic_path, is_no_space, no_space_error, remove_leftovers
from cxr_transfer.core.locking import DEFAULT_LOCK_TIMEOUT, file_lock
from cxr_transfer.core.record import library_versions, now_iso, write_json
from cxr_transfer.extract.registry import BackboneConfig
from cxr_transfer.extract.runtime import open_session
from cxr_transfer.extract.weights import WeightsSource, build_keras_backbone

log = logging.getLogger(__name__)

DEFAULT_OPSET = 17
MAX_RELATIVE_ERROR = 1e-4
INPUT_NAME = "pixels"


@dataclass(frozen=True)
class OnnxBackbone:
    """An exported backbone on disk, with what produced it."""

    config: BackboneConfig
    input_size: int
    path: Path
    sha256: str
    weights_sha256: str
    opset: int
    max_relative_error: float
    export_peak_rss_mb: int | None = None   # peak RSS of the export's process; None: not exported here

    @property
    def preprocessing(self) -> str:
        return f"keras.applications.{self.config.keras_module}.preprocess_input (mode={self.config.preprocessing})"


def onnx_cache_path(cache_dir: Path, config: BackboneConfig, input_size: int, weights_sha256: str,
                    opset: int) -> Path:
    return Path(cache_dir) / "onnx" / f"{model_key(config.name, input_size, weights_sha256, f'opset{opset}')}.onnx"


def keras_preprocess_input(config: BackboneConfig):
    """The architecture's own Keras preprocess_input function (takes RGB pixels in [0, 255])."""
    import importlib

    return importlib.import_module(f"keras.applications.{config.keras_module}").preprocess_input


def relative_error(reference: np.ndarray, candidate: np.ndarray) -> float:
    """max |a - b| / max |a|: error relative to the embedding's scale."""
    scale = float(np.max(np.abs(reference))) or 1.0
    return float(np.max(np.abs(reference - candidate)) / scale)


@contextlib.contextmanager
def _write_back_once():
    """Skip tf2onnx's write-back of every node into its protobuf after each optimizer pass.

    ``GraphOptimizerBase.optimize`` ends each pass with ``Graph.update_proto``. With the upb protobuf runtime
    (protobuf >= 4) what a message held before stays in its arena until the message is freed, so each pass kept
    one more copy of all the weights: about 45 passes, 14 GB on NASNetLarge at 32 px. Nothing reads those
    protobufs between passes; ``make_model`` writes them once, at the end.
    """
    from tf2onnx.graph import Graph

    write_back = Graph.update_proto
    Graph.update_proto = lambda self, external_tensor_storage=None: None
    try:
        yield
    finally:
        Graph.update_proto = write_back


def _convert(function, spec, opset: int, path: Path) -> None:
    """``tf2onnx.convert.from_function``'s steps, keeping one or two copies of the weights at a time instead of
    up to 40 (docs/benchmarks.md, "Export memory").

    - Freezing the variables into constants is tf2onnx's large-model freezing, which returns the frozen graph
      as it is. The stock path also rebuilds it as a TF function, imports it twice more and runs grappler on
      it (5 to 10 copies at once). The constant folding grappler did (batch normalisation) is done by
      tf2onnx's own passes and onnxruntime's graph optimizer.
    - The frozen graph and TensorFlow's copy of it are dropped once tf2onnx has its own graph, and tf2onnx's
      graph once the ONNX protobuf is made, before it is serialised.
    - The optimizer passes run in place: tf2onnx deep-copies the whole graph before each pass so that a
      failing pass can be skipped (a third of NASNetLarge's export time), and writes every node back into its
      protobuf after each (``_write_back_once``).
    If this conversion fails, tf2onnx's stock one is tried.
    """
    import tensorflow as tf
    import tf2onnx
    from tf2onnx import optimizer, tf_loader, utils
    from tf2onnx.convert import tensor_names_from_structed
    from tf2onnx.tfonnx import process_tf_graph

    concrete = function.get_concrete_function(*spec)
    inputs = [t.name for t in concrete.inputs if t.dtype != tf.dtypes.resource]
    outputs = [t.name for t in concrete.outputs if t.dtype != tf.dtypes.resource]
    renames = tensor_names_from_structed(concrete, inputs, outputs)
    try:
        with tf.device("/cpu:0"):
            frozen = tf_loader.from_function(concrete, inputs, outputs, large_model=True)
            with tf.Graph().as_default() as tf_graph:
                tf.import_graph_def(frozen, name="")
                del frozen
                graph = process_tf_graph(tf_graph, continue_on_error=True, opset=opset, input_names=inputs,
                                         output_names=outputs, tensors_to_rename=renames)
            del tf_graph
            with _write_back_once():
                graph = optimizer.optimize_graph(graph, catch_errors=False)
            model = graph.make_model(f"converted from {concrete.name}")
            del graph
            utils.save_protobuf(str(path), model)
    except OSError:  # a full disk or an unwritable folder: converting again would meet it again
        raise
    except Exception as exc:  # noqa: BLE001 - convert again the way tf2onnx does by default
        log.warning("the lean tf2onnx conversion failed (%s); converting with tf2onnx's defaults, which can "
                    "take several times more memory", exc)
        tf2onnx.convert.from_function(function, input_signature=spec, opset=opset, output_path=str(path))


def export_checked(model_fn, input_size: int, target: Path, check_batch: np.ndarray, reference: np.ndarray,
                   error_fn, max_error: float, what: str, opset: int = DEFAULT_OPSET) -> float:
    """Convert ``model_fn`` (raw RGB float32 NHWC pixels -> outputs) to ONNX at ``target`` with tf2onnx.

    The ONNX outputs on ``check_batch`` are compared with ``reference`` (Keras' outputs) by ``error_fn``; above
    ``max_error`` the file is refused. Written beside ``target`` first, renamed on success. Used for the
    headless backbones here and for whole fine-tuned models (finetune/export.py).
    """
    import tensorflow as tf

    spec = (tf.TensorSpec((None, input_size, input_size, 3), tf.float32, name=INPUT_NAME),)
    function = tf.function(model_fn, input_signature=spec)
    with atomic_path(target) as tmp:
        _convert(function, spec, opset, tmp)
        session = open_session(tmp)
        exported = session.run(None, {session.get_inputs()[0].name: np.asarray(check_batch, np.float32)})[0]
        error = error_fn(reference, exported) if len(check_batch) else 0.0
        if not np.isfinite(error) or error > max_error:
            raise CxrError(f"ONNX export of {what} differs from Keras: error {error:.2e} > {max_error:.0e}")
    return error


def _export(config: BackboneConfig, input_size: int, source: WeightsSource, target: Path,
            opset: int) -> tuple[float, int | None]:
    """Export in a fresh process (``core.fresh_process``): (max relative error vs Keras, its peak RSS in MB).

    TensorFlow, the Keras model and tf2onnx's graphs live only in that process, so their memory is returned at
    its exit (compare exports up to nine backbones in one run) and its peak can be recorded.
    """
    return call_in_fresh_process(_export_here, config, input_size, source, target, opset,
                                 what=f"exporting {config.name} ({input_size} px) to ONNX")


def _export_here(config: BackboneConfig, input_size: int, source: WeightsSource, target: Path, opset: int) -> float:
    """The export itself, in this process: build the Keras model, convert it, check the ONNX file against it."""
    model = build_keras_backbone(config, input_size, source)
    preprocess_input = keras_preprocess_input(config)
    batch = np.random.default_rng(0).uniform(0, 255, size=(2, input_size, input_size, 3)).astype(np.float32)
    reference = model.predict(preprocess_input(batch.copy()), verbose=0)
    return export_checked(lambda pixels: model(preprocess_input(pixels), training=False), input_size, target,
                          batch, reference, relative_error, MAX_RELATIVE_ERROR, config.name, opset)


def _verified(target: Path, sidecar: Path) -> dict | None:
    """The sidecar of a cached export whose bytes still have the recorded sha256; None when there is none.

    A damaged export (flipped bytes, truncated) or sidecar is removed, with a warning, so it is made again.
    """
    return verified_cache(target, sidecar, lambda info: float(info["max_relative_error"]))


def verified_cache(target: Path, sidecar: Path, check_fields: Callable[[dict], object] = lambda info: None,
                   what: str = "cached ONNX export", redo: str = "exporting it again") -> dict | None:
    """The sidecar of a cached ONNX file whose bytes still have the sidecar's ``onnx_sha256``; None when there is
    none, or when the file or sidecar is damaged: then both are removed, with a warning, so they are made again.

    ``check_fields(info)`` raises KeyError, TypeError or ValueError when a field the caller needs is malformed.
    Used for the built-in exports here and for the wrapped user models (``extract/user_onnx.py``).
    """
    if not target.is_file() and not sidecar.is_file():
        return None
    problem = None
    try:
        info = json.loads(sidecar.read_text(encoding="utf-8"))
        recorded = info["onnx_sha256"]
        if not isinstance(recorded, str):
            raise TypeError(f"onnx_sha256 is {recorded!r}")
        check_fields(info)
        if not target.is_file():
            problem = "the ONNX file is missing"
        elif sha256_file(target) != recorded:
            problem = f"its sha256 differs from the {recorded[:16]}... recorded in {sidecar.name}"
    except (OSError, ValueError, KeyError, TypeError) as exc:
        problem = f"its sidecar {sidecar.name} is unreadable ({exc})"
    if problem is None:
        return info
    log.warning("%s %s is damaged (%s); %s", what, target, problem, redo)
    for stale in (target, sidecar):
        stale.unlink(missing_ok=True)
    return None


def get_onnx_backbone(config: BackboneConfig, input_size: int, source: WeightsSource, cache_dir: str | Path,
                      opset: int = DEFAULT_OPSET, lock_timeout: float = DEFAULT_LOCK_TIMEOUT) -> OnnxBackbone:
    """The cached ONNX file for these weights and size, verified by its sha256; exported and checked first
    if it is missing or damaged."""
    if config.is_user_onnx:  # a user's own ONNX model, wrapped and validated at registration (user_onnx.py)
        return config.onnx_backbone(input_size)
    target = onnx_cache_path(Path(cache_dir), config, input_size, source.sha256, opset)
    sidecar = target.with_suffix(".json")
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        with file_lock(target, lock_timeout):
            remove_leftovers(target)                 # left by a killed export
            remove_leftovers(sidecar)
            info = _verified(target, sidecar)
            if info is not None:
                return OnnxBackbone(config, input_size, target, info["onnx_sha256"], source.sha256, opset,
                                    float(info["max_relative_error"]), info.get("export_peak_rss_mb"))
            return _export_and_record(config, input_size, source, target, sidecar, opset)
    except OSError as exc:
        if is_no_space(exc):
            raise no_space_error(target.parent, 4 * config.feature_dim * 1024 + (1 << 20)) from None
        if isinstance(exc, (PermissionError, FileExistsError, NotADirectoryError)) or exc.errno == errno.EROFS:
            raise CxrError(f"`cache_dir`: cannot write the ONNX export to {target.parent} "
                           f"({exc.strerror or exc}); give a writable folder with `cache_dir`") from None
        raise


def _export_and_record(config: BackboneConfig, input_size: int, source: WeightsSource, target: Path,
                       sidecar: Path, opset: int) -> OnnxBackbone:
    log.info("exporting %s (%d px, weights %s) to ONNX", config.name, input_size, source.describe())
    started = time.perf_counter()
    error, peak_mb = _export(config, input_size, source, target, opset)
    onnx_sha = sha256_file(target)
    write_json(sidecar, {"backbone": config.name, "input_size": input_size, "opset": opset,
                         "weights_sha256": source.sha256, "weights": source.describe(), "onnx_sha256": onnx_sha,
                         "max_relative_error": error, "export_seconds": round(time.perf_counter() - started, 1),
                         "export_peak_rss_mb": peak_mb, "created": now_iso(), "versions": library_versions()})
    log.info("exported %s: max relative error vs Keras %.2e, peak memory %s MB", config.name, error, peak_mb)
    return OnnxBackbone(config, input_size, target, onnx_sha, source.sha256, opset, error, peak_mb)
