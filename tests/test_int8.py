"""int8 extraction: the int8 sample, the fidelity gate, separate hash-checked caches, precision in saved heads."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

import cxr_transfer
from cxr_transfer.core.errors import CxrError
from testkit.synthetic import write_class_tree
from cxr_transfer.extract import quantize
from cxr_transfer.extract.dataset import load_dataset
from cxr_transfer.extract.pipeline import ExtractSettings, extract_features, load_features

OPTIONS = dict(backbone="vgg16", random_weights=True, input_size=32, progress=False)


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    return write_class_tree(tmp_path_factory.mktemp("int8") / "data", per_class=8, splits=("train", "test"), size=40)


@pytest.fixture(scope="module")
def cache(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("int8-cache")


def settings(cache: Path, **extra) -> ExtractSettings:
    return ExtractSettings.from_options(cache_dir=cache, **{**OPTIONS, **extra})


def test_int8_sample_is_deterministic_disjoint_and_from_train(data: Path):
    dataset = load_dataset(data)
    chosen = quantize.choose_int8_sample(dataset.samples, 8)
    shuffled = quantize.choose_int8_sample(list(reversed(dataset.samples)), 8)
    assert chosen.digest == shuffled.digest and len(chosen.images) == 8 and len(chosen.held_back) == 6
    assert not {s.sha256 for s in chosen.images} & {s.sha256 for s in chosen.held_back}
    assert {s.split for s in chosen.images + chosen.held_back} == {"train"}
    with pytest.raises(CxrError, match="at least 1"):
        quantize.choose_int8_sample(dataset.samples, 0)


def test_int8_embeddings_are_close_to_float32_and_cached_apart(data: Path, cache: Path):
    dataset = load_dataset(data)
    full, full_result = load_features(dataset, settings(cache))
    low, low_result = load_features(dataset, settings(cache, precision="int8", int8_sample_size=16))
    assert low_result.cache_path != full_result.cache_path and "int8-cal" in low_result.cache_path.name
    assert low_result.precision == "int8" and low_result.int8_sample_digest
    assert low_result.onnx_sha256 != full_result.onnx_sha256
    cosines = quantize.cosine_rows(full.embeddings, low.embeddings)
    assert cosines.min() >= quantize.FIDELITY_MIN_COSINE and not np.array_equal(full.embeddings, low.embeddings)
    sidecar = json.loads(next(cache.glob("onnx/*int8*.json")).read_text())
    assert sidecar["fidelity"]["min_cosine"] >= quantize.FIDELITY_MIN_COSINE
    assert sidecar["int8_sample"]["n_images"] == 16 and sidecar["quantization"]["format"] == "QDQ"
    again = extract_features(dataset, settings(cache, precision="int8", int8_sample_size=16))
    assert again.n_computed == 0 and again.n_cached == len(dataset)


def test_a_changed_int8_file_is_quantized_again(data: Path, tmp_path: Path):
    dataset = load_dataset(data)
    first, _ = load_features(dataset, settings(tmp_path, precision="int8", int8_sample_size=8))
    model = next(tmp_path.glob("onnx/*int8*.onnx"))
    model.write_bytes(model.read_bytes()[:-64] + bytes(64))          # damaged: the hash no longer matches
    for h5 in tmp_path.rglob("*int8*.h5"):
        h5.unlink()
    second, _ = load_features(dataset, settings(tmp_path, precision="int8", int8_sample_size=8))
    np.testing.assert_allclose(second.embeddings, first.embeddings, rtol=1e-5, atol=1e-5)
    info = json.loads(model.with_suffix(".json").read_text())
    from cxr_transfer.core.hashing import sha256_file
    assert sha256_file(model) == info["sha256"]


def test_fidelity_gate_refuses_with_one_line(data: Path, tmp_path: Path, monkeypatch):
    monkeypatch.setattr(quantize, "FIDELITY_MIN_COSINE", 1.000001)
    with pytest.raises(CxrError, match=r"int8 vgg16 refused: .* min cosine of .* use `precision` float32"):
        extract_features(load_dataset(data), settings(tmp_path, precision="int8", int8_sample_size=8))
    assert not list(tmp_path.glob("onnx/*int8*"))          # neither the model nor its .tmp


def test_saved_head_keeps_its_precision_and_predict_refuses_another(data: Path, cache: Path, tmp_path: Path):
    run = cxr_transfer.compare(data, "vgg16", heads="logreg", protocol="holdout", save=True, out_dir=tmp_path,
                               cache_dir=cache, random_weights=True, input_size=32, progress=False,
                               precision="int8", int8_sample_size=16)
    head = run.run_dir / "vgg16-logreg.joblib"
    part = json.loads(head.with_suffix(".json").read_text())["backbones"][0]
    assert part["precision"] == "int8" and part["int8_sample_digest"]
    out, skipped = cxr_transfer.predict(data / "test", head, out=tmp_path / "p.csv", cache_dir=cache,
                                        random_weights=True, progress=False)
    assert not skipped and len(out.read_text().splitlines()) == 1 + 24
    with pytest.raises(CxrError, match="trained on int8"):
        cxr_transfer.predict(data / "test", head, out=tmp_path / "q.csv", precision="float32", cache_dir=cache,
                             random_weights=True, progress=False)
    with pytest.raises(CxrError, match="not in"):           # its int8 model is not in another cache
        cxr_transfer.predict(data / "test", head, out=tmp_path / "r.csv", cache_dir=tmp_path / "empty",
                             random_weights=True, progress=False)


def test_finetune_refuses_int8(data: Path, tmp_path: Path):
    with pytest.raises(CxrError, match="float32"):
        cxr_transfer.finetune_backbone(data, "vgg16", random_weights=True, precision="int8", run_dir=tmp_path / "r",
                              cache_dir=tmp_path)


def test_float_prefix_nodes_keep_the_input_and_first_convolutions():
    from onnx import helper

    ops = ["Mul", "Sub", "Transpose", "Conv", "Relu", "Conv", "Relu", "Conv", "Add", "Conv"]
    model = helper.make_model(helper.make_graph(
        [helper.make_node(op, [], [], name=f"n{i}") for i, op in enumerate(ops)], "g", [], []))
    assert quantize.float_prefix_nodes(model, 0) == []
    assert quantize.float_prefix_nodes(model, 1) == ["n0", "n1", "n2", "n3", "n4"]
    assert quantize.float_prefix_nodes(model, 2) == ["n0", "n1", "n2", "n3", "n4", "n5", "n6"]
    assert quantize.float_prefix_nodes(model, 9) == [f"n{i}" for i in range(len(ops))]


def test_a_backbone_with_float32_convolutions_keeps_them_and_names_its_files(data: Path, tmp_path: Path):
    """Xception's int8 model keeps its first two convolutions in float32 and has its biases corrected; the variant
    names the model and cache."""
    from cxr_transfer.extract.registry import get_backbone

    config = get_backbone("xception")
    assert config.int8_float_convs == 2 and config.int8_variant == "percentile-b8-f2-bc"
    assert get_backbone("vgg16").int8_variant == ""
    import onnx

    result = extract_features(load_dataset(data), settings(tmp_path, backbone="xception", input_size=71,
                                                           precision="int8", int8_sample_size=8))
    assert result.cache_path.name.endswith("-percentile-b8-f2-bc.h5")
    model_file = next(tmp_path.glob("onnx/*int8*-percentile-b8-f2-bc.onnx"))
    sidecar = json.loads(model_file.with_suffix(".json").read_text())
    kept = sidecar["quantization"]["float32_nodes"]
    assert sidecar["quantization"]["float32_convolutions"] == 2 and kept
    assert sidecar["quantization"]["bias_corrected_convolutions"] > 30     # Xception's 38 int8 convs with a bias
    graph = onnx.load(str(model_file)).graph
    ops = {node.name: node.op_type for node in graph.node}
    assert [ops[name] for name in kept if name in ops].count("Conv") == 2
    quantized_inputs = {i for node in graph.node if node.op_type == "DequantizeLinear" for i in node.output}
    first_conv = next(node for node in graph.node if node.name in kept and node.op_type == "Conv")
    assert not set(first_conv.input) & quantized_inputs     # it reads float32 tensors, not dequantized ones


@pytest.mark.parametrize("method, calibrater", [("minmax", "MinMaxCalibrater"), ("percentile", "HistogramCalibrater")])
def test_int8_statistics_are_collected_one_batch_at_a_time(data: Path, cache: Path, monkeypatch, method,
                                                                  calibrater):
    """onnxruntime keeps every batch's activations until its collect step ends: one batch per step keeps the
    memory of a large --int8-sample-size to one batch (128 Xception images collected at once needed > 24 GB)."""
    from onnxruntime.quantization import calibrate

    from cxr_transfer.core.settings import INT8_STATISTICS_BATCH

    dataset = load_dataset(data)
    load_features(dataset, settings(cache))
    float_model = next(p for p in cache.glob("onnx/vgg16-32-*.onnx") if "int8" not in p.name)
    images = quantize._decode(dataset.samples[:20], 32)
    cls = getattr(calibrate, calibrater)
    steps: list[list[int]] = []
    monkeypatch.setattr(cls, "collect_data", _recording(cls.collect_data, steps))
    quantize._quantize(float_model, images, cache / f"steps-{method}.onnx", method)
    assert steps == [[INT8_STATISTICS_BATCH]] * 2 + [[20 - 2 * INT8_STATISTICS_BATCH]]


def _recording(original, steps):
    """A collect_data that records the batch sizes each collection step received, then collects them."""
    def collect(self, reader):
        items = []
        while (item := reader.get_next()) is not None:
            items.append(item)
        steps.append([len(next(iter(item.values()))) for item in items])

        class Replay:
            def __init__(self) -> None:
                self.pending = iter(items)

            def get_next(self):
                return next(self.pending, None)
        return original(self, Replay())
    return collect


def test_a_refused_backbone_does_not_stop_the_others(data: Path, cache: Path, monkeypatch, capsys):
    """extract vgg19,vgg16 --precision int8 with vgg19 refused: vgg16 is still extracted and reported, then one
    error line names the refusal and what was extracted (exit 2)."""
    from cxr_transfer.cli import main
    from cxr_transfer.core.errors import Int8RefusedError
    from cxr_transfer.extract import pipeline

    real = pipeline.get_int8_backbone

    def refuse_vgg19(backbone, *args, **kwargs):
        if backbone.config.name == "vgg19":
            raise Int8RefusedError("int8 vgg19 refused: its embeddings of 6 held-back images have a min cosine of "
                                   "0.5000 to float32, below 0.99; use `precision` float32")
        return real(backbone, *args, **kwargs)

    monkeypatch.setattr(pipeline, "get_int8_backbone", refuse_vgg19)
    code = main(["extract", "--data", str(data), "--backbone", "vgg19,vgg16", "--random-weights", "--input-size", "32",
                 "--precision", "int8", "--int8-sample-size", "16", "--cache-dir", str(cache), "--no-progress"])
    out, err = capsys.readouterr()
    assert code == 2
    assert "vgg16" in out and "vgg19" not in out
    errors = [line for line in err.splitlines() if line.startswith("error:")]
    assert errors == [("error: int8 vgg19 refused: its embeddings of 6 held-back images have a min cosine of 0.5000 "
                       "to float32, below 0.99; use --precision float32 (vgg16 extracted)")]


def test_a_full_disk_while_quantizing_is_one_error_and_leaves_no_file(data: Path, cache: Path, tmp_path: Path,
                                                                      monkeypatch):
    import errno

    dataset = _with_float_export_only(data, cache, tmp_path)
    real = quantize._quantize

    def full_disk(float_path, images, out, *args):
        real(float_path, images, out, *args)
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(quantize, "_quantize", full_disk)
    with pytest.raises(CxrError, match=r"^no space left in .*onnx: writing the cache needs about"):
        extract_features(dataset, settings(tmp_path, precision="int8", int8_sample_size=8))
    assert not _int8_files(tmp_path)


def test_quantization_holds_the_model_lock_and_a_waiter_uses_the_model(data: Path, cache: Path, tmp_path: Path,
                                                                        monkeypatch):
    """Two runs that need the same int8 model (copies of one folder, same int8 sample): while one
    quantizes, the model's lock is held, and a run that got the lock after it finds the model and uses it."""
    from cxr_transfer.core.locking import file_lock

    dataset = _with_float_export_only(data, cache, tmp_path)
    real, seen = quantize._quantize, []

    def quantize_and_probe_the_lock(float_path, images, out, *args):
        model = out.with_name(out.name[1:].split(".")[0] + ".onnx")    # .<stem>.<8 hex>.onnx.tmp (core.io)
        with pytest.raises(CxrError, match="is being written by pid"), file_lock(model, timeout=0):
            pass
        seen.append(model)
        return real(float_path, images, out, *args)

    monkeypatch.setattr(quantize, "_quantize", quantize_and_probe_the_lock)
    first, _ = load_features(dataset, settings(tmp_path, precision="int8", int8_sample_size=8))
    assert len(seen) == 1 and not list((tmp_path / "onnx").glob("*.tmp"))
    for h5 in tmp_path.rglob("*int8*.h5"):
        h5.unlink()
    second, _ = load_features(dataset, settings(tmp_path, precision="int8", int8_sample_size=8))
    assert len(seen) == 1                                      # the model was there: not quantized again
    np.testing.assert_array_equal(first.embeddings, second.embeddings)


def test_an_interrupted_quantization_leaves_no_temporary_file(data: Path, cache: Path, tmp_path: Path, monkeypatch):
    """Ctrl-C while the int8 model is being written: no half-written model stays in the cache folder."""
    dataset = _with_float_export_only(data, cache, tmp_path)
    real = quantize._quantize

    def interrupted(float_path, images, out, *args):
        real(float_path, images, out, *args)
        assert out.is_file()
        raise KeyboardInterrupt

    monkeypatch.setattr(quantize, "_quantize", interrupted)
    with pytest.raises(KeyboardInterrupt):
        extract_features(dataset, settings(tmp_path, precision="int8", int8_sample_size=8))
    assert not _int8_files(tmp_path)


def test_a_killed_quantization_leaves_nothing_the_next_run_keeps(data: Path, cache: Path, tmp_path: Path,
                                                                 monkeypatch):
    """A run killed while quantizing (SIGKILL: no cleanup) leaves the model's .tmp, its work folder with a
    prepared float32 copy, or a sidecar's .tmp; the next run that quantizes that model removes them, even when
    that run's model is refused."""
    dataset = _with_float_export_only(data, cache, tmp_path)
    extract_features(dataset, settings(tmp_path, precision="int8", int8_sample_size=8))
    model = next(tmp_path.glob("onnx/*int8*.onnx"))
    for made in [model, model.with_suffix(".json"), *tmp_path.rglob("*int8*.h5")]:
        made.unlink()
    work = model.with_name(model.name + ".tmp.k1ll3d")
    work.mkdir()
    (work / "prepared.onnx").write_bytes(b"x" * 1000)
    model.with_name(model.name + ".tmp").write_bytes(b"half")
    model.with_suffix(".json.tmp").write_bytes(b"")                 # killed while writing the sidecar
    model.with_name(f".{model.stem}.0123abcd.onnx.tmp").write_bytes(b"half")    # the same, named by core.io
    model.with_name(f".{model.stem}.0123abcd.onnx.tmp.k1ll3d").mkdir()
    model.with_name(f".{model.stem}.89abcdef.json.tmp").write_bytes(b"")
    with monkeypatch.context() as refusing:
        refusing.setattr(quantize, "FIDELITY_MIN_COSINE", 1.000001)
        with pytest.raises(CxrError, match="refused"):
            extract_features(dataset, settings(tmp_path, precision="int8", int8_sample_size=8))
    assert not _int8_files(tmp_path)
    extract_features(dataset, settings(tmp_path, precision="int8", int8_sample_size=8))
    assert _int8_files(tmp_path) == [
        model.with_suffix(".json").name, model.name]


def test_a_full_disk_while_writing_the_sidecar_leaves_no_model(data: Path, cache: Path, tmp_path: Path, monkeypatch):
    """The model is in place when its sidecar is written: if that fails, the model goes too (one error line)."""
    import errno

    from cxr_transfer.core import record

    dataset = _with_float_export_only(data, cache, tmp_path)
    real_replace = Path.replace

    def full_disk(self, target):
        if str(self).endswith(".json.tmp") and "int8" in self.name:
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_replace(self, target)

    monkeypatch.setattr(Path, "replace", full_disk)
    with pytest.raises(CxrError, match=r"^no space left in .*onnx"):
        extract_features(dataset, settings(tmp_path, precision="int8", int8_sample_size=8))
    assert not _int8_files(tmp_path)
    monkeypatch.undo()
    record.write_json(tmp_path / "ok.json", {"a": 1})          # and write_json itself still works
    assert json.loads((tmp_path / "ok.json").read_text()) == {"a": 1}


def test_too_little_space_to_quantize_is_one_error_before_writing(data: Path, cache: Path, tmp_path: Path,
                                                                    monkeypatch):
    """onnx's shape inference truncates its output on a full disk instead of failing (then a protobuf error
    came out): the free space is checked before quantizing."""
    import collections
    import shutil

    dataset = _with_float_export_only(data, cache, tmp_path)
    real = quantize._quantize
    called = []

    def recording(*args):
        called.append(args)
        return real(*args)

    usage = collections.namedtuple("usage", "total used free")
    monkeypatch.setattr(quantize, "_quantize", recording)
    monkeypatch.setattr(shutil, "disk_usage", lambda folder: usage(1 << 40, 1 << 40, 1 << 20))
    with pytest.raises(CxrError, match=r"^no space left in .*onnx: writing the cache needs about .*, 1\.0 MB free"):
        extract_features(dataset, settings(tmp_path, precision="int8", int8_sample_size=8))
    assert not called and not _int8_files(tmp_path)


def _int8_files(cache: Path) -> list[str]:
    """Names of everything int8 in the cache's ONNX folder (models, sidecars, .tmp files, work folders), sorted."""
    return sorted(p.name for p in (cache / "onnx").iterdir() if "int8" in p.name)


def _with_float_export_only(data: Path, cache: Path, tmp_path: Path):
    """The fixture dataset, with a copy of its float32 export (no int8 model) in ``tmp_path``: only quantization
    writes there."""
    import shutil

    dataset = load_dataset(data)
    load_features(dataset, settings(cache))
    (tmp_path / "onnx").mkdir()
    for exported in (cache / "onnx").glob("vgg16-32-*"):
        if "int8" not in exported.name:
            shutil.copy(exported, tmp_path / "onnx" / exported.name)
    return dataset
