"""Explicit registration of a user ONNX backbone (``register_onnx_backbone``), like timm's ``register_model``.

``get_backbone`` only looks up: it never wraps, runs or writes. A registration is persisted in the wrap's sidecar
under ``cache_dir/onnx/``, so a new process registers the name again (``register_cached_onnx_backbone``, or the
API from a name), and a head saved on the model is predicted in a fresh process.
"""
from __future__ import annotations

import ast
import csv
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

import cxr_transfer as cxr
from cxr_transfer.core.errors import CxrError
from cxr_transfer.extract.registry import get_backbone, registered_backbones
from cxr_transfer.extract.user_onnx import InputSpec, register_cached_onnx_backbone, register_onnx_backbone

ROOT = Path(__file__).resolve().parent.parent
WEIGHT = np.array([0.5, -1.0, 2.0, 1.5, 0.25, -0.75], np.float32).reshape(2, 3, 1, 1)


def tiny_model(path: Path, weight: np.ndarray = WEIGHT) -> Path:
    """A 1x1 convolution, NCHW, 3 -> 2 channels, any input size (a feature map: pooled by the wrap)."""
    graph = helper.make_graph([helper.make_node("Conv", ["image", "w"], ["features"])], "tiny",
                              [helper.make_tensor_value_info("image", TensorProto.FLOAT, ["n", 3, "h", "w"])],
                              [helper.make_tensor_value_info("features", TensorProto.FLOAT, ["n", 2, "h", "w"])],
                              [numpy_helper.from_array(weight, "w")])
    path.parent.mkdir(parents=True, exist_ok=True)
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)]), str(path))
    return path


def _files(folder: Path) -> dict[str, int]:
    """Every file under ``folder`` with its modification time (ns)."""
    return {str(p.relative_to(folder)): p.stat().st_mtime_ns for p in sorted(folder.rglob("*")) if p.is_file()}


def _python(code: str, cwd: Path) -> subprocess.CompletedProcess:
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=cwd, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    return done


def test_get_backbone_of_an_unregistered_user_model_writes_and_registers_nothing(tmp_path: Path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    model = tiny_model(tmp_path / "models" / "tiny.onnx")
    before, registered = _files(tmp_path), dict(registered_backbones())
    with pytest.raises(CxrError, match=r"^backbone onnx:.*not registered.*register_onnx_backbone\(") as caught:
        get_backbone(f"onnx:{model}")
    assert caught.value.param == "backbone"
    with pytest.raises(CxrError, match=r"^backbone onnx-nowhere-3ch-none is a user ONNX model not registered.*"
                                       r"register_cached_onnx_backbone\("):
        get_backbone("onnx-nowhere-3ch-none")
    assert _files(tmp_path) == before and not (tmp_path / "features").exists()
    assert dict(registered_backbones()) == registered


def test_a_registered_model_resolves_in_a_new_process_from_its_persisted_registration(tmp_path: Path):
    model = tiny_model(tmp_path / "models" / "tiny.onnx")
    cache = tmp_path / "cache"
    name = register_onnx_backbone(model, InputSpec(3, "none"), 16, cache)
    assert get_backbone(name).source_path == model.resolve() and get_backbone(f"onnx:{model}").name == name
    pixels = np.random.default_rng(0).integers(0, 256, (3, 16, 16, 3), dtype=np.uint8)
    np.save(tmp_path / "pixels.npy", pixels)
    wrapped = _files(cache)
    code = f"""
import json, sys
import numpy as np
import cxr_transfer as cxr
from cxr_transfer.core.errors import CxrError
from cxr_transfer.extract.registry import get_backbone
from cxr_transfer.extract.user_onnx import register_cached_onnx_backbone
try:
    get_backbone({name!r})
    sys.exit("found before it was registered in this process")
except CxrError:
    pass
vectors = cxr.embed_images(np.load("pixels.npy"), {name!r}, cache_dir={str(cache)!r})   # the API registers the name
config = get_backbone({name!r})
assert register_cached_onnx_backbone({name!r}, {str(cache)!r}) == {name!r}
print(json.dumps({{"source": str(config.source_path), "dim": config.feature_dim, "size": config.input_size(None),
                  "vectors": vectors.tolist()}}))
"""
    got = json.loads(_python(code, tmp_path).stdout.strip().splitlines()[-1])
    assert got["source"] == str(model.resolve()) and got["dim"] == 2 and got["size"] == 16
    expected = pixels.astype(np.float32).mean(axis=(1, 2)) @ WEIGHT.reshape(2, 3).T
    np.testing.assert_allclose(np.array(got["vectors"]), expected, rtol=1e-5, atol=1e-4)
    assert _files(cache) == wrapped   # resolved from the sidecar: nothing wrapped or written again


def test_a_persisted_registration_of_a_changed_file_or_of_two_files_is_one_line(tmp_path: Path):
    model = tiny_model(tmp_path / "tiny.onnx")
    cache = tmp_path / "cache"
    name = register_onnx_backbone(model, InputSpec(3, "none"), 16, cache)
    assert register_onnx_backbone(model, InputSpec(3, "none"), None, cache) == name   # the same name, another size
    with pytest.raises(CxrError, match=r"^backbone onnx-tiny-3ch-none names 2 registrations ") as caught:
        register_cached_onnx_backbone(name, cache)
    assert "at input size 16" in str(caught.value) and "at input size None" in str(caught.value)
    tiny_model(model, WEIGHT * 2)
    with pytest.raises(CxrError, match=r"^backbone onnx-tiny-3ch-none was registered from .*tiny\.onnx, which is "
                                       r"missing or has changed since; register the file with register_onnx_backbone"):
        register_cached_onnx_backbone(name, cache)
    with pytest.raises(CxrError, match=r"^backbone onnx-tiny-3ch-none is not registered in .*other"):
        register_cached_onnx_backbone(name, tmp_path / "other")


def test_a_head_saved_on_a_user_onnx_backbone_is_predicted_in_a_fresh_process(tmp_path: Path, class_tree: Path):
    model = tiny_model(tmp_path / "models" / "tiny.onnx")
    cache = tmp_path / "cache"
    cxr.compare(class_tree, f"onnx:{model}", heads="logreg", protocol="cv", folds=2, save=True,
                      out_dir=tmp_path / "runs", run_name="r", n_jobs=1, input_size=16, cache_dir=cache,
                      progress=False)
    head, = (tmp_path / "runs" / "r").glob("onnx-tiny-*-logreg.joblib")
    here, skipped = cxr.predict(class_tree / "covid", head, out=tmp_path / "here.csv", cache_dir=cache,
                                progress=False)
    assert not skipped
    code = f"""
import cxr_transfer as cxr
out, skipped = cxr.predict({str(class_tree / "covid")!r}, {str(head)!r}, out="fresh.csv",
                           cache_dir={str(tmp_path / "cache2")!r}, progress=False)
assert not skipped, skipped
"""
    _python(code, tmp_path)

    def rows(path: Path) -> list[dict]:
        with open(path, newline="") as handle:
            return list(csv.DictReader(handle))

    fresh, expected = rows(tmp_path / "fresh.csv"), rows(here)
    assert len(fresh) == len(expected) == 4
    for a, b in zip(fresh, expected):
        assert a["predicted"] == b["predicted"]
        assert [float(a[k]) for k in a if k not in ("path", "sha256", "predicted")] == \
            pytest.approx([float(b[k]) for k in b if k not in ("path", "sha256", "predicted")], abs=1e-6)


@pytest.mark.parametrize("importer", ["extract/registry.py", "extract/onnx_export.py"])
def test_no_import_of_user_onnx_from_the_registry_or_the_exporter(importer: str):
    """user_onnx imports both; neither imports it back, not even inside a function."""
    tree = ast.parse((ROOT / importer).read_text(encoding="utf-8"))
    imported = [n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)] + \
        [a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names]
    imported += [f"{n.module}.{a.name}" for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) for a in n.names]
    assert not [m for m in imported if m and "user_onnx" in m], imported
