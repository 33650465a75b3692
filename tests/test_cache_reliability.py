"""Issue 9, cache and extraction side: names as UTF-8 text, damaged caches and exports, one writer per
cache, a full disk, read-only caches, predict on one file, leftovers of killed runs.

The command-line cases (``CORPUS``) belong to the bad-input corpus: each runs the real CLI on tiny images
and asserts the exit status, the one ``error:`` line (or the right result), no traceback, and that no
cached row is lost or wrong. One warm ONNX export (mobilenetv2, random weights, 32 px) is shared.
"""
from __future__ import annotations

import contextlib
import errno
import json
import os
import re
import shutil
import subprocess
import sys
import threading
import time
from collections import namedtuple
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import h5py
import numpy as np
import pytest
from PIL import Image

from cxr_transfer.core.errors import CxrError
from testkit.synthetic import synthetic_xray, write_class_tree
from cxr_transfer.extract.dataset import load_dataset
from cxr_transfer.extract.pipeline import ExtractSettings, extract_features, load_features

TINY = {"backbone": "mobilenetv2", "random_weights": True, "input_size": 32, "batch_size": 4, "progress": False}
ENV = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3"}


# ----------------------------------------------------------------------------------------------- helpers
@pytest.fixture(scope="module")
def warm(tmp_path_factory) -> Path:
    """A cache folder holding the ONNX export every test reuses (exported once per module)."""
    cache = tmp_path_factory.mktemp("warm-features")
    extract_features(load_dataset(write_class_tree(cache.parent / "warm-data", per_class=1)), settings(cache))
    return cache


def settings(cache_dir: Path, **overrides) -> ExtractSettings:
    return ExtractSettings.from_options(cache_dir=cache_dir, **{**TINY, **overrides})


def fresh_cache(tmp_path: Path, warm: Path) -> Path:
    """An empty feature cache that already holds the warm ONNX export."""
    cache = tmp_path / "features"
    shutil.copytree(warm / "onnx", cache / "onnx")
    return cache


def extract_args(data: Path, cache: Path) -> list[str]:
    return ["extract", "--data", str(data), "--backbone", "mobilenetv2", "--random-weights", "--input-size", "32",
            "--cache-dir", str(cache), "--no-progress"]


def cache_h5(cache: Path) -> Path:
    (path,) = [p for p in cache.rglob("mobilenetv2-32-*.h5") if "onnx" not in p.parts]
    return path


def stored(path: Path) -> dict[str, tuple]:
    """sha256 -> (path, label, embedding bytes) straight from the HDF5 file (UTF-8 decoded)."""
    with h5py.File(path, "r") as handle:
        shas = handle["sha256"].asstr()[()]
        paths = handle["path"].asstr("utf-8")[()]
        labels = handle["label"].asstr("utf-8")[()]
        embeddings = handle["embeddings"][()]
    return {s: (p, lab, e.tobytes()) for s, p, lab, e in zip(shas, paths, labels, embeddings)}


def add_image(folder: Path, name: str, seed: int) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / name
    Image.fromarray(synthetic_xray(seed, 48)).save(path, format="PNG")
    return path


def add_image_bytes_name(folder: Path, name: bytes, seed: int) -> None:
    """An image whose file name is raw bytes (not valid UTF-8)."""
    target = os.path.join(os.fsencode(folder), name)
    with open(target, "wb") as handle:
        Image.fromarray(synthetic_xray(seed, 48)).save(handle, format="PNG")


DiskUsage = namedtuple("DiskUsage", "total used free")


def exported_intact(onnx: Path) -> bool:
    """True when an ONNX export's bytes have the sha256 its sidecar records."""
    from cxr_transfer.core.hashing import sha256_file

    return sha256_file(onnx) == json.loads(onnx.with_suffix(".json").read_text())["onnx_sha256"]


def flip_embedding_bytes(path: Path) -> None:
    """Flip 16 bytes in the middle of the first stored block of embeddings."""
    with h5py.File(path, "r") as handle:
        info = handle["embeddings"].id.get_chunk_info(0)
    data = bytearray(path.read_bytes())
    middle = info.byte_offset + info.size // 2
    for k in range(middle, middle + 16):
        data[k] ^= 0x5A
    path.write_bytes(bytes(data))


def run_patched(patch: str, args: list[str], cwd: Path) -> subprocess.CompletedProcess:
    """The CLI in a subprocess after ``patch`` (Python code) ran: faults no real machine gives on demand."""
    code = f"import sys\n{patch}\nfrom cxr_transfer.cli import main\nsys.exit(main(sys.argv[1:]))\n"
    return subprocess.run([sys.executable, "-c", code, *args], check=False, capture_output=True, text=True, cwd=cwd, env=ENV,
                          encoding="utf-8", errors="replace", timeout=300)


def one_error_line(stderr: str) -> str:
    assert "Traceback" not in stderr, stderr[-3000:]
    lines = [line for line in stderr.splitlines() if line.startswith("error: ")]
    assert len(lines) == 1, stderr[-3000:]
    return lines[0]


_ENOSPC_ON = """
import builtins, errno, os
_open = builtins.open
def _full(file, mode="r", *a, **k):
    if "w" in mode and str(file).endswith({suffix!r}):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(file))
    return _open(file, mode, *a, **k)
builtins.open = _full
"""


# ------------------------------------------------------------------------------------- library tests
def test_non_ascii_file_and_class_names_are_utf8_text(tmp_path: Path, warm: Path):
    root = write_class_tree(tmp_path / "dätä", classes=("cövid-19", "normal"), per_class=2)
    add_image(root / "normal", "röntgen.png", 50)
    cache = fresh_cache(tmp_path, warm)
    first = extract_features(load_dataset(root), settings(cache))
    second = extract_features(load_dataset(root), settings(cache))          # read the names back
    assert (first.n_computed, second.n_cached, second.n_computed) == (5, 5, 0)
    features, _ = load_features(load_dataset(root), settings(cache))
    assert features.class_names == ["cövid-19", "normal"] and len(features.samples) == 5
    with h5py.File(first.cache_path, "r") as handle:
        for column in ("path", "label"):
            assert h5py.check_string_dtype(handle[column].dtype).encoding == "utf-8"
        assert "normal/röntgen.png" in handle["path"].asstr("utf-8")[()].tolist()
        assert "cövid-19" in handle["label"].asstr("utf-8")[()].tolist()
        assert "dätä" in handle.attrs["dataset_root"]


def test_non_utf8_names_are_skipped_before_any_work(tmp_path: Path, warm: Path):
    root = write_class_tree(tmp_path / "d", classes=("a", "b"), per_class=2)
    add_image_bytes_name(root / "a", b"bad\xff\xfe.png", 60)
    os.mkdir(os.path.join(os.fsencode(root), b"cl\xe4ss"))
    add_image_bytes_name(Path(os.fsdecode(os.path.join(os.fsencode(root), b"cl\xe4ss"))), b"x.png", 61)
    cache = fresh_cache(tmp_path, warm)
    result = extract_features(load_dataset(root), settings(cache))
    assert result.n_computed == 4
    assert sorted(p for p, _ in result.failures) == ["a/bad\\xff\\xfe.png", "cl\\xe4ss/x.png"]
    assert all("not valid UTF-8" in reason for _, reason in result.failures)
    assert len(stored(result.cache_path)) == 4
    assert not list(cache.rglob("*.tmp"))
    features, again = load_features(load_dataset(root), settings(cache))
    assert again.n_computed == 0 and len(features.samples) == 4


def test_damaged_onnx_export_is_verified_and_exported_again(tmp_path: Path, warm: Path, monkeypatch):
    from cxr_transfer.extract import onnx_export

    root = write_class_tree(tmp_path / "d", per_class=1)
    reference = stored(extract_features(load_dataset(root), settings(warm)).cache_path)
    cache = fresh_cache(tmp_path, warm)
    (onnx,) = (cache / "onnx").glob("*.onnx")
    good = onnx.read_bytes()
    data = bytearray(good)
    for k in range(len(data) // 2, len(data) // 2 + 64):    # inside the weights
        data[k] ^= 0x01
    onnx.write_bytes(bytes(data))
    exports = []

    def export(config, input_size, source, target, opset):      # what a real export writes, without the wait
        exports.append(target)
        target.write_bytes(good)
        return 0.0, None

    monkeypatch.setattr(onnx_export, "_export", export)
    result = extract_features(load_dataset(root), settings(cache))
    assert exports == [onnx] and exported_intact(onnx) and onnx.read_bytes() == good      # exported again
    fresh = stored(result.cache_path)
    assert fresh.keys() == reference.keys()
    for sha, (path, label, embedding) in reference.items():
        assert fresh[sha][:2] == (path, label)
        np.testing.assert_allclose(np.frombuffer(fresh[sha][2], np.float32), np.frombuffer(embedding, np.float32),
                                   rtol=1e-5, atol=1e-6)
    with h5py.File(result.cache_path, "r") as handle:
        assert handle.attrs["onnx_sha256"] == result.onnx_sha256
    from cxr_transfer.extract.onnx_export import _verified

    onnx.write_bytes(good[:1000])                             # truncated: refused, removed
    assert _verified(onnx, onnx.with_suffix(".json")) is None and not onnx.exists()


def test_non_finite_embeddings_are_never_cached(tmp_path: Path, warm: Path, monkeypatch):
    from cxr_transfer.extract import runtime

    real = runtime.OnnxEmbedder.embed

    def some_nan(self, images):
        out = real(self, images)
        out[0, 3] = np.nan
        return out

    monkeypatch.setattr(runtime.OnnxEmbedder, "embed", some_nan)
    root = write_class_tree(tmp_path / "d", per_class=2)
    result = extract_features(load_dataset(root), settings(fresh_cache(tmp_path, warm), batch_size=4))
    assert result.n_computed == 4 and len(result.failures) == 2            # 6 images, 2 batches
    assert all("non-finite embedding" in reason for _, reason in result.failures)
    with h5py.File(result.cache_path, "r") as handle:
        assert handle["embeddings"].shape[0] == 4 and np.isfinite(handle["embeddings"][()]).all()


_HOLD_LOCK = """
import sys, time
from cxr_transfer.core.locking import file_lock
with file_lock(sys.argv[1]):
    print("locked", flush=True)
    time.sleep(float(sys.argv[2]))
"""


def test_a_second_writer_waits_or_names_the_holder(tmp_path: Path, warm: Path):
    root = write_class_tree(tmp_path / "d", per_class=1)
    cache = fresh_cache(tmp_path, warm)
    target = extract_features(load_dataset(root), settings(cache)).cache_path
    add_image(root / "covid", "new.png", 70)
    holder = subprocess.Popen([sys.executable, "-c", _HOLD_LOCK, str(target), "30"], stdout=subprocess.PIPE,
                              text=True, env=ENV)
    try:
        assert holder.stdout.readline().strip() == "locked"
        with pytest.raises(CxrError, match=f"being written by pid {holder.pid}"):
            extract_features(load_dataset(root), settings(cache, lock_timeout=0.5))
    finally:
        holder.kill()
        holder.wait()
    assert len(stored(target)) == 3                                         # nothing written meanwhile
    # A holder that finishes: the waiting run goes on and completes.
    holder = subprocess.Popen([sys.executable, "-c", _HOLD_LOCK, str(target), "1.5"], stdout=subprocess.PIPE,
                              text=True, env=ENV)
    assert holder.stdout.readline().strip() == "locked"
    result = extract_features(load_dataset(root), settings(cache, lock_timeout=60))
    holder.wait()
    assert result.n_computed == 1 and len(stored(target)) == 4
    assert not target.with_name(target.name + ".lock").exists()


def test_lock_is_exclusive_between_threads_and_reusable(tmp_path: Path):
    from cxr_transfer.core.locking import file_lock

    target = tmp_path / "x.h5"
    order = []

    def hold():
        with file_lock(target):
            order.append("a-in")
            time.sleep(0.5)
            order.append("a-out")

    thread = threading.Thread(target=hold)
    thread.start()
    while not order:
        time.sleep(0.01)
    with file_lock(target, timeout=10):
        order.append("b-in")
    thread.join()
    assert order == ["a-in", "a-out", "b-in"]
    with file_lock(target, timeout=0):
        pass


def test_disk_full_keeps_the_old_cache_and_the_rerun_completes(tmp_path: Path, warm: Path, monkeypatch):
    from cxr_transfer.core import io as io_module

    root = write_class_tree(tmp_path / "d", per_class=2)
    cache = fresh_cache(tmp_path, warm)
    path = extract_features(load_dataset(root), settings(cache)).cache_path
    before = stored(path)
    add_image(root / "covid", "new.png", 80)

    def full(file, mode="r", *args, **kwargs):
        if "w" in mode and str(file).endswith(".h5.tmp"):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(file))
        return open(file, mode, *args, **kwargs)

    monkeypatch.setattr(io_module, "open", full, raising=False)
    with pytest.raises(CxrError, match=rf"no space left in {path.parent}: writing the cache needs about [\d.]+ MB"):
        extract_features(load_dataset(root), settings(cache))
    assert stored(path) == before and not list(cache.rglob("*.tmp"))
    assert len(list(path.with_name(path.name + ".parts").glob("part-*.npz"))) == 1    # the new row is kept
    monkeypatch.undo()
    again = extract_features(load_dataset(root), settings(cache))
    assert (again.n_cached, again.n_computed) == (7, 0)
    after = stored(path)
    assert len(after) == 7 and all(after[sha] == row for sha, row in before.items())


def test_too_little_free_space_is_refused_before_writing(tmp_path: Path, warm: Path, monkeypatch):
    from cxr_transfer.extract import cache as cache_module

    root = write_class_tree(tmp_path / "d", per_class=1)
    cache = fresh_cache(tmp_path, warm)
    monkeypatch.setattr(cache_module.shutil, "disk_usage", lambda p: DiskUsage(1 << 30, 1 << 30, 1000))
    with pytest.raises(CxrError, match="no space left in .*0.0 MB free"):
        extract_features(load_dataset(root), settings(cache))
    assert not list(cache.rglob("*.h5")) and not list(cache.rglob("*.tmp"))


def test_flipped_bytes_short_columns_and_nan_in_a_cache_are_found(tmp_path: Path, warm: Path):
    root = write_class_tree(tmp_path / "d", per_class=2)
    cache = fresh_cache(tmp_path, warm)
    path = extract_features(load_dataset(root), settings(cache)).cache_path
    good = stored(path)
    with h5py.File(path, "r") as handle:
        assert handle["embeddings"].fletcher32 and handle["sha256"].fletcher32

    flip_embedding_bytes(path)
    result = extract_features(load_dataset(root), settings(cache))
    assert result.n_computed == 6 and stored(path) == good
    assert len(list(path.parent.glob(path.name + ".damaged-*"))) == 1

    with h5py.File(path, "a") as handle:                       # embeddings shorter than the sha256 column
        embeddings = handle["embeddings"][()]
        del handle["embeddings"]
        handle.create_dataset("embeddings", data=embeddings[:4])
    features, result = load_features(load_dataset(root), settings(cache))
    assert result.n_computed == 6 and len(features.samples) == 6 and stored(path) == good

    with h5py.File(path, "a") as handle:                       # a non-finite value without a checksum error
        embeddings = handle["embeddings"][()]
        embeddings[2, 5] = np.inf
        del handle["embeddings"]
        handle.create_dataset("embeddings", data=embeddings)
    result = extract_features(load_dataset(root), settings(cache))
    assert result.n_computed == 6 and stored(path) == good


def test_read_cache_refuses_a_damaged_file(tmp_path: Path, warm: Path):
    from cxr_transfer.extract.cache import read_cache

    root = write_class_tree(tmp_path / "d", per_class=2)
    path = extract_features(load_dataset(root), settings(fresh_cache(tmp_path, warm))).cache_path
    flip_embedding_bytes(path)
    with pytest.raises(CxrError, match="is damaged .*run extract again"):
        read_cache(path)


def test_read_only_cache_that_needs_writing_fails_before_computing(tmp_path: Path, warm: Path, monkeypatch,
                                                                   read_only):
    from cxr_transfer.extract import pipeline

    root = write_class_tree(tmp_path / "d", per_class=1)
    cache = fresh_cache(tmp_path, warm)
    path = extract_features(load_dataset(root), settings(cache)).cache_path
    before = stored(path)
    with read_only(path.parent):
        again = extract_features(load_dataset(root), settings(cache))        # complete: reading is fine
        assert (again.n_cached, again.n_computed) == (3, 0)
        add_image(root / "covid", "new.png", 90)

        def no_computing(*args, **kwargs):
            raise AssertionError("computed before finding the cache read-only")

        monkeypatch.setattr(pipeline, "get_onnx_backbone", no_computing)
        with pytest.raises(CxrError, match=f"cannot write to the cache folder {path.parent}"):
            extract_features(load_dataset(root), settings(cache))
    assert stored(path) == before


def test_leftovers_of_killed_runs_are_removed(tmp_path: Path, warm: Path):
    root = write_class_tree(tmp_path / "d", per_class=1)
    cache = fresh_cache(tmp_path, warm)
    path = extract_features(load_dataset(root), settings(cache)).cache_path
    parts = path.with_name(path.name + ".parts")
    parts.mkdir()
    (parts / "part-123-0.npz.tmp").write_bytes(b"half a part")                  # names of older versions
    path.with_name(path.name + ".tmp").write_bytes(b"half an h5")
    (parts / ".part-124-0.0123abcd.npz.tmp").write_bytes(b"half a part")         # core.io.atomic_write's names
    path.with_name(f".{path.stem}.89abcdef.h5.tmp").write_bytes(b"half an h5")
    result = extract_features(load_dataset(root), settings(cache))
    assert result.n_computed == 0
    assert not parts.exists() and not list(cache.rglob("*.tmp"))
    parts.mkdir()                                            # an empty parts folder alone
    extract_features(load_dataset(root), settings(cache))
    assert not parts.exists()


def test_predict_on_one_file_keeps_the_folders_other_rows(tmp_path: Path, warm: Path):
    from cxr_transfer.classify.predict import predict_images

    head = _saved_head(tmp_path, warm)
    images = tmp_path / "new-images"
    for i in range(5):
        add_image(images, f"img_{i}.png", 100 + i)
    cache = fresh_cache(tmp_path, warm)
    predict_images(images, head, settings(cache), tmp_path / "all.csv")
    path = cache_h5(cache)
    before = stored(path)
    assert len(before) == 5
    out, _ = predict_images(images / "img_2.png", head, settings(cache), tmp_path / "one.csv")
    assert stored(path) == before
    assert len(out.read_text().splitlines()) == 2


def _saved_head(tmp_path: Path, warm: Path) -> Path:
    from sklearn.linear_model import LogisticRegression

    from cxr_transfer.classify.saved_model import save_head

    root = write_class_tree(tmp_path / "train", classes=("a", "b"), per_class=3)
    features, result = load_features(load_dataset(root), settings(warm))
    model = LogisticRegression(max_iter=200).fit(features.embeddings, features.labels)
    return save_head(tmp_path / "head.joblib", model, features.class_names,
                     [{"backbone": "mobilenetv2", "input_size": 32, "weights_sha256": result.weights.sha256,
                       "onnx_sha256": result.onnx_sha256, "precision": "float32"}], {})


# ------------------------------------------------------------------------------ command-line corpus
@dataclass
class Case:
    """One bad or odd input: the CLI arguments, the expected exit status and message, and a check after."""

    args: list[str]
    returncode: int
    message: str = ""                                   # a regex the error line (or stdout) must match
    after: Callable[[], None] | None = None
    patch: str = ""                                     # Python run before the CLI (a fault on demand)


def _complete_cache(tmp_path: Path, warm: Path, per_class: int = 1, **tree) -> tuple[Path, Path, Path, dict]:
    root = write_class_tree(tmp_path / "d", per_class=per_class, **tree)
    cache = fresh_cache(tmp_path, warm)
    path = extract_features(load_dataset(root), settings(cache)).cache_path
    return root, cache, path, stored(path)


def _rows_kept(path: Path, before: dict, total: int | None = None) -> Callable[[], None]:
    def check() -> None:
        after = stored(path)
        assert all(after.get(sha) == row for sha, row in before.items()), "a cached row was lost or changed"
        if total is not None:
            assert len(after) == total
    return check


def case_non_ascii_names_second_run(tmp_path, warm):
    root = write_class_tree(tmp_path / "d", classes=("cövid-19", "normal"), per_class=1)
    add_image(root / "normal", "röntgen.png", 50)
    cache = fresh_cache(tmp_path, warm)
    path = extract_features(load_dataset(root), settings(cache)).cache_path
    return Case(extract_args(root, cache), 0, r"3 images, 3 cached, 0 computed", _rows_kept(path, stored(path), 3))


def case_non_utf8_file_name(tmp_path, warm):
    root = write_class_tree(tmp_path / "d", per_class=1)
    add_image_bytes_name(root / "covid", b"bad\xff\xfe.png", 60)
    cache = fresh_cache(tmp_path, warm)

    def after():
        assert len(stored(cache_h5(cache))) == 3 and not list(cache.rglob("*.tmp"))
    return Case(extract_args(root, cache), 0, r"skipped covid/bad\\xff\\xfe.png: path not valid UTF-8", after)


def case_non_utf8_class_folder(tmp_path, warm):
    root = write_class_tree(tmp_path / "d", per_class=1)
    folder = os.path.join(os.fsencode(root), b"pneum\xf6nia")
    os.mkdir(folder)
    add_image_bytes_name(Path(os.fsdecode(folder)), b"a.png", 61)
    cache = fresh_cache(tmp_path, warm)

    def after():
        assert len(stored(cache_h5(cache))) == 3
    return Case(extract_args(root, cache), 0, r"skipped pneum\\xf6nia/a.png: path and class not valid UTF-8", after)


def case_cache_dir_is_a_file(tmp_path, warm):
    root = write_class_tree(tmp_path / "d", per_class=1)
    (tmp_path / "features.txt").write_text("not a folder")
    return Case(extract_args(root, tmp_path / "features.txt"), 2, r"error: --cache-dir: .*features.txt is a file")


def case_cache_dir_unwritable(tmp_path, warm):
    root = write_class_tree(tmp_path / "d", per_class=1)
    locked = tmp_path / "locked"
    locked.mkdir()
    return Case(extract_args(root, locked / "features"), 2, r"error: --cache-dir: cannot write to the cache folder"), locked


def case_read_only_cache_needs_writing(tmp_path, warm):
    root, cache, path, before = _complete_cache(tmp_path, warm)
    add_image(root / "covid", "new.png", 90)
    return Case(extract_args(root, cache), 2, rf"error: --cache-dir: cannot write to the cache folder {path.parent}",
                _rows_kept(path, before, 3)), path.parent


def case_read_only_cache_complete(tmp_path, warm):
    root, cache, path, before = _complete_cache(tmp_path, warm)
    return Case(extract_args(root, cache), 0, r"3 cached, 0 computed", _rows_kept(path, before, 3)), path.parent


def case_read_only_cache_with_an_image_removed(tmp_path, warm):
    root, cache, path, before = _complete_cache(tmp_path, warm)
    (root / "covid" / "img_000.png").unlink()
    return Case(extract_args(root, cache), 0, r"2 images, 2 cached, 0 computed", _rows_kept(path, before, 3)), \
        path.parent


def case_disk_full_writing_a_part(tmp_path, warm):
    root, cache, path, before = _complete_cache(tmp_path, warm)
    add_image(root / "covid", "new.png", 91)
    return Case(extract_args(root, cache), 2, r"error: no space left in .*\.h5\.parts: writing the cache needs",
                _rows_kept(path, before, 3), patch=_ENOSPC_ON.format(suffix=".npz.tmp"))


def case_disk_full_writing_the_h5(tmp_path, warm):
    root, cache, path, before = _complete_cache(tmp_path, warm)
    add_image(root / "covid", "new.png", 92)
    return Case(extract_args(root, cache), 2, rf"error: no space left in {path.parent}: writing the cache needs",
                _rows_kept(path, before, 3), patch=_ENOSPC_ON.format(suffix=".h5.tmp"))


def case_flipped_bytes_in_cache(tmp_path, warm):
    root, cache, path, before = _complete_cache(tmp_path, warm)
    flip_embedding_bytes(path)
    return Case(extract_args(root, cache), 0, r"3 images, 0 cached, 3 computed", _rows_kept(path, before, 3))


def case_embeddings_shorter_than_sha256(tmp_path, warm):
    root, cache, path, before = _complete_cache(tmp_path, warm)
    with h5py.File(path, "a") as handle:
        embeddings = handle["embeddings"][()]
        del handle["embeddings"]
        handle.create_dataset("embeddings", data=embeddings[:2])
    return Case(extract_args(root, cache), 0, r"3 images, 0 cached, 3 computed", _rows_kept(path, before, 3))


def case_nan_in_cached_embeddings(tmp_path, warm):
    root, cache, path, before = _complete_cache(tmp_path, warm)
    with h5py.File(path, "a") as handle:
        embeddings = handle["embeddings"][()]
        embeddings[1] = np.nan
        del handle["embeddings"]
        handle.create_dataset("embeddings", data=embeddings)
    return Case(extract_args(root, cache), 0, r"3 images, 0 cached, 3 computed", _rows_kept(path, before, 3))


def case_dataset_folder_name_of_250_characters(tmp_path, warm):
    root = write_class_tree(tmp_path / ("x" * 250), per_class=1)
    cache = fresh_cache(tmp_path, warm)

    def after():
        assert len(stored(cache_h5(cache))) == 3
    return Case(extract_args(root, cache), 0, r"3 images, 0 cached, 3 computed", after)


def case_orphan_part_tmp_and_empty_parts(tmp_path, warm):
    root, cache, path, before = _complete_cache(tmp_path, warm)
    parts = path.with_name(path.name + ".parts")
    parts.mkdir()
    (parts / "part-1-0.npz.tmp").write_bytes(b"half")

    def after():
        assert not parts.exists()
        _rows_kept(path, before, 3)()
    return Case(extract_args(root, cache), 0, r"3 cached, 0 computed", after)


def case_stale_h5_tmp(tmp_path, warm):
    root, cache, path, before = _complete_cache(tmp_path, warm)
    stale = path.with_name(path.name + ".tmp")
    stale.write_bytes(b"half an h5 file")

    def after():
        assert not stale.exists()
        _rows_kept(path, before, 3)()
    return Case(extract_args(root, cache), 0, r"3 cached, 0 computed", after)


def case_truncated_part_file(tmp_path, warm):
    root, cache, path, before = _complete_cache(tmp_path, warm)
    add_image(root / "covid", "new.png", 93)
    parts = path.with_name(path.name + ".parts")
    parts.mkdir()
    (parts / "part-1-0.npz").write_bytes(b"PK\x03\x04 truncated")
    return Case(extract_args(root, cache), 0, r"4 images, 3 cached, 1 computed", _rows_kept(path, before, 4))


def case_nan_in_a_part_file(tmp_path, warm):
    root, cache, path, before = _complete_cache(tmp_path, warm)
    new = add_image(root / "covid", "new.png", 94)
    from cxr_transfer.core.hashing import sha256_file

    parts = path.with_name(path.name + ".parts")
    parts.mkdir()
    np.savez(parts / "part-1-0.npz", sha256=np.array([sha256_file(new)], dtype="S64"),
             embeddings=np.full((1, 1280), np.nan, np.float32))

    def after():
        rows = stored(path)
        assert len(rows) == 4 and all(np.isfinite(np.frombuffer(r[2], np.float32)).all() for r in rows.values())
        _rows_kept(path, before)()
    return Case(extract_args(root, cache), 0, r"4 images, 3 cached, 1 computed", after)


def case_predict_one_file_of_a_cached_folder(tmp_path, warm):
    from cxr_transfer.classify.predict import predict_images

    head = _saved_head(tmp_path, warm)
    images = tmp_path / "new-images"
    for i in range(4):
        add_image(images, f"img_{i}.png", 110 + i)
    cache = fresh_cache(tmp_path, warm)
    predict_images(images, head, settings(cache), tmp_path / "all.csv")
    path = cache_h5(cache)
    args = ["predict", str(images / "img_1.png"), "--model", str(head), "--backbone", "mobilenetv2",
            "--random-weights", "--cache-dir", str(cache), "--no-progress", "--out", str(tmp_path / "one.csv")]
    return Case(args, 0, r"predictions: ", _rows_kept(path, stored(path), 4))


CORPUS = {name[len("case_"):]: fn for name, fn in sorted(globals().items()) if name.startswith("case_")}


@pytest.mark.parametrize("name", sorted(CORPUS))
def test_cli_corpus(name: str, tmp_path: Path, warm: Path, run_cli, read_only):
    made = CORPUS[name](tmp_path, warm)
    case, frozen = made if isinstance(made, tuple) else (made, None)
    with read_only(frozen) if frozen else contextlib.nullcontext():
        if case.patch:
            done = run_patched(case.patch, case.args, tmp_path)
            returncode, stdout, stderr = done.returncode, done.stdout, done.stderr
        else:
            result = run_cli(*case.args)
            returncode, stdout, stderr = result.returncode, result.stdout, result.stderr
    assert returncode == case.returncode, stderr[-3000:]
    assert "Traceback" not in stderr, stderr[-3000:]
    if case.returncode == 2:
        assert re.search(case.message, one_error_line(stderr)), stderr[-2000:]
    else:
        assert re.search(case.message, stdout), stdout + stderr[-2000:]
    if case.after:
        case.after()


def test_disk_full_rerun_in_a_subprocess_neither_crashes_nor_loses_rows(tmp_path: Path, warm: Path):
    """The issue's crash: ENOSPC in the HDF5 write, then a segmentation fault, again on the rerun."""
    root, cache, path, before = _complete_cache(tmp_path, warm, per_class=2)
    add_image(root / "normal", "new.png", 95)
    patch = _ENOSPC_ON.format(suffix=".h5.tmp")
    for _ in range(2):
        done = run_patched(patch, extract_args(root, cache), tmp_path)
        assert done.returncode == 2, done.stderr[-3000:]
        assert "no space left in" in one_error_line(done.stderr)
        assert stored(path) == before
    done = subprocess.run([sys.executable, "-m", "cxr_transfer.cli", *extract_args(root, cache)], check=False, capture_output=True,
                          text=True, env=ENV, cwd=tmp_path, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "7 images, 7 cached, 0 computed" in done.stdout
    _rows_kept(path, before, 7)()


def test_two_extract_runs_on_one_cache_at_once(tmp_path: Path, warm: Path):
    root = write_class_tree(tmp_path / "d", per_class=60)
    cache = fresh_cache(tmp_path, warm)
    runs = [subprocess.Popen([sys.executable, "-m", "cxr_transfer.cli", *extract_args(root, cache), "--batch-size",
                              "2"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=ENV, cwd=tmp_path)
            for _ in range(2)]
    outs = [run.communicate(timeout=300) for run in runs]
    for run, (out, err) in zip(runs, outs):
        assert run.returncode == 0, err[-3000:]
        assert "Traceback" not in err
    rows = stored(cache_h5(cache))
    assert len(rows) == 180
    assert sum(int(out.split(" computed")[0].rsplit(" ", 1)[-1]) for out, _ in outs) == 180


_MOUNT_HELP = "needs root and a kernel that lets it mount a tmpfs (a real full disk); the ENOSPC cases above " \
              "cover the same code with a patched write"


@pytest.fixture
def small_disk(tmp_path: Path):
    """A 9 MB tmpfs mounted under tmp_path: a disk that really fills up."""
    mount = tmp_path / "small-disk"
    mount.mkdir()
    if os.geteuid() != 0 or subprocess.run(["mount", "-t", "tmpfs", "-o", "size=9000k", "tmpfs", str(mount)],
                                           check=False, capture_output=True).returncode != 0:
        pytest.skip(_MOUNT_HELP)
    try:
        yield mount
    finally:
        subprocess.run(["umount", str(mount)], check=True)


def test_a_full_disk_during_the_onnx_export_gives_the_one_error_line(tmp_path: Path, small_disk: Path):
    """The export runs in its own process (extract.onnx_export); its ENOSPC reaches the user as before."""
    root = write_class_tree(tmp_path / "d", per_class=1)
    cache = small_disk / "features"
    filler = small_disk / "filler"
    filler.write_bytes(b"\0" * (shutil.disk_usage(small_disk).free - 2 * 2**20))    # 2 MB left: the 8 MB export
    done = subprocess.run([sys.executable, "-m", "cxr_transfer.cli", *extract_args(root, cache)],
                          check=False, capture_output=True, text=True, env=ENV, cwd=tmp_path, timeout=300)
    assert done.returncode == 2, done.stderr[-3000:]
    assert re.search(rf"^error: no space left in {re.escape(str(cache / 'onnx'))}: writing the cache needs about",
                     one_error_line(done.stderr))
    assert not list(cache.rglob("*.tmp")) and not list(cache.rglob("*.onnx"))
    filler.unlink()
    done = subprocess.run([sys.executable, "-m", "cxr_transfer.cli", *extract_args(root, cache)],
                          check=False, capture_output=True, text=True, env=ENV, cwd=tmp_path, timeout=300)
    assert done.returncode == 0 and "3 computed" in done.stdout, done.stderr[-3000:]


def test_a_really_full_disk_gives_one_error_line_and_no_crash(tmp_path: Path, warm: Path, small_disk: Path):
    """HDF5 meeting ENOSPC crashed the process (exit 139), on the rerun too."""
    root = write_class_tree(tmp_path / "d", per_class=4)
    cache = small_disk / "features"
    shutil.copytree(warm / "onnx", cache / "onnx")
    filler = small_disk / "filler"
    free = shutil.disk_usage(small_disk).free
    filler.write_bytes(b"\0" * (free - 100 * 1024))          # room for the parts, not for the HDF5 file too
    for _ in range(2):
        done = subprocess.run([sys.executable, "-m", "cxr_transfer.cli", *extract_args(root, cache)],
                              check=False, capture_output=True, text=True, env=ENV, cwd=tmp_path, timeout=300)
        assert done.returncode == 2, done.stderr[-3000:]
        assert re.search(r"no space left in .*: writing the cache needs about [\d.]+ MB", one_error_line(done.stderr))
        assert not list(cache.rglob("*.tmp"))
    filler.unlink()
    done = subprocess.run([sys.executable, "-m", "cxr_transfer.cli", *extract_args(root, cache)],
                          check=False, capture_output=True, text=True, env=ENV, cwd=tmp_path, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "12 images, 12 cached, 0 computed" in done.stdout                 # the first run's rows were kept
    assert len(stored(cache_h5(cache))) == 12
