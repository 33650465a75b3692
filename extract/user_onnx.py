"""Your own ONNX image model as a backbone: ``register_onnx_backbone(path, spec)``, ``--backbone onnx:PATH``.

Any ONNX model with one rank-4 image input (NCHW or NHWC, 1 or 3 channels) whose output is a feature map
(globally average-pooled here) or a vector. The file is wrapped once into a graph that takes what every
built-in export takes, raw RGB pixels float32 (N, size, size, 3) in [0, 255], and returns (N, dim):

    pixels -> channels (RGB->BGR for caffe, the mean of R, G, B for --channels 1) -> (x - mean) / std
           -> NCHW if the model wants it -> your model -> global average pool of a feature map -> (N, dim)

so the runner, caches, compare, audit and predict use it unchanged. Preprocessing modes (Keras'
``preprocess_input`` conventions): caffe (BGR, ImageNet mean subtracted), tf ([-1, 1]), torch ([0, 1] then
the ImageNet mean/std), none (raw [0, 255]); or ``--mean/--std`` in the [0, 1] scale (torchvision's
Normalize). With one channel, per-channel constants are averaged.

Registration (``register_onnx_backbone``, explicit, like timm's ``register_model``) validates the model: one
image input of rank 4 with a channel axis of the size given, its size (a fixed input size must equal
``--input-size``), an output of rank 2 or 4, and a finite forward pass on a random batch; each failure is one
``CxrError`` line (an output without shape information gets its rank from that forward pass; of several outputs
the first is used, with a warning). The wrapped file is cached in ``<cache>/onnx/`` by the model file's sha256
and the preprocessing, like the built-in exports; a sidecar JSON records both and the wrap's sha256, checked on
every use (``onnx_export.verified_cache``): a damaged wrap is wrapped again from the model file. The model joins
this process's registry (``registry.register_backbone``) as ``onnx-<file stem>-<channels>ch-<preprocessing>``
(file-name safe), the name ``get_backbone`` finds it by. The sidecar is the persisted registration: a later
process registers the name again with ``register_cached_onnx_backbone``; ``backbones`` lists them. A saved head
records the file and settings (``saved_record``) so that another process registers it again
(``backbone_for_saved``).
"""
from __future__ import annotations

import hashlib
import json
import logging
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from cxr_transfer.core.cache_keys import model_key
from cxr_transfer.core.errors import CxrError
from cxr_transfer.core.hashing import sha256_file
from cxr_transfer.core.io import atomic_path, remove_leftovers
from cxr_transfer.core.locking import DEFAULT_LOCK_TIMEOUT, file_lock
from cxr_transfer.core.params import Options, check_params, param
from cxr_transfer.core.record import now_iso, write_json
from cxr_transfer.core.settings import DEFAULT_CACHE_DIR
from cxr_transfer.extract.onnx_export import OnnxBackbone, verified_cache
from cxr_transfer.extract.registry import (
    USER_ONNX_NAME_PREFIX,
    BackboneConfig,
    get_backbone,
    register_backbone,
    registered_backbones,
)
from cxr_transfer.extract.runtime import open_session

log = logging.getLogger(__name__)

PREPROCESS_MODES = ("caffe", "tf", "torch", "none")
DEFAULT_SIZE = 224
MIN_OPSET = 7
_WRAPPED_INPUT = "cxr_pixels"
_WRAPPED_OUTPUT = "cxr_embedding"

# (mean, std) per channel in the [0, 255] pixel scale, in the model's channel order.
_MODES: dict[str, tuple[tuple[float, ...], tuple[float, ...]]] = {
    "caffe": ((103.939, 116.779, 123.68), (1.0, 1.0, 1.0)),
    "tf": ((127.5,) * 3, (127.5,) * 3),
    "torch": (tuple(255 * m for m in (0.485, 0.456, 0.406)), tuple(255 * s for s in (0.229, 0.224, 0.225))),
    "none": ((0.0,) * 3, (1.0,) * 3),
}


@dataclass(frozen=True)
class InputSpec:
    """How pixels are fed to the model: channels, preprocessing mode, or explicit mean/std ([0, 1] scale)."""

    channels: int = param(3, Options((1, 3)), "image channels the model takes")
    preprocess: str = param("none", Options(PREPROCESS_MODES),
                            "pixel normalisation (Keras preprocess_input modes; none: raw 0-255)")
    mean: tuple[float, ...] | None = param(None, help="per-channel mean in [0, 1] (with std)")
    std: tuple[float, ...] | None = param(None, help="per-channel std in [0, 1] (with mean)")

    def __post_init__(self) -> None:
        check_params(self)
        if (self.mean is None) != (self.std is None):
            raise CxrError("give `mean` and `std` together")
        for name, values in (("mean", self.mean), ("std", self.std)):
            if values is not None and len(values) not in (1, self.channels):
                raise CxrError(f"{name} takes 1 or {self.channels} values (one per channel); got {len(values)}",
                               param=name)
        if self.std is not None and any(v <= 0 for v in self.std):
            raise CxrError(f"`std` values must be > 0; got {','.join(map(str, self.std))}")

    @property
    def tag(self) -> str:
        """Short, file-name safe: ``3ch-torch`` or ``1ch-ms<hash>`` for explicit mean/std."""
        if self.mean is not None:
            text = ",".join(f"{v:g}" for v in self.mean) + "/" + ",".join(f"{v:g}" for v in self.std or ())
            return f"{self.channels}ch-ms{hashlib.sha256(text.encode()).hexdigest()[:8]}"
        return f"{self.channels}ch-{self.preprocess}"

    def describe(self) -> str:
        if self.mean is not None:
            return f"{self.channels} channel(s), (x/255 - mean {list(self.mean)}) / std {list(self.std or ())}"
        return f"{self.channels} channel(s), {self.preprocess} preprocessing"

    def constants(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(matrix 3 x channels from RGB pixels, mean, std) in the [0, 255] scale."""
        if self.mean is not None:
            mean = np.resize(np.array(self.mean, np.float32) * 255, self.channels)
            std = np.resize(np.array(self.std, np.float32) * 255, self.channels)
        else:
            mean3, std3 = (np.array(v, np.float32) for v in _MODES[self.preprocess])
            mean = mean3 if self.channels == 3 else mean3.mean(keepdims=True)
            std = std3 if self.channels == 3 else std3.mean(keepdims=True)
        if self.channels == 1:
            matrix = np.full((3, 1), 1 / 3, np.float32)
        elif self.preprocess == "caffe" and self.mean is None:
            matrix = np.eye(3, dtype=np.float32)[:, ::-1].copy()   # RGB -> BGR
        else:
            matrix = np.eye(3, dtype=np.float32)
        return matrix, mean.astype(np.float32), std.astype(np.float32)


@dataclass(frozen=True)
class UserOnnxConfig(BackboneConfig):
    """A registry entry for a user ONNX model: the registry's fields plus the file and how it is fed."""

    source_path: Path = Path()
    source_sha256: str = ""
    wrapped_path: Path = Path()
    spec: InputSpec = InputSpec()
    fixed_size: int | None = None
    requested_size: int | None = None   # the input_size it was registered with (part of the cache key)

    @property
    def is_user_onnx(self) -> bool:
        return True

    @property
    def preprocessing_description(self) -> str:
        return f"user ONNX {self.source_path.name}: {self.spec.describe()}"

    def input_size(self, override: int | None = None) -> int:
        if self.fixed_size is not None and override is not None and override != self.fixed_size:
            raise CxrError(f"{self.source_path}: the model's input is {self.fixed_size}x{self.fixed_size}; got "
                           f"`input_size` {override} instead")
        return self.fixed_size or override or self.default_input_size

    def onnx_backbone(self, input_size: int | None) -> OnnxBackbone:
        """The wrapped file as an ``OnnxBackbone`` (what the runner and caches use for the built-in exports),
        after checking it against its sha256 (``verified_wrap``); ``onnx_export.get_onnx_backbone`` calls this."""
        info = verified_wrap(self)   # checked on every use, like the built-in exports
        return OnnxBackbone(self, self.input_size(input_size), self.wrapped_path, str(info["onnx_sha256"]),
                            self.source_sha256, int(info["opset"]), 0.0)


def _dims(value_info) -> list[int | None]:
    return [d.dim_value if d.HasField("dim_value") else None for d in value_info.type.tensor_type.shape.dim]


def _layout(dims: list[int | None], channels: int, path: Path) -> str:
    if len(dims) != 4:
        raise CxrError(f"{path}: the model's input has rank {len(dims)} (shape {dims}); an image model with a "
                       f"rank-4 input (N, C, H, W) or (N, H, W, C) is expected")
    if dims[1] == channels:
        return "NCHW"
    if dims[3] == channels:
        return "NHWC"
    if dims[1] is None and dims[3] is None:
        return "NCHW"
    raise CxrError(f"{path}: the model's input shape {dims} has no channel axis of size {channels} (`channels`)")


def _fixed_size(dims: list[int | None], layout: str, path: Path) -> int | None:
    height, width = (dims[2], dims[3]) if layout == "NCHW" else (dims[1], dims[2])
    if height is None and width is None:
        return None
    if height != width or height is None:
        raise CxrError(f"{path}: the model's input is {height}x{width}; a square input is expected")
    return int(height)


def _output_rank(model, path: Path, layout: str, channels: int, size: int) -> int:
    """The rank of the first output of a model whose output has no shape information: a forward pass on a random
    batch of 2 at ``size`` px tells it (one ``CxrError`` line when the model does not run)."""
    shape = (2, channels, size, size) if layout == "NCHW" else (2, size, size, channels)
    result = _run_random_batch(path, model.SerializeToString(), shape, 1.0, size, model.graph.output[0].name)
    return int(np.ndim(result))


def _run_random_batch(path: Path, model: str | bytes, shape: tuple[int, ...], high: float, size: int,
                      output: str | None = None) -> np.ndarray:
    """Run ``model`` (a file name or serialized bytes) on a random batch of ``shape`` with values in [0, high):
    its first output (or the one named ``output``); one ``CxrError`` line naming ``path`` when it does not run."""
    try:
        session = open_session(model)
        batch = np.random.default_rng(0).uniform(0, high, size=shape).astype(np.float32)
        return session.run(None if output is None else [output], {session.get_inputs()[0].name: batch})[0]
    except Exception as exc:  # noqa: BLE001 - onnxruntime raises its own types; the first line says why
        first = str(exc).strip().splitlines()[0][:200] if str(exc).strip() else type(exc).__name__
        raise CxrError(f"{path}: the model does not run on a {size}x{size} input ({first})") from exc


def _wrap(path: Path, spec: InputSpec, target: Path, input_size: int | None = None) -> dict[str, object]:
    """Write the wrapped model (module docstring) to ``target``; returns facts about the original.

    An output without shape information gets its rank from a forward pass at ``input_size`` (or the model's fixed
    size, or ``DEFAULT_SIZE``). Of several outputs the first is used (the others are recorded in
    ``ignored_outputs``, and registration warns)."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    try:
        model = onnx.load(str(path))
    except Exception as exc:  # noqa: BLE001 - any parse failure is the user's file
        raise CxrError(f"{path}: not a readable ONNX model ({type(exc).__name__})") from exc
    graph = model.graph
    initializers = {i.name for i in graph.initializer}
    inputs = [i for i in graph.input if i.name not in initializers]
    if len(inputs) != 1 or len(graph.output) < 1:
        raise CxrError(f"{path}: the model has {len(inputs)} inputs and {len(graph.output)} outputs; one image "
                       f"input and an output are expected")
    opset = max((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), default=0)
    if opset < MIN_OPSET:
        raise CxrError(f"{path}: opset {opset} is below {MIN_OPSET}; re-export the model with a newer opset")
    image = inputs[0]
    if image.type.tensor_type.elem_type != TensorProto.FLOAT:
        raise CxrError(f"{path}: the input is of type {TensorProto.DataType.Name(image.type.tensor_type.elem_type)}; "
                       f"float32 is expected")
    dims = _dims(image)
    layout = _layout(dims, spec.channels, path)
    if dims[0] not in (None, 0):
        raise CxrError(f"{path}: the model's batch size is fixed to {dims[0]}; export it with a dynamic batch axis")
    fixed = _fixed_size(dims, layout, path)
    if graph.output[0].type.tensor_type.HasField("shape"):
        out_dims = _dims(graph.output[0])
        rank = len(out_dims)
    else:   # no shape information: the rank is unknown, not 0
        out_dims = None
        rank = _output_rank(model, path, layout, spec.channels, fixed or input_size or DEFAULT_SIZE)
    if rank not in (2, 4):
        shown = f"shape {out_dims}" if out_dims is not None else "found by a forward pass"
        raise CxrError(f"{path}: the output has rank {rank} ({shown}); a feature map "
                       f"(rank 4) or a vector (rank 2) is expected")
    outputs = [o.name for o in graph.output]

    matrix, mean, std = spec.constants()
    graph.initializer.extend([numpy_helper.from_array(matrix, "cxr_pre_matrix"),
                              numpy_helper.from_array(mean, "cxr_pre_mean"),
                              numpy_helper.from_array(std, "cxr_pre_std")])
    pre = [helper.make_node("MatMul", [_WRAPPED_INPUT, "cxr_pre_matrix"], ["cxr_pre_channels"]),
           helper.make_node("Sub", ["cxr_pre_channels", "cxr_pre_mean"], ["cxr_pre_centered"]),
           helper.make_node("Div", ["cxr_pre_centered", "cxr_pre_std"],
                            ["cxr_pre_nhwc" if layout == "NCHW" else image.name])]
    if layout == "NCHW":
        pre.append(helper.make_node("Transpose", ["cxr_pre_nhwc"], [image.name], perm=[0, 3, 1, 2]))
    output = graph.output[0].name
    if rank == 4:
        # The output feature map has the input's layout (NCHW models keep channels first).
        post = []
        pooled_input = output
        if layout == "NHWC":
            post.append(helper.make_node("Transpose", [output], ["cxr_post_nchw"], perm=[0, 3, 1, 2]))
            pooled_input = "cxr_post_nchw"
        post += [helper.make_node("GlobalAveragePool", [pooled_input], ["cxr_post_pooled"]),
                 helper.make_node("Flatten", ["cxr_post_pooled"], [_WRAPPED_OUTPUT], axis=1)]
    else:
        post = [helper.make_node("Flatten", [output], [_WRAPPED_OUTPUT], axis=1)]
    nodes = pre + list(graph.node) + post
    del graph.node[:]
    graph.node.extend(nodes)
    size_dim = fixed if fixed is not None else "size"
    graph.input.remove(image)
    graph.input.insert(0, helper.make_tensor_value_info(_WRAPPED_INPUT, TensorProto.FLOAT,
                                                        ["batch", size_dim, size_dim, 3]))
    del graph.output[:]
    graph.output.extend([helper.make_tensor_value_info(_WRAPPED_OUTPUT, TensorProto.FLOAT, ["batch", "dim"])])
    onnx.save(model, str(target))
    return {"layout": layout, "fixed_size": fixed, "input_shape": dims, "output_shape": out_dims,
            "output_rank": rank, "output": outputs[0], "ignored_outputs": outputs[1:], "opset": opset}


def _check_forward(path: Path, wrapped: Path, size: int) -> int:
    """Run the wrapped model on a random batch of 2; its feature dimension, or a one-line CxrError."""
    result = _run_random_batch(path, str(wrapped), (2, size, size, 3), 255.0, size)
    if result.ndim != 2 or result.shape[0] != 2:
        raise CxrError(f"{path}: a batch of 2 gave an output of shape {result.shape}; (2, dim) is expected")
    if not np.all(np.isfinite(result)):
        raise CxrError(f"{path}: the forward pass on a random batch gave non-finite values")
    return int(result.shape[1])


def _safe_stem(path: Path) -> str:
    return re.sub(r"[^a-z0-9_.]+", "_", path.stem.lower()).strip("_.")[:40] or "model"


def _check_sidecar_fields(info: dict) -> None:
    """Raises KeyError, TypeError or ValueError when a wrapped model's sidecar lacks what registration reads."""
    if info.get("kind") != "user-onnx":
        raise ValueError(f"kind is {info.get('kind')!r}, not 'user-onnx'")
    for key in ("feature_dim", "default_input_size", "opset"):
        int(info[key])
    if info["fixed_size"] is not None:
        int(info["fixed_size"])


def _wrapped_info(path: Path, sha: str, name: str, spec: InputSpec, input_size: int | None,
                  target: Path) -> dict:
    """The sidecar of the cached wrap at ``target``, verified against its sha256 (``onnx_export.verified_cache``);
    wrapped again from ``path`` first, with a warning, when it is missing, damaged or its sidecar unreadable."""
    sidecar = target.with_suffix(".json")
    checks = dict(check_fields=_check_sidecar_fields, what="cached wrapped ONNX model",
                  redo=f"wrapping it again from {path}")
    info = verified_cache(target, sidecar, **checks)
    if info is not None:
        return info
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        with file_lock(target, DEFAULT_LOCK_TIMEOUT):
            info = verified_cache(target, sidecar, **checks)   # another process may have wrapped it meanwhile
            if info is not None:
                return info
            remove_leftovers(target)                         # left by a killed run
            remove_leftovers(sidecar)
            return _wrap_and_record(path, sha, name, spec, input_size, target)
    except OSError as exc:
        raise CxrError(f"`cache_dir`: cannot write the wrapped ONNX model to {target.parent} "
                       f"({exc.strerror or exc}); give a writable folder with `cache_dir`") from None


def _wrap_and_record(path: Path, sha: str, name: str, spec: InputSpec, input_size: int | None,
                     target: Path) -> dict:
    """Wrap ``path`` (whose sha256 must still be ``sha``), check a forward pass, write the file and its sidecar."""
    now = sha256_file(path)
    if now != sha:
        raise CxrError(f"{path}: changed since it was registered (sha256 {now[:16]}..., was {sha[:16]}...); "
                       f"run again to use the new file")
    with atomic_path(target) as tmp:
        facts = _wrap(path, spec, tmp, input_size)
        fixed = facts["fixed_size"]
        if fixed is not None and input_size is not None and input_size != fixed:
            raise CxrError(f"{path}: the model's input is {fixed}x{fixed}; got `input_size` {input_size} instead")
        check_size = fixed or input_size or DEFAULT_SIZE
        dim = _check_forward(path, tmp, check_size)
    info = {"kind": "user-onnx", "name": name, "source": str(path), "source_sha256": sha,
            "input": spec.describe(), "channels": spec.channels, "preprocess": spec.preprocess,
            "mean": spec.mean, "std": spec.std, "input_size": input_size, **facts,
            "default_input_size": check_size, "feature_dim": dim, "onnx_sha256": sha256_file(target),
            "created": now_iso()}
    try:
        write_json(target.with_suffix(".json"), info)
    except OSError:
        target.unlink(missing_ok=True)   # a wrap without its sidecar would be removed as damaged anyway
        raise
    return info


def register_onnx_backbone(path: str | Path, spec: InputSpec, input_size: int | None = None,
                           cache_dir: str | Path = DEFAULT_CACHE_DIR) -> str:
    """Validate the ONNX model ``path`` (module docstring), wrap it once into ``cache_dir/onnx/`` and register it
    in this process; returns the name ``get_backbone`` and the rest of the library know it by.

    The wrap's sidecar is the persisted registration: a later process registers the name again with
    ``register_cached_onnx_backbone``. A cached wrap is used only when its sha256 matches its sidecar's;
    otherwise it is wrapped again from ``path``.
    """
    if not isinstance(spec, InputSpec):
        raise TypeError(f"spec must be an InputSpec, got {type(spec).__name__} instead")
    path = Path(path).expanduser()
    if not path.is_file():
        raise CxrError(f"{path}: no such ONNX file")
    if path.stat().st_size == 0:
        raise CxrError(f"{path}: empty file (0 bytes), not an ONNX model")
    path = path.resolve()
    return _register(path, sha256_file(path), spec, input_size, cache_dir).name


def _register(path: Path, sha: str, spec: InputSpec, input_size: int | None, cache_dir: str | Path) -> UserOnnxConfig:
    """``register_onnx_backbone`` of the resolved file ``path`` whose sha256 the caller has just computed."""
    name = f"{USER_ONNX_NAME_PREFIX}{_safe_stem(path)}-{spec.tag}"
    target = Path(cache_dir) / "onnx" / f"{model_key(name, input_size or 0, sha)}.onnx"
    info = _wrapped_info(path, sha, name, spec, input_size, target)
    if info.get("ignored_outputs"):
        log.warning("%s has %d outputs; using the first, %r, as the embedding (ignored: %s)", path,
                    1 + len(info["ignored_outputs"]), info.get("output"),
                    ", ".join(repr(o) for o in info["ignored_outputs"]))
    config = _config(name, info, path, sha, spec, input_size, target)
    register_backbone(config)
    return config


def _config(name: str, info: dict, path: Path, sha: str, spec: InputSpec, input_size: int | None,
            target: Path) -> UserOnnxConfig:
    """The registry entry ``name`` of the wrap ``target`` whose sidecar is ``info``."""
    fixed = info["fixed_size"]
    return UserOnnxConfig(name=name, keras_factory="", keras_module="", preprocessing=spec.tag,
                          default_input_size=int(info["default_input_size"]), feature_dim=int(info["feature_dim"]),
                          min_input_size=int(fixed or 1), keras_weights_file="", source_path=path,
                          source_sha256=sha, wrapped_path=target, spec=spec,
                          fixed_size=None if fixed is None else int(fixed), requested_size=input_size)


def verified_wrap(config: UserOnnxConfig) -> dict:
    """The sidecar of ``config``'s wrapped file after checking the file against its sha256; a missing or damaged
    wrap (or sidecar) is wrapped again from the source file, with a warning, never used."""
    return _wrapped_info(config.source_path, config.source_sha256, config.name, config.spec, config.requested_size,
                         config.wrapped_path)


def _registrations(cache_dir: str | Path) -> list[tuple[Path, dict]]:
    """(wrapped file, sidecar) of every user ONNX model registered with ``cache_dir``: the sidecars in its onnx/
    folder (unreadable ones are left out; registering the file again rewrites them)."""
    folder = Path(cache_dir) / "onnx"
    found = []
    for sidecar in sorted(folder.glob(f"{USER_ONNX_NAME_PREFIX}*.json")) if folder.is_dir() else []:
        try:
            info = json.loads(sidecar.read_text())
        except (OSError, ValueError):
            continue
        if isinstance(info, dict) and info.get("kind") == "user-onnx":
            found.append((sidecar.with_suffix(".onnx"), info))
    return found


def cached_user_models(cache_dir: str | Path) -> list[dict]:
    """Sidecars of the user ONNX models wrapped in ``cache_dir`` (for ``backbones``)."""
    return [info for _, info in _registrations(cache_dir)]


def register_cached_onnx_backbone(name: str, cache_dir: str | Path = DEFAULT_CACHE_DIR) -> str:
    """Register in this process the user ONNX model that an earlier one registered as ``name`` with ``cache_dir``
    (``register_onnx_backbone``: its wrap's sidecar in ``cache_dir/onnx/`` is the registration); returns ``name``.

    Reads only: the model file must still have the sha256 it was registered with, and the wrap is checked when
    used. One ``CxrError`` line when no such registration is found, or when several are (the same name for
    another file or input size): then register the one meant with ``register_onnx_backbone``.
    """
    found = [(target, info) for target, info in _registrations(cache_dir) if info.get("name") == name]
    hashes: dict[str, str | None] = {}
    current = []
    for target, info in found:
        source = str(info.get("source", ""))
        if source not in hashes:
            hashes[source] = sha256_file(source) if source and Path(source).is_file() else None
        if hashes[source] is not None and hashes[source] == info.get("source_sha256"):
            current.append((target, info))
    again = "register the file with register_onnx_backbone(path, spec, input_size, cache_dir)"
    if not current:
        if found:
            raise CxrError(f"backbone {name} was registered from {found[0][1].get('source')}, which is missing or has "
                           f"changed since; {again}", param="backbone")
        raise CxrError(f"backbone {name} is not registered in {Path(cache_dir) / 'onnx'}; {again}", param="backbone")
    if len(current) > 1:
        which = "; ".join(f"{i['source']} at input size {i.get('input_size')}" for _, i in current)
        raise CxrError(f"backbone {name} names {len(current)} registrations in {Path(cache_dir) / 'onnx'} ({which}); "
                       f"{again} for the one you mean", param="backbone")
    target, info = current[0]
    try:
        spec = InputSpec(int(info["channels"]), str(info["preprocess"]), _floats(info["mean"]), _floats(info["std"]))
        size = None if info["input_size"] is None else int(info["input_size"])
        config = _config(name, info, Path(str(info["source"])), str(info["source_sha256"]), spec, size, target)
    except (KeyError, TypeError, ValueError) as exc:
        raise CxrError(f"backbone {name}: its registration {target.with_suffix('.json')} is malformed "
                       f"({type(exc).__name__}: {exc}); {again}", param="backbone") from None
    return register_backbone(config)


def _floats(values: list | None) -> tuple[float, ...] | None:
    """A recorded mean or std (a list of numbers, or None) as InputSpec takes it."""
    return None if values is None else tuple(float(v) for v in values)


def saved_record(name: str) -> dict | None:
    """For a saved head: how to register the user ONNX model ``name`` again in another process (its source file,
    that file's sha256, and the wrap settings); None when ``name`` is not a user model registered here."""
    config = registered_backbones().get(name)
    if not isinstance(config, UserOnnxConfig):
        return None
    spec = config.spec
    return {"source": str(config.source_path), "source_sha256": config.source_sha256, "channels": spec.channels,
            "preprocess": spec.preprocess, "mean": list(spec.mean) if spec.mean is not None else None,
            "std": list(spec.std) if spec.std is not None else None, "input_size": config.requested_size}


def backbone_for_saved(part: dict, cache_dir: str | Path = DEFAULT_CACHE_DIR) -> BackboneConfig:
    """The backbone one part of a saved head names (``part["backbone"]``).

    A user ONNX model is registered (``register_onnx_backbone``) from the head's record (``saved_record``) unless
    this process registered it with the same file and settings: from a file registered here with the recorded
    sha256 (``--backbone onnx:PATH``), else from the recorded path when that file still has the recorded sha256;
    otherwise one ``CxrError`` line names the file and sha256 needed and the flag that supplies it.
    """
    name = str(part["backbone"]).strip()
    record = part.get("user_onnx")
    if not name.startswith(USER_ONNX_NAME_PREFIX) or (record is None and name in registered_backbones()):
        return get_backbone(name)
    sha = str(part.get("weights_sha256", ""))
    if not isinstance(record, dict):
        raise CxrError(f"{name} is a user ONNX model and the head's description does not say which file (saved "
                       f"before cxr-transfer recorded it): pass the file with sha256 {sha} with `backbone` "
                       f"onnx:PATH and the `channels`/`preprocess`/`mean`/`std`/`input_size` it was trained with")
    try:
        spec = InputSpec(int(record["channels"]), str(record["preprocess"]), _floats(record["mean"]),
                         _floats(record["std"]))
        size = record["input_size"]
        size = None if size is None else int(size)
        source = Path(str(record["source"]))
        sha = str(record["source_sha256"])
    except (KeyError, TypeError, ValueError) as exc:
        raise CxrError(f"the head's record of the user ONNX model {name} is malformed ({type(exc).__name__}: "
                       f"{exc}); save the head again") from None
    users = [c for c in registered_backbones().values() if isinstance(c, UserOnnxConfig) and c.source_sha256 == sha]
    same = [c for c in users if c.name == name and c.spec == spec and c.requested_size == size]
    if same:
        return same[0]
    if users:   # the file given with --backbone onnx:PATH (wherever it is now), with the recorded settings
        return get_backbone(register_onnx_backbone(users[0].source_path, spec, size, cache_dir))
    now = sha256_file(source) if source.is_file() else None
    if now == sha:   # hashed just now: registered without hashing the file a second time
        return _register(source.resolve(), sha, spec, size, cache_dir)
    problem = "is missing" if now is None else f"has changed since (its sha256 is now {now[:16]}...)"
    raise CxrError(f"the head was trained on the ONNX model {source}, which {problem}; pass the file with sha256 "
                   f"{sha} with `backbone` onnx:PATH")
