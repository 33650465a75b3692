"""Empirical bias correction of int8 models: the corrected model's channel means match float32's."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from cxr_transfer.extract import bias_correction, quantize
from cxr_transfer.extract.runtime import open_session


def _float_model(path: Path) -> None:
    """Conv -> ReLU -> Conv -> ReLU -> global average pool, with random weights (8 channels, NCHW)."""
    rng = np.random.default_rng(0)
    inits = [numpy_helper.from_array(rng.normal(0, 0.4, (8, 3, 3, 3)).astype(np.float32), "w1"),
             numpy_helper.from_array(rng.normal(0, 0.2, 8).astype(np.float32), "b1"),
             numpy_helper.from_array(rng.normal(0, 0.25, (8, 8, 3, 3)).astype(np.float32), "w2"),
             numpy_helper.from_array(rng.normal(0, 0.2, 8).astype(np.float32), "b2")]
    nodes = [helper.make_node("Conv", ["x", "w1", "b1"], ["c1"], name="conv1", pads=[1, 1, 1, 1]),
             helper.make_node("Relu", ["c1"], ["r1"], name="relu1"),
             helper.make_node("Conv", ["r1", "w2", "b2"], ["c2"], name="conv2", pads=[1, 1, 1, 1]),
             helper.make_node("Relu", ["c2"], ["r2"], name="relu2"),
             helper.make_node("GlobalAveragePool", ["r2"], ["pooled"], name="pool"),
             helper.make_node("Flatten", ["pooled"], ["embedding"], name="flatten")]
    graph = helper.make_graph(nodes, "tiny", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", 3, 16, 16])],
                              [helper.make_tensor_value_info("embedding", TensorProto.FLOAT, ["n", 8])], inits)
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), str(path))


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> dict[str, object]:
    folder = tmp_path_factory.mktemp("bias")
    rng = np.random.default_rng(1)
    sample = rng.gamma(2.0, 1.0, (32, 3, 16, 16)).astype(np.float32)        # skewed, with outliers: the
    other = rng.gamma(2.0, 1.0, (32, 3, 16, 16)).astype(np.float32)         # Percentile clipping biases int8
    _float_model(folder / "float.onnx")
    plain, corrected = folder / "plain.onnx", folder / "corrected.onnx"
    quantize._quantize(folder / "float.onnx", sample, plain, "percentile")
    done = quantize._quantize(folder / "float.onnx", sample, corrected, "percentile", bias_correction=True)
    return {"float": folder / "float.onnx", "plain": plain, "corrected": corrected, "done": done,
            "sample": sample, "other": other}


def _channel_mean_error(models: dict, name: str, images: np.ndarray) -> float:
    reference = quantize._embed(models["float"], images, 1).mean(axis=0)
    return float(np.abs(quantize._embed(models[name], images, 1).mean(axis=0) - reference).max())


def test_both_convolutions_are_corrected_and_recorded(models):
    assert models["done"]["bias_corrected_convolutions"] == 2
    plain, corrected = onnx.load(str(models["plain"])), onnx.load(str(models["corrected"]))
    def biases(model) -> dict[str, np.ndarray]:
        return {i.name: numpy_helper.to_array(i) for i in model.graph.initializer
                if i.name in ("b1_quantized", "b2_quantized")}

    before, after = biases(plain), biases(corrected)
    assert set(before) == set(after) == {"b1_quantized", "b2_quantized"} and after["b1_quantized"].dtype == np.int32
    assert all(not np.array_equal(before[k], after[k]) for k in before)     # both shifted, still int32 QDQ
    assert {n.op_type for n in corrected.graph.node} == {n.op_type for n in plain.graph.node}


def test_corrected_channel_means_match_float32_on_the_int8_sample_and_other_images(models):
    """Matched on the int8 sample (0.020 -> 0.002 when written), and closer on others (0.018 -> 0.010)."""
    plain, corrected = (_channel_mean_error(models, m, models["sample"]) for m in ("plain", "corrected"))
    assert corrected < plain / 4, (plain, corrected)
    plain, corrected = (_channel_mean_error(models, m, models["other"]) for m in ("plain", "corrected"))
    assert corrected < plain * 0.8, (plain, corrected)


def test_correction_is_measured_after_rounding_and_layer_by_layer(models):
    """Each target is read after its uint8 rounding, against the float32 tensor of the same name (the ReLU's)."""
    targets = bias_correction._targets(onnx.load(str(models["plain"])), onnx.load(str(models["float"])))
    assert [t.conv for t in targets] == ["conv1", "conv2"]
    assert [t.float_output for t in targets] == ["r1", "r2"]          # the quantizer fused each ReLU
    assert all(t.int8_output.endswith("DequantizeLinear_Output") for t in targets)


def test_a_zero_bias_scale_leaves_that_bias_alone(models):
    """A scale of 0 would make the shift infinite (an int32 bias of -2**31): that bias is left as it was."""
    model, original = onnx.load(str(models["plain"])), onnx.load(str(models["float"]))
    scale = next(i for i in model.graph.initializer if i.name == "b1_quantized_scale")
    scale.CopyFrom(numpy_helper.from_array(np.zeros_like(numpy_helper.to_array(scale)), scale.name))
    before = {i.name: numpy_helper.to_array(i).copy() for i in model.graph.initializer if i.name.endswith("quantized")}
    corrected = bias_correction.correct_biases(model, original, models["sample"],
                                               lambda m: open_session(m, 1))
    after = {i.name: numpy_helper.to_array(i) for i in model.graph.initializer if i.name.endswith("quantized")}
    assert corrected == 2 and np.array_equal(after["b1_quantized"], before["b1_quantized"])
    assert not np.array_equal(after["b2_quantized"], before["b2_quantized"])


@pytest.mark.parametrize("name", ["", "same"])
def test_convolutions_without_a_unique_name_are_not_matched(models, name):
    """Twins are found by node name: unnamed or duplicate names would pair a conv with another's output."""
    plain, original = onnx.load(str(models["plain"])), onnx.load(str(models["float"]))
    for graph in (plain.graph, original.graph):
        for node in graph.node:
            if node.op_type == "Conv":
                node.name = name
    assert bias_correction._targets(plain, original) == []
    assert bias_correction.correct_biases(plain, original, models["sample"],
                                          lambda m: open_session(m, 1)) == 0
