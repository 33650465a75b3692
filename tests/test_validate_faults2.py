"""validate faults found by a tester: a non-UTF-8 file name that is a byte copy of another image (N5), the knn
head on folds too small for its neighbours (N1), and an unbounded --n-boot (N2)."""
from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest

import cxr_transfer.classify.validate as validate_module
from cxr_transfer.classify.validate import ValidateSettings, run_validate
from cxr_transfer.core.errors import CxrError
from cxr_transfer.core.synthetic import write_class_tree
from cxr_transfer.extract.pipeline import ExtractSettings

CLI_COMMON = ["--backbone", "mobilenetv2", "--random-weights", "--input-size", "32", "--no-progress", "--n-boot",
              "100", "--jobs", "1"]


def _bad_name(text: str) -> str:
    """A file name holding the byte 0xff (not valid UTF-8), as Python sees it (a surrogate escape)."""
    return os.fsdecode(text.replace("?", "\xff").encode("latin-1"))


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> dict[str, Path]:
    base = tmp_path_factory.mktemp("faults2")
    found = {"tr4": write_class_tree(base / "tr4", per_class=4),
             "tr10": write_class_tree(base / "tr10", per_class=10, seed=50),
             "ext": write_class_tree(base / "ext", per_class=2, seed=900)}
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


# ------------------------------------------------------------------------- N5: non-UTF-8 byte copies


def test_validate_with_non_utf8_byte_copies_writes_a_utf8_report_and_keeps_the_readable_copy(data, extract,
                                                                                            tmp_path):
    run = run_validate(ValidateSettings(data=data["tr_copy"], external=data["ext_copy"], extract=extract,
                                        backbones="mobilenetv2", heads="logreg", n_boot=100, n_jobs=1,
                                        out_dir=tmp_path, run_name="copies"))
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
                                      heads="knn", folds=2, alpha=0.2, n_boot=100, n_jobs=1, out_dir=tmp_path))
    # other heads still run on the same data (the check is knn's own)
    with pytest.raises(AssertionError, match="embedded"):
        run_validate(ValidateSettings(data=data["tr4"], external=data["ext"], extract=extract, backbones="mobilenetv2",
                                      heads="logreg", folds=2, alpha=0.2, n_boot=100, n_jobs=1, out_dir=tmp_path))


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
                                        n_jobs=1, out_dir=tmp_path))
    assert run.models[0]["head"] == "knn"


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
