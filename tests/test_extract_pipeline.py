"""Extraction end to end on tiny synthetic folders: cache reuse, updates, bad files, crashes, memory."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import h5py
import numpy as np
import pytest
from PIL import Image

from cxr_transfer.core.errors import CxrError
from testkit.synthetic import synthetic_xray, write_class_tree
from cxr_transfer.extract.cache import read_cache
from cxr_transfer.extract.dataset import load_dataset
from cxr_transfer.extract.pipeline import (
    ExtractSettings,
    ImageMask,
    extract_features,
    load_features,
)

TINY = dict(backbone="mobilenetv2", random_weights=True, input_size=32, batch_size=4, progress=False)


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("features")


def settings(cache_dir: Path, **overrides) -> ExtractSettings:
    return ExtractSettings.from_options(cache_dir=cache_dir, **{**TINY, **overrides})


def test_second_run_computes_nothing_and_updates_are_incremental(tmp_path: Path, cache_dir: Path):
    root = write_class_tree(tmp_path / "d", per_class=4)
    first = extract_features(load_dataset(root), settings(cache_dir))
    assert (first.n_computed, first.n_cached) == (12, 0)
    mtime = first.cache_path.stat().st_mtime_ns
    second = extract_features(load_dataset(root), settings(cache_dir))
    assert (second.n_computed, second.n_cached) == (0, 12)
    assert second.cache_path.stat().st_mtime_ns == mtime          # nothing rewritten

    Image.fromarray(synthetic_xray(999, 48)).save(root / "covid" / "new.png")       # new
    Image.fromarray(synthetic_xray(998, 48)).save(root / "normal" / "img_000.png")  # changed
    (root / "pneumonia" / "img_003.png").unlink()                                    # removed
    third = extract_features(load_dataset(root), settings(cache_dir))
    assert third.n_computed == 2 and third.n_cached == 10
    features, _ = load_features(load_dataset(root), settings(cache_dir))
    paths = [str(s.path.relative_to(root)) for s in features.samples]
    assert "pneumonia/img_003.png" not in paths and "covid/new.png" in paths
    _, columns, attrs = read_cache(third.cache_path)
    assert len(columns["sha256"]) == 12
    assert attrs["backbone"] == "mobilenetv2" and attrs["weights_sha256"] == "random:seed0"
    assert "onnx_sha256" in attrs and "versions" in attrs


def test_cached_rows_match_fresh_computation(tmp_path: Path, cache_dir: Path):
    root = write_class_tree(tmp_path / "d", per_class=3)
    dataset = load_dataset(root)
    cached, _ = load_features(dataset, settings(cache_dir))
    again, _ = load_features(dataset, settings(cache_dir))                # read from HDF5
    fresh, _ = load_features(dataset, settings(tmp_path / "other-cache"))  # recomputed from scratch
    assert np.array_equal(cached.embeddings, again.embeddings)
    np.testing.assert_allclose(cached.embeddings, fresh.embeddings, rtol=1e-5, atol=1e-6)
    assert cached.labels.tolist() == [0, 0, 0, 1, 1, 1, 2, 2, 2]


def test_bad_files_are_skipped_named_and_counted(tmp_path: Path, cache_dir: Path):
    root = write_class_tree(tmp_path / "d", per_class=3)
    (root / "covid" / "zero.png").write_bytes(b"")
    (root / "normal" / "text.jpg").write_bytes(b"hello, not a jpeg")
    good = root / "pneumonia" / "img_000.png"
    (root / "pneumonia" / "cut.png").write_bytes(good.read_bytes()[:60])
    result = extract_features(load_dataset(root), settings(cache_dir))
    assert result.n_computed == 9 and len(result.failures) == 3
    assert {Path(p).name for p, _ in result.failures} == {"zero.png", "text.jpg", "cut.png"}
    features, _ = load_features(load_dataset(root), settings(cache_dir))
    assert len(features.samples) == 9


def test_other_identity_gets_its_own_cache_and_mismatch_is_refused(tmp_path: Path, cache_dir: Path):
    root = write_class_tree(tmp_path / "d", per_class=2)
    a = extract_features(load_dataset(root), settings(cache_dir))
    b = extract_features(load_dataset(root), settings(cache_dir, input_size=40))
    assert a.cache_path != b.cache_path and b.n_computed == 6
    with h5py.File(a.cache_path, "a") as handle:     # a file that lies about its identity
        handle.attrs["input_size"] = 99
    with pytest.raises(CxrError, match="refusing to mix"):
        extract_features(load_dataset(root), settings(cache_dir))


def test_empty_and_unreadable_folders_fail_clearly(tmp_path: Path, cache_dir: Path):
    root = tmp_path / "d" / "covid"
    root.mkdir(parents=True)
    (root / "a.png").write_bytes(b"")
    with pytest.raises(CxrError, match="none of the 1 images could be read"):
        extract_features(load_dataset(root.parent), settings(cache_dir))


_SLOW_RUN = """
import sys, time
from pathlib import Path
from cxr_transfer.extract.dataset import load_dataset
from cxr_transfer.extract.pipeline import ExtractSettings, ImageMask, extract_features
def slow(image):
    time.sleep(0.02)
    return image
settings = ExtractSettings.from_options(backbone="mobilenetv2", random_weights=True, input_size=32, batch_size=4,
                           cache_dir=Path({cache!r}), flush_every=8, progress=False, decode_workers=1,
                           mask=ImageMask("slowcopy", slow))
extract_features(load_dataset({data!r}), settings)
"""


def test_kill_minus_nine_leaves_a_cache_the_next_run_completes(tmp_path: Path, cache_dir: Path):
    root = write_class_tree(tmp_path / "d", per_class=40)
    # Warm the ONNX export in-process so the child only extracts.
    extract_features(load_dataset(write_class_tree(tmp_path / "warm", per_class=1)), settings(cache_dir))
    script = _SLOW_RUN.format(cache=str(cache_dir), data=str(root))
    child = subprocess.Popen([sys.executable, "-c", script], env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3"})
    deadline = time.time() + 120
    parts = []
    while time.time() < deadline and child.poll() is None:
        parts = list(cache_dir.rglob("*slowcopy.h5.parts/part-*.npz"))
        if len(parts) >= 2:
            break
        time.sleep(0.05)
    assert child.poll() is None, "the child finished before it could be killed; make it slower"
    os.kill(child.pid, signal.SIGKILL)
    child.wait()
    assert len(parts) >= 2
    mask = ImageMask("slowcopy", lambda image: image)
    resumed = extract_features(load_dataset(root), settings(cache_dir, mask=mask))
    assert resumed.n_cached >= 16 and resumed.n_cached + resumed.n_computed == 120
    complete, _ = load_features(load_dataset(root), settings(cache_dir, mask=mask))
    fresh, _ = load_features(load_dataset(root), settings(tmp_path / "fresh", mask=mask))
    np.testing.assert_allclose(complete.embeddings, fresh.embeddings, rtol=1e-5, atol=1e-6)
    assert not list(cache_dir.rglob("*slowcopy.h5.parts/part-*"))


_MEMORY_RUN = """
import resource, sys, json
from pathlib import Path
from cxr_transfer.extract.dataset import load_dataset
from cxr_transfer.extract.pipeline import ExtractSettings, extract_features
settings = ExtractSettings.from_options(backbone="mobilenetv2", random_weights=True, input_size=32, batch_size=16,
                           cache_dir=Path({cache!r}), flush_every=128, progress=False)
result = extract_features(load_dataset({data!r}), settings)
print(json.dumps({{"computed": result.n_computed, "maxrss_kb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss}}))
"""


def _peak_memory(root: Path, cache: Path) -> dict:
    script = _MEMORY_RUN.format(cache=str(cache), data=str(root))
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True,
                         env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3"})
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_memory_stays_bounded_on_thousands_of_files(tmp_path: Path, cache_dir: Path):
    extract_features(load_dataset(write_class_tree(tmp_path / "warm", per_class=1, size=96)),
                     settings(cache_dir))
    small = _peak_memory(write_class_tree(tmp_path / "small", per_class=100, size=96), cache_dir)
    large = _peak_memory(write_class_tree(tmp_path / "large", per_class=1000, size=96), cache_dir)
    assert (small["computed"], large["computed"]) == (300, 3000)
    growth_mb = (large["maxrss_kb"] - small["maxrss_kb"]) / 1024
    print(f"peak RSS: 300 files {small['maxrss_kb'] / 1024:.0f} MB, 3000 files {large['maxrss_kb'] / 1024:.0f} MB")
    # 10x the files: decoded images (3000 x 96 x 96 x 3 = 83 MB if all were held) must not accumulate.
    assert growth_mb < 40


def test_damaged_cache_file_is_kept_aside_and_rebuilt(tmp_path: Path, cache_dir: Path):
    root = write_class_tree(tmp_path / "d", per_class=2)
    first = extract_features(load_dataset(root), settings(cache_dir))
    first.cache_path.write_bytes(first.cache_path.read_bytes()[:200])     # truncated HDF5
    again = extract_features(load_dataset(root), settings(cache_dir))
    assert again.n_computed == 6
    assert list(first.cache_path.parent.glob(first.cache_path.name + ".damaged-*"))
