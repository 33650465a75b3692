"""Faults around --backbone onnx:PATH: a damaged cache of the wrapped model (M11), a garbage sidecar (M6),
misleading messages (L3), and heads trained on a user model used in a new process (M12).

The models are written here with onnx.helper: a 1x1 convolution, NCHW, 3 -> 4 channels, any input size.
"""
from __future__ import annotations

import csv
import json
import logging
import shutil
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from cxr_transfer.core.errors import CxrError
from cxr_transfer.core.hashing import sha256_file
from cxr_transfer.extract.registry import get_backbone, parse_backbone_list
from cxr_transfer.extract.runtime import OnnxEmbedder
from cxr_transfer.api import register_user_models
from cxr_transfer.extract.user_onnx import InputSpec, register_onnx_backbone

WEIGHT = np.array([0.3125, -0.75, 1.5, 2.25, -1.25, 0.5, 0.0625, 1.0, -0.5, 0.25, 0.125, -2.0],
                  np.float32).reshape(4, 3, 1, 1)
MARKER = np.float32(0.3125).tobytes()   # one weight, to find in the wrapped file and damage


def tiny_model(path: Path, output_shape: bool | None = True, flatten: bool = False, extra_output: bool = False,
               opset: int = 13) -> Path:
    """Conv 3 -> 4 channels (NCHW, dynamic size); with ``flatten`` pooled to (N, 4); ``output_shape=None``
    leaves the output's shape unset (rank unknown)."""
    nodes = [helper.make_node("Conv", ["image", "w"], ["features"])]
    out, dims = "features", ["n", 4, "h", "w"]
    if flatten:
        nodes += [helper.make_node("GlobalAveragePool", ["features"], ["pooled"]),
                  helper.make_node("Flatten", ["pooled"], ["vector"], axis=1)]
        out, dims = "vector", ["n", 4]
    outputs = [helper.make_tensor_value_info(out, TensorProto.FLOAT, dims if output_shape else None)]
    if extra_output:
        nodes.append(helper.make_node("Relu", ["features"], ["relu_map"]))
        outputs.append(helper.make_tensor_value_info("relu_map", TensorProto.FLOAT, ["n", 4, "h", "w"]))
    graph = helper.make_graph(nodes, "tiny", [helper.make_tensor_value_info("image", TensorProto.FLOAT,
                                                                            ["n", 3, "h", "w"])],
                              outputs, [numpy_helper.from_array(WEIGHT, "w")])
    path.parent.mkdir(parents=True, exist_ok=True)
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)]), str(path))
    return path


PIXELS = np.random.default_rng(1).uniform(0, 255, (3, 16, 16, 3)).astype(np.float32)


def _expected(pixels: np.ndarray) -> np.ndarray:
    """What the tiny model gives after wrapping with --preprocess none: the pooled 1x1 convolution."""
    return pixels.mean(axis=(1, 2)) @ WEIGHT.reshape(4, 3).T


# --- M11: the cached wrapped model is verified ---------------------------------------------------------------


def test_flipped_weight_in_cached_wrap_is_detected_and_rewrapped(tmp_path: Path, caplog):
    config = get_backbone(register_onnx_backbone(tiny_model(tmp_path / "m.onnx"), InputSpec(3, "none"), 16,
                                                 tmp_path / "cache"))
    recorded = sha256_file(config.wrapped_path)
    data = bytearray(config.wrapped_path.read_bytes())
    at = data.index(MARKER)
    data[at + 3] ^= 0x80                                   # the sign bit of one weight
    config.wrapped_path.write_bytes(bytes(data))
    with caplog.at_level(logging.WARNING):
        got = OnnxEmbedder(config.onnx_backbone(16)).embed(PIXELS)
    np.testing.assert_allclose(got, _expected(PIXELS), rtol=1e-5, atol=1e-4)
    assert sha256_file(config.wrapped_path) == recorded
    assert any("wrapping it again" in r.getMessage() for r in caplog.records), caplog.text


def test_unreadable_cached_wrap_is_rewrapped_by_the_cli(tmp_path: Path, class_tree: Path, run_cli):
    model = tiny_model(tmp_path / "m.onnx")
    flags = ("extract", "--data", class_tree, "--backbone", f"onnx:{model}", "--input-size", "16",
             "--cache-dir", tmp_path / "cache", "--no-progress")
    assert run_cli(*flags).returncode == 0
    wrapped, = (tmp_path / "cache" / "onnx").glob("onnx-m-*.onnx")
    wrapped.write_bytes(b"\x08\xff\xff\xff garbage, not a protobuf")
    again = run_cli(*flags)
    assert again.returncode == 0 and "Traceback" not in again.stderr, again.stderr[-3000:]
    assert "wrapping it again" in again.stderr
    onnx.checker.check_model(onnx.load(str(wrapped)))


# --- M6: a garbage sidecar of a wrapped model ------------------------------------------------------------------


@pytest.mark.parametrize("text", ["{not json", json.dumps({"kind": "user-onnx"}), "[1, 2]"])
def test_garbage_sidecar_of_wrapped_model_is_rewrapped(tmp_path: Path, caplog, text: str):
    model = tiny_model(tmp_path / "m.onnx")
    first = get_backbone(register_onnx_backbone(model, InputSpec(3, "none"), 16, tmp_path / "cache"))
    sidecar = first.wrapped_path.with_suffix(".json")
    sidecar.write_text(text)
    with caplog.at_level(logging.WARNING):
        config = get_backbone(register_onnx_backbone(model, InputSpec(3, "none"), 16, tmp_path / "cache"))
    assert config.feature_dim == 4 and json.loads(sidecar.read_text())["feature_dim"] == 4
    assert any("wrapping it again" in r.getMessage() for r in caplog.records), caplog.text


# --- L3: messages --------------------------------------------------------------------------------------------


def test_empty_file_says_empty(tmp_path: Path):
    empty = tmp_path / "empty.onnx"
    empty.write_bytes(b"")
    with pytest.raises(CxrError, match="empty file"):
        register_onnx_backbone(empty, InputSpec(3, "none"), 16, tmp_path / "cache")


@pytest.mark.parametrize("flatten", [False, True])
def test_output_without_shape_gets_its_rank_from_a_forward_pass(tmp_path: Path, flatten: bool):
    model = tiny_model(tmp_path / "m.onnx", output_shape=None, flatten=flatten)
    config = get_backbone(register_onnx_backbone(model, InputSpec(3, "none"), 16, tmp_path / "cache"))
    assert config.feature_dim == 4
    np.testing.assert_allclose(OnnxEmbedder(config.onnx_backbone(16)).embed(PIXELS), _expected(PIXELS),
                               rtol=1e-5, atol=1e-4)


def test_comma_in_path(tmp_path: Path):
    model = tiny_model(tmp_path / "a,b" / "my,model.onnx")
    name = register_user_models(f"onnx:{model}", InputSpec(3, "none"), 16, tmp_path / "cache")
    assert name.startswith("onnx-my_model-")
    assert register_user_models(f"vgg16,onnx:{model},mobilenetv2", InputSpec(3, "none"), 16,
                                tmp_path / "cache") == f"vgg16,{name},mobilenetv2"
    assert [c.name for c in parse_backbone_list(f"onnx:{model},vgg16")] == [name, "vgg16"]
    with pytest.raises(CxrError, match="no such ONNX file"):
        register_user_models(f"onnx:{tmp_path / 'a'},vgg16", InputSpec(3, "none"), 16, tmp_path / "cache")


def test_several_outputs_use_the_first_with_a_warning(tmp_path: Path, caplog):
    model = tiny_model(tmp_path / "two.onnx", extra_output=True)
    with caplog.at_level(logging.WARNING):
        config = get_backbone(register_onnx_backbone(model, InputSpec(3, "none"), 16, tmp_path / "cache"))
    assert config.feature_dim == 4
    warned = [r.getMessage() for r in caplog.records if "outputs" in r.getMessage()]
    assert warned and "'features'" in warned[0] and "'relu_map'" in warned[0], caplog.text


# --- M12: a head trained on onnx:PATH in a new process ---------------------------------------------------------


def test_head_on_user_onnx_predicts_and_explains_in_a_new_process(tmp_path: Path, class_tree: Path, run_cli):
    model = tiny_model(tmp_path / "models" / "tiny.onnx")
    trained = run_cli("compare", "--data", class_tree, "--backbone", f"onnx:{model}", "--input-size", "16",
                      "--heads", "logreg", "--protocol", "cv", "--folds", "2", "--save", "--out", tmp_path / "runs",
                      "--name", "r", "--jobs", "1", "--cache-dir", tmp_path / "cache", "--no-progress")
    assert trained.returncode == 0, trained.stderr[-3000:]
    head, = (tmp_path / "runs" / "r").glob("onnx-tiny-*-logreg.joblib")
    record = json.loads(head.with_suffix(".json").read_text())["backbones"][0]["user_onnx"]
    assert record["source"] == str(model.resolve()) and record["source_sha256"] == sha256_file(model)
    assert record["channels"] == 3 and record["preprocess"] == "none"

    # a new process, no --backbone, a cache that has never seen the model
    images = class_tree / "covid"
    done = run_cli("predict", images, "--model", head, "--out", tmp_path / "p.csv", "--cache-dir",
                   tmp_path / "cache2", "--no-progress")
    assert done.returncode == 0, done.stderr[-3000:]
    with open(tmp_path / "p.csv", newline="") as handle:
        assert len(list(csv.DictReader(handle))) == 4
    done = run_cli("explain", images, "--model", head, "--out", tmp_path / "ex", "--cache-dir", tmp_path / "cache2",
                   "--no-progress")
    assert done.returncode == 0, done.stderr[-3000:]
    assert "occlusion: 4 heatmaps" in done.stdout

    # the file moved: one error line naming the file, its sha256 and the flag; given with the flag it works
    moved = tmp_path / "elsewhere" / "tiny.onnx"
    moved.parent.mkdir()
    shutil.move(model, moved)
    refused = run_cli("predict", images, "--model", head, "--out", tmp_path / "q.csv", "--cache-dir",
                      tmp_path / "cache2", "--no-progress")
    line = refused.error_line()
    assert refused.returncode == 2 and str(model.resolve()) in line and record["source_sha256"][:16] in line
    assert "--backbone onnx:" in line
    done = run_cli("predict", images, "--model", head, "--out", tmp_path / "q.csv", "--cache-dir",
                   tmp_path / "cache2", "--no-progress", "--backbone", f"onnx:{moved}")
    assert done.returncode == 0, done.stderr[-3000:]

    # a changed file at the recorded path is refused the same way
    tiny_model(model, opset=14)
    refused = run_cli("predict", images, "--model", head, "--out", tmp_path / "q.csv", "--cache-dir",
                      tmp_path / "cache2", "--no-progress")
    assert refused.returncode == 2 and "changed" in refused.error_line()
