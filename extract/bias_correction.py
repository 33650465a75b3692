"""Empirical bias correction of a static int8 (QDQ) model: each quantized convolution's int32 bias is shifted so
that its output's per-channel mean over the int8 sample matches the float32 model's.

Why: uint8 activations are rounded and (with Percentile ranges) clipped at every layer; the clipping and the
ReLUs turn that noise into a per-channel bias that adds up along a deep network. On Xception this took the
held-back min cosine to float32 from 0.989 to 0.992 at unchanged int8 speed (docs/benchmarks.md).
- The layers are corrected one at a time in graph order, each measured after the layers before it were
  corrected: correcting all at once counts the error each layer inherits twice (measured: cosine 0.92 and lower).
- Each layer is measured where the next layers read it, after rounding (and clipping, and the fused ReLU):
  matching the convolution's output before rounding made later layers worse on one variant (docs/benchmarks.md).
  A bias shift moves that clipped mean only through the values inside the uint8 range, so the shift is the mean
  difference divided by that fraction (at least ``MIN_SLOPE``): one step then matches the mean instead of
  halving the difference (Xception: min cosine 0.9917 / 0.9932 on gate / check images, 0.9930 / 0.9915 with the
  undivided shift; without the float32 first convolutions 0.9910 / 0.9928 against 0.9898 / 0.9907).
- The shift is rounded to the int32 bias's own step (input scale x weight scale), so the graph stays pure QDQ
  and runs at the int8 speed.
This is the "empirical bias correction" of Nagel et al., "Data-Free Quantization Through Weight Equalization and
Bias Correction" (ICCV 2019), done on the ONNX graph: onnxruntime.quantization does not offer it.
"""
from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from cxr_transfer.core.settings import INT8_STATISTICS_BATCH

log = logging.getLogger(__name__)

MIN_SLOPE = 0.25
"""Lower bound of the fraction of a channel's values inside the uint8 range, by which its mean shift is divided."""
FLOAT_OUTPUTS_PER_RUN = 16
"""Float32 convolution outputs measured per pass over the images (bounds the memory of one run)."""


@dataclass(frozen=True)
class _Target:
    conv: str            # node name, the same in the float32 and the int8 graph
    int8_output: str
    float_output: str
    bias: str            # int32 initializer read by the bias DequantizeLinear
    bias_scale: str      # its (per-channel) scale initializer
    rounded: tuple[str, str] | None = None   # scale and zero point of the uint8 rounding measured (None: before)


def _targets(int8_model, float_model) -> list[_Target]:
    """The convolutions of ``int8_model`` with a quantized (int32) bias and a same-named float32 twin, each with
    the tensor to measure: its output after rounding to uint8, which is what the next layers read."""
    from onnx import TensorProto

    initializers = {i.name: i for i in int8_model.graph.initializer}
    producer = {out: node for node in int8_model.graph.node for out in node.output}
    readers: dict[str, list] = {}
    for node in int8_model.graph.node:
        for name in node.input:
            readers.setdefault(name, []).append(node)
    float_tensors = {out for node in float_model.graph.node for out in node.output}
    names = Counter(node.name for node in float_model.graph.node)
    # twins are matched by name, so only names that are set and unique in both graphs count
    float_nodes = {node.name: node for node in float_model.graph.node if node.name and names[node.name] == 1}
    int8_names = Counter(node.name for node in int8_model.graph.node)
    targets: list[_Target] = []
    for node in int8_model.graph.node:
        if node.op_type != "Conv" or len(node.input) < 3 or int8_names[node.name] != 1:
            continue
        dequantize = producer.get(node.input[2])
        twin = float_nodes.get(node.name)
        if dequantize is None or dequantize.op_type != "DequantizeLinear" or twin is None \
                or not {dequantize.input[0], dequantize.input[1]} <= initializers.keys() or twin.op_type != "Conv" \
                or any(t.bias == dequantize.input[0] for t in targets):   # a shared bias is corrected once
            continue
        measured, reference, rounded = node.output[0], twin.output[0], None
        if node.output[0] in float_tensors:
            # the output rounded to uint8 (and clipped, and with the ReLU the quantizer fused into the rounding:
            # the conv then writes the ReLU's tensor name), against that float32 tensor
            quantizers = [r for r in readers.get(node.output[0], []) if r.op_type == "QuantizeLinear"]
            dequantizers = [r for q in quantizers for r in readers.get(q.output[0], [])
                            if r.op_type == "DequantizeLinear"]
            rounding = dequantizers[0].input if len(dequantizers) == 1 else []
            if len(rounding) == 3 and {rounding[1], rounding[2]} <= initializers.keys() \
                    and _size(initializers[rounding[1]]) == 1 \
                    and initializers[rounding[2]].data_type == TensorProto.UINT8:
                # per-tensor uint8 rounding (what _quantize writes); anything else is measured before rounding
                measured, reference = dequantizers[0].output[0], node.output[0]
                rounded = (dequantizers[0].input[1], dequantizers[0].input[2])
        targets.append(_Target(node.name, measured, reference, dequantize.input[0], dequantize.input[1], rounded))
    return targets


def _size(tensor) -> int:
    return int(np.prod(tensor.dims)) if tensor.dims else 1


def _with_outputs(model, names: list[str]) -> bytes:
    import onnx

    exposed = onnx.ModelProto()
    exposed.CopyFrom(model)
    present = {o.name for o in exposed.graph.output}
    exposed.graph.output.extend(onnx.helper.make_empty_tensor_value_info(n) for n in names if n not in present)
    return exposed.SerializeToString()


def _channel_means(model, names: list[str], images: np.ndarray, new_session: Callable,
                   inside: tuple[float, float] | None = None) -> list[np.ndarray]:
    """Per-channel means (axis 1, over images and pixels) of the named tensors of ``model`` on ``images``; with
    ``inside`` = (low, high), also the fraction of each channel's values strictly between the two (appended)."""
    session = new_session(_with_outputs(model, names))
    input_name = session.get_inputs()[0].name
    sums: list[np.ndarray] = [np.zeros(0)] * len(names)
    counts = [0] * len(names)
    within: np.ndarray | float = 0.0
    step = INT8_STATISTICS_BATCH        # memory stays at one batch's activations
    for start in range(0, len(images), step):
        outputs = session.run(names, {input_name: images[start:start + step]})
        for k, out in enumerate(outputs):
            axes = (0, *range(2, out.ndim))
            total = out.astype(np.float64).sum(axis=axes)
            sums[k] = total if counts[k] == 0 else sums[k] + total
            counts[k] += out.size // out.shape[1]
            if inside is not None and k == 0:
                within = within + ((out > inside[0]) & (out < inside[1])).sum(axis=axes)
    means = [s / c for s, c in zip(sums, counts)]
    return means + ([np.asarray(within) / counts[0]] if inside is not None else [])


def correct_biases(int8_model, float_model, images: np.ndarray, new_session: Callable) -> int:
    """Shift the int32 biases of ``int8_model`` (an ``onnx.ModelProto``, changed in place) so that each quantized
    convolution's rounded output has the per-channel mean on ``images`` of ``float_model``'s; returns how many
    convolutions were corrected.

    ``new_session(model_bytes)`` returns an onnxruntime session (the caller's threads and providers).
    """
    from onnx import numpy_helper

    targets = _targets(int8_model, float_model)
    float_means: list[np.ndarray] = []
    for start in range(0, len(targets), FLOAT_OUTPUTS_PER_RUN):
        chunk = targets[start:start + FLOAT_OUTPUTS_PER_RUN]
        float_means += _channel_means(float_model, [t.float_output for t in chunk], images, new_session)
    initializers = {i.name: i for i in int8_model.graph.initializer}
    for target, float_mean in zip(targets, float_means):
        bias = initializers[target.bias]
        scale = numpy_helper.to_array(initializers[target.bias_scale]).astype(np.float64)
        if target.rounded is None:
            (int8_mean,) = _channel_means(int8_model, [target.int8_output], images, new_session)
            slope = 1.0
        else:
            step = float(numpy_helper.to_array(initializers[target.rounded[0]]))
            zero = float(numpy_helper.to_array(initializers[target.rounded[1]]))
            low, high = step * (0 - zero), step * (255 - zero)
            int8_mean, inside = _channel_means(int8_model, [target.int8_output], images, new_session, (low, high))
            slope = np.maximum(inside, MIN_SLOPE)
        with np.errstate(divide="ignore", invalid="ignore"):
            shift = np.round((int8_mean - float_mean) / slope / scale)
        info = np.iinfo(np.int32)
        shift = np.where(np.isfinite(shift), shift, 0)    # a zero scale or a non-finite mean: leave the bias
        shift = np.clip(shift, info.min, info.max)          # (a tiny scale: no int64 overflow; the bias saturates)
        values = numpy_helper.to_array(bias).astype(np.int64) - shift.astype(np.int64)
        bias.CopyFrom(numpy_helper.from_array(np.clip(values, info.min, info.max).astype(np.int32), target.bias))
    log.info("int8 bias correction: %d convolutions on %d images", len(targets), len(images))
    return len(targets)
