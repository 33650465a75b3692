"""Saved models: what a head records (precision, int8 sample, input size), the sidecar's fields checked against
the hashed file, malformed descriptions refused in one line, heads of the old format, interrupted runs."""
from __future__ import annotations

import csv
import json
import shutil
from pathlib import Path

import joblib
import numpy as np
import pytest

import cxr_transfer
from cxr_transfer.classify.predict import predict_images
from cxr_transfer.classify.saved_model import load_head
from cxr_transfer.validation.run import ValidateSettings, run_validate
from cxr_transfer.core.errors import CxrError
from cxr_transfer.core.hashing import sha256_file
from testkit.synthetic import write_class_tree
from cxr_transfer.extract.dataset import load_dataset
from cxr_transfer.extract.pipeline import ExtractSettings, load_features

OPTIONS = dict(backbone="mobilenetv2", random_weights=True, input_size=32, progress=False)
CLI_MODEL = ["--backbone", "mobilenetv2", "--random-weights", "--no-progress"]   # the input size: the model's


@pytest.fixture(scope="module")
def base(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("saved")


@pytest.fixture(scope="module")
def data(base: Path) -> Path:
    return write_class_tree(base / "train", per_class=10, splits=("train", "test"), size=40)


@pytest.fixture(scope="module")
def ext(base: Path) -> Path:
    return write_class_tree(base / "ext", per_class=3, size=40, seed=500)


@pytest.fixture(scope="module")
def cache(base: Path) -> Path:
    return base / "features"


def settings(cache: Path, **extra) -> ExtractSettings:
    return ExtractSettings.from_options(cache_dir=cache, **{**OPTIONS, **extra})


@pytest.fixture(scope="module")
def compare_head(data: Path, cache: Path, base: Path) -> Path:
    """A float32 logreg head saved by compare --save."""
    run = cxr_transfer.compare(data, "mobilenetv2", heads="logreg", protocol="holdout", save=True,
                               out_dir=base / "runs", run_name="cmp", cache_dir=cache, random_weights=True,
                               input_size=32, progress=False)
    return run.run_dir / "mobilenetv2-logreg.joblib"


@pytest.fixture(scope="module")
def validate_int8_run(data: Path, ext: Path, cache: Path, base: Path) -> Path:
    """A validate --precision int8 --save run folder."""
    run = run_validate(ValidateSettings(data=data, external=ext, extract=settings(cache, precision="int8",
                                                                                 int8_sample_size=8),
                                        backbones="mobilenetv2", heads="logreg", folds=3, n_boot=100, save=True,
                                        n_jobs=1), base / "runs", "val8")
    return run.run_dir


def copied(head: Path, folder: Path) -> Path:
    """A copy of a saved head (joblib + sidecar) in ``folder``."""
    folder.mkdir(parents=True, exist_ok=True)
    for suffix in (".joblib", ".json"):
        shutil.copy(head.with_suffix(suffix), folder / (head.stem + suffix))
    return folder / head.name


def edit_sidecar(head: Path, change) -> Path:
    sidecar = head.with_suffix(".json")
    info = json.loads(sidecar.read_text())
    change(info)
    sidecar.write_text(json.dumps(info))
    return head


def probabilities(csv_path: Path) -> np.ndarray:
    with open(csv_path, newline="") as handle:
        rows = list(csv.DictReader(handle))
    return np.array([[float(r[k]) for k in r if k.startswith("p_")] for r in rows])


# ------------------------------------------------------------------------------------------------ H6


def test_validate_int8_head_records_precision_and_is_predicted_and_explained_at_int8(validate_int8_run, ext,
                                                                                      cache, tmp_path):
    head = validate_int8_run / "mobilenetv2-logreg.joblib"
    part = json.loads(head.with_suffix(".json").read_text())["backbones"][0]
    assert part["precision"] == "int8" and len(part["int8_sample_digest"]) == 64 and part["input_size"] == 32
    # its external images were embedded with TRAIN's int8 model (one cache file per int8 sample)
    int8_caches = {p.name for p in cache.rglob("*int8*.h5")}
    assert len({name.split("-int8-")[1] for name in int8_caches}) == 1, int8_caches
    with pytest.raises(CxrError, match="trained on int8"):
        cxr_transfer.predict(ext, head, out=tmp_path / "f.csv", precision="float32", cache_dir=cache,
                             random_weights=True, progress=False)
    out, _ = cxr_transfer.predict(ext, head, out=tmp_path / "p.csv", cache_dir=cache, random_weights=True,
                                  progress=False)
    model, _ = load_head(head)
    int8_features, _ = load_features(load_dataset(ext), settings(cache, precision="int8",
                                                                 int8_sample_digest=part["int8_sample_digest"]))
    float_features, _ = load_features(load_dataset(ext), settings(cache))
    got = probabilities(out)
    assert np.allclose(got, model.predict_proba(int8_features.embeddings), atol=2e-6)
    assert not np.allclose(got, model.predict_proba(float_features.embeddings), atol=2e-6)
    # explain: the same int8 embeddings (occlusion: no exact CAM from the float32 feature-map export)
    one = sorted(ext.rglob("*.png"))[0]
    with pytest.raises(CxrError, match="trained on int8"):
        cxr_transfer.explain_images(one, head, out=tmp_path / "e0", precision="float32", cache_dir=cache,
                             random_weights=True, progress=False)
    with pytest.raises(CxrError, match="int8"):
        cxr_transfer.explain_images(one, head, out=tmp_path / "e1", method="cam", cache_dir=cache, random_weights=True,
                             progress=False)
    result = cxr_transfer.explain_images(one, head, out=tmp_path / "e2", pngs=False, cache_dir=cache,
                                  random_weights=True, progress=False)
    assert result.method == "occlusion"
    row = sorted(ext.rglob("*.png")).index(one)
    assert result.explanations[0].probability == pytest.approx(float(got[row].max()), abs=1e-5)


def with_old_digest_key(head: Path, folder: Path) -> Path:
    """A copy of a saved head as written before the int8 sample's digest was renamed: "calibration_digest" in
    the sidecar and in the description inside the hashed joblib file."""
    copy = copied(head, folder)
    payload = joblib.load(copy)

    def rename(description: dict) -> None:
        for part in description["backbones"]:
            part["calibration_digest"] = part.pop("int8_sample_digest")

    rename(payload["description"])
    joblib.dump(payload, copy)
    return edit_sidecar(copy, lambda info: (rename(info), info.update(joblib_sha256=sha256_file(copy))))


def test_an_int8_head_saved_with_the_old_digest_key_loads_and_predicts_the_same(validate_int8_run, ext, cache,
                                                                                tmp_path):
    head = validate_int8_run / "mobilenetv2-logreg.joblib"
    digest = json.loads(head.with_suffix(".json").read_text())["backbones"][0]["int8_sample_digest"]
    old = with_old_digest_key(head, tmp_path / "old")
    assert json.loads(old.with_suffix(".json").read_text())["backbones"][0]["calibration_digest"] == digest
    _, info = load_head(old)
    assert info["backbones"][0]["int8_sample_digest"] == digest and "calibration_digest" not in info["backbones"][0]
    new_out, _ = cxr_transfer.predict(ext, head, out=tmp_path / "new.csv", cache_dir=cache, random_weights=True,
                                      progress=False)
    old_out, _ = cxr_transfer.predict(ext, old, out=tmp_path / "old.csv", cache_dir=cache, random_weights=True,
                                      progress=False)
    assert np.array_equal(probabilities(old_out), probabilities(new_out))
    # an edited old-name digest still differs from the hashed copy: refused, under the field's current name
    edit_sidecar(old, lambda info: info["backbones"][0].update(calibration_digest="2" * 64))
    with pytest.raises(CxrError, match=r"backbones\[0\]\.int8_sample_digest is '2+' here"):
        load_head(old)


# ------------------------------------------------------------------------------------------------ M5

EDITS = {
    "class_names-swapped": (lambda i: i.update(class_names=["normal", "covid", "pneumonia"]), "class_names"),
    "class_names-duplicated": (lambda i: i.update(class_names=["covid", "covid", "normal"]), "class_names"),
    "class_names-extra": (lambda i: i.update(class_names=["covid", "normal", "pneumonia", "other"]), "class_names"),
    "input_size": (lambda i: i["backbones"][0].update(input_size=48), "input_size"),
    "onnx_sha256": (lambda i: i["backbones"][0].update(onnx_sha256="0" * 64), "onnx_sha256"),
    "precision": (lambda i: i["backbones"][0].update(precision="int8", int8_sample_digest="1" * 64), "precision"),
    "weights_sha256": (lambda i: i["backbones"][0].update(weights_sha256="2" * 64), "weights_sha256"),
    "format-old": (lambda i: i.update(format="cxr-transfer/head/1"), "format"),   # was an AttributeError
}


@pytest.mark.parametrize("case", list(EDITS))
def test_an_edited_sidecar_field_is_refused_naming_it(case, compare_head, ext, cache, tmp_path):
    change, field_name = EDITS[case]
    head = edit_sidecar(copied(compare_head, tmp_path / "h"), change)
    with pytest.raises(CxrError, match=field_name) as caught:
        predict_images(ext, head, settings(cache, input_size=None), tmp_path / "p.csv")
    assert "\n" not in str(caught.value)
    assert not (tmp_path / "p.csv").exists()


def test_edited_class_names_refused_in_one_cli_line(compare_head, ext, cache, tmp_path, run_cli):
    head = edit_sidecar(copied(compare_head, tmp_path / "h"),
                        lambda i: i.update(class_names=["normal", "covid", "pneumonia"]))
    done = run_cli("predict", ext, "--model", head, "--out", tmp_path / "p.csv", "--cache-dir", cache,
                   *CLI_MODEL)
    assert done.returncode == 2
    line = done.error_line()
    assert "class_names" in line and "mobilenetv2-logreg.json" in line


# ------------------------------------------------------------------------------------- old format heads


def save_head_40c227d(path: Path, model, class_names, backbones, training) -> Path:
    """save_head as commit 40c227d wrote it (format cxr-transfer/head/1: the model pickled alone)."""
    joblib.dump(model, path)
    path.with_suffix(".json").write_text(json.dumps({
        "format": "cxr-transfer/head/1", "kind": "head", "joblib_sha256": sha256_file(path),
        "class_names": list(class_names),
        "backbones": [{**{k: b[k] for k in ("backbone", "input_size", "weights_sha256", "onnx_sha256", "precision")
                          if k in b}, **({"calibration_digest": b["int8_sample_digest"]}      # its name then
                                         if "int8_sample_digest" in b else {})} for b in backbones],
        "training": training, "created": "2026-12-01T00:00:00", "versions": {}}))
    return path


@pytest.fixture
def old_head(compare_head, tmp_path) -> Path:
    model, info = load_head(compare_head)
    tmp_path.joinpath("old").mkdir()
    return save_head_40c227d(tmp_path / "old" / "h.joblib", model, info["class_names"], info["backbones"],
                             info["training"])


def test_a_head_of_the_old_format_still_loads_and_predicts_the_same(old_head, compare_head, ext, cache, tmp_path):
    new, _ = predict_images(ext, compare_head, settings(cache, input_size=None), tmp_path / "new.csv")
    old, _ = predict_images(ext, old_head, settings(cache, input_size=None), tmp_path / "old.csv")
    assert np.array_equal(probabilities(new), probabilities(old))
    old_head.write_bytes(old_head.read_bytes() + b"\0")     # its joblib hash is still checked
    with pytest.raises(CxrError, match="refusing to load a changed file"):
        load_head(old_head)


# ------------------------------------------------------------------------------------------------ M6


def test_old_format_sidecar_with_too_few_class_names_is_one_line(old_head, ext, cache, tmp_path):
    edit_sidecar(old_head, lambda i: i.update(class_names=["covid", "normal"]))
    with pytest.raises(CxrError, match=r"h\.json.*class_names"):
        predict_images(ext, old_head, settings(cache, input_size=None), tmp_path / "p.csv")
    with pytest.raises(CxrError, match=r"h\.json.*class_names"):
        cxr_transfer.explain_images(ext, old_head, out=tmp_path / "e", cache_dir=cache, random_weights=True,
                             progress=False)


def test_unknown_precision_in_a_sidecar_is_one_line(old_head, ext, cache, tmp_path, run_cli):
    edit_sidecar(old_head, lambda i: i["backbones"][0].update(precision="float16"))
    for command in ("predict", "explain"):
        done = run_cli(command, ext, "--model", old_head, "--out", tmp_path / command, "--cache-dir", cache,
                       *CLI_MODEL)
        assert done.returncode == 2
        line = done.error_line()
        assert "h.json" in line and "precision" in line and "float16" in line


def fake_finetune_run(folder: Path, text: str) -> Path:
    folder.mkdir(parents=True)
    (folder / "model.json").write_text(text)
    (folder / "model.onnx").write_bytes(b"not read")
    return folder


FINETUNE_JSON = {"kind": "finetune", "model": "finetune", "backbone": "mobilenetv2", "input_size": 32,
                 "class_names": ["covid", "normal", "pneumonia"], "weights_sha256": "random:seed0",
                 "keras_file": "model.keras", "keras_sha256": "0" * 64, "onnx_file": "model.onnx",
                 "onnx_sha256": "0" * 64}


@pytest.mark.parametrize("text,field_name", [
    ("{not json", "not a readable"),
    (json.dumps({k: v for k, v in FINETUNE_JSON.items() if k != "input_size"}), "input_size"),
    (json.dumps({**FINETUNE_JSON, "input_size": "big"}), "input_size"),
    (json.dumps({**FINETUNE_JSON, "class_names": ["covid"]}), "class_names"),
    (json.dumps([1, 2]), "not a fine-tuned model description"),
])
def test_malformed_finetune_model_json_is_one_line(text, field_name, ext, tmp_path):
    run = fake_finetune_run(tmp_path / "ft", text)
    with pytest.raises(CxrError, match=rf"model\.json.*{field_name}"):
        cxr_transfer.predict(ext, run, out=tmp_path / "p.csv", random_weights=True, progress=False)
    with pytest.raises(CxrError, match=rf"model\.json.*{field_name}"):
        cxr_transfer.explain_images(ext, run, out=tmp_path / "e", method="gradcam", random_weights=True, progress=False)


# ------------------------------------------------------------------------------------------------ L8


def test_model_keras_is_pointed_to_the_run_folder(ext, tmp_path):
    run = fake_finetune_run(tmp_path / "ft1", json.dumps(FINETUNE_JSON))
    (run / "model.keras").write_bytes(b"zip")
    for call in (cxr_transfer.predict, cxr_transfer.explain_images):
        with pytest.raises(CxrError, match=r"model\.keras.*(run folder|model\.onnx)"):
            call(ext, run / "model.keras", out=tmp_path / "o", random_weights=True, progress=False)


def test_an_input_size_other_than_the_models_is_refused(compare_head, ext, cache, tmp_path, run_cli):
    with pytest.raises(CxrError, match="input_size"):
        predict_images(ext, compare_head, settings(cache, input_size=64), tmp_path / "p.csv")
    run = fake_finetune_run(tmp_path / "ft", json.dumps(FINETUNE_JSON))
    with pytest.raises(CxrError, match="input_size"):
        cxr_transfer.predict(ext, run, out=tmp_path / "q.csv", input_size=64, progress=False)
    done = run_cli("predict", ext, "--model", compare_head, "--out", tmp_path / "r.csv", "--cache-dir", cache,
                   *CLI_MODEL, "--input-size", "64")
    assert done.returncode == 2 and "32" in done.error_line() and "64" in done.error_line()
    # the same size, or none, is fine
    out, _ = predict_images(ext, compare_head, settings(cache), tmp_path / "s.csv")
    assert len(probabilities(out)) == 9


# ------------------------------------------------------------------------------------------------ L5


def test_report_on_a_validate_run_says_what_it_is(validate_int8_run, run_cli, tmp_path):
    done = run_cli("report", validate_int8_run, "--out", tmp_path / "side.md")
    assert done.returncode == 2
    line = done.error_line()
    assert "validate run" in line and "report.md" in line


def test_a_compare_run_interrupted_while_saving_is_marked_incomplete(data, cache, tmp_path, monkeypatch,
                                                                     run_cli):
    from cxr_transfer.classify import compare as compare_module

    real, calls = compare_module.save_head, []

    def save_then_interrupt(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(compare_module, "save_head", save_then_interrupt)
    with pytest.raises(KeyboardInterrupt):
        cxr_transfer.compare(data, "mobilenetv2", heads="logreg,knn", protocol="holdout", save=True,
                             out_dir=tmp_path, run_name="killed", cache_dir=cache, random_weights=True,
                             input_size=32, progress=False, n_jobs=1)
    run_dir = tmp_path / "killed"
    heads = sorted(run_dir.glob("*.joblib"))
    assert len(heads) == 1 and not (run_dir / "record.json").exists()
    with pytest.raises(CxrError, match="incomplete run") as caught:
        predict_images(data / "test", heads[0], settings(cache), tmp_path / "p.csv")
    assert "interrupted" in str(caught.value)
    done = run_cli("report", run_dir, "--out", tmp_path / "side.md")
    assert done.returncode == 2 and "incomplete run (interrupted)" in done.error_line()


def test_finetune_description_digest_refuses_an_edited_field_and_old_files_still_read(tmp_path):
    from cxr_transfer.classify.saved_model import finetune_description_digest, read_finetune_info

    signed = {**FINETUNE_JSON, "description_sha256": finetune_description_digest(FINETUNE_JSON)}
    path = tmp_path / "model.json"
    path.write_text(json.dumps(signed))
    assert read_finetune_info(path)["class_names"] == FINETUNE_JSON["class_names"]
    path.write_text(json.dumps({**signed, "class_names": ["normal", "covid", "pneumonia"]}))
    with pytest.raises(CxrError, match="edited since the model was saved"):
        read_finetune_info(path)
    path.write_text(json.dumps(FINETUNE_JSON))          # written before the digest existed
    assert read_finetune_info(path)["input_size"] == 32
