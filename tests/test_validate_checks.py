"""validate's checks before any computing (sizes for the conformal and nested folds, numeric settings, the run
folder), its intervals on tiny or one-class external sets, and faults a tester found: a non-UTF-8 file name that
is a byte copy of another image (N5), the knn head on folds too small for its neighbours (N1), an unbounded
--n-boot (N2)."""
from __future__ import annotations

import json
import math
import os
import shutil
from pathlib import Path

import numpy as np
import pytest

import cxr_transfer
import cxr_transfer.validation.run as validate_module
from cxr_transfer.classify import bootstrap, conformal, metrics
from cxr_transfer.classify.bootstrap import wilson_interval
from cxr_transfer.classify.conformal import fit_conformal
from cxr_transfer.classify.metrics import confusion_matrix, metrics_from_confusion
from cxr_transfer.validation.run import ValidateSettings, run_validate
from cxr_transfer.core.errors import CxrError
from testkit.synthetic import write_class_tree
from cxr_transfer.extract.pipeline import ExtractSettings

CLASSES = ["covid", "normal", "pneumonia"]
CLI_COMMON = ["--backbone", "mobilenetv2", "--random-weights", "--input-size", "32", "--no-progress", "--n-boot",
              "100", "--jobs", "1"]


def _bad_name(text: str) -> str:
    """A file name holding the byte 0xff (not valid UTF-8), as Python sees it (a surrogate escape)."""
    return os.fsdecode(text.replace("?", "\xff").encode("latin-1"))


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> dict[str, Path]:
    base = tmp_path_factory.mktemp("checks")
    found = {"tr4": write_class_tree(base / "tr4", per_class=4),
             "tr10": write_class_tree(base / "tr10", per_class=10, seed=50),
             "ext": write_class_tree(base / "ext", per_class=2, seed=900)}
    one = base / "ext1" / "covid"
    one.mkdir(parents=True)
    shutil.copy(found["ext"] / "covid" / "img_000.png", one / "img_000.png")
    found["ext1"] = base / "ext1"
    found["ext_cov"] = write_class_tree(base / "ext_cov", classes=("covid",), per_class=4, seed=700)
    # N5: byte copies under names that are not UTF-8; "a?" sorts before the original "img_000.png"
    found["tr_copy"] = shutil.copytree(found["tr10"], base / "tr_copy")
    shutil.copy(found["tr_copy"] / "covid" / "img_000.png", found["tr_copy"] / "covid" / _bad_name("a?.png"))
    found["ext_copy"] = shutil.copytree(found["ext"], base / "ext_copy")
    shutil.copy(found["ext_copy"] / "covid" / "img_000.png", found["ext_copy"] / "covid" / _bad_name("x?.png"))
    return found


@pytest.fixture(scope="module")
def extract(tmp_path_factory) -> ExtractSettings:
    return ExtractSettings.from_options(backbone="mobilenetv2", random_weights=True, input_size=32, progress=False,
                                        cache_dir=tmp_path_factory.mktemp("features"))


@pytest.fixture
def no_embedding(monkeypatch):
    """Make any embedding fail loudly: the checks under test must come before it."""
    def refuse(*args, **kwargs):
        raise AssertionError("validate embedded images before refusing")

    monkeypatch.setattr(validate_module, "load_features", refuse)


def _settings(data, extract, train="tr10", external="ext", **options) -> ValidateSettings:
    options = {"backbones": "mobilenetv2", "heads": "logreg", "n_boot": 100, "n_jobs": 1, **options}
    return ValidateSettings(data=data[train], external=data[external], extract=extract, **options)


# ------------------------------------------------------------------------- H3: sizes checked before embedding


def test_too_small_alpha_is_refused_before_embedding_with_the_smallest_allowed(data, extract, tmp_path,
                                                                               no_embedding):
    # 30 images, 5 folds: each outer training part holds 24 images, and MAPIE needs 1/alpha <= 24
    with pytest.raises(CxrError, match=r"alpha=0\.04 .*24 .*smallest alpha .* is 0\.0417"):
        run_validate(_settings(data, extract, alpha=0.04, folds=5), tmp_path)
    with pytest.raises(CxrError, match=r"largest alpha .* is 0\.958"):
        run_validate(_settings(data, extract, alpha=0.999, folds=5), tmp_path)
    # the default alpha with 2 folds of 18 images: 9 images per training part, 1/0.1 = 10
    small = write_class_tree(tmp_path / "tr6", per_class=6)
    with pytest.raises(CxrError, match=r"alpha=0\.1 .*9 images"):
        run_validate(ValidateSettings(data=small, external=data["ext"], extract=extract, folds=2), tmp_path)


def test_inner_folds_too_many_for_a_class_are_refused_before_embedding(data, extract, tmp_path, no_embedding):
    # 4 images per class and 4 folds: the outer split works, but each training part has 3 covid images for
    # the 4 nested (conformal scores / calibrate) folds. 2 folds is the largest that works (3 leaves 2 per class).
    with pytest.raises(CxrError, match=r"class 'covid' .*3 images .*largest folds .* is 2"):
        run_validate(_settings(data, extract, train="tr4", folds=4, alpha=0.4), tmp_path)


def test_folds_message_names_the_class_not_its_index(data, extract, tmp_path, no_embedding):
    with pytest.raises(CxrError, match=r"class 'covid' has 10 images") as caught:
        run_validate(_settings(data, extract, folds=50), tmp_path)
    assert "'0'" not in str(caught.value)


def test_fit_conformal_refuses_too_few_images_for_its_scores():
    rng = np.random.default_rng(0)
    X, y = rng.normal(size=(9, 4)), np.repeat([0, 1, 2], 3)
    with pytest.raises(CxrError, match=r"alpha=0\.1 .*9 images"):
        fit_conformal("logreg", X, y, 0.1, folds=3)
    assert conformal.smallest_alpha(24) == pytest.approx(1 / 24) and 1 / conformal.smallest_alpha(24) <= 24


def test_cli_small_train_is_one_error_line_before_any_embedding(data, tmp_path, run_cli):
    cache = tmp_path / "cache"
    done = run_cli("validate", "--data", data["tr4"], "--external", data["ext"], *CLI_COMMON, "--cache-dir", cache,
                   "--folds", "4")
    assert done.returncode == 2
    assert "class 'covid'" in done.error_line() and "largest folds" in done.error_line()
    assert not list(cache.rglob("*.h5")) if cache.exists() else True


# ------------------------------------------------------------------------- M1: numeric settings


@pytest.mark.parametrize("option, value, pattern", [
    ("n_jobs", 0, "n_jobs"), ("n_jobs", -5, "n_jobs"), ("n_jobs", 1.5, "n_jobs"), ("seed", -1, "seed"),
    ("seed", 2**32, "seed"), ("folds", 1, "folds"), ("folds", True, "folds"), ("n_boot", 50, "n_boot"),
    ("explain", -1, "explain"), ("alpha", 1.0, "alpha"), ("alpha", float("nan"), "alpha")])
def test_settings_refuse_out_of_range_numbers_naming_the_parameter(data, option, value, pattern):
    with pytest.raises((ValueError, TypeError), match=pattern):
        ValidateSettings(data=data["tr10"], external=data["ext"], **{option: value})


def test_settings_accept_the_documented_edges(data):
    ValidateSettings(data=data["tr10"], external=data["ext"], n_jobs=-1, seed=2**32 - 1, folds=2, n_boot=100)
    ValidateSettings(data=data["tr10"], external=data["ext"], n_jobs=np.int64(3), seed=np.int64(0))
    ValidateSettings(data=data["tr10"], external=data["ext"], alpha=np.float32(0.1))   # was refused as out of range
    assert conformal.check_alpha(np.float32(0.1)) == pytest.approx(0.1)


def test_library_validate_refuses_bad_jobs_with_a_value_error(data, no_embedding):
    with pytest.raises(ValueError, match="n_jobs"):
        cxr_transfer.validate(data["tr10"], data["ext"], "mobilenetv2", random_weights=True, input_size=32,
                              n_jobs=0)


@pytest.mark.parametrize("flag, value, word", [("--jobs", "0", "--jobs: must be -1 (all cores) or at least 1"),
                                               ("--jobs", "-5", "--jobs: must be -1 (all cores) or at least 1"),
                                               ("--seed", "-1", "--seed: must be at least 0")])
def test_cli_bad_numbers_are_one_error_line(data, tmp_path, run_cli, flag, value, word):
    done = run_cli("validate", "--data", data["tr10"], "--external", data["ext"], "--backbone", "mobilenetv2",
                   "--random-weights", "--input-size", "32", "--cache-dir", tmp_path / "c", flag, value)
    assert done.returncode == 2 and word in done.error_line()   # the flag, not the library's parameter name


# ------------------------------------------------------------------------- L1: the run folder first


def test_out_and_name_are_checked_before_any_computing(data, extract, tmp_path, no_embedding, read_only):
    a_file = tmp_path / "a_file"
    a_file.write_text("x")
    with pytest.raises(CxrError, match="existing file"):
        run_validate(_settings(data, extract), a_file)
    finished = tmp_path / "runs" / "done"
    finished.mkdir(parents=True)
    (finished / "results.json").write_text("{}")
    with pytest.raises(CxrError, match="already holds a finished run"):
        run_validate(_settings(data, extract), tmp_path / "runs", "done")
    locked = tmp_path / "locked"
    locked.mkdir()
    with read_only(locked):
        with pytest.raises(CxrError, match="not writable"):
            run_validate(_settings(data, extract), locked)


def test_cli_out_a_file_is_refused_at_once(data, tmp_path, run_cli):
    (tmp_path / "a_file").write_text("x")
    done = run_cli("validate", "--data", data["tr10"], "--external", data["ext"], *CLI_COMMON, "--cache-dir",
                   tmp_path / "c", "--out", tmp_path / "a_file")
    assert done.returncode == 2 and "existing file" in done.error_line()
    assert not (tmp_path / "c").exists() or not list((tmp_path / "c").rglob("*.h5"))


# ------------------------------------------------------------------------- M2: tiny and one-class EXT


def test_macro_over_present_classes_ignores_absent_ones():
    y, pred = np.array([0, 0, 0, 0]), np.array([0, 0, 0, 1])
    found = metrics_from_confusion(confusion_matrix(y, pred, 3), CLASSES)
    assert found["macro"]["f1"] == pytest.approx((6 / 7) / 3)                # the paper's macro: absent = 0
    assert metrics.macro_over_present(found, "f1") == pytest.approx(6 / 7)         # covid's F1 alone
    empty = metrics_from_confusion(np.zeros((3, 3), dtype=int), CLASSES)
    assert math.isnan(metrics.macro_over_present(empty, "f1"))


def test_small_sets_get_wilson_intervals_and_a_mover_gap():
    y = np.array([0])
    proba = np.array([[0.9, 0.05, 0.05]])
    stats = bootstrap.wilson_intervals(y, proba, CLASSES)
    low, high = wilson_interval(1, 1)
    assert stats["accuracy"] == {"value": 1.0, "ci_low": low, "ci_high": high} and high - low > 0.5
    assert stats["sensitivity_covid"]["ci_low"] == low
    assert math.isnan(stats["macro_f1"]["ci_low"]) and math.isnan(stats["auc_macro"]["value"])
    internal = {"accuracy": {"value": 0.8, "ci_low": 0.7, "ci_high": 0.88}}
    gap = bootstrap.mover_gap_intervals(internal, {"accuracy": stats["accuracy"]})["accuracy"]
    assert gap["value"] == pytest.approx(0.2)
    assert gap["ci_low"] == pytest.approx(0.2 - math.hypot(1.0 - low, 0.88 - 0.8))
    assert gap["ci_high"] == pytest.approx(0.2 + math.hypot(0.0, 0.8 - 0.7))
    assert bootstrap.SMALL_SAMPLE == 30
    assert wilson_interval(15, 15)[1] == 1.0 and wilson_interval(0, 15)[0] == 0.0   # holds p despite rounding


def test_one_image_external_set_gets_a_wilson_interval_not_a_zero_width_one(data, extract, tmp_path):
    run = run_validate(_settings(data, extract, external="ext1", folds=3), tmp_path, "one")
    (model,) = run.models
    accuracy = model.external["metrics"]["accuracy"]
    assert model.external["interval"] == "wilson" and model.internal["interval"] == "bootstrap"
    assert accuracy["ci_high"] - accuracy["ci_low"] > 0.5                    # Wilson of 1 image: ~0.79 wide
    gap = model.gap["accuracy"]
    assert gap["ci_low"] < 0 < gap["ci_high"] or gap["ci_high"] - gap["ci_low"] > 0.5
    report = (run.run_dir / "report.md").read_text()
    assert "Wilson" in report and f"fewer than {bootstrap.SMALL_SAMPLE}" in report


def test_one_class_external_set_has_macro_f1_over_its_class_and_no_macro_gap(data, extract, tmp_path):
    run = run_validate(_settings(data, extract, external="ext_cov", folds=3), tmp_path, "cov")
    (model,) = run.models
    external = model.external["metrics"]
    sensitivity = external["sensitivity_covid"]["value"]
    f1 = 2 * sensitivity / (1 + sensitivity) if sensitivity else 0.0       # precision is 1: only covid images
    assert external["macro_f1"]["value"] == pytest.approx(f1)
    for metric in ("macro_f1", "auc_macro"):
        gap = model.gap[metric]
        assert math.isnan(gap["ci_low"]) and math.isnan(gap["ci_high"])     # never "significant"
    assert any("lacks class" in note for note in run.notes)


# ------------------------------------------------------------------------- N5: non-UTF-8 byte copies


def test_validate_with_non_utf8_byte_copies_writes_a_utf8_report_and_keeps_the_readable_copy(data, extract,
                                                                                            tmp_path):
    run = run_validate(ValidateSettings(data=data["tr_copy"], external=data["ext_copy"], extract=extract,
                                        backbones="mobilenetv2", heads="logreg", n_boot=100, n_jobs=1),
                       tmp_path, "copies")
    report = (run.run_dir / "report.md").read_bytes().decode("utf-8")   # valid UTF-8
    assert "covid/x\\xff.png" in report and "covid/a\\xff.png" in report
    results = json.loads((run.run_dir / "results.json").read_text(encoding="utf-8"))
    # the copy with the readable name is the one kept: no TRAIN image is lost to the unreadable name
    assert results["record"]["n_train"] == 30 and results["record"]["n_external"] == 6
    skipped = {where: dict(entries) for where, entries in run.skipped.items()}
    assert "covid/a\\xff.png" in skipped["TRAIN"] and "covid/img_000.png" in skipped["TRAIN"]["covid/a\\xff.png"]
    assert "covid/x\\xff.png" in skipped["EXT"]
    for where, entries in run.skipped.items():
        for path, reason in entries:
            (path + reason).encode("utf-8")
    (run.run_dir / "external_predictions.csv").read_bytes().decode("utf-8")


# ------------------------------------------------------------------------- N1: knn on small folds


def test_knn_on_folds_smaller_than_its_neighbours_is_refused_before_embedding(data, extract, tmp_path,
                                                                            no_embedding):
    # 12 images, 2 outer folds: 6 per training part, split again in 2 for the conformal sets: 3 per fit < 5
    with pytest.raises(CxrError, match=r"knn .*5 neighbours.* 3 images"):
        run_validate(ValidateSettings(data=data["tr4"], external=data["ext"], extract=extract, backbones="mobilenetv2",
                                      heads="knn", folds=2, alpha=0.2, n_boot=100, n_jobs=1), tmp_path)
    # other heads still run on the same data (the check is knn's own)
    with pytest.raises(AssertionError, match="embedded"):
        run_validate(ValidateSettings(data=data["tr4"], external=data["ext"], extract=extract, backbones="mobilenetv2",
                                      heads="logreg", folds=2, alpha=0.2, n_boot=100, n_jobs=1), tmp_path)


def test_cli_knn_on_small_folds_is_one_error_line(data, tmp_path, run_cli):
    done = run_cli("validate", "--data", data["tr4"], "--external", data["ext"], *CLI_COMMON, "--folds", "2",
                   "--alpha", "0.2", "--heads", "knn", "--cache-dir", tmp_path / "cache", "--out", tmp_path)
    assert done.returncode == 2, done.stderr[-2000:]
    assert "Traceback" not in done.stderr
    assert "knn" in done.error_line() and "at least 5" in done.error_line()
    assert not (tmp_path / "cache").exists() or not list((tmp_path / "cache").rglob("*.h5"))


def test_knn_runs_when_every_fit_has_enough_images(data, extract, tmp_path):
    run = run_validate(ValidateSettings(data=data["tr10"], external=data["ext"], extract=extract,
                                        backbones="mobilenetv2", heads="knn", folds=2, alpha=0.2, n_boot=100,
                                        n_jobs=1), tmp_path)
    assert run.models[0].head == "knn"


# ------------------------------------------------------------------------- N2: --n-boot bounded


def test_n_boot_has_an_upper_bound(data):
    with pytest.raises(CxrError, match=r"n_boot must be at most 100000 .*got 1000000000000"):
        ValidateSettings(data=data["tr10"], external=data["ext"], n_boot=10**12)
    ValidateSettings(data=data["tr10"], external=data["ext"], n_boot=100_000)


def test_cli_n_boot_too_large_is_one_error_line(data, tmp_path, run_cli):
    done = run_cli("validate", "--data", data["tr10"], "--external", data["ext"], "--n-boot", "1000000000000",
                   "--out", tmp_path, timeout=120)
    assert done.returncode == 2, done.stderr[-2000:]
    assert "Traceback" not in done.stderr
    assert "n_boot" in done.error_line() or "n-boot" in done.error_line()
    assert "100000" in done.error_line()
