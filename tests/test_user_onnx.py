"""--backbone onnx:PATH: a user's own ONNX model, wrapped (channels, normalisation, pooling), validated, cached.

The "foreign" model is one of this tool's own exports (random MobileNetV2 at 32 px, which takes raw pixels,
so --preprocess none), copied elsewhere; the others are written here with onnx.helper.
"""
from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from cxr_transfer.core.errors import CxrError
from cxr_transfer.extract.dataset import load_dataset
from cxr_transfer.extract.onnx_export import get_onnx_backbone
from cxr_transfer.extract.pipeline import ExtractSettings, load_features
from cxr_transfer.extract.registry import get_backbone
from cxr_transfer.extract.runtime import OnnxEmbedder
from cxr_transfer.extract.user_onnx import InputSpec, register_onnx_backbone
from cxr_transfer.extract.weights import resolve_weights

TINY = dict(random_weights=True, input_size=32, batch_size=8, progress=False)


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("cache")


@pytest.fixture(scope="module")
def foreign(cache_dir: Path, tmp_path_factory) -> Path:
    """This tool's own export of a random MobileNetV2 (32 px), copied to look like someone else's file."""
    config = get_backbone("mobilenetv2")
    export = get_onnx_backbone(config, 32, resolve_weights(config, random_weights=True), cache_dir)
    target = tmp_path_factory.mktemp("foreign") / "my_cxr_model.onnx"
    shutil.copyfile(export.path, target)
    return target


def _save(graph, path: Path, opset: int = 13) -> Path:
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)]), str(path))
    return path


def test_foreign_export_embeds_like_the_builtin_backbone(class_tree: Path, cache_dir: Path, foreign: Path):
    dataset = load_dataset(class_tree)
    builtin, _ = load_features(dataset, ExtractSettings.from_options(backbone="mobilenetv2", cache_dir=cache_dir,
                                                                       **TINY))
    config = get_backbone(register_onnx_backbone(foreign, InputSpec(3, "none"), None, cache_dir))
    assert config.fixed_size == 32 and config.feature_dim == 1280 and config.name.startswith("onnx-my_cxr_model")
    assert get_backbone(config.name) is config
    user, result = load_features(dataset, ExtractSettings.from_options(backbone=config.name, cache_dir=cache_dir,
                                                                        progress=False))
    np.testing.assert_allclose(user.embeddings, builtin.embeddings, rtol=1e-5, atol=1e-5)
    assert result.weights.sha256 == config.source_sha256 and result.cache_path != builtin.cache_path


def test_cli_extract_and_backbones_list_the_user_model(class_tree: Path, cache_dir: Path, foreign: Path, run_cli):
    result = run_cli("extract", "--data", class_tree, "--backbone", f"onnx:{foreign}", "--cache-dir", cache_dir,
                     "--no-progress")
    assert result.returncode == 0, result.stderr[-3000:]
    assert "onnx-my_cxr_model" in result.stdout and "12 images" in result.stdout
    listed = run_cli("backbones", "--cache-dir", cache_dir)
    assert listed.returncode == 0 and f"onnx:{foreign}" in listed.stdout and "1280" in listed.stdout


def test_nchw_grey_feature_map_model_is_normalised_and_pooled(tmp_path: Path):
    # 1x1 convolution, 1 -> 2 channels, on an NCHW grey input of any size: output is a feature map.
    weight = np.array([[[[2.0]]], [[[-1.0]]]], np.float32)
    bias = np.array([0.5, 1.0], np.float32)
    graph = helper.make_graph(
        [helper.make_node("Conv", ["image", "w", "b"], ["features"])], "tiny",
        [helper.make_tensor_value_info("image", TensorProto.FLOAT, ["n", 1, "h", "w"])],
        [helper.make_tensor_value_info("features", TensorProto.FLOAT, ["n", 2, "h", "w"])],
        [numpy_helper.from_array(weight, "w"), numpy_helper.from_array(bias, "b")])
    path = _save(graph, tmp_path / "grey.onnx")
    config = get_backbone(register_onnx_backbone(path, InputSpec(1, "tf"), 16, tmp_path / "cache"))
    assert config.fixed_size is None and config.input_size(None) == 16 and config.feature_dim == 2
    pixels = np.random.default_rng(0).uniform(0, 255, (3, 16, 16, 3)).astype(np.float32)
    got = OnnxEmbedder(config.onnx_backbone(16)).embed(pixels)
    grey = pixels.mean(axis=3) / 127.5 - 1                       # mean of R, G, B, then tf's [-1, 1]
    expected = np.stack([2 * grey.mean(axis=(1, 2)) + 0.5, -grey.mean(axis=(1, 2)) + 1.0], axis=1)
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-5)


def test_mean_std_and_caffe_inputs():
    assert InputSpec(3, mean=(0.5,), std=(0.25,)).constants()[1].tolist() == [127.5] * 3
    matrix, mean, _ = InputSpec(3, "caffe").constants()
    assert matrix[0, 2] == 1 and mean[0] == pytest.approx(103.939)   # R goes to the third (BGR) channel
    with pytest.raises(CxrError, match="`mean` and `std` together"):
        InputSpec(3, mean=(0.5,))
    with pytest.raises(CxrError, match="channels must be one of 1, 3"):
        InputSpec(2)


def test_bad_file_wrong_rank_and_wrong_size_are_one_line_errors(tmp_path: Path, class_tree: Path, foreign: Path,
                                                                  run_cli):
    bad = tmp_path / "bad.onnx"
    bad.write_bytes(b"not a model")
    flat = _save(helper.make_graph(
        [helper.make_node("Relu", ["x"], ["y"])], "flat",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", 10])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["n", 10])]), tmp_path / "flat.onnx")
    cases = [((f"onnx:{bad}",), "not a readable ONNX model"),
             ((f"onnx:{flat}",), "input has rank 2"),
             ((f"onnx:{foreign}", "--input-size", "64"), "input is 32x32; got --input-size 64 instead"),
             ((f"onnx:{tmp_path / 'missing.onnx'}",), "no such ONNX file"),
             ((f"onnx:{foreign}", "--channels", "1"), "no channel axis of size 1")]
    for args, message in cases:
        result = run_cli("extract", "--data", class_tree, "--cache-dir", tmp_path / "cache", "--backbone", *args)
        assert result.returncode == 2 and message in result.error_line(), result.stderr[-2000:]
