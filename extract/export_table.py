"""One backbone's cached embeddings of a dataset as a table other tools read without cxr-transfer.

The HDF5 cache stays the source of truth: an export is a copy, made through ``load_features`` (which first
computes the embeddings the cache lacks, exactly as ``compare`` does). Rows are the dataset's readable images
in the cache's order (split, label, path), one per image; embeddings are the cache's float32 values, bit for
bit. Two layouts (README, "Export"):

- ``parquet``: one file. Columns ``sha256``, ``path``, ``label``, ``split``, ``group`` (UTF-8 strings; ""
  when a dataset has no split or group) and ``embedding`` (``fixed_size_list<float32>[D]``). The schema's
  key/value metadata holds ``export_metadata``'s keys (backbone, input size, precision, weights and ONNX
  sha256, the int8 sample digest, the HDF5 cache path, the cxr_transfer version, ...).
- ``npy``: one folder holding ``embeddings.npy`` (float32, N x D, C order), ``rows.csv`` (header
  sha256,path,label,split,group; UTF-8 without byte-order mark; row i describes embedding i) and
  ``metadata.json`` (the same keys as the Parquet metadata).

Writes are atomic (``core.io.atomic_path``): the file (or folder) is written beside ``out`` under a hidden
temporary name, synced, and renamed onto ``out``; an interrupted or failed export leaves no partial output.
An existing ``out`` is refused unless ``overwrite``; even then an npy folder is replaced only when it holds
nothing but an earlier export's three files (never a folder of other files). Destination problems (a missing
parent folder, an unwritable one, ``out`` of the wrong kind) are refused before any embedding is computed.
"""
from __future__ import annotations

import csv
import json
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from cxr_transfer.core.errors import CxrError
from cxr_transfer.core.io import atomic_path, is_no_space
from cxr_transfer.core.outputs import writable_folder
from cxr_transfer.core.settings import EXPORT_FORMATS
from cxr_transfer.core.version import __version__
from cxr_transfer.extract.cache import MASK_ATTR, TEXT_COLUMNS
from cxr_transfer.extract.dataset import Dataset, load_dataset
from cxr_transfer.extract.pipeline import ExtractResult, ExtractSettings, FeatureSet, load_features

ROW_COLUMNS = ("sha256", *TEXT_COLUMNS)
EMBEDDING_COLUMN = "embedding"
NPY_FILES = ("embeddings.npy", "rows.csv", "metadata.json")


@dataclass
class ExportResult:
    """What one export wrote, and the extraction it read."""

    path: Path
    format: str
    rows: int
    dim: int
    size_bytes: int
    metadata: dict[str, str]
    extraction: ExtractResult
    dataset: Dataset

    def summary_lines(self) -> list[str]:
        """What the command line prints: skipped entries, the extraction, the file written."""
        return (self.dataset.skipped_summary() + self.extraction.summary_lines() + [self.summary()])

    def summary(self) -> str:
        n = self.size_bytes
        size = f"{n / 2**20:.1f} MB" if n >= 2**20 else f"{n / 2**10:.0f} kB"
        return (f"{self.format}: {self.rows} rows x {self.dim} float32 ({self.metadata['backbone']}"
                f"{' int8' if self.metadata['precision'] == 'int8' else ''}) -> {self.path} ({size})")


def check_destination(out: str | Path, format: str, overwrite: bool = False) -> Path:
    """``out`` as a Path once it is a place this export may write; CxrError (one line) otherwise."""
    if format not in EXPORT_FORMATS:
        raise CxrError(f"`format` must be one of {', '.join(EXPORT_FORMATS)}, got {format!r} instead")
    out = Path(out).expanduser()
    parent = out.parent
    if not parent.is_dir():
        what = "is a file, not a folder" if parent.exists() else "does not exist"
        raise CxrError(f"`out`: the folder {parent} {what}; create it first or give another `out`")
    writable_folder(parent, "`out`")
    if out.exists() or out.is_symlink():
        if not overwrite:
            raise CxrError(f"`out`: {out} already exists; give a new name, or `overwrite` to replace it")
        if format == "parquet" and out.is_dir():
            raise CxrError(f"`out`: {out} is a folder; a Parquet export is one file, give a file name")
        if format == "npy":
            _check_replaceable_folder(out)
    return out


def _check_replaceable_folder(out: Path) -> None:
    if not out.is_dir() or out.is_symlink():
        raise CxrError(f"`out`: {out} is not a folder; an npy export is a folder, give a folder name")
    others = sorted(p.name for p in out.iterdir() if p.name not in NPY_FILES)
    if others:
        raise CxrError(f"`out`: {out} holds files other than an npy export's ({', '.join(others[:3])}"
                       f"{' ...' if len(others) > 3 else ''}); refusing to replace it, give another `out`")


def export_metadata(features: FeatureSet, result: ExtractResult) -> dict[str, str]:
    """The facts an export records about its embeddings (strings, for Parquet's key/value metadata)."""

    attrs = features.attrs
    meta = {"backbone": result.backbone, "input_size": str(attrs.get("input_size", "")),
            "precision": result.precision, "weights_sha256": result.weights.sha256,
            "weights": result.weights.describe(), "onnx_sha256": result.onnx_sha256,
            "preprocessing": str(attrs.get("preprocessing", "")), "mask": str(attrs.get(MASK_ATTR, "full")),
            "embedding_dim": str(features.embeddings.shape[1]), "cache_path": str(Path(result.cache_path).absolute()),
            "dataset_root": str(attrs.get("dataset_root", "")), "cxr_transfer_version": __version__}
    if result.int8_sample_digest:
        meta["int8_sample_digest"] = result.int8_sample_digest
    return meta


def row_columns(features: FeatureSet, dataset: Dataset) -> dict[str, list[str]]:
    """The per-image text columns, as the cache stores them (``extract.pipeline._rows``)."""
    return {"sha256": [s.sha256 for s in features.samples],
            "path": [dataset.relative(s) for s in features.samples],
            "label": [s.label for s in features.samples],
            "split": [s.split for s in features.samples],
            "group": [s.group for s in features.samples]}


def export_embeddings(data: str | Path | Dataset, out: str | Path, settings: ExtractSettings,
                      format: str = "parquet", overwrite: bool = False) -> ExportResult:
    """Embed what the cache lacks, then write the dataset's embeddings to ``out`` (module docstring)."""
    out = check_destination(out, format, overwrite)
    dataset = load_dataset(data)
    features, result = load_features(dataset, settings)
    metadata = export_metadata(features, result)
    columns = row_columns(features, dataset)
    writer = write_parquet if format == "parquet" else write_npy
    size = writer(out, features.embeddings, columns, metadata, overwrite)
    return ExportResult(out, format, len(features.samples), int(features.embeddings.shape[1]), size, metadata,
                        result, dataset)


def write_parquet(out: Path, embeddings: np.ndarray, columns: dict[str, list[str]], metadata: dict[str, str],
                  overwrite: bool = False) -> int:
    """Write the table as one Parquet file (atomically); returns its size in bytes."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    embeddings = np.ascontiguousarray(embeddings, dtype=np.float32)
    dim = embeddings.shape[1]
    vectors = pa.FixedSizeListArray.from_arrays(pa.array(embeddings.reshape(-1)), dim)
    arrays = [pa.array(columns[name], type=pa.string()) for name in ROW_COLUMNS] + [vectors]
    names = [*ROW_COLUMNS, EMBEDDING_COLUMN]
    table = pa.Table.from_arrays(arrays, names=names).replace_schema_metadata(metadata)
    try:
        with atomic_path(out) as tmp:
            # Plain (not dictionary) encoding for the floats: the dictionary of 425 VGG16 embeddings made the file
            # 1.23 MB instead of 0.83 MB. Snappy, Parquet's most widely read compression, for the rest.
            pq.write_table(table, str(tmp), use_dictionary=list(ROW_COLUMNS), compression="snappy")
            _make_room(out, overwrite, folder=False)
    except OSError as exc:
        raise _write_error(exc, out, embeddings.nbytes) from None
    return out.stat().st_size


def write_npy(out: Path, embeddings: np.ndarray, columns: dict[str, list[str]], metadata: dict[str, str],
              overwrite: bool = False) -> int:
    """Write embeddings.npy, rows.csv and metadata.json into the folder ``out`` (atomically); returns bytes."""
    embeddings = np.ascontiguousarray(embeddings, dtype=np.float32)
    old = None
    try:
        with atomic_path(out) as tmp:
            tmp.mkdir()
            np.save(tmp / "embeddings.npy", embeddings, allow_pickle=False)
            with open(tmp / "rows.csv", "w", encoding="utf-8", newline="") as handle:
                writer = csv.writer(handle, lineterminator="\n")
                writer.writerow(ROW_COLUMNS)
                writer.writerows(zip(*(columns[name] for name in ROW_COLUMNS)))
            layout = {"embeddings.npy": f"float32 ({embeddings.shape[0]}, {embeddings.shape[1]}), C order",
                      "rows.csv": f"{','.join(ROW_COLUMNS)}; UTF-8; row i describes embedding i"}
            (tmp / "metadata.json").write_text(json.dumps({**metadata, "layout": layout}, indent=2,
                                                          ensure_ascii=False) + "\n", encoding="utf-8")
            old = _make_room(out, overwrite, folder=True)
    except BaseException as exc:   # any failure, Ctrl-C included: the earlier export goes back in place
        if old is not None and not out.exists():
            os.replace(old, out)
        if isinstance(exc, OSError):
            raise _write_error(exc, out, embeddings.nbytes) from None
        raise
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
    return sum((out / name).stat().st_size for name in NPY_FILES)


def _make_room(out: Path, overwrite: bool, folder: bool) -> Path | None:
    """Just before the finished export is renamed onto ``out``: refuse an ``out`` that appeared while the
    embeddings were computed (unless ``overwrite``); move an earlier npy folder aside (a folder is renamed only
    onto an empty one) and return where it went, for removal once the new folder is in place."""
    if (out.exists() or out.is_symlink()) and not overwrite:
        raise CxrError(f"`out`: {out} already exists; give a new name, or `overwrite` to replace it")
    if not folder or not out.is_dir():
        return None
    _check_replaceable_folder(out)
    old = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}.", suffix=".old"))
    os.replace(out, old)
    return old


def _write_error(exc: OSError, out: Path, needed: int) -> CxrError:
    """The user's one-line error for a failed write: a full disk, or why the destination refused it.

    A full disk is recognised by its errno, or by less free space than the export needs: Arrow reports a
    full disk as a short write ("16640 requested and 5088 written") without the errno.
    """
    try:
        free = shutil.disk_usage(out.parent).free
    except OSError:
        free = -1
    if is_no_space(exc) or 0 <= free < needed:
        free_text = f", {free / 2**20:.1f} MB free" if free >= 0 else ""
        return CxrError(f"no space left in {out.parent}: the export needs about {needed / 2**20:.1f} MB"
                        f"{free_text}; nothing was written: free some space or give another `out`")
    return CxrError(f"`out`: cannot write {out} ({exc.strerror or exc}); give a writable place with `out`")
