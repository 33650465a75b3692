"""export: a dataset's cached embeddings as Parquet or npy, read back by pyarrow, pandas, numpy and Ray."""
from __future__ import annotations

import csv
import errno
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import cxr_transfer
from cxr_transfer.core.errors import CxrError
from testkit.synthetic import synthetic_xray, write_class_tree
from cxr_transfer.extract.cache import read_cache

TINY = {"random_weights": True, "input_size": 32, "progress": False}
TINY_FLAGS = ("--backbone", "mobilenetv2", "--random-weights", "--input-size", "32", "--no-progress")
ODD_NAME = "röntgen 東京 ü.png"


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    """Two classes in train/ and test/, a non-ASCII folder, class, file name and patient ids (manifest)."""
    from PIL import Image

    root = write_class_tree(tmp_path_factory.mktemp("export") / "dätä", classes=("cövid-19", "normal"), per_class=3,
                            splits=("train", "test"))
    Image.fromarray(synthetic_xray(77, 48)).save(root / "train" / "normal" / ODD_NAME)
    paths = sorted(p.relative_to(root).as_posix() for p in root.rglob("*.png"))
    lines = ["path,patient_id"] + [f"{path},pätient-{i // 2}" for i, path in enumerate(paths)]
    (root / "manifest.csv").write_text("\n".join(lines) + "\n", encoding="utf-8")
    return root


@pytest.fixture(scope="module")
def cache(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("features")


@pytest.fixture(scope="module")
def exported(data: Path, cache: Path, tmp_path_factory):
    """One Parquet export through the library (it computes the embeddings: the only export that does)."""
    out = tmp_path_factory.mktemp("out") / "mobilenetv2.parquet"
    return cxr_transfer.export_embeddings(data, "mobilenetv2", out=out, cache_dir=cache, **TINY)


def cached(result) -> tuple[np.ndarray, dict[str, np.ndarray], dict[str, object]]:
    return read_cache(result.extraction.cache_path)


def test_parquet_holds_the_cache_bit_for_bit_with_its_provenance(exported):
    import pyarrow as pa
    import pyarrow.parquet as pq

    embeddings, columns, attrs = cached(exported)
    table = pq.read_table(exported.path)
    dim = embeddings.shape[1]
    assert table.schema.names == ["sha256", "path", "label", "split", "group", "embedding"]
    assert all(table.schema.field(name).type == pa.string() for name in table.schema.names[:5])
    assert table.schema.field("embedding").type == pa.list_(pa.float32(), dim)   # fixed size
    assert table.num_rows == exported.rows == len(embeddings) == 13 and exported.dim == dim
    assert np.count_nonzero(embeddings) > 0
    values = table.column("embedding").combine_chunks().flatten().to_numpy().reshape(-1, dim)
    assert np.array_equal(values.view(np.uint32), embeddings.view(np.uint32))         # bitwise
    for name in ("sha256", "path", "label", "split", "group"):
        assert table.column(name).to_pylist() == columns[name].tolist(), name       # the cache's rows, its order
    meta = {k.decode(): v.decode() for k, v in table.schema.metadata.items()}
    assert meta["backbone"] == "mobilenetv2" and meta["input_size"] == "32" and meta["precision"] == "float32"
    assert meta["weights_sha256"] == attrs["weights_sha256"] == "random:seed0"
    assert meta["onnx_sha256"] == attrs["onnx_sha256"] and len(meta["onnx_sha256"]) == 64
    assert meta["cache_path"] == str(exported.extraction.cache_path)
    assert meta["cxr_transfer_version"] == cxr_transfer.__version__ and meta["embedding_dim"] == str(dim)
    assert "int8_sample_digest" not in meta
    row_group = pq.ParquetFile(exported.path).metadata.row_group(0)
    assert "RLE_DICTIONARY" not in row_group.column(5).encodings          # floats plain: a dictionary is larger
    assert [p.name for p in exported.path.parent.iterdir()] == [exported.path.name]    # no temporary left


def test_int8_export_records_its_int8_sample(exported, data: Path, cache: Path, tmp_path: Path):
    import pyarrow.parquet as pq

    result = cxr_transfer.export_embeddings(data, "mobilenetv2", out=tmp_path / "int8.parquet", cache_dir=cache,
                                            precision="int8", int8_sample_size=4, **TINY)
    embeddings, _, attrs = cached(result)
    meta = {k.decode(): v.decode() for k, v in pq.read_schema(result.path).metadata.items()}
    assert meta["precision"] == "int8" and "-int8-cal" in meta["cache_path"]
    assert meta["int8_sample_digest"] == attrs["int8_sample_digest"] == result.extraction.int8_sample_digest
    assert meta["onnx_sha256"] == attrs["onnx_sha256"] != exported.metadata["onnx_sha256"]   # the int8 model's
    values = np.stack(pq.read_table(result.path).column("embedding").to_pylist()).astype(np.float32)
    assert np.array_equal(values, embeddings)


def test_pandas_reads_non_ascii_names_and_float32_vectors(exported):
    import pandas as pd

    embeddings, columns, _ = cached(exported)
    frame = pd.read_parquet(exported.path)
    assert list(frame.columns) == ["sha256", "path", "label", "split", "group", "embedding"]
    assert all(pd.api.types.is_string_dtype(frame[name]) for name in ("sha256", "path", "label", "split", "group"))
    vector = frame["embedding"].iloc[0]
    assert isinstance(vector, np.ndarray) and vector.dtype == np.float32 and vector.shape == (embeddings.shape[1],)
    assert np.array_equal(np.stack(frame["embedding"].to_list()).view(np.uint32), embeddings.view(np.uint32))
    assert f"train/normal/{ODD_NAME}" in frame["path"].tolist()
    assert set(frame["label"]) == {"cövid-19", "normal"} and set(frame["split"]) == {"train", "test"}
    assert frame["group"].str.startswith("pätient-").all() and frame["group"].tolist() == columns["group"].tolist()


def test_npy_folder_from_the_command_line(exported, data: Path, cache: Path, tmp_path: Path, run_cli):
    import pyarrow.parquet as pq

    out = tmp_path / "mobilenetv2-npy"
    done = run_cli("export", "--data", data, *TINY_FLAGS, "--cache-dir", cache, "--format", "npy", "--out", out)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "13 images, 13 cached, 0 computed" in done.stdout                 # read from the cache, nothing computed
    assert f"npy: 13 rows x {exported.dim} float32 (mobilenetv2) -> {out}" in done.stdout
    assert sorted(p.name for p in out.iterdir()) == ["embeddings.npy", "metadata.json", "rows.csv"]
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".")) == []
    embeddings, columns, _ = cached(exported)
    loaded = np.load(out / "embeddings.npy", allow_pickle=False)
    assert loaded.dtype == np.float32 and np.array_equal(loaded.view(np.uint32), embeddings.view(np.uint32))
    with open(out / "rows.csv", encoding="utf-8", newline="") as handle:
        rows = list(csv.reader(handle))
    assert rows[0] == ["sha256", "path", "label", "split", "group"]
    assert rows[1:] == [list(row) for row in zip(*(columns[c].tolist() for c in rows[0]))]
    metadata = json.loads((out / "metadata.json").read_text(encoding="utf-8"))
    parquet_meta = {k.decode(): v.decode() for k, v in pq.read_schema(exported.path).metadata.items()}
    assert {k: v for k, v in metadata.items() if k != "layout"} == parquet_meta
    assert metadata["layout"]["embeddings.npy"] == f"float32 (13, {exported.dim}), C order"


def test_a_folder_of_exports_reads_as_one_dataset(exported, data: Path, cache: Path, tmp_path: Path):
    """A folder of exports is what Spark, Ray and pyarrow.dataset read: every visible Parquet file under one
    schema. A running export's hidden temporary (.NAME.*.tmp) is not picked up by them."""
    import pyarrow.dataset as ds

    shutil.copy(exported.path, tmp_path / "a.parquet")
    cxr_transfer.export_embeddings(data, "mobilenetv2", out=tmp_path / "b.parquet", cache_dir=cache, **TINY)
    (tmp_path / ".c.0123abcd.parquet.tmp").write_bytes(b"PAR1 half written")
    table = ds.dataset(tmp_path, format="parquet").to_table()
    assert table.num_rows == 26 and table.schema.field("embedding").type.list_size == exported.dim
    assert table.column("path").to_pylist() == 2 * cached(exported)[1]["path"].tolist()


@pytest.mark.slow
def test_ray_data_reads_the_parquet_without_this_tool(exported, tmp_path: Path):
    """A plain Ray Data job (one CPU, an 80 MB object store) sees the columns and the same float32 vectors.

    Marked slow: starting Ray and its first read task took 14-22 s on the 2-core test machine."""
    pytest.importorskip("ray.data")
    embeddings, columns, _ = cached(exported)
    np.save(tmp_path / "expected.npy", embeddings)
    script = f"""
import json, sys
import numpy as np
import ray
ray.init(num_cpus=1, object_store_memory=80 * 2**20, include_dashboard=False, log_to_driver=False,
         logging_level="ERROR")
ray.data.DataContext.get_current().enable_progress_bars = False
ds = ray.data.read_parquet({str(exported.path)!r})
batch = ds.take_batch(batch_size=1000, batch_format="pyarrow")
vectors = batch.column("embedding").combine_chunks().flatten().to_numpy().reshape(batch.num_rows, -1)
same = np.array_equal(vectors.view(np.uint32), np.load({str(tmp_path / "expected.npy")!r}).view(np.uint32))
print(json.dumps({{"rows": ds.count(), "columns": ds.schema().names, "paths": batch.column("path").to_pylist(),
                  "same": bool(same), "ours": "cxr_transfer" in sys.modules}}))
ray.shutdown()
"""
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, encoding="utf-8",
                          cwd=tmp_path, timeout=120, check=False, env={**os.environ, "RAY_USAGE_STATS_ENABLED": "0"})
    assert done.returncode == 0, done.stderr[-3000:]
    seen = json.loads(done.stdout.strip().splitlines()[-1])
    assert seen == {"rows": 13, "columns": ["sha256", "path", "label", "split", "group", "embedding"],
                    "paths": columns["path"].tolist(), "same": True, "ours": False}


def test_refusals_are_one_line_before_any_computing(exported, data: Path, tmp_path: Path, run_cli):
    fresh = tmp_path / "never-created"          # a cache folder a refused run must not even create
    base = ("export", "--data", data, *TINY_FLAGS, "--cache-dir", fresh)
    before = exported.path.read_bytes()
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "notes.txt").write_text("mine")
    refusals = {
        ("--out", exported.path): "already exists; give a new name, or --overwrite",
        ("--out", tmp_path / "missing" / "e.parquet"): f"the folder {tmp_path / 'missing'} does not exist",
        ("--out", tmp_path / "e.csv", "--format", "csv"): "invalid choice: 'csv'",
        ("--out", tmp_path / "e.parquet", "--backbone", "mobilenetv2,vgg16"): "an export holds one backbone",
        ("--out", tmp_path / "other", "--format", "npy", "--overwrite"): "holds files other than an npy export",
        ("--out", tmp_path / "other", "--overwrite"): "is a folder; a Parquet export is one file",
    }
    for flags, message in refusals.items():
        done = run_cli(*base, *flags)
        assert done.returncode == 2 and message in done.error_line(), (flags, done.stderr[-2000:])
    assert exported.path.read_bytes() == before and (tmp_path / "other" / "notes.txt").read_text() == "mine"
    assert not fresh.exists()


def test_unwritable_destination_is_refused(exported, data: Path, cache: Path, tmp_path: Path, read_only):
    locked = tmp_path / "locked"
    locked.mkdir()
    with read_only(locked), pytest.raises(CxrError, match=r"locked: the `out` folder is not writable \("):
        cxr_transfer.export_embeddings(data, "mobilenetv2", out=locked / "e.parquet", cache_dir=cache, **TINY)


@pytest.mark.parametrize("format", ["parquet", "npy"])
def test_overwrite_replaces_an_earlier_export_whole(exported, data: Path, cache: Path, tmp_path: Path, format):
    out = tmp_path / f"e.{format}"
    first = cxr_transfer.export_embeddings(data, "mobilenetv2", out=out, format=format, cache_dir=cache, **TINY)
    if format == "parquet":
        out.write_bytes(b"stale")
    else:
        (out / "embeddings.npy").write_bytes(b"stale")
    again = cxr_transfer.export_embeddings(data, "mobilenetv2", out=out, format=format, overwrite=True,
                                           cache_dir=cache, **TINY)
    assert again.size_bytes == first.size_bytes and again.rows == 13
    loaded = (np.load(out / "embeddings.npy") if format == "npy" else
              np.stack(__import__("pandas").read_parquet(out)["embedding"].to_list()))
    assert np.array_equal(loaded, cached(exported)[0])
    assert sorted(p.name for p in tmp_path.iterdir()) == [out.name]    # no temporary or old copy left


def _fail_with_enospc(*args, **kwargs):
    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


@pytest.mark.parametrize("format", ["parquet", "npy"])
def test_full_disk_is_one_line_and_leaves_nothing(exported, data: Path, cache: Path, tmp_path: Path,
                                                  monkeypatch, format):
    import pyarrow.parquet as pq

    monkeypatch.setattr(pq, "write_table", _fail_with_enospc)
    monkeypatch.setattr(np, "save", _fail_with_enospc)
    with pytest.raises(CxrError, match=rf"^no space left in {re.escape(str(tmp_path))}: the export needs about [\d.]+ MB"):
        cxr_transfer.export_embeddings(data, "mobilenetv2", out=tmp_path / "e", format=format, cache_dir=cache,
                                       **TINY)
    assert list(tmp_path.iterdir()) == []


@pytest.fixture
def small_disk(tmp_path: Path):
    """A 256 kB tmpfs: a disk that really fills up (needs root and a kernel that allows the mount)."""
    mount = tmp_path / "small-disk"
    mount.mkdir()
    if os.geteuid() != 0 or subprocess.run(["mount", "-t", "tmpfs", "-o", "size=256k", "tmpfs", str(mount)],
                                           check=False, capture_output=True).returncode != 0:
        pytest.skip("needs root and a tmpfs mount; test_full_disk_is_one_line_and_leaves_nothing covers the code")
    try:
        yield mount
    finally:
        subprocess.run(["umount", str(mount)], check=True)


def test_a_really_full_disk(exported, data: Path, cache: Path, small_disk: Path, run_cli):
    filler = small_disk / "filler"
    filler.write_bytes(b"\0" * (shutil.disk_usage(small_disk).free - 20 * 1024))   # 20 kB left, 66 kB needed
    for format in ("parquet", "npy"):
        done = run_cli("export", "--data", data, *TINY_FLAGS, "--cache-dir", cache, "--format", format,
                       "--out", small_disk / "e")
        assert done.returncode == 2 and f"no space left in {small_disk}" in done.error_line(), done.stderr[-2000:]
        assert [p.name for p in small_disk.iterdir()] == ["filler"]
