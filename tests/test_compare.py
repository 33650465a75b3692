"""compare and predict end to end on a tiny synthetic dataset (random-weight MobileNetV2 at 32 px)."""
from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest

from cxr_transfer import cli
from cxr_transfer.classify.compare import CompareSettings, run_compare
from cxr_transfer.classify.predict import predict_images
from cxr_transfer.classify.results import load_results
from cxr_transfer.core.errors import CxrError
from testkit.synthetic import write_class_tree
from cxr_transfer.extract.pipeline import ExtractSettings


@pytest.fixture(scope="module")
def dataset_dir(tmp_path_factory) -> Path:
    root = write_class_tree(tmp_path_factory.mktemp("cmp") / "data", per_class=10, splits=("train", "test"))
    lines = ["path,split,label,sha256,patient_id,view"]
    for path in sorted(root.rglob("*.png")):
        rel = path.relative_to(root)
        patient = f"{rel.parts[1]}-{int(path.stem.split('_')[1]) // 2}"   # two images per patient
        lines.append(f"{rel.as_posix()},{rel.parts[0]},{rel.parts[1]},x,{patient},PA")
    (root / "manifest.csv").write_text("\n".join(lines) + "\n")
    return root


@pytest.fixture(scope="module")
def extract_settings(tmp_path_factory) -> ExtractSettings:
    return ExtractSettings.from_options(backbone="mobilenetv2", random_weights=True, input_size=32, progress=False,
                           cache_dir=tmp_path_factory.mktemp("features"))


def settings(dataset_dir: Path, extract_settings: ExtractSettings, **kw) -> CompareSettings:
    base = dict(data=dataset_dir, extract=extract_settings, backbones="mobilenetv2", heads="logreg,knn",
                seeds=3, n_jobs=1)
    return CompareSettings(**{**base, **kw})


def test_paper_protocol_writes_a_complete_run_folder(dataset_dir, extract_settings, tmp_path):
    run = run_compare(settings(dataset_dir, extract_settings), tmp_path, "a")
    assert len(run.evaluations) == 3 * 2 + 3   # 2 heads and the head chosen by inner CV, on 3 splits
    assert all(e.n_test == 6 and e.n_train == 24 for e in run.evaluations)   # 20% of the 30 train/ images
    assert {e.extra["chosen"] for e in run.evaluations if e.model == "selected"} <= {"logreg", "knn"}
    for name in ("results.json", "results.csv", "report.md", "record.json", "accuracy.png",
                 "confusion-mobilenetv2-logreg.png"):
        assert (run.run_dir / name).is_file(), name
    record = json.loads((run.run_dir / "record.json").read_text())
    assert record["seed"] == 0 and record["versions"]["numpy"]
    assert record["extraction"]["mobilenetv2"]["weights_sha256"] == "random:seed0"
    report = (run.run_dir / "report.md").read_text()
    assert "| mobilenetv2 | logreg |" in report
    assert "CV inside its training part, never by its test images" in report
    assert "corrected resampled t (n=3)" in report and (run.run_dir / "comparisons.json").is_file()
    again = run_compare(settings(dataset_dir, extract_settings), tmp_path, "b")
    first = [(e.test_fingerprint, e.metrics["accuracy"]) for e in run.evaluations]
    assert first == [(e.test_fingerprint, e.metrics["accuracy"]) for e in again.evaluations]
    assert load_results(run.run_dir)["evaluations"][0].backbone == "mobilenetv2"


def test_cv_grouped_and_holdout(dataset_dir, extract_settings, tmp_path):
    cv = run_compare(settings(dataset_dir, extract_settings, protocol="cv", folds=3, repeats=2,
                              heads="logreg"), tmp_path)
    assert len(cv.evaluations) == 6 and sum(e.n_test for e in cv.evaluations) == 2 * 30
    grouped = run_compare(settings(dataset_dir, extract_settings, protocol="cv", folds=3,
                                   heads="logreg", group_by="patient_id"), tmp_path)
    assert len(grouped.evaluations) == 3
    holdout = run_compare(settings(dataset_dir, extract_settings, protocol="holdout", heads="knn"), tmp_path)
    assert [(e.n_train, e.n_test) for e in holdout.evaluations] == [(30, 30)]


@pytest.mark.parametrize("kw, message", [
    (dict(protocol="cv", folds=11), "has 10 images but 11-fold"),
    (dict(group_by="patient_id", data_kind="nogroups"), "no 'patient_id' column"),
    (dict(data_kind="oneclass"), "only one class"),
    (dict(heads="logreg,boosted-unicorn"), "boosted-unicorn"),
])
def test_bad_requests_fail_with_one_line(dataset_dir, extract_settings, tmp_path, kw, message):
    kind = kw.pop("data_kind", None)
    data = dataset_dir
    if kind == "nogroups":
        data = write_class_tree(tmp_path / "ng", per_class=5)
    elif kind == "oneclass":
        data = write_class_tree(tmp_path / "one", classes=("covid",), per_class=6)
    with pytest.raises(CxrError, match=message):
        run_compare(settings(data, extract_settings, **{**kw, "data": data}), tmp_path)


def test_save_then_predict_and_refusals(dataset_dir, extract_settings, tmp_path):
    run = run_compare(settings(dataset_dir, extract_settings, heads="logreg", save=True, seeds=1), tmp_path)
    model = run.run_dir / "mobilenetv2-logreg.joblib"
    out, skipped = predict_images(dataset_dir / "test", model, extract_settings, tmp_path / "p.csv")
    rows = list(csv.DictReader(open(out)))
    assert len(rows) == 30 and not skipped
    assert set(rows[0]) == {"path", "sha256", "predicted", "p_covid", "p_normal", "p_pneumonia"}
    assert abs(sum(float(rows[0][f"p_{c}"]) for c in ("covid", "normal", "pneumonia")) - 1) < 1e-5
    with pytest.raises(CxrError, match="weights found here"):
        other = tmp_path / "w"
        other.mkdir()
        (other / "mobilenetv2_other.h5").write_bytes(b"not the same weights")
        predict_images(dataset_dir / "test", model,
                       ExtractSettings.from_options(extract_settings.common, random_weights=False, weights_dir=other))
    model.write_bytes(model.read_bytes() + b"\0")
    with pytest.raises(CxrError, match="refusing to load a changed file"):
        predict_images(dataset_dir / "test", model, extract_settings)


def test_cli_compare_and_errors(dataset_dir, extract_settings, tmp_path, capsys):
    code = cli.main(["compare", "--data", str(dataset_dir), "--backbone", "mobilenetv2", "--random-weights",
                     "--input-size", "32", "--cache-dir", str(extract_settings.cache_dir), "--heads", "knn",
                     "--seeds", "2", "--out", str(tmp_path), "--no-progress", "--jobs", "1"])
    printed = capsys.readouterr().out
    assert code == 0 and "mobilenetv2" in printed and "run folder:" in printed
    assert cli.main(["compare", "--data", str(tmp_path / "missing"), "--random-weights"]) == 2
    assert "no such file or folder" in capsys.readouterr().err


def test_grouped_holdout_drops_test_patients_seen_in_training(tmp_path, extract_settings):
    root = write_class_tree(tmp_path / "d", per_class=4, splits=("train", "test"))
    lines = ["path,patient_id"]
    for path in sorted(root.rglob("*.png")):
        rel = path.relative_to(root).as_posix()
        shared = rel.startswith("test/") and path.stem == "img_000"      # one test image per class: a train patient
        lines.append(f"{rel},{'train-' + path.parent.name if shared else rel}")
    for path in sorted((root / "train").rglob("img_000.png")):
        lines = [l if not l.startswith(path.relative_to(root).as_posix()) else
                 f"{path.relative_to(root).as_posix()},train-{path.parent.name}" for l in lines]
    (root / "manifest.csv").write_text("\n".join(lines) + "\n")
    run = run_compare(settings(root, extract_settings, protocol="holdout", heads="knn",
                               group_by="patient_id"), tmp_path)
    assert [(e.n_train, e.n_test) for e in run.evaluations] == [(12, 9)]


def test_cli_compare_prints_the_chosen_head_and_paired_tests(dataset_dir, extract_settings, tmp_path, capsys):
    base = ["compare", "--data", str(dataset_dir), "--backbone", "mobilenetv2", "--random-weights",
            "--input-size", "32", "--cache-dir", str(extract_settings.cache_dir), "--heads", "logreg,knn",
            "--seeds", "3", "--out", str(tmp_path), "--no-progress", "--jobs", "1"]
    assert cli.main(base) == 0
    printed = capsys.readouterr().out
    assert "by 3-fold CV inside its training part, never by its test images" in printed
    assert "vs top" in printed and "corrected resampled t (n=3)" in printed and "p (Holm)" in printed
    assert cli.main(base + ["--head", "knn", "--name", "named"]) == 0
    assert "knn, named by the user (--head knn)" in capsys.readouterr().out
    assert cli.main(base + ["--head", "rf"]) == 2
    assert "--head rf is not among the compared heads" in capsys.readouterr().err


def test_predictions_and_reports_are_utf8_under_an_ascii_locale(tmp_path):
    """Issue 9, item 1: names are UTF-8 text in every output file, whatever the locale's encoding."""
    import os
    import subprocess
    import sys

    script = f"""
import numpy as np
from pathlib import Path
from cxr_transfer.classify.predict import write_predictions
from cxr_transfer.extract.dataset import Dataset, Sample
root = Path({str(tmp_path)!r})
sample = Sample(root / "r\\u00f6ntgen.png", "", sha256="0" * 64)
classes = ["c\\u00f6vid", "normal"]
write_predictions(root / "p.csv", Dataset(root, [sample], classes), [sample], np.array([[0.9, 0.1]]), classes)
"""
    env = {**os.environ, "LC_ALL": "C", "LANG": "C", "PYTHONUTF8": "0", "PYTHONCOERCECLOCALE": "0"}
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env)
    assert done.returncode == 0, done.stderr[-2000:]
    text = (tmp_path / "p.csv").read_text(encoding="utf-8")
    assert "röntgen.png" in text and "p_cövid" in text and ",cövid," in text
