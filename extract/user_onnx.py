"""Your own ONNX image model as a backbone: ``--backbone onnx:PATH``.

Any ONNX model with one rank-4 image input (NCHW or NHWC, 1 or 3 channels) whose output is a feature map
(globally average-pooled here) or a vector. The file is wrapped once into a graph that takes what every
built-in export takes, raw RGB pixels float32 (N, size, size, 3) in [0, 255], and returns (N, dim):

    pixels -> channels (RGB->BGR for caffe, the mean of R, G, B for --channels 1) -> (x - mean) / std
           -> NCHW if the model wants it -> your model -> global average pool of a feature map -> (N, dim)

so the runner, caches, compare, audit and predict use it unchanged. Preprocessing modes (Keras'
``preprocess_input`` conventions): caffe (BGR, ImageNet mean subtracted), tf ([-1, 1]), torch ([0, 1] then
the ImageNet mean/std), none (raw [0, 255]); or ``--mean/--std`` in the [0, 1] scale (torchvision's
Normalize). With one channel, per-channel constants are averaged.

At load the model is validated: one image input of rank 4 with a channel axis of the size given, its size
(a fixed input size must equal ``--input-size``), an output of rank 2 or 4, and a finite forward pass on a
random batch; each failure is one ``CxrError`` line. The wrapped file is cached in ``<cache>/onnx/`` by the
model file's sha256 and the preprocessing, like the built-in exports; a sidecar JSON records both.
Registered models are named ``onnx-<file stem>-<channels>ch-<preprocessing>`` (file-name safe) for the rest of
the process; ``backbones`` lists those whose wrapped file is in the cache.
"""
from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from cxr_transfer.core.cache_keys import model_key
from cxr_transfer.core.errors import CxrError
from cxr_transfer.core.hashing import sha256_file
from cxr_transfer.core.record import now_iso, write_json
from cxr_transfer.extract.registry import BackboneConfig

PREFIX = "onnx:"
NAME_PREFIX = "onnx-"
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

_REGISTERED: dict[str, "UserOnnxConfig"] = {}


@dataclass(frozen=True)
class InputSpec:
    """How pixels are fed to the model: channels, preprocessing mode, or explicit mean/std ([0, 1] scale)."""

    channels: int = 3
    preprocess: str = "none"
    mean: tuple[float, ...] | None = None
    std: tuple[float, ...] | None = None

    def __post_init__(self) -> None:
        if self.channels not in (1, 3):
            raise CxrError(f"--channels takes 1 or 3; got {self.channels} instead")
        if self.preprocess not in PREPROCESS_MODES:
            raise CxrError(f"--preprocess takes one of {', '.join(PREPROCESS_MODES)}; got '{self.preprocess}' instead")
        if (self.mean is None) != (self.std is None):
            raise CxrError("give --mean and --std together")
        for name, values in (("mean", self.mean), ("std", self.std)):
            if values is not None and len(values) not in (1, self.channels):
                raise CxrError(f"--{name} takes 1 or {self.channels} values (one per channel); got {len(values)}")
        if self.std is not None and any(v <= 0 for v in self.std):
            raise CxrError(f"--std values must be > 0; got {','.join(map(str, self.std))}")

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

    @property
    def is_user_onnx(self) -> bool:
        return True

    @property
    def preprocessing_description(self) -> str:
        return f"user ONNX {self.source_path.name}: {self.spec.describe()}"

    def input_size(self, override: int | None = None) -> int:
        if self.fixed_size is not None and override is not None and override != self.fixed_size:
            raise CxrError(f"{self.source_path}: the model's input is {self.fixed_size}x{self.fixed_size}; got "
                           f"--input-size {override} instead")
        return self.fixed_size or override or self.default_input_size


def is_user_onnx(spec: str) -> bool:
    """True for ``onnx:PATH`` backbone specs."""
    return spec.strip().lower().startswith(PREFIX)


def registered(name: str) -> UserOnnxConfig | None:
    """The config registered under ``name`` in this process, if any."""
    return _REGISTERED.get(name)


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
    raise CxrError(f"{path}: the model's input shape {dims} has no channel axis of size {channels} (--channels)")


def _fixed_size(dims: list[int | None], layout: str, path: Path) -> int | None:
    height, width = (dims[2], dims[3]) if layout == "NCHW" else (dims[1], dims[2])
    if height is None and width is None:
        return None
    if height != width or height is None:
        raise CxrError(f"{path}: the model's input is {height}x{width}; a square input is expected")
    return int(height)


def _wrap(path: Path, spec: InputSpec, target: Path) -> dict[str, object]:
    """Write the wrapped model (module docstring) to ``target``; returns facts about the original."""
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
    out_dims = _dims(graph.output[0])
    if len(out_dims) not in (2, 4):
        raise CxrError(f"{path}: the output has rank {len(out_dims)} (shape {out_dims}); a feature map "
                       f"(rank 4) or a vector (rank 2) is expected")

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
    if len(out_dims) == 4:
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
    tmp = target.with_name(target.name + ".tmp")
    onnx.save(model, str(tmp))
    return {"layout": layout, "fixed_size": fixed, "input_shape": dims, "output_shape": out_dims, "opset": opset,
            "tmp": tmp}


def _check_forward(path: Path, wrapped: Path, size: int) -> int:
    """Run the wrapped model on a random batch of 2; its feature dimension, or a one-line CxrError."""
    import onnxruntime as ort

    try:
        session = ort.InferenceSession(str(wrapped), providers=["CPUExecutionProvider"])
        batch = np.random.default_rng(0).uniform(0, 255, size=(2, size, size, 3)).astype(np.float32)
        result = session.run(None, {session.get_inputs()[0].name: batch})[0]
    except Exception as exc:  # noqa: BLE001 - onnxruntime raises its own types; the first line says why
        first = str(exc).strip().splitlines()[0][:200] if str(exc).strip() else type(exc).__name__
        raise CxrError(f"{path}: the model does not run on a {size}x{size} input ({first})") from exc
    if result.ndim != 2 or result.shape[0] != 2:
        raise CxrError(f"{path}: a batch of 2 gave an output of shape {result.shape}; (2, dim) is expected")
    if not np.all(np.isfinite(result)):
        raise CxrError(f"{path}: the forward pass on a random batch gave non-finite values")
    return int(result.shape[1])


def _safe_stem(path: Path) -> str:
    return re.sub(r"[^a-z0-9_.]+", "_", path.stem.lower()).strip("_.")[:40] or "model"


def register_user_onnx(path: str | Path, spec: InputSpec | None = None, input_size: int | None = None,
                       cache_dir: str | Path = "features") -> UserOnnxConfig:
    """Validate ``path`` (module docstring), wrap and cache it, and register it for this process.

    Returns the config; its ``name`` is what the rest of the library (get_backbone, caches) uses.
    """
    spec = spec or InputSpec()
    path = Path(path).expanduser()
    if not path.is_file():
        raise CxrError(f"{path}: no such ONNX file")
    path = path.resolve()
    sha = sha256_file(path)
    name = f"{NAME_PREFIX}{_safe_stem(path)}-{spec.tag}"
    folder = Path(cache_dir) / "onnx"
    key = model_key(name, input_size or 0, sha)
    target = folder / f"{key}.onnx"
    sidecar = target.with_suffix(".json")
    if target.is_file() and sidecar.is_file():
        info = json.loads(sidecar.read_text())
    else:
        folder.mkdir(parents=True, exist_ok=True)
        facts = _wrap(path, spec, target)
        tmp = facts.pop("tmp")
        fixed = facts["fixed_size"]
        if fixed is not None and input_size is not None and input_size != fixed:
            tmp.unlink(missing_ok=True)
            raise CxrError(f"{path}: the model's input is {fixed}x{fixed}; got --input-size {input_size} instead")
        check_size = fixed or input_size or DEFAULT_SIZE
        try:
            dim = _check_forward(path, tmp, check_size)
        except CxrError:
            tmp.unlink(missing_ok=True)
            raise
        tmp.replace(target)
        info = {"kind": "user-onnx", "name": name, "source": str(path), "source_sha256": sha,
                "input": spec.describe(), "channels": spec.channels, "preprocess": spec.preprocess,
                "mean": spec.mean, "std": spec.std, **facts, "default_input_size": check_size,
                "feature_dim": dim, "onnx_sha256": sha256_file(target), "created": now_iso()}
        write_json(sidecar, info)
    fixed = info["fixed_size"]
    config = UserOnnxConfig(name=name, keras_factory="", keras_module="", preprocessing=spec.tag,
                            default_input_size=int(info["default_input_size"]), feature_dim=int(info["feature_dim"]),
                            min_input_size=int(fixed or 1), keras_weights_file="", source_path=path,
                            source_sha256=sha, wrapped_path=target, spec=spec, fixed_size=fixed)
    _REGISTERED[name] = config
    return config


def wrapped_sha256(config: UserOnnxConfig) -> str:
    """The sha256 of the wrapped file (from its sidecar)."""
    return str(json.loads(config.wrapped_path.with_suffix(".json").read_text())["onnx_sha256"])


def resolve_backbone_spec(spec: str, input_spec: InputSpec | None = None, input_size: int | None = None,
                          cache_dir: str | Path = "features") -> str:
    """A comma list of backbones with every ``onnx:PATH`` registered and replaced by its registered name."""
    names = []
    for item in spec.split(","):
        item = item.strip()
        names.append(register_user_onnx(item[len(PREFIX):], input_spec, input_size, cache_dir).name
                     if is_user_onnx(item) else item)
    return ",".join(names)


def cached_user_models(cache_dir: str | Path) -> list[dict]:
    """Sidecars of the user ONNX models wrapped in ``cache_dir`` (for ``backbones``)."""
    folder = Path(cache_dir) / "onnx"
    found = []
    for sidecar in sorted(folder.glob(f"{NAME_PREFIX}*.json")) if folder.is_dir() else []:
        try:
            info = json.loads(sidecar.read_text())
        except (OSError, ValueError):
            continue
        if info.get("kind") == "user-onnx":
            found.append(info)
    return found


def user_onnx_backbone(config: UserOnnxConfig, input_size: int):
    """The wrapped file as an ``OnnxBackbone`` (what the runner and caches use for the built-in exports)."""
    from cxr_transfer.extract.onnx_export import OnnxBackbone

    opset = int(json.loads(config.wrapped_path.with_suffix(".json").read_text()).get("opset", 0))
    return OnnxBackbone(config, config.input_size(input_size), config.wrapped_path, wrapped_sha256(config),
                        config.source_sha256, opset, 0.0)
