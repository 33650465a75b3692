"""The bad-input corpus (issue 9): odd and hostile inputs run through the real command line.

Every case runs ``python -m cxr_transfer.cli`` in a subprocess on tiny synthetic images and checks the exit
status, the one ``error: ...`` line (or the summary lines that name what was left out), that no traceback is
printed, and, where features are cached, that no cached row is lost or wrong: every row of the HDF5 file must
equal the embedding the same image has in a clean reference extraction.
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Callable

import numpy as np
import pytest

from cxr_transfer.core.cache_keys import dataset_cache_id
from testkit.synthetic import write_class_tree

BACKBONE = ["--backbone", "mobilenetv2", "--random-weights", "--input-size", "32", "--no-progress"]
CLASSES = ("covid", "normal")
PER_CLASS = 5


@pytest.fixture(scope="session")
def corpus(tmp_path_factory) -> dict:
    """Clean images, a shared cache (the ONNX export is made once) and the reference embedding of each image."""
    from cxr_transfer.api import embed_folder

    base = tmp_path_factory.mktemp("corpus")
    images = write_class_tree(base / "images", classes=CLASSES, per_class=PER_CLASS, size=40)
    cache = base / "cache"
    features = embed_folder(images, "mobilenetv2", random_weights=True, input_size=32, cache_dir=cache)
    reference = {s.sha256: row for s, row in zip(features.samples, features.embeddings)}
    assert len(reference) == len(CLASSES) * PER_CLASS
    return {"images": images, "cache": cache, "reference": reference}


def copy_images(corpus: dict, target: Path) -> Path:
    shutil.copytree(corpus["images"], target)
    return target


def cached_rows(corpus: dict, data: Path) -> int:
    """Rows of the dataset's HDF5 cache after checking each against the reference; returns their number."""
    from cxr_transfer.extract.cache import read_cache

    folder = corpus["cache"] / dataset_cache_id(data.resolve())
    files = sorted(folder.glob("mobilenetv2-32-*.h5"))
    assert len(files) == 1, list(folder.iterdir())
    embeddings, columns, _ = read_cache(files[0])
    assert len(embeddings) == len(columns["sha256"])
    for sha, row in zip(columns["sha256"], embeddings):
        np.testing.assert_allclose(row, corpus["reference"][str(sha)], rtol=1e-5, atol=1e-5)
    return len(embeddings)


# --- refused with one line, before any work: (arguments or a setup that returns them, words of the message) ---

def _csv(content: bytes, name: str = "list.csv") -> Callable[[Path, dict], list[str]]:
    def setup(tmp: Path, corpus: dict) -> list[str]:
        data = copy_images(corpus, tmp / "data")
        (data / name).write_bytes(content)
        return ["extract", "--data", str(data / name), *BACKBONE]
    return setup


def _manifest_of_random_bytes(tmp: Path, corpus: dict) -> list[str]:
    data = copy_images(corpus, tmp / "data")
    (data / "manifest.csv").write_bytes(bytes(np.random.default_rng(0).integers(0, 256, 2000, dtype=np.uint8)))
    return ["extract", "--data", str(data), *BACKBONE]


def _out_is_a_file(tmp: Path, corpus: dict) -> list[str]:
    (tmp / "runs").write_text("not a folder")
    return ["compare", "--data", str(corpus["images"]), *BACKBONE, "--out", str(tmp / "runs")]


def _out_under_a_file(tmp: Path, corpus: dict) -> list[str]:
    (tmp / "file").write_text("x")
    return ["compare", "--data", str(corpus["images"]), *BACKBONE, "--out", str(tmp / "file" / "runs")]


def _name_of_a_finished_run(tmp: Path, corpus: dict) -> list[str]:
    (tmp / "runs" / "mine").mkdir(parents=True)
    (tmp / "runs" / "mine" / "results.json").write_text("{}")
    return ["compare", "--data", str(corpus["images"]), *BACKBONE, "--out", str(tmp / "runs"), "--name", "mine"]


def _partial_finetune_run(tmp: Path, corpus: dict) -> list[str]:
    run = tmp / "ft"
    run.mkdir()
    (run / "results.json").write_text(json.dumps({
        "kind": "finetune", "class_names": list(CLASSES), "evaluations": [], "summary": [],
        "record": {"partial": True, "epochs_done": 2, "settings": {"epochs": 4}}}))
    return ["report", str(run), str(run), "--out", str(tmp / "side.md")]


def _not_a_run_folder(tmp: Path, corpus: dict) -> list[str]:
    return ["report", str(tmp), "--out", str(tmp / "side.md")]


def _damaged_results(tmp: Path, corpus: dict) -> list[str]:
    (tmp / "run").mkdir()
    (tmp / "run" / "results.json").write_text('{"kind": "compare", "evaluations": [{"backbone": ')
    return ["report", str(tmp / "run"), "--out", str(tmp / "side.md")]


def _head(sidecar: str | None, out: str | None = None) -> Callable[[Path, dict], list[str]]:
    def setup(tmp: Path, corpus: dict) -> list[str]:
        (tmp / "h.joblib").write_bytes(b"never unpickled")
        if sidecar is not None:
            (tmp / "h.json").write_text(sidecar)
        extra = ["--out", str(tmp / out)] if out else []
        if out:
            (tmp / out).mkdir()
        return ["predict", str(corpus["images"]), "--model", str(tmp / "h.joblib"), *BACKBONE, *extra]
    return setup


GOOD_SIDECAR = {"format": "cxr-transfer/head/1", "joblib_sha256": "0" * 64, "class_names": list(CLASSES),
                "backbones": [{"backbone": "mobilenetv2", "input_size": 32, "weights_sha256": "random:seed0"}]}


def _images(*args: str) -> Callable[[Path, dict], list[str]]:
    return lambda tmp, corpus: [args[0], "--data", str(corpus["images"]), *BACKBONE, *args[1:]]


REFUSED = {
    "batch-size-0": (_images("extract", "--batch-size", "0"), "--batch-size: must be at least 1, got 0"),
    "batch-size-negative": (_images("extract", "--batch-size", "-1"), "--batch-size: must be at least 1, got -1"),
    "jobs-0": (_images("compare", "--jobs", "0"), "--jobs: must be -1 (all cores) or at least 1"),
    "input-size-100000": (_images("extract", "--input-size", "100000"), "--input-size: must be at most 1024"),
    "input-size-0": (_images("extract", "--input-size", "0"), "--input-size: must be at least 1"),
    "threads-0": (_images("extract", "--threads", "0"), "--threads: must be at least 1"),
    "seeds-0": (_images("compare", "--seeds", "0"), "--seeds: must be at least 1"),
    "seed-negative": (_images("compare", "--seed", "-3"), "--seed: must be at least 0"),
    "folds-1": (_images("compare", "--folds", "1"), "--folds: must be at least 2"),
    "test-size-1.5": (_images("compare", "--test-size", "1.5"), "--test-size: must be between 0 and 1"),
    "epochs-0": (_images("finetune", "--epochs", "0"), "--epochs: must be at least 1"),
    "lr-negative": (_images("finetune", "--lr", "-1"), "--lr: must be a positive finite number"),
    "dropout-1": (_images("finetune", "--dropout", "1"), "--dropout: must be between 0 and 1 (excluding 1)"),
    "unknown-backbone": (lambda tmp, corpus: ["extract", "--data", str(corpus["images"]), "--backbone", "vgg17"],
                         "unknown backbone 'vgg17'"),
    "missing-data": (lambda tmp, corpus: ["extract", "--data", str(tmp / "nowhere"), *BACKBONE],
                     "no such file or folder"),
    "empty-folder": (lambda tmp, corpus: ["extract", "--data", str(tmp), *BACKBONE], "no class folders found"),
    "data-is-a-text-file": (_csv(b"hello", "notes.txt"), "give a folder of class subfolders or a .csv"),
    "csv-random-bytes": (_csv(bytes(np.random.default_rng(1).integers(0, 256, 3000, dtype=np.uint8))),
                         "not UTF-8 text"),
    "csv-latin-1": (_csv("path,label\ncovid/img_000.png,röntgen\n".encode("latin-1")), "not UTF-8 text (byte"),
    "csv-nul-bytes": (_csv(b"path,label\n\0\0,covid\n"), "contains NUL bytes"),
    "csv-wrong-columns": (_csv(b"file,class\ncovid/img_000.png,covid\n"), "needs the columns path,label"),
    "csv-missing-file": (_csv(b"path,label\ncovid/nope.png,covid\n"), "1 listed file(s) do not exist"),
    "csv-empty-label": (_csv(b"path,label\ncovid/img_000.png,\n"), "list.csv:2: empty path or label"),
    "csv-one-image-two-labels": (_csv(b"path,label\ncovid/img_000.png,covid\ncovid/img_000.png,normal\n"
                                      b"normal/img_001.png,normal\n"),
                                 "has two labels: covid/img_000.png is 'covid' and covid/img_000.png is 'normal'"),
    "manifest-random-bytes": (_manifest_of_random_bytes, "manifest.csv: not UTF-8 text"),
    "out-is-a-file": (_out_is_a_file, "is an existing file, not a folder"),
    "out-under-a-file": (_out_under_a_file, "cannot create the --out folder"),
    "name-of-a-finished-run": (_name_of_a_finished_run, "already holds a finished run (results.json)"),
    "name-with-a-slash": (_images("compare", "--name", "a/b"), "must be one folder name"),
    "report-partial-run-given-twice": (_partial_finetune_run,
                                       "is a partial finetune run (interrupted after 2 of 4 epochs)"),
    "report-not-a-run-folder": (_not_a_run_folder, "not a cxr-transfer run folder"),
    "report-damaged-results": (_damaged_results, "not a readable results file"),
    "head-without-sidecar": (_head(None), "only heads saved by cxr-transfer"),
    "head-sidecar-not-json": (_head("{not json"), "not a readable head description"),
    "head-sidecar-bad-size": (_head(json.dumps({**GOOD_SIDECAR, "backbones": [{**GOOD_SIDECAR["backbones"][0],
                                                                               "input_size": "big"}]})),
                              "malformed head description: input_size of mobilenetv2"),
    "head-sidecar-no-classes": (_head(json.dumps({**GOOD_SIDECAR, "class_names": []})),
                                "class_names must list at least two class names"),
    "predict-out-is-a-folder": (_head(json.dumps(GOOD_SIDECAR), out="preds"), "is an existing folder"),
}


@pytest.mark.parametrize("case", list(REFUSED))
def test_refused_with_one_line(case, corpus, run_cli, tmp_path):
    setup, words = REFUSED[case]
    result = run_cli(*setup(tmp_path, corpus))
    assert result.returncode == 2, result.stderr[-2000:]
    assert words in result.error_line()


# --- accepted, with what was left out named and counted, and the cache intact --------------------------------


def test_bom_csv_is_accepted(corpus, run_cli, tmp_path):
    data = copy_images(corpus, tmp_path / "data")
    rows = [f"{p.relative_to(data).as_posix()},{p.parent.name}" for p in sorted(data.rglob("*.png"))]
    (data / "list.csv").write_bytes(("\ufeffpath,label\n" + "\n".join(rows) + "\n").encode("utf-8"))
    result = run_cli("extract", "--data", data / "list.csv", *BACKBONE, "--cache-dir", corpus["cache"])
    assert result.returncode == 0, result.stderr[-2000:]
    assert cached_rows(corpus, data) == 10


def test_one_file_listed_twice_is_one_row(corpus, run_cli, tmp_path):
    data = copy_images(corpus, tmp_path / "data")
    rows = [f"{p.relative_to(data).as_posix()},{p.parent.name}" for p in sorted(data.rglob("*.png"))]
    (data / "list.csv").write_text("path,label\n" + "\n".join(rows + rows[:1]) + "\n")
    result = run_cli("extract", "--data", data / "list.csv", *BACKBONE, "--cache-dir", corpus["cache"])
    assert result.returncode == 0, result.stderr[-2000:]
    assert "kept once" in result.stdout and "1 file(s) or folder(s)" in result.stdout
    assert cached_rows(corpus, data) == 10


def test_odd_entries_are_named_and_counted_and_a_rerun_keeps_every_row(corpus, run_cli, tmp_path):
    """A copy of an image in test/, a non-split folder, dangling and looping links, a loose image; then a
    damaged and an empty file added: each named and counted, and no cached row lost."""
    data = tmp_path / "data"
    copy_images(corpus, data / "train")
    (data / "test" / "covid").mkdir(parents=True)
    shutil.copy(data / "train" / "covid" / "img_000.png", data / "test" / "covid" / "copy.png")
    shutil.copy(data / "train" / "normal" / "img_000.png", data / "test" / "covid" / "x.png")  # class normal
    (data / "test" / "normal").mkdir()
    shutil.copy(data / "train" / "normal" / "img_001.png", data / "test" / "normal" / "copy.png")
    (data / "notes").mkdir()
    (data / "train" / "covid" / "gone.png").symlink_to(tmp_path / "missing.png")
    (data / "train" / "covid" / "loop.png").symlink_to(data / "train" / "covid" / "loop.png")
    shutil.copy(data / "train" / "covid" / "img_001.png", data / "loose.png")
    args = ("extract", "--data", data, *BACKBONE, "--cache-dir", corpus["cache"])
    result = run_cli(*args)
    assert result.returncode == 2   # the same bytes as train/normal/img_000.png under the label covid
    assert "test/covid/x.png is 'covid' and train/normal/img_000.png is 'normal'" in result.error_line() or \
        "train/normal/img_000.png is 'normal' and test/covid/x.png is 'covid'" in result.error_line()
    (data / "test" / "covid" / "x.png").unlink()
    result = run_cli(*args)
    assert result.returncode == 0, result.stderr[-2000:]
    for words in ("left out notes: folder beside the split folders is not a split",
                  "left out train/covid/gone.png: dangling symbolic link",
                  "left out train/covid/loop.png: symbolic link loop",
                  "left out loose.png: image outside any class folder",
                  "left out test/covid/copy.png: the same image as train/covid/img_000.png",
                  "left out test/normal/copy.png: the same image as train/normal/img_001.png",
                  "6 file(s) or folder(s)"):
        assert words in result.stdout, result.stdout
    assert "Traceback" not in result.stderr
    assert cached_rows(corpus, data) == 10
    (data / "train" / "covid" / "damaged.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"\0" * 40)
    (data / "train" / "normal" / "empty.png").write_bytes(b"")
    result = run_cli(*args)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "2 skipped" in result.stdout and "empty file (0 bytes)" in result.stdout
    assert cached_rows(corpus, data) == 10


def test_a_folder_of_unreadable_images_says_none_could_be_read(corpus, run_cli, tmp_path):
    data = tmp_path / "data"
    for index, name in enumerate(CLASSES):
        (data / name).mkdir(parents=True)
        (data / name / "a.png").write_bytes(b"\0" * index)   # an empty file and a one-byte file
        (data / name / "b.jpg").write_bytes(b"not a jpeg at all " + name.encode())
    result = run_cli("extract", "--data", data, *BACKBONE, "--cache-dir", corpus["cache"])
    assert result.returncode == 2 and "none of the 4 images could be read" in result.error_line()


def test_a_250_character_folder_name(corpus, run_cli, tmp_path):
    data = copy_images(corpus, tmp_path / ("x" * 250))
    result = run_cli("extract", "--data", data, *BACKBONE, "--cache-dir", corpus["cache"])
    assert result.returncode == 0, result.stderr[-2000:]
    assert cached_rows(corpus, data) == 10


def test_errors_name_classes_and_a_holdout_class_missing_from_train(corpus, run_cli, tmp_path):
    data = tmp_path / "data"
    copy_images(corpus, data / "train")
    shutil.rmtree(data / "train" / "normal")
    (data / "test").mkdir()
    shutil.copytree(corpus["images"] / "normal", data / "test" / "normal")
    base = ("compare", "--data", data, *BACKBONE, "--cache-dir", corpus["cache"], "--heads", "logreg",
            "--out", tmp_path / "runs", "--jobs", "1")
    one_class = run_cli(*base, "--seeds", "1")
    assert one_class.returncode == 2 and "only one class ('covid', 5 images)" in one_class.error_line()
    holdout = run_cli(*base, "--protocol", "holdout")
    assert holdout.returncode == 2
    assert "class 'normal' has images in test/ but none in train/" in holdout.error_line()
    assert not (tmp_path / "runs").exists() or not any((tmp_path / "runs").iterdir())
    assert cached_rows(corpus, data) == 10


def test_a_name_is_never_reused_and_default_run_folders_never_collide(corpus, run_cli, tmp_path):
    from cxr_transfer.core.outputs import new_run_dir

    args = ("compare", "--data", corpus["images"], *BACKBONE, "--cache-dir", corpus["cache"], "--heads", "logreg",
            "--seeds", "1", "--out", tmp_path / "runs", "--jobs", "1")
    first = run_cli(*args, "--name", "mine")
    assert first.returncode == 0, first.stderr[-2000:]
    before = {p.name: p.read_bytes() for p in (tmp_path / "runs" / "mine").iterdir()}
    second = run_cli(*args, "--name", "mine")
    assert second.returncode == 2 and "already holds a finished run" in second.error_line()
    assert {p.name: p.read_bytes() for p in (tmp_path / "runs" / "mine").iterdir()} == before
    folders = {new_run_dir(tmp_path / "many", "compare-paper") for _ in range(50)}   # all within a second or two
    assert len(folders) == 50 and all(p.is_dir() for p in folders)
    assert cached_rows(corpus, corpus["images"]) == 10


def test_audit_of_one_class_says_what_it_could_not_check(corpus, run_cli, tmp_path):
    data = tmp_path / "data"
    shutil.copytree(corpus["images"] / "covid", data / "covid")
    result = run_cli("audit", "--data", data, *BACKBONE, "--cache-dir", corpus["cache"], "--runs-dir",
                     tmp_path / "runs")
    assert result.returncode == 0, result.stderr[-2000:]
    assert "Not checked: acquisition shortcuts" in result.stdout and "pixel shortcuts" in result.stdout
    assert "No duplicates, leakage or shortcuts were found" not in result.stdout
    assert "patient ids" not in result.stdout


def test_a_non_ascii_name_under_an_ascii_locale_is_printed_not_fatal(corpus, run_cli, tmp_path):
    """Messages naming a non-ASCII file must not crash a terminal that cannot show it (item 1, messages)."""
    data = copy_images(corpus, tmp_path / "data")
    (data / "covid" / "röntgen.png").symlink_to(tmp_path / "missing.png")
    ascii_terminal = {"LC_ALL": "C", "LANG": "C", "PYTHONUTF8": "0", "PYTHONCOERCECLOCALE": "0",
                      "PYTHONIOENCODING": ""}
    result = run_cli("extract", "--data", data, *BACKBONE, "--cache-dir", corpus["cache"], env=ascii_terminal)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "left out covid/r" in result.stdout and "ntgen.png: dangling symbolic link" in result.stdout
    assert cached_rows(corpus, data) == 10


SITECUSTOMIZE = '''
"""Test only: open() of one file fails with EACCES, as chmod 000 does for a user without override rights."""
import builtins
import os

_locked = os.environ.get("CXR_TEST_LOCKED", "")
_open = builtins.open


def _guarded(file, *args, **kwargs):
    if _locked and isinstance(file, (str, os.PathLike)) and os.path.realpath(file) == _locked:
        raise PermissionError(13, "Permission denied", os.fspath(file))
    return _open(file, *args, **kwargs)


builtins.open = _guarded
'''


def test_a_file_without_read_permission_is_skipped_and_counted(corpus, run_cli, tmp_path):
    """Item 8: as root chmod 000 cannot be reproduced, so the CLI runs with open() of one file failing with
    PermissionError (a sitecustomize in the subprocess only); the file is skipped and counted, not fatal."""
    import os

    data = copy_images(corpus, tmp_path / "data")
    hook = tmp_path / "hook"
    hook.mkdir()
    (hook / "sitecustomize.py").write_text(SITECUSTOMIZE)
    locked = data / "normal" / "img_001.png"
    env = {"PYTHONPATH": os.pathsep.join([str(hook), os.environ.get("PYTHONPATH", "")]),
           "CXR_TEST_LOCKED": os.path.realpath(locked)}
    result = run_cli("extract", "--data", data, *BACKBONE, "--cache-dir", corpus["cache"], env=env)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "left out normal/img_001.png: cannot be read (PermissionError: Permission denied)" in result.stdout
    assert "1 file(s) or folder(s)" in result.stdout and "Traceback" not in result.stderr
    assert cached_rows(corpus, data) == 9
