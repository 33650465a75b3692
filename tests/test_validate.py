"""validate: intervals, calibration, conformal coverage, duplicate-aware groups, subgroups, and the CLI end to end."""
from __future__ import annotations

import csv
import json
import math
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from sklearn.metrics import roc_auc_score

from cxr_transfer.classify.bootstrap import (
    bootstrap_metrics,
    cluster_bootstrap_indices,
    flat_metrics,
    gap_intervals,
    intervals,
    ovr_auc,
    wilson_interval,
)
from cxr_transfer.classify.calibration import brier_score, expected_calibration_error, reliability_bins
from cxr_transfer.classify.conformal import fit_conformal, nested_sets, prediction_sets, set_summary
from cxr_transfer.classify.duplicate_groups import merge_groups
from cxr_transfer.classify.protocols import cv_splits, resolve_groups
from cxr_transfer.validation.run import ValidateSettings, evaluate_validate, run_validate
from cxr_transfer.core.errors import CxrError
from testkit.synthetic import write_class_tree
from cxr_transfer.extract.dataset import load_dataset
from cxr_transfer.extract.pipeline import ExtractSettings

CLASSES = ["covid", "normal", "pneumonia"]


# ------------------------------------------------------------------------------------- intervals, by hand


def test_wilson_interval_matches_hand_worked_values():
    # 0 of 1: p = 0, z = 1.95996; centre = half = (z^2 / 2) / (1 + z^2) = 0.39672 -> (0, 0.79344)
    low, high = wilson_interval(0, 1)
    assert low == 0.0 and high == pytest.approx(0.79344, abs=1e-4)
    # 8 of 10: centre = (0.8 + 0.19207) / 1.38415 = 0.71680; half = 1.95996 * sqrt(0.016 + 0.0096037) / 1.38415
    low, high = wilson_interval(8, 10)
    assert (low, high) == (pytest.approx(0.49016, abs=1e-4), pytest.approx(0.94332, abs=1e-4))
    assert wilson_interval(1, 1) == (pytest.approx(1 - 0.79344, abs=1e-4), 1.0)
    assert all(math.isnan(v) for v in wilson_interval(0, 0))
    with pytest.raises(ValueError):
        wilson_interval(3, 2)


def test_flat_metrics_on_a_hand_worked_case():
    y = np.array([0, 0, 1, 1, 2, 2])
    # predicted:   0  1  1  1  2  0
    proba = np.array([[.8, .1, .1], [.3, .6, .1], [.1, .8, .1], [.2, .7, .1], [.1, .1, .8], [.5, .2, .3]])
    m = flat_metrics(y, proba, CLASSES)
    assert m["accuracy"] == pytest.approx(4 / 6)
    assert m["sensitivity_covid"] == pytest.approx(1 / 2)      # TP 1, FN 1
    assert m["specificity_covid"] == pytest.approx(3 / 4)      # 4 negatives, one (last image) called covid
    assert m["sensitivity_normal"] == 1.0 and m["specificity_normal"] == pytest.approx(3 / 4)
    assert m["sensitivity_pneumonia"] == pytest.approx(1 / 2) and m["specificity_pneumonia"] == 1.0
    # F1: covid P 1/2 R 1/2 -> 1/2; normal P 2/3 R 1 -> 4/5; pneumonia P 1 R 1/2 -> 2/3
    assert m["macro_f1"] == pytest.approx((1 / 2 + 4 / 5 + 2 / 3) / 3)
    # AUC covid: positives score .8, .3; negatives .1, .2, .1, .5 -> .8 beats 4, .3 beats 3: 7 of 8 pairs
    assert m["auc_covid"] == pytest.approx(7 / 8)
    for k, name in enumerate(CLASSES):
        assert m[f"auc_{name}"] == pytest.approx(roc_auc_score(y == k, proba[:, k]))
    # a class absent from y: its sensitivity and AUC are undefined (nan), not 0
    absent = flat_metrics(np.array([0, 1]), proba[:2], CLASSES)
    assert math.isnan(absent["sensitivity_pneumonia"]) and math.isnan(absent["auc_pneumonia"])


def test_ovr_auc_with_ties_equals_sklearn():
    rng = np.random.default_rng(0)
    positive = rng.integers(0, 2, 200).astype(bool)
    scores = rng.integers(0, 5, 200) / 4.0          # many ties
    assert ovr_auc(positive, scores) == pytest.approx(roc_auc_score(positive, scores))


def test_cluster_bootstrap_draws_whole_patients():
    clusters = np.array(["a", "a", "a", "b", "c", "c"])
    for rows in cluster_bootstrap_indices(6, clusters, 50, seed=1):
        drawn = clusters[rows]
        for name, size in (("a", 3), ("b", 1), ("c", 2)):
            assert (drawn == name).sum() % size == 0    # a patient comes with all its images or not at all


def test_bootstrap_intervals_stay_in_unit_interval_and_gap_is_the_difference():
    rng = np.random.default_rng(0)
    y = np.repeat([0, 1, 2], 10)
    perfect = np.eye(3)[y] * 0.9 + 0.1 / 3
    point, reps = bootstrap_metrics(y, perfect, CLASSES, clusters=np.arange(30) // 2, n_boot=200, seed=0)
    stats = intervals(point, reps)
    assert stats["accuracy"] == {"value": 1.0, "ci_low": 1.0, "ci_high": 1.0}
    noisy = rng.dirichlet(np.ones(3), size=30)
    point_b, reps_b = bootstrap_metrics(y, noisy, CLASSES, n_boot=200, seed=1)
    stats_b = intervals(point_b, reps_b)
    for name, s in stats_b.items():
        assert 0.0 <= s["ci_low"] <= s["ci_high"] <= 1.0, name
    gap = gap_intervals(point, reps, point_b, reps_b)
    assert gap["accuracy"]["value"] == pytest.approx(point_b["accuracy"] - 1.0)
    # internal replicates are all 1.0, so the gap's interval is the external interval shifted by -1
    assert gap["accuracy"]["ci_low"] == pytest.approx(stats_b["accuracy"]["ci_low"] - 1.0)
    assert gap["accuracy"]["ci_high"] == pytest.approx(stats_b["accuracy"]["ci_high"] - 1.0)


# ------------------------------------------------------------------------------------- calibration, by hand


def test_ece_and_brier_on_a_hand_worked_case():
    y = np.array([0, 0, 1, 1])
    proba = np.array([[.95, .05], [.65, .35], [.75, .25], [.15, .85]])
    # confidences .95 .65 .75 .85, one per bin; correct 1 1 0 1 -> |1-.95| + |1-.65| + |0-.75| + |1-.85| = 1.30
    assert expected_calibration_error(y, proba) == pytest.approx(1.30 / 4)
    bins = reliability_bins(y, proba)
    assert [b["n"] for b in bins] == [0, 0, 0, 0, 0, 0, 1, 1, 1, 1]
    # Brier: 2 * (.05^2 + .35^2 + .75^2 + .15^2) / 4
    assert brier_score(y, proba) == pytest.approx(2 * (.0025 + .1225 + .5625 + .0225) / 4)
    assert expected_calibration_error(np.array([1]), np.array([[0.5, 0.5]])) == pytest.approx(0.5)  # (0.4, 0.5]


# ------------------------------------------------------------------------------------- conformal coverage


def _blobs(n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    y = rng.integers(0, 3, n)
    X = rng.normal(size=(n, 10))
    X[:, 0] += 1.2 * y
    X[:, 1] += 0.8 * (y == 2)
    return X, y


def test_conformal_coverage_reaches_one_minus_alpha_on_exchangeable_data():
    alpha = 0.1
    X, y = _blobs(600, 1)
    groups = np.arange(600) // 2                               # two images per patient
    X_new, y_new = _blobs(2000, 2)
    model = fit_conformal("logreg", X, y, alpha, groups, folds=5, seed=0)
    fresh = set_summary(prediction_sets(model, X_new), y_new)
    # sampling error: conformal scores of 600 images and 2000 test images, 3 standard errors each
    tolerance = 3 * math.sqrt(alpha * (1 - alpha) / 600) + 3 * math.sqrt(alpha * (1 - alpha) / 2000)
    assert fresh["coverage"] >= 1 - alpha - tolerance
    assert 1.0 < fresh["mean_size"] < 3.0                      # informative sets, neither singletons nor all
    outer = cv_splits(y, 5, 1, 0, groups)
    nested = set_summary(nested_sets("logreg", X, y, 3, alpha, outer, groups, folds=5, seed=0), y)
    assert nested["coverage"] >= 1 - alpha - 3 * math.sqrt(alpha * (1 - alpha) / 600) * 2
    with pytest.raises(CxrError, match="alpha"):
        fit_conformal("logreg", X, y, 1.5, groups)


# ------------------------------------------------------------------------------------- duplicate-aware groups


def test_merge_groups_joins_groups_linked_by_a_cluster():
    merged = merge_groups(["p1", "p2", "p3", "p4", "p1"], [[0, 1], [1, 2]])
    assert merged.tolist() == ["p1+p2+p3", "p1+p2+p3", "p1+p2+p3", "p4", "p1+p2+p3"]
    assert merge_groups(["a", "b"], []).tolist() == ["a", "b"]


def test_resolve_groups_keeps_one_radiograph_filed_under_two_patients_together(tmp_path):
    root = write_class_tree(tmp_path / "d", per_class=3)
    # the same film filed for another patient, saved again (other bytes, so not an exact duplicate)
    Image.open(root / "covid" / "img_000.png").save(root / "covid" / "img_copy.png", compress_level=1)
    lines = ["path,patient_id"] + [f"{p.relative_to(root).as_posix()},{p.stem}-{p.parent.name}"
                                   for p in sorted(root.rglob("*.png"))]
    (root / "manifest.csv").write_text("\n".join(lines) + "\n")
    dataset = load_dataset(root)
    names = [dataset.relative(s) for s in dataset.samples]
    plain = resolve_groups(dataset, "patient_id", merge_duplicates=False)
    merged = resolve_groups(dataset, "patient_id")
    a, b = names.index("covid/img_000.png"), names.index("covid/img_copy.png")
    assert plain[a] != plain[b] and merged[a] == merged[b]
    assert len(set(merged.tolist())) == len(set(plain.tolist())) - 1


def test_subgroup_columns_come_from_a_dataset_csv_or_a_manifest(tmp_path):
    root = write_class_tree(tmp_path / "d", per_class=2)
    rows = [f"{p.relative_to(root).as_posix()},{p.parent.name},site-{p.stem[-1]}" for p in sorted(root.rglob("*.png"))]
    (root / "list.csv").write_text("path,label,site\n" + "\n".join(rows) + "\n")
    dataset = load_dataset(root / "list.csv")     # the loader keeps the columns (validate's subgroups)
    assert dataset.columns == ["label", "site"]
    assert [s.column("site") for s in dataset.samples][:2] == ["site-0", "site-1"]
    plain = load_dataset(root)                    # a folder without manifest.csv
    assert plain.columns == [] and all(s.extra == () for s in plain.samples)


# ------------------------------------------------------------------------------------- end to end


def _write_pair(base: Path) -> tuple[Path, Path]:
    """TRAIN (train/test splits, two images per patient) and EXT (source column; one source of one image)."""
    train = write_class_tree(base / "train", per_class=12, splits=("train", "test"))
    lines = ["path,patient_id"]
    for p in sorted(train.rglob("*.png")):
        rel = p.relative_to(train)
        lines.append(f"{rel.as_posix()},{rel.parts[1]}-{rel.parts[0]}-{int(p.stem.split('_')[1]) // 2}")
    (train / "manifest.csv").write_text("\n".join(lines) + "\n")
    ext = write_class_tree(base / "ext", per_class=5, seed=500)
    lines = ["path,label,source,patient_id"]
    for p in sorted(ext.rglob("*.png")):
        rel = p.relative_to(ext)
        i = int(p.stem.split("_")[1])
        source = "solo" if (rel.parts[0], i) == ("covid", 0) else "a" if i % 2 else "b"
        lines.append(f"{rel.as_posix()},{rel.parts[0]},{source},e-{rel.parts[0]}-{i}")
    (ext / "manifest.csv").write_text("\n".join(lines) + "\n")
    return train, ext


@pytest.fixture(scope="module")
def pair(tmp_path_factory) -> tuple[Path, Path]:
    return _write_pair(tmp_path_factory.mktemp("val"))


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("features")


def test_run_validate_writes_everything_and_handles_tiny_and_missing_subgroups(pair, cache_dir, tmp_path):
    train, ext = pair
    extract = ExtractSettings.from_options(backbone="mobilenetv2", random_weights=True, input_size=32,
                                           progress=False, cache_dir=cache_dir)
    run = run_validate(ValidateSettings(data=train, external=ext, extract=extract, backbones="mobilenetv2",
                                        heads="logreg", subgroups="source,age_group", folds=3, n_boot=200,
                                        calibrate="isotonic", n_jobs=1), tmp_path, "r")
    assert {p.name for p in run.run_dir.iterdir()} >= {"report.md", "results.json", "results.csv", "accuracy.png",
                                                       "reliability.png", "record.json", "external_predictions.csv"}
    (model,) = run.models
    assert model.internal["n"] == 36 and model.external["n"] == 15      # train/ split only; all of EXT
    for where in ("internal", "external"):
        for s in getattr(model, where)["metrics"].values():
            assert math.isnan(s["ci_low"]) or 0.0 <= s["ci_low"] <= s["value"] <= s["ci_high"] <= 1.0
    rows = {(r["value"], r["class"]): r for r in model.subgroups["source"]}
    solo = rows[("solo", "all")]
    assert solo["n"] == 1 and 0.0 <= solo["ci_low"] < solo["ci_high"] <= 1.0    # Wilson, not degenerate
    assert sum(rows[(v, "all")]["n"] for v in ("a", "b", "solo")) == 15
    assert "age_group" not in model.subgroups
    assert any("no column 'age_group'" in note for note in run.notes)
    assert {"internal", "external", "method"} <= set(model.calibrated)
    report = (run.run_dir / "report.md").read_text()
    assert report.index("## Verdict") < report.index("## Internal vs external") < report.index("## Calibration")
    assert "no column 'age_group'" in report and "by source" in report
    with open(run.run_dir / "external_predictions.csv", newline="") as handle:
        predictions = list(csv.DictReader(handle))
    assert len(predictions) == 15 and {"source", "mobilenetv2-logreg:set"} <= set(predictions[0])
    payload = json.loads((run.run_dir / "results.json").read_text(), parse_constant=pytest.fail)   # strict JSON
    assert payload["kind"] == "validate" and payload["record"]["grouping"].startswith("patient_id")
    timings = payload["record"]["timings"]   # seconds per stage (core.record.Stopwatch), in stage order
    assert list(timings) == ["read_and_embed", "groups_and_duplicates", "fit", "bootstrap_and_scores"]
    assert all(isinstance(v, float) and v >= 0 for v in timings.values())
    assert payload["record"]["seconds"] >= sum(timings.values()) - 0.05


def test_cli_validate_then_predict_with_conformal_sets(pair, cache_dir, tmp_path, run_cli):
    train, ext = pair
    common = ["--backbone", "mobilenetv2", "--random-weights", "--input-size", "32", "--cache-dir", cache_dir,
              "--no-progress"]
    done = run_cli("validate", "--data", train, "--external", ext, *common, "--heads", "knn", "--folds", "3",
                   "--n-boot", "100", "--subgroups", "source", "--alpha", "0.2", "--save", "--out", tmp_path,
                   "--name", "cli", "--jobs", "1")
    assert done.returncode == 0, done.stderr[-3000:]
    assert "Best external accuracy" in done.stdout and "run folder:" in done.stdout
    model = tmp_path / "cli" / "mobilenetv2-knn.joblib"
    out = tmp_path / "pred.csv"
    done = run_cli("predict", ext, "--model", model, "--conformal", "0.2", "--out", out, *common)
    assert done.returncode == 0, done.stderr[-3000:]
    with open(out, newline="") as handle:
        rows = list(csv.DictReader(handle))
    assert len(rows) == 15 and all(set(filter(None, r["set"].split("|"))) <= set(CLASSES) for r in rows)
    refused = run_cli("predict", ext, "--model", model, "--conformal", "0.05", "--out", out, *common)
    assert refused.returncode == 2 and "conformal threshold is for alpha 0.2" in refused.error_line()


def test_validate_refusals(pair, cache_dir, tmp_path):
    train, ext = pair
    extract = ExtractSettings.from_options(backbone="mobilenetv2", random_weights=True, input_size=32,
                                           progress=False, cache_dir=cache_dir)
    with pytest.raises(CxrError, match="no such file or folder"):
        evaluate_validate(ValidateSettings(data=train, external=tmp_path / "nowhere", extract=extract))
    with pytest.raises(CxrError, match="calibrate must be one of sigmoid, isotonic"):
        ValidateSettings(data=train, external=ext, calibrate="platt")
    other = write_class_tree(tmp_path / "other", classes=("covid", "tuberculosis"), per_class=2)
    with pytest.raises(CxrError, match="tuberculosis are not among TRAIN's classes"):
        evaluate_validate(ValidateSettings(data=train, external=other, extract=extract))


def test_validate_explain_draws_the_most_confident_errors(pair, cache_dir, tmp_path):
    train, ext = pair
    extract = ExtractSettings.from_options(backbone="mobilenetv2", random_weights=True, input_size=32,
                                           progress=False, cache_dir=cache_dir)
    run = run_validate(ValidateSettings(data=train, external=ext, extract=extract, backbones="mobilenetv2",
                                        heads="knn,logreg", folds=3, n_boot=100, explain=2, n_jobs=1),
                       tmp_path, "x")
    info = json.loads((run.run_dir / "record.json").read_text())["explain"]
    assert info["model"] == "mobilenetv2+logreg" and info["method"] == "cam"     # the linear head: exact CAM
    errors = [r for r in run.models if r.head == "logreg"][0].external["metrics"]["accuracy"]["value"]
    assert info["n_errors"] == round((1 - errors) * 15) and len(info["shown"]) == min(2, info["n_errors"])
    probabilities = [r["probability"] for r in info["shown"]]
    assert probabilities == sorted(probabilities, reverse=True)
    assert all(r["true"] != r["predicted"] for r in info["shown"])
    if info["shown"]:
        assert (run.run_dir / info["sheet"]).is_file()
    shares = info["border_share_by_true_class"]
    assert set(shares) <= set(CLASSES) and sum(v["n"] for v in shares.values()) <= 15
    assert all(0.0 <= v["mean"] <= 1.0 for v in shares.values())
    assert "## What the model looks at" in (run.run_dir / "report.md").read_text()
    assert (run.run_dir / "mobilenetv2-logreg.joblib").is_file()          # explain reads the saved head
