"""export-model: a saved head and its backbone as one ONNX file (deploy/export_model.py), predict with it, and the
reference reader (examples/read_model.py) in a process where TensorFlow and scikit-learn cannot be imported."""
from __future__ import annotations

import csv
import errno
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import cxr_transfer
from cxr_transfer.classify.heads import HEAD_NAMES
from cxr_transfer.core.errors import CxrError
from cxr_transfer.deploy.model_card import model_card
from testkit.synthetic import synthetic_xray, write_class_tree

ROOT = Path(__file__).resolve().parent.parent
READER = ROOT / "examples" / "read_model.py"
TINY = {"random_weights": True, "progress": False}
BLOCKED = ("tensorflow", "keras", "sklearn", "skl2onnx", "cv2", "onnx", "cxr_transfer", "tf2onnx", "scipy")


@pytest.fixture(scope="module")
def base(tmp_path_factory, tiny_exports: Path) -> Path:
    base = tmp_path_factory.mktemp("export")
    shutil.copytree(tiny_exports, base / "cache" / "onnx")   # skip the backbone's export
    return base


@pytest.fixture(scope="module")
def heads(base: Path) -> dict[str, Path]:
    """Every head of the HEADS table, saved by compare --save (mobilenetv2, random weights, 32 px)."""
    data = write_class_tree(base / "data", per_class=6, splits=("train", "test"), size=48)
    run = cxr_transfer.compare(data, "mobilenetv2", heads="all", protocol="holdout", save=True,
                               out_dir=base / "runs", run_name="cmp", cache_dir=base / "cache", input_size=32,
                               **TINY)
    return {name: run.run_dir / f"mobilenetv2-{name}.joblib" for name in HEAD_NAMES}


@pytest.fixture(scope="module")
def images(base: Path) -> Path:
    """New images: shrunk by a non-integer factor (48 px), by a whole one (64 px), enlarged (20 px), one side
    shrunk and one grown (24 x 80), RGB and RGBA."""
    folder = write_class_tree(base / "new", per_class=2, size=48, seed=900)
    extra = folder / "extra"
    extra.mkdir()
    Image.fromarray(synthetic_xray(1, 64)).save(extra / "whole.png")
    Image.fromarray(synthetic_xray(2, 20)).save(extra / "small.png")
    Image.fromarray(synthetic_xray(3, 80)[:24]).save(extra / "wide.png")
    rgb = np.stack([synthetic_xray(4, 50), synthetic_xray(5, 50), synthetic_xray(6, 50)], axis=2)
    Image.fromarray(rgb).save(extra / "colour.png")
    Image.fromarray(np.dstack([rgb, synthetic_xray(7, 50)])).save(extra / "alpha.png")
    return folder


@pytest.fixture(scope="module")
def exported(base: Path, heads: dict[str, Path]) -> dict[str, Path]:
    """Each head exported once (a head skl2onnx cannot convert would fail here, naming it)."""
    out = {}
    for name, head in heads.items():
        result = cxr_transfer.export_model(head, base / "models" / f"{name}.onnx", cache_dir=base / "cache", **TINY)
        assert result.path.is_file() and result.head == name and result.max_difference <= 1e-5
        out[name] = result.path
    return out


def read_csv(path: Path) -> dict[str, dict[str, str]]:
    with open(path, newline="", encoding="utf-8") as handle:
        return {row["path"]: row for row in csv.DictReader(handle)}


def probabilities(row: dict[str, str]) -> np.ndarray:
    return np.array([float(v) for k, v in sorted(row.items()) if k.startswith("p_")])


@pytest.mark.parametrize("name", HEAD_NAMES)
def test_single_file_equals_the_two_stage_predict(name: str, base: Path, heads, exported, images: Path):
    two_stage = cxr_transfer.predict(images, heads[name], out=base / f"{name}-joblib.csv",
                                     cache_dir=base / "cache", **TINY)
    single = cxr_transfer.predict(images, exported[name], out=base / f"{name}-onnx.csv", **TINY)
    expected, found = read_csv(two_stage.csv_path), read_csv(single.csv_path)
    assert sorted(found) == sorted(expected) and len(found) == 11   # 6 class images + 5 extra
    for path, row in expected.items():
        assert found[path]["predicted"] == row["predicted"], path
        assert found[path]["sha256"] == row["sha256"]
        np.testing.assert_allclose(probabilities(found[path]), probabilities(row), atol=1e-5, rtol=0)


def test_metadata_describes_the_model(base: Path, heads, exported):
    import onnx

    model = onnx.load(str(exported["logreg"]))
    meta = {p.key: p.value for p in model.metadata_props}
    sidecar = json.loads(heads["logreg"].with_suffix(".json").read_text())
    assert json.loads(meta["class_names"]) == ["covid", "normal", "pneumonia"]
    assert json.loads(meta["input"])["size"] == 32 and "INTER_AREA" in meta["resize_rule"]
    assert meta["backbone"] == "mobilenetv2" and meta["head"] == "logreg"
    assert meta["backbone_weights_sha256"] == sidecar["backbones"][0]["weights_sha256"]
    assert meta["head_joblib_sha256"] == sidecar["joblib_sha256"]
    assert meta["training_data_fingerprint"] == sidecar["training"]["trained_on"]
    assert meta["project_version"] == cxr_transfer.__version__
    assert list(meta)[-1] == "model_sha256" and len(meta["model_sha256"]) == 64
    assert [o.name for o in model.graph.output] == ["probabilities", "label"]
    assert model.graph.input[0].type.tensor_type.elem_type == onnx.TensorProto.UINT8


@pytest.mark.parametrize("where", [1000, -100, -1])
def test_a_changed_file_is_refused(where: int, base: Path, exported, images: Path, run_cli):
    tampered = base / f"tampered{where}.onnx"
    data = bytearray(exported["logreg"].read_bytes())
    data[where] ^= 0x01
    tampered.write_bytes(bytes(data))
    with pytest.raises(CxrError, match="differ from the model_sha256"):
        cxr_transfer.predict(images, tampered, out=base / "t.csv", **TINY)
    assert "differ from the model_sha256" in run_cli("predict", images, "--model", tampered, "--random-weights",
                                                     "--out", base / "t.csv").error_line()


def test_a_file_without_the_hash_is_refused(base: Path, exported, images: Path):
    stripped = base / "stripped.onnx"
    stripped.write_bytes(exported["logreg"].read_bytes()[:-82])
    with pytest.raises(CxrError, match="no model_sha256 at its end"):
        cxr_transfer.predict(images, stripped, out=base / "s.csv", **TINY)


@pytest.mark.parametrize("asked, message", [({"input_size": 48}, "trained at input_size 32"),
                                            ({"backbone": "vgg16"}, "trained on mobilenetv2 embeddings"),
                                            ({"precision": "int8"}, "trained on float32")])
def test_a_head_for_another_backbone_or_size_is_refused(asked, message, base: Path, heads):
    out = base / "refused.onnx"
    with pytest.raises(CxrError, match=message):
        cxr_transfer.export_model(heads["logreg"], out, cache_dir=base / "cache", **TINY, **asked)
    assert not out.exists()


def test_other_weights_are_refused(base: Path, heads, tmp_path: Path):
    other = tmp_path / "mobilenetv2_imagenet_notop.weights.h5"
    other.write_bytes(b"other weights")
    with pytest.raises(CxrError, match="weights with sha256"):
        cxr_transfer.export_model(heads["logreg"], tmp_path / "m.onnx", cache_dir=base / "cache", weights=other,
                                  progress=False)
    assert not (tmp_path / "m.onnx").exists()


def test_out_is_checked_before_the_model_is_read(tmp_path: Path, run_cli):
    folder = tmp_path / "taken.onnx"
    folder.mkdir()
    missing = tmp_path / "no-such-head.joblib"
    with pytest.raises(CxrError, match="existing folder"):
        cxr_transfer.export_model(missing, folder, **TINY)
    with pytest.raises(CxrError, match="must be a .onnx file"):
        cxr_transfer.export_model(missing, tmp_path / "model.txt", **TINY)
    line = run_cli("export-model", "--model", missing, "--out", folder).error_line()
    assert "existing folder" in line and "no such model" not in line


def test_cli_export_then_predict(base: Path, heads, images: Path, run_cli):
    out = base / "cli" / "model.onnx"
    refused = run_cli("export-model", "--model", heads["knn"], "--out", out, "--random-weights", "--backbone", "vgg16",
                      "--cache-dir", base / "cache")   # the flag is checked against the head's own backbone
    assert refused.returncode == 2 and "trained on mobilenetv2 embeddings; --backbone vgg16" in refused.stderr
    done = run_cli("export-model", "--model", heads["knn"], "--out", out, "--random-weights",
                   "--backbone", "mobilenetv2", "--cache-dir", base / "cache")
    assert done.returncode == 0, done.stderr[-2000:]
    assert "model_sha256" in done.stdout and out.is_file()
    done = run_cli("predict", images, "--model", out, "--out", base / "cli" / "p.csv")
    assert done.returncode == 0, done.stderr[-2000:]
    rows = read_csv(base / "cli" / "p.csv")
    assert len(rows) == 11 and {row["predicted"] for row in rows.values()} <= {"covid", "normal", "pneumonia"}


def test_reference_reader_without_tensorflow_or_sklearn(base: Path, heads, exported, images: Path, tmp_path: Path):
    """examples/read_model.py in a process where TensorFlow, scikit-learn, OpenCV, onnx and cxr_transfer cannot be
    imported gives predict's probabilities and labels."""
    blocker = tmp_path / "blocker"
    blocker.mkdir()
    (blocker / "sitecustomize.py").write_text(
        "import sys\n"
        f"BLOCKED = {BLOCKED!r}\n"
        "class Block:\n"
        "    def find_spec(self, name, path=None, target=None):\n"
        "        if name.split('.')[0] in BLOCKED:\n"
        "            raise ImportError(f'{name} is blocked in this test')\n"
        "sys.meta_path.insert(0, Block())\n", encoding="utf-8")
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"} | {"PYTHONPATH": str(blocker)}
    probe = subprocess.run([sys.executable, "-c", "import sklearn"], capture_output=True, text=True, env=env,
                           cwd=tmp_path)
    assert probe.returncode != 0 and "blocked" in probe.stderr   # the block works
    expected = read_csv(cxr_transfer.predict(images, heads["logreg"], out=tmp_path / "p.csv",
                                             cache_dir=base / "cache", **TINY).csv_path)
    done = subprocess.run([sys.executable, str(READER), str(exported["logreg"]), str(images)], capture_output=True,
                          text=True, env=env, cwd=tmp_path, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    rows = list(csv.DictReader(done.stdout.splitlines()))
    assert len(rows) == len(expected) == 11
    for row in rows:
        reference = expected[str(Path(row["path"]).relative_to(images))]
        assert row["predicted"] == reference["predicted"]
        np.testing.assert_allclose(probabilities(row), probabilities(reference), atol=1e-5, rtol=0)


def test_the_reader_skips_an_unreadable_image_and_quotes_names(exported, images: Path, tmp_path: Path):
    folder = tmp_path / "mixed"
    folder.mkdir()
    first = sorted(p for p in images.rglob("*") if p.is_file() and not p.name.startswith("."))[0]
    shutil.copy(first, folder / f"a,b{first.suffix}")   # a comma in a name: quoted in the CSV
    shutil.copy(first, folder / f".hidden{first.suffix}")   # hidden: skipped, as predict skips it
    (folder / "broken.png").write_bytes(b"not a png")
    done = subprocess.run([sys.executable, str(READER), str(exported["logreg"]), str(folder)], capture_output=True,
                          text=True, timeout=300)
    assert done.returncode == 1 and done.stderr.startswith(f"skipped {folder / 'broken.png'}: ")
    rows = list(csv.DictReader(done.stdout.splitlines()))
    assert [Path(r["path"]).name for r in rows] == [f"a,b{first.suffix}"]


def test_predict_never_overwrites_its_own_model_or_an_image(base: Path, heads, exported, images: Path):
    image = sorted(p for p in images.rglob("*") if p.is_file() and not p.name.startswith("."))[0]
    for model in (heads["logreg"], exported["logreg"]):
        kept = {path: path.read_bytes() for path in (model, image)}
        for out in (model, image):
            with pytest.raises(CxrError, match="`out` .* (is the model this run reads|exists and is not a .csv)"):
                cxr_transfer.predict(images, model, out=out, cache_dir=base / "cache", **TINY)
        assert all(path.read_bytes() == data for path, data in kept.items())


def test_a_full_disk_or_a_killed_export_leaves_a_whole_pair(base: Path, heads, tmp_path: Path, monkeypatch):
    """A write that fails leaves the earlier model and card as they were (one line); a temporary file that a
    killed export left is removed by the next export."""
    out = tmp_path / "m.onnx"
    cxr_transfer.export_model(heads["logreg"], out, cache_dir=base / "cache", **TINY)
    pair = {path: path.read_bytes() for path in (out, tmp_path / "m.model-card.md")}
    stale = tmp_path / ".m.0badc0de.onnx.tmp"
    stale.write_bytes(b"half a model")

    def full_disk(self, data):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(Path, "write_bytes", full_disk)
    with pytest.raises(CxrError, match="no model or card was written"):
        cxr_transfer.export_model(heads["knn"], out, cache_dir=base / "cache", **TINY)
    monkeypatch.undo()
    assert {path: path.read_bytes() for path in pair} == pair
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.model-card.md", "m.onnx"]   # the stale one too


def test_a_validate_head_exports_its_inner_head(base: Path, images: Path, tmp_path: Path):
    """A head saved by validate --save (a ConformalHead): the file gives the head's probabilities, not its sets."""
    external = write_class_tree(base / "ext", per_class=3, size=40, seed=500)
    run = cxr_transfer.validate(base / "data", external, "mobilenetv2", heads="logreg", folds=3, n_boot=100,
                                subgroups="label", save=True, out_dir=base / "runs", run_name="val",
                                cache_dir=base / "cache",
                                input_size=32, **TINY)
    head = run.run_dir / "mobilenetv2-logreg.joblib"
    exported = cxr_transfer.export_model(head, tmp_path / "val.onnx", cache_dir=base / "cache", **TINY)
    expected = read_csv(cxr_transfer.predict(images, head, out=tmp_path / "a.csv", cache_dir=base / "cache",
                                             **TINY).csv_path)
    found = read_csv(cxr_transfer.predict(images, exported.path, out=tmp_path / "b.csv", **TINY).csv_path)
    assert sorted(found) == sorted(expected) and len(found) == 11
    for path, row in expected.items():
        assert found[path]["predicted"] == row["predicted"]
        np.testing.assert_allclose(probabilities(found[path]), probabilities(row), atol=1e-5, rtol=0)


def _metadata(path: Path) -> dict[str, str]:
    import onnx

    return {p.key: p.value for p in onnx.load(str(path)).metadata_props}


def test_a_validate_head_carries_its_evaluation_and_card(base: Path, tmp_path: Path):
    """The file's ``evaluation`` and its model card hold the validate run's numbers, as results.json has them;
    the card lists the audit's findings when an audit of the training data is given, and refuses one of other
    data."""
    run = base / "runs" / "val"
    if not run.is_dir():
        pytest.skip("needs the validate run of test_a_validate_head_exports_its_inner_head")
    results = json.loads((run / "results.json").read_text())
    model = results["models"][0]
    exported = cxr_transfer.export_model(run / "mobilenetv2-logreg.joblib", tmp_path / "m.onnx",
                                         cache_dir=base / "cache", **TINY)
    evaluation = json.loads(_metadata(exported.path)["evaluation"])
    assert evaluation["kind"] == "validate" and evaluation["run"] == str(run.resolve())
    external = model["external"]["metrics"]["accuracy"]
    assert evaluation["metrics"]["accuracy"]["external"]["value"] == external["value"]
    assert evaluation["calibration"]["external"]["ece"] == model["external"]["calibration"]["ece"]
    assert evaluation["conformal"]["alpha"] == 0.1 and 0 < evaluation["conformal"]["min_probability"] <= 1
    card = exported.model_card.read_text()
    assert exported.model_card == tmp_path / "m.model-card.md" and exported.evaluated and not exported.audited
    assert f"{external['value']:.3f} [{external['ci_low']:.3f}, {external['ci_high']:.3f}]" in card
    assert "## Not intended use" in card and "no audit of this training data was found" in card
    assert f"internal {model['internal']['calibration']['ece']:.3f}" in card
    row = model["subgroups"]["label"][0]   # the external results by subgroup, with their Wilson intervals
    assert "### External results by subgroup" in card
    assert (f"| label={row['value']} | {row['class']} | {row['n']} | {row['accuracy']:.3f} [{row['ci_low']:.3f}, "
            f"{row['ci_high']:.3f}] |") in card

    flagged = {**row, "column": "label", "class": "all"}   # a flagged subgroup becomes a limitation in words
    text = model_card(_metadata(exported.path), {**evaluation, "flagged_subgroups": [flagged]}, None, "m.onnx",
                      "0" * 64, 0.0)
    assert (f"- It fails more often on label={row['value']}: accuracy {row['accuracy']:.3f} [{row['ci_low']:.3f}, "
            f"{row['ci_high']:.3f}] on {row['n']} external images.") in text

    audit = cxr_transfer.audit_dataset(base / "data", "mobilenetv2", out_dir=base / "audit", cache_dir=base / "cache",
                                       input_size=32, **TINY)
    again = cxr_transfer.export_model(run / "mobilenetv2-logreg.joblib", tmp_path / "m.onnx", audit=base / "audit",
                                      cache_dir=base / "cache", **TINY)
    card = again.model_card.read_text()
    assert again.audited and str((base / "audit" / "audit.json").resolve()) in card and "duplicates:" in card
    other = write_class_tree(base / "other-data", per_class=4, size=40, seed=77)
    cxr_transfer.audit_dataset(other, "mobilenetv2", out_dir=base / "other-audit", cache_dir=base / "cache",
                               input_size=32, **TINY)
    with pytest.raises(CxrError, match="audits other data"):
        cxr_transfer.export_model(run / "mobilenetv2-logreg.joblib", tmp_path / "n.onnx",
                                  audit=base / "other-audit", cache_dir=base / "cache", **TINY)
    assert not (tmp_path / "n.onnx").exists() and audit.findings is not None


def test_a_compare_head_card_says_it_was_not_validated(base: Path, exported):
    card = (base / "models" / "logreg.model-card.md").read_text()
    evaluation = json.loads(_metadata(exported["logreg"])["evaluation"])
    assert evaluation["kind"] == "compare" and evaluation["protocol"] == "holdout"
    assert "was not validated externally" in card and "no external validation record" in card


def test_an_int8_head_is_exported_with_its_int8_backbone(base: Path, images: Path, tmp_path: Path):
    run = cxr_transfer.compare(base / "data", "mobilenetv2", heads="logreg", protocol="holdout", save=True,
                               out_dir=base / "runs", run_name="cmp-int8", cache_dir=base / "cache", input_size=32,
                               precision="int8", int8_sample_size=4, **TINY)
    head = run.run_dir / "mobilenetv2-logreg.joblib"
    exported = cxr_transfer.export_model(head, tmp_path / "int8.onnx", cache_dir=base / "cache", **TINY)
    assert exported.precision == "int8" and _metadata(exported.path)["precision"] == "int8"
    expected = read_csv(cxr_transfer.predict(images, head, out=tmp_path / "a.csv", cache_dir=base / "cache",
                                             **TINY).csv_path)
    found = read_csv(cxr_transfer.predict(images, exported.path, out=tmp_path / "b.csv", **TINY).csv_path)
    assert sorted(found) == sorted(expected)
    for path, row in expected.items():
        assert found[path]["predicted"] == row["predicted"]
        np.testing.assert_allclose(probabilities(found[path]), probabilities(row), atol=1e-5, rtol=0)


def test_a_finetuned_model_is_exported(tmp_path: Path, images: Path):
    """A fine-tuned run folder (a hand-made model.onnx in its form: float pixels in, probabilities out)."""
    import onnx
    from onnx import TensorProto, helper

    from cxr_transfer.classify.saved_model import finetune_description_digest
    from cxr_transfer.core.hashing import sha256_file

    run = tmp_path / "ft"
    run.mkdir()
    graph = helper.make_graph(
        [helper.make_node("ReduceMean", ["pixels"], ["mean"], axes=[1, 2], keepdims=0),
         helper.make_node("Mul", ["mean", "scale"], ["scaled"]),
         helper.make_node("Softmax", ["scaled"], ["proba"], axis=1)],
        "tiny", [helper.make_tensor_value_info("pixels", TensorProto.FLOAT, [None, 32, 32, 3])],
        [helper.make_tensor_value_info("proba", TensorProto.FLOAT, [None, 3])],
        initializer=[helper.make_tensor("scale", TensorProto.FLOAT, [1], [0.05])])
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)]), str(run / "model.onnx"))
    info = {"kind": "finetune", "model": "finetune", "backbone": "mobilenetv2", "input_size": 32,
            "class_names": ["covid", "normal", "pneumonia"], "weights_sha256": "random:seed0",
            "onnx_file": "model.onnx", "onnx_sha256": sha256_file(run / "model.onnx"), "keras_file": "model.keras",
            "keras_sha256": "0" * 64}
    info["description_sha256"] = finetune_description_digest(info)
    (run / "model.json").write_text(json.dumps(info))
    with pytest.raises(CxrError, match="fine-tuned from mobilenetv2"):
        cxr_transfer.export_model(run, tmp_path / "x.onnx", backbone="vgg16", progress=False)
    exported = cxr_transfer.export_model(run, tmp_path / "ft.onnx", progress=False)
    assert exported.head == "finetune" and exported.max_difference <= 1e-5 and not exported.evaluated
    assert "No run record was found" in exported.model_card.read_text()
    expected = read_csv(cxr_transfer.predict(images, run, out=tmp_path / "a.csv", progress=False).csv_path)
    found = read_csv(cxr_transfer.predict(images, exported.path, out=tmp_path / "b.csv", progress=False).csv_path)
    assert sorted(found) == sorted(expected) and len(found) == 11
    for path, row in expected.items():
        assert found[path]["predicted"] == row["predicted"]
        np.testing.assert_allclose(probabilities(found[path]), probabilities(row), atol=1e-6, rtol=0)
