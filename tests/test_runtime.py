"""extract/runtime.py: the one onnxruntime session factory, used by every module and given the threads setting.

The sessions are recorded where they are made (``onnxruntime.InferenceSession``, which only ``open_session``
calls): their intra-op thread count is the ``threads`` setting of predict and explain, for a fine-tuned model
(a tiny hand-made ONNX file) and for a saved head (mobilenetv2, random weights, 32 px)."""
from __future__ import annotations

import ast
import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from cxr_transfer.classify.predict import predict_images
from cxr_transfer.classify.saved_model import finetune_description_digest, save_head
from cxr_transfer.core.errors import CxrError
from cxr_transfer.core.hashing import sha256_file
from testkit.synthetic import write_class_tree
from cxr_transfer.explain.explainers import load_explainer
from cxr_transfer.extract import runtime
from cxr_transfer.extract.pipeline import ExtractSettings

ROOT = Path(__file__).resolve().parent.parent
SIZE = 32
CLASSES = ["covid", "normal", "pneumonia"]


def _library_files(project_python_files: list[Path]) -> list[Path]:
    """Library code; examples/ is left out on purpose: read_model.py shows reading an exported model with
    onnxruntime alone, without this package, so it must open its own session."""
    return [p for p in project_python_files if p.relative_to(ROOT).parts[0] not in ("tests", "benchmarks", "examples")]


def _session_calls(path: Path) -> list[int]:
    """Lines of ``path`` that name onnxruntime's InferenceSession (``ort.InferenceSession(...)``, an import of it)."""
    tree = ast.parse(path.read_text(encoding="utf-8"), str(path))
    lines = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Attribute) and node.attr == "InferenceSession" or \
                isinstance(node, ast.Name) and node.id == "InferenceSession" or \
                isinstance(node, ast.ImportFrom) and any(a.name == "InferenceSession" for a in node.names):
            lines.append(node.lineno)
    return lines


def test_only_the_factory_makes_onnxruntime_sessions(project_python_files):
    files = _library_files(project_python_files)
    assert ROOT / "extract" / "runtime.py" in files and ROOT / "classify" / "predict.py" in files
    found = {str(p.relative_to(ROOT)): _session_calls(p) for p in files}
    assert len(found["extract/runtime.py"]) == 1            # open_session itself
    assert {name: lines for name, lines in found.items() if lines and name != "extract/runtime.py"} == {}


def test_the_scan_finds_a_direct_session(tmp_path):
    direct = tmp_path / "direct.py"
    direct.write_text("import onnxruntime as ort\n\ndef f(p):\n    return ort.InferenceSession(p)\n")
    imported = tmp_path / "imported.py"
    imported.write_text("from onnxruntime import InferenceSession\n")
    assert _session_calls(direct) == [4] and _session_calls(imported) == [1]


class _Recorder:
    """Stands in for ``onnxruntime.InferenceSession``: records each session's intra-op threads and spinning."""

    def __init__(self, real):
        self.real, self.threads, self.spinning = real, [], []

    def __call__(self, model, sess_options=None, **kwargs):
        assert sess_options is not None, "a session without the factory's options"
        self.threads.append(sess_options.intra_op_num_threads)
        try:
            self.spinning.append(sess_options.get_session_config_entry("session.intra_op.allow_spinning"))
        except RuntimeError:                 # not set: onnxruntime's default, spinning
            self.spinning.append("1")
        return self.real(model, sess_options, **kwargs)


@pytest.fixture
def sessions(monkeypatch) -> _Recorder:
    import onnxruntime as ort

    recorder = _Recorder(ort.InferenceSession)
    monkeypatch.setattr(ort, "InferenceSession", recorder)
    return recorder


def test_open_session_sets_threads_and_spinning(sessions, tmp_path):
    path = _write_tiny_model(tmp_path / "m.onnx")
    runtime.open_session(path, 3)
    runtime.open_session(path.read_bytes(), 2, spin=False)
    runtime.open_session(path)
    assert sessions.threads == [3, 2, runtime.default_threads()] and sessions.spinning == ["1", "0", "1"]
    with pytest.raises(TypeError, match="got int instead"):
        runtime.open_session(3)


def _write_tiny_model(path: Path) -> Path:
    """An ONNX model in the fine-tuned models' form: RGB pixels (N, SIZE, SIZE, 3) in, probabilities of 3 classes
    out (the softmax of each channel's mean)."""
    import onnx
    from onnx import TensorProto, helper

    graph = helper.make_graph(
        [helper.make_node("ReduceMean", ["pixels"], ["mean"], axes=[1, 2], keepdims=0),
         helper.make_node("Softmax", ["mean"], ["proba"], axis=1)],
        "tiny", [helper.make_tensor_value_info("pixels", TensorProto.FLOAT, [None, SIZE, SIZE, 3])],
        [helper.make_tensor_value_info("proba", TensorProto.FLOAT, [None, 3])])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    onnx.save(model, str(path))
    return path


@pytest.fixture
def finetuned_run(tmp_path) -> Path:
    run = tmp_path / "ft"
    run.mkdir()
    onnx_path = _write_tiny_model(run / "model.onnx")
    info = {"kind": "finetune", "model": "finetune", "backbone": "mobilenetv2", "input_size": SIZE,
            "class_names": CLASSES, "weights_sha256": "random:seed0", "onnx_file": "model.onnx",
            "onnx_sha256": sha256_file(onnx_path), "keras_file": "model.keras", "keras_sha256": "0" * 64}
    info["description_sha256"] = finetune_description_digest(info)
    (run / "model.json").write_text(json.dumps(info))
    return run


def test_predict_and_explain_of_a_finetuned_model_use_the_threads_setting(sessions, finetuned_run, tmp_path):
    images = write_class_tree(tmp_path / "images", per_class=1, size=SIZE)
    settings = ExtractSettings.from_options(threads=3, progress=False, cache_dir=tmp_path / "cache")
    predict_images(images, finetuned_run, settings, tmp_path / "p.csv")
    assert sessions.threads == [3]
    explainer = load_explainer(finetuned_run, ExtractSettings.from_options(threads=2, progress=False),
                               method="occlusion")
    assert sessions.threads == [3, 2] and explainer.method == "occlusion"


@pytest.fixture
def saved_knn_head(tiny_exports, tmp_path) -> tuple[Path, Path]:
    """(a knn head on mobilenetv2 embeddings at 32 px, a cache folder holding that backbone's export)."""
    from sklearn.neighbors import KNeighborsClassifier

    cache = tmp_path / "cache"
    shutil.copytree(tiny_exports, cache / "onnx")
    rng = np.random.default_rng(0)
    head = KNeighborsClassifier(n_neighbors=1).fit(rng.normal(size=(6, 1280)), [0, 1, 2, 0, 1, 2])
    path = save_head(tmp_path / "run" / "knn.joblib", head, CLASSES,
                     [{"backbone": "mobilenetv2", "input_size": SIZE, "weights_sha256": "random:seed0",
                       "precision": "float32"}], {"head": "knn"})
    return path, cache


def test_predict_and_explain_of_a_saved_head_use_the_threads_setting(sessions, saved_knn_head, tmp_path):
    head, cache = saved_knn_head
    images = write_class_tree(tmp_path / "images", per_class=1, size=SIZE)
    settings = ExtractSettings.from_options(threads=3, random_weights=True, progress=False, cache_dir=cache)
    predict_images(images, head, settings, tmp_path / "p.csv")
    assert sessions.threads == [3] and sessions.spinning == ["0"]     # extraction: decode threads share cores
    explainer = load_explainer(head, ExtractSettings.from_options(threads=2, random_weights=True, progress=False,
                                                                  cache_dir=cache), method="occlusion")
    assert sessions.threads == [3, 2] and explainer.method == "occlusion"


# --- the one loader of saved models -------------------------------------------------------------


def test_load_saved_model_takes_a_run_folder_its_files_or_a_head(finetuned_run, saved_knn_head):
    from cxr_transfer.classify.saved_model import SavedFinetuned, SavedHead, load_saved_model

    for given in (finetuned_run, finetuned_run / "model.json", finetuned_run / "model.onnx", str(finetuned_run)):
        saved = load_saved_model(given)
        assert isinstance(saved, SavedFinetuned) and saved.info_path == finetuned_run / "model.json"
        assert saved.input_size == SIZE and saved.class_names == CLASSES
    proba = saved.onnx_probabilities(1)(np.zeros((2, SIZE, SIZE, 3), np.uint8))
    np.testing.assert_allclose(proba, 1 / 3, rtol=1e-6)
    head = load_saved_model(saved_knn_head[0])
    assert isinstance(head, SavedHead) and head.info["class_names"] == CLASSES and hasattr(head.model, "predict")
    with pytest.raises(TypeError, match="got int instead"):
        load_saved_model(3)


def test_predict_and_explain_refuse_a_changed_or_missing_model_file_alike(finetuned_run, tmp_path):
    images = write_class_tree(tmp_path / "images", per_class=1, size=SIZE)
    settings = ExtractSettings.from_options(progress=False, cache_dir=tmp_path / "cache")
    onnx_path = finetuned_run / "model.onnx"
    onnx_path.write_bytes(onnx_path.read_bytes() + b"\0")
    changed = r"model\.onnx: missing or changed since it was saved \(sha256 differs from model\.json\)"
    with pytest.raises(CxrError, match=changed):
        predict_images(images, finetuned_run, settings, tmp_path / "p.csv")
    with pytest.raises(CxrError, match=changed):
        load_explainer(finetuned_run, settings, method="occlusion")
    with pytest.raises(CxrError, match=r"model\.keras: missing or changed"):   # recorded, never written here
        load_explainer(finetuned_run, settings, method="gradcam")
