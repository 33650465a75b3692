"""explain on bad output places, odd file names and reused output folders; its per-class summary.

mobilenetv2 with random weights at 32 px on small synthetic images; the heads are saved once per module.
"""
from __future__ import annotations

import csv
import math
import os
import re
import shutil
from pathlib import Path

import numpy as np
import pytest

from cxr_transfer.classify.compare import CompareSettings, run_compare
from cxr_transfer.classify.predict import predict_images
from cxr_transfer.core.errors import CxrError
from testkit.synthetic import write_class_tree
from cxr_transfer.explain.regions import REGIONS
from cxr_transfer.explain.run import Explanation, run_explain
from cxr_transfer.extract.pipeline import ExtractSettings

SIZE = 32


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory) -> Path:
    return write_class_tree(tmp_path_factory.mktemp("explain-faults") / "data", per_class=5, splits=("train", "test"),
                            size=40)


@pytest.fixture(scope="module")
def settings(tmp_path_factory) -> ExtractSettings:
    return ExtractSettings.from_options(backbone="mobilenetv2", random_weights=True, input_size=SIZE, progress=False,
                                        cache_dir=tmp_path_factory.mktemp("cache"))


@pytest.fixture(scope="module")
def heads(data_dir, settings, tmp_path_factory) -> Path:
    run = run_compare(CompareSettings(data=data_dir, extract=settings, backbones="mobilenetv2", heads="logreg,knn",
                                      protocol="holdout", save=True, n_jobs=1),
                      tmp_path_factory.mktemp("runs"), "r")
    return run.run_dir


def _pngs(folder: Path) -> list[Path]:
    return sorted((folder / "test").rglob("*.png"))


def _images(folder: Path, sources: list[Path]) -> Path:
    folder.mkdir(parents=True)
    for i, source in enumerate(sources):
        shutil.copy(source, folder / f"img{i}.png")
    return folder


# --- M7: --out checked before the model is loaded -------------------------------------------------------


@pytest.mark.parametrize("kind", ["file", "under_file", "read_only"])
def test_cli_bad_out_is_one_error_line_before_any_export(kind, heads, data_dir, run_cli, read_only, tmp_path):
    fresh_cache = tmp_path / "fresh-cache"          # an export would land here
    blocker = tmp_path / "taken"
    blocker.write_text("a file\n")
    read_only_dir = tmp_path / "ro"
    read_only_dir.mkdir()
    out, expected = {"file": (blocker, "is an existing file, not a folder"),
                     "under_file": (blocker / "sub", "cannot create the"),
                     "read_only": (read_only_dir, "not writable")}[kind]
    args = ("explain", data_dir / "test" / "covid", "--model", heads / "mobilenetv2-logreg.joblib", "--out", out,
            "--random-weights", "--cache-dir", fresh_cache, "--no-progress")
    if kind == "read_only":
        with read_only(read_only_dir):
            done = run_cli(*args)
    else:
        done = run_cli(*args)
    assert done.returncode == 2
    line = done.error_line()
    assert str(out) in line and expected in line
    assert not fresh_cache.exists() or not any(fresh_cache.rglob("*.onnx"))


# --- M8: a file name that is not valid UTF-8 ------------------------------------------------------------


def test_non_utf8_name_is_skipped_as_predict_does(heads, data_dir, settings, tmp_path):
    folder = _images(tmp_path / "imgs", _pngs(data_dir)[:3])
    odd = Path(os.fsdecode(os.fsencode(folder) + b"/x\xff.png"))
    shutil.copy(_pngs(data_dir)[3], odd)
    model = heads / "mobilenetv2-logreg.joblib"
    result = run_explain(folder, model, settings, tmp_path / "out")
    assert len(result.explanations) == 3
    _, predicted_skips = predict_images(folder, model, settings, tmp_path / "p.csv")
    assert len(result.skipped) == 1 and result.skipped == [(p, r) for p, r in predicted_skips]
    assert result.skipped[0][0] == "x\\xff.png" and "path not valid UTF-8 (rename it)" in result.skipped[0][1]
    rows = (tmp_path / "out" / "explain.csv").read_text(encoding="utf-8").splitlines()
    assert len(rows) == 4


# --- L7: the summary counts every image; an earlier explain run is never mixed in -------------------------


def _explanation(predicted: str, border: float) -> Explanation:
    shares = {r: float("nan") for r in REGIONS} if math.isnan(border) else \
        {"center": 1 - border, "middle": 0.0, "border": border}
    return Explanation("a.png", "0" * 64, predicted, 0.9, "occlusion", np.zeros((2, 2)), shares)


def test_summary_counts_images_without_positive_evidence():
    from cxr_transfer.explain.run import summary_lines

    nan = float("nan")
    lines = summary_lines([_explanation("covid", 0.2), _explanation("covid", nan), _explanation("covid", nan),
                           _explanation("normal", nan), _explanation("normal", nan)])
    assert lines == ["predicted covid: 3 images, mean border share 20.0% over the 1 with positive evidence "
                     "(2 without)",
                     "predicted normal: 2 images, none with positive evidence (no border share)"]
    assert summary_lines([_explanation("covid", 0.5), _explanation("covid", 0.1)]) == \
        ["predicted covid: 2 images, mean border share 30.0%"]


def _listing(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir())


def test_existing_explain_output_is_refused_or_replaced_whole(heads, data_dir, settings, tmp_path):
    model = heads / "mobilenetv2-logreg.joblib"
    first = _images(tmp_path / "first", _pngs(data_dir)[:3])
    second = _images(tmp_path / "second", _pngs(data_dir)[3:5])
    for i, path in enumerate(sorted(second.iterdir())):
        path.rename(second / f"other{i}.png")
    out = tmp_path / "out"
    run_explain(first, model, settings, out)
    assert _listing(out) == ["explain.csv", "img0.png", "img1.png", "img2.png"]
    with pytest.raises(CxrError, match=r"already holds an explain run.*overwrite"):
        run_explain(second, model, settings, out)
    assert _listing(out) == ["explain.csv", "img0.png", "img1.png", "img2.png"]
    run_explain(second, model, settings, out, overwrite=True)
    assert _listing(out) == ["explain.csv", "other0.png", "other1.png"]       # no stale PNG of the first run
    with open(out / "explain.csv", newline="") as handle:
        assert [row["png"] for row in csv.DictReader(handle)] == ["other0.png", "other1.png"]
    # a folder holding something else: refused, and with overwrite its files are left alone
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("keep me\n")
    with pytest.raises(CxrError, match=r"mine: the output folder is not empty"):
        run_explain(second, model, settings, mine)
    run_explain(second, model, settings, mine, overwrite=True)
    assert _listing(mine) == ["explain.csv", "notes.txt", "other0.png", "other1.png"]


def test_cli_summary_counts_every_explained_image_and_overwrite(heads, data_dir, settings, run_cli, tmp_path):
    flags = ("--model", heads / "mobilenetv2-knn.joblib", "--random-weights", "--cache-dir", settings.cache_dir,
             "--no-progress", "--out", tmp_path / "ex")
    done = run_cli("explain", data_dir / "test", *flags)
    assert done.returncode == 0, done.stderr[-3000:]
    total = int(re.search(r"occlusion: (\d+) heatmaps", done.stdout).group(1))
    assert total == 15
    counted = [int(n) for n in re.findall(r"^predicted \S+: (\d+) images", done.stdout, re.M)]
    assert sum(counted) == total, done.stdout
    again = run_cli("explain", data_dir / "test" / "covid", *flags)
    assert again.returncode == 2 and "--overwrite" in again.error_line()
    again = run_cli("explain", data_dir / "test" / "covid", *flags, "--overwrite")
    assert again.returncode == 0, again.stderr[-3000:]
    assert "occlusion: 5 heatmaps" in again.stdout
    assert len(list((tmp_path / "ex").glob("*.png"))) == 5
