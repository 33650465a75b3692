"""The library refuses what the command line refuses, with TypeError / ValueError before any work; export and
int8 say what they did; TensorFlow's start-up lines stay off stderr unless -v.

A random-weight MobileNetV2 at 32 px, exported once per module, serves the tests that extract.
"""
from __future__ import annotations

import argparse
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import cxr_transfer
from cxr_transfer import cli
from cxr_transfer.core import params as bounds
from cxr_transfer.core.settings import BackboneSettings
from testkit.synthetic import write_class_tree
from cxr_transfer.extract.dataset import load_dataset
from cxr_transfer.extract.engine import EngineSettings
from cxr_transfer.extract.pipeline import ExtractSettings, extract_features

TINY = {"backbone": "mobilenetv2", "random_weights": True, "input_size": 32, "progress": False}
IMAGES = np.zeros((2, 40, 40, 3), np.uint8)


@pytest.fixture(scope="module")
def models(tiny_exports: Path) -> Path:
    """The tiny model's ONNX export folder (conftest's, made once per session)."""
    return tiny_exports


@pytest.fixture(scope="module")
def tiny_data(tmp_path_factory) -> Path:
    return write_class_tree(tmp_path_factory.mktemp("lib") / "data", per_class=2)


# ----------------------------------------------------------------------------------------- M14 + L6: bounds
@pytest.mark.parametrize("size", [0, -3, 1025, 5000])
def test_input_size_out_of_bounds_is_refused_by_library_and_cli_alike(size: int):
    with pytest.raises(ValueError, match=rf"input_size must be at (least 1|most 1024).*got {size} instead"):
        BackboneSettings(input_size=size)
    input_size = cli.flag_type(bounds.INPUT_SIZE, "int")   # the --input-size flag's type
    with pytest.raises(argparse.ArgumentTypeError, match=f"got {size} instead"):
        input_size(str(size))
    for good in (1, bounds.MAX_INPUT_SIZE):
        assert BackboneSettings(input_size=good).input_size == input_size(str(good)) == good


@pytest.mark.parametrize("size", [0, 5000])
def test_embed_images_checks_input_size_before_any_export(size: int, tmp_path: Path):
    with pytest.raises(ValueError, match=f"input_size must be at .*got {size} instead"):
        cxr_transfer.embed_images(IMAGES, "vgg16", weights=tmp_path / "missing.h5", input_size=size,
                                  cache_dir=tmp_path / "c")
    assert not (tmp_path / "c").exists()


@pytest.mark.parametrize("call, message", [
    (lambda d: cxr_transfer.embed_images(IMAGES, None), "backbone must be a non-empty str, got None instead"),
    (lambda d: cxr_transfer.embed_images(IMAGES, 123), "backbone must be a non-empty str, got 123 instead"),
    (lambda d: cxr_transfer.embed_images(IMAGES, threads="2"), "threads must be an int or None"),
    (lambda d: cxr_transfer.embed_folder(d, None), "backbone must be a non-empty str, got None instead"),
    (lambda d: cxr_transfer.compare(d, [123]), "backbones must be a str or a list of str, got a list holding a int"),
    (lambda d: cxr_transfer.compare(d, "mobilenetv2", heads=123, random_weights=True, input_size=32),
     "heads must be a str or a list of str, got int instead"),
    (lambda d: cxr_transfer.validate(d, d, ("vgg16", None)), "backbones must be a str or a list of str"),
    (lambda d: cxr_transfer.export_embeddings(d, 7, out=d / "x.parquet"), "backbone must be a non-empty str"),
])
def test_wrong_argument_types_are_type_errors(call, message: str, tiny_data: Path):
    with pytest.raises(TypeError, match=message):
        call(tiny_data)


def test_a_list_of_names_is_a_comma_list():
    assert bounds.names_argument("heads", ["logreg", "knn"]) == "logreg,knn"
    assert bounds.names_argument("heads", "logreg") == "logreg"
    with pytest.raises(ValueError, match="heads must name at least one"):
        bounds.names_argument("heads", [])


@pytest.mark.parametrize("make, message", [
    (lambda: BackboneSettings(int8_sample_size=0), "int8_sample_size must be at least 1, got 0"),
    (lambda: BackboneSettings(int8_sample_size=2.5), "int8_sample_size must be an int"),
    (lambda: BackboneSettings(threads=0), "threads must be at least 1, got 0"),
    (lambda: ExtractSettings(batch_size=0), "batch_size must be at least 1, got 0"),
    (lambda: ExtractSettings(decode_workers=-1), "decode_workers must be at least 1, got -1"),
    (lambda: EngineSettings(name="ray", threads_per_worker=0), "threads_per_worker must be at least 1"),
    (lambda: _compare_settings(n_jobs=0), r"n_jobs must be -1 \(all cores\) or at least 1, got 0"),
    (lambda: _compare_settings(n_jobs=-2), r"n_jobs must be -1 \(all cores\) or at least 1, got -2"),
    (lambda: _compare_settings(seeds=0), "seeds must be at least 1, got 0"),
    (lambda: _compare_settings(folds=1), "folds must be at least 2, got 1"),
    (lambda: _compare_settings(repeats=0), "repeats must be at least 1, got 0"),
    (lambda: _compare_settings(select_folds=1), "select_folds must be at least 2, got 1"),
    (lambda: _compare_settings(seed=-1), "seed must be at least 0, got -1"),
    (lambda: _compare_settings(seed=2**32), "seed must be at most 4294967295"),
])
def test_counts_are_bounded_in_the_library_as_on_the_command_line(make, message: str):
    with pytest.raises((TypeError, ValueError), match=message):
        make()


def _compare_settings(**options):
    from cxr_transfer.classify.compare import CompareSettings

    return CompareSettings(data=Path("."), **options)


def test_cli_flags_and_library_share_one_constraint_per_setting(capsys):
    """Every flag with limits is made from its settings field (core.params): the flag and the library refuse
    the same value with the same words, and the parser of each command really uses that flag type."""
    import dataclasses

    checked = 0
    for cls in cxr_transfer.api.settings_classes().values():
        for field in dataclasses.fields(cls):
            info = bounds.param_info(field)
            constraint = info and info["constraint"]
            if not isinstance(constraint, bounds.Interval) or constraint.low is None:
                continue
            bad = constraint.low - (0.5 if constraint.real else 1) if constraint.special is None else -5
            with pytest.raises(argparse.ArgumentTypeError) as refused:
                cli.flag_type(constraint, "int")(str(bad))
            assert str(refused.value) == constraint.problem(bad)
            with pytest.raises(ValueError, match=f"^{field.name} {re.escape(constraint.problem(bad))}"):
                bounds.check_value(field.name, bad, constraint)
            checked += 1
    assert checked >= 20
    with pytest.raises(SystemExit):
        cli.build_parser().parse_args(["compare", "--folds", "1"])
    assert f"--folds: {bounds.FOLDS.problem(1)}" in capsys.readouterr().err


def test_cli_refuses_an_int8_sample_size_below_one(run_cli, class_tree: Path):
    result = run_cli("extract", "--data", class_tree, "--precision", "int8", "--int8-sample-size", "0",
                     "--random-weights", "--no-progress")
    assert result.returncode == 2 and "--int8-sample-size: must be at least 1, got 0 instead" in result.error_line()


# ----------------------------------------------------------------------------------------- L10, L2
def test_export_records_the_cache_path_absolute(models: Path, tiny_data: Path, tmp_path: Path, monkeypatch):
    pq = pytest.importorskip("pyarrow.parquet")
    shutil.copytree(models, tmp_path / "c" / "onnx")
    monkeypatch.chdir(tmp_path)
    options = {k: v for k, v in TINY.items() if k != "backbone"}
    result = cxr_transfer.export_embeddings(tiny_data, "mobilenetv2", out="e.parquet", cache_dir="c", **options)
    metadata = {k.decode(): v.decode() for k, v in pq.read_schema(result.path).metadata.items()}
    assert Path(metadata["cache_path"]).is_absolute() and Path(metadata["cache_path"]).is_file()
    assert Path(metadata["dataset_root"]).is_absolute()


def test_int8_summary_says_when_its_sample_has_fewer_images_than_asked(models: Path, tmp_path: Path):
    data = write_class_tree(tmp_path / "d", per_class=4, size=40)      # 12 images: 3 held back, 9 in the int8 sample
    shutil.copytree(models, tmp_path / "c" / "onnx")
    result = extract_features(load_dataset(data), ExtractSettings.from_options(
        cache_dir=tmp_path / "c", precision="int8", int8_sample_size=64, **TINY))
    assert "int8 statistics from 9 of 64 requested images (the dataset has 12, 3 held back" in result.summary()
    enough = extract_features(load_dataset(data), ExtractSettings.from_options(
        cache_dir=tmp_path / "c", precision="int8", int8_sample_size=4, **TINY))
    assert "int8 statistics from" not in enough.summary()


# ----------------------------------------------------------------------------------------- L9 / quiet
def test_starting_tensorflow_writes_nothing_on_stderr_unless_verbose(tmp_path: Path):
    script = ("import logging, sys\n"
              "logging.basicConfig(level=logging.INFO if sys.argv[1] == 'v' else logging.WARNING)\n"
              "from cxr_transfer.core.quiet import start_tensorflow\n"
              "tf = start_tensorflow()\n"
              "import keras\n"
              "print(float(tf.reduce_sum(tf.ones(3))), keras.__name__)\n")
    env = {k: v for k, v in __import__("os").environ.items() if not k.startswith("TF_CPP")}
    quiet = subprocess.run([sys.executable, "-c", script, "q"], capture_output=True, text=True, env=env,
                           timeout=300)
    assert quiet.returncode == 0 and quiet.stdout.strip() == "3.0 keras"
    assert quiet.stderr == "", quiet.stderr
    verbose = subprocess.run([sys.executable, "-c", script, "v"], capture_output=True, text=True, env=env,
                             timeout=300)
    assert verbose.returncode == 0 and "oneDNN" in verbose.stderr


def test_finetune_and_gradcam_print_no_framework_lines(run_cli, tmp_path: Path):
    data = write_class_tree(tmp_path / "d", per_class=5, size=40)
    flags = ["--backbone", "mobilenetv2", "--random-weights", "--input-size", "32", "--no-progress",
             "--cache-dir", tmp_path / "c"]
    tuned = run_cli("finetune", "--data", data, *flags, "--epochs", "1", "--no-augment", "--run-dir", tmp_path / "ft")
    assert tuned.returncode == 0, tuned.stderr[-3000:]
    assert tuned.stderr == "", tuned.stderr
    shown = run_cli("explain", data / "covid", "--model", tmp_path / "ft", "--method", "gradcam", *flags,
                    "--out", tmp_path / "ex")
    assert shown.returncode == 0, shown.stderr[-3000:]
    assert shown.stderr == "", shown.stderr


@pytest.mark.parametrize("call, name", [
    (lambda: cxr_transfer.validate("data", None), "external must be a str or Path, got None instead"),
    (lambda: cxr_transfer.explain_images("images", "model.joblib", out=123), "out must be a str or Path, got 123"),
    (lambda: cxr_transfer.predict(["a.png"], "model.joblib"), "images must be a str or Path, got \\['a.png'\\]"),
    (lambda: cxr_transfer.compare(42), "data must be a str or Path, got 42 instead"),
])
def test_path_arguments_of_the_api_are_type_checked_first(call, name):
    """A wrong type for a path argument is a TypeError naming it, before any file is looked at."""
    with pytest.raises(TypeError, match=f"^{name}"):
        call()
