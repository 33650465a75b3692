"""The HDF5 embedding cache: one file per (dataset folder, backbone, input size, weights, image view).

Layout of ``features/<dataset-id>/<backbone>-<size>-<weights16>[-<view>].h5`` (README, "Feature cache"):

    /embeddings  float32 (N, D)   one row per image of the current listing, in the dataset's stable order
    /sha256      bytes   (N,)     sha256 of the image file's bytes (the identity a row is keyed on)
    /path        str     (N,)     path relative to the dataset root
    /label       str     (N,)     class name
    /split       str     (N,)     split folder or CSV split ("" when none)
    /group       str     (N,)     patient group ("" when none)
    attrs: backbone, input_size, preprocessing, view, weights_sha256, onnx_sha256, onnx_max_relative_error,
           opset, versions (JSON), created, updated, dataset_root, failed (JSON list of skipped files)

Crash safety: while a run computes, every flushed block of embeddings is written to its own ``.npz`` part
file next to the cache (atomic rename). The HDF5 file itself is only ever replaced whole, by a new file
written beside it and renamed over it. A ``kill -9`` at any moment therefore leaves the old cache intact
plus the finished parts, and the next run opens both and computes only what is missing.
"""
from __future__ import annotations

import json
import logging
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable

import h5py
import numpy as np

from cxr_transfer.core.errors import CxrError
from cxr_transfer.core.record import now_iso

log = logging.getLogger(__name__)

IDENTITY_ATTRS = ("backbone", "input_size", "preprocessing", "view", "weights_sha256")
_STR = h5py.string_dtype(encoding="utf-8")
_COPY_ROWS = 512


@dataclass(frozen=True)
class CacheRow:
    """The per-image columns stored beside each embedding."""

    sha256: str
    path: str
    label: str
    split: str
    group: str


class FeatureCache:
    """Embeddings keyed by image sha256 for one model identity; see the module docstring for the layout."""

    def __init__(self, path: str | Path, identity: dict[str, object]) -> None:
        self.path = Path(path)
        self.parts_dir = self.path.with_name(self.path.name + ".parts")
        self.identity = {k: identity[k] for k in IDENTITY_ATTRS}
        self._stored: dict[str, int] = {}
        self._parts: dict[str, tuple[Path, int]] = {}
        self._open_existing()
        self._scan_parts()

    # ----------------------------------------------------------------- reading what is there
    def _open_existing(self) -> None:
        if not self.path.exists():
            return
        try:
            with h5py.File(self.path, "r") as handle:
                stored = {k: handle.attrs.get(k) for k in IDENTITY_ATTRS}
                for key, expected in self.identity.items():
                    value = stored[key]
                    value = value.item() if hasattr(value, "item") else value
                    if str(value) != str(expected):
                        raise CxrError(f"{self.path} holds features with {key}={value}, not {expected}: "
                                       f"refusing to mix them; delete the file or use another --cache-dir")
                shas = handle["sha256"][:].astype(str)
                handle["embeddings"].shape  # noqa: B018 - fails on a damaged file
        except CxrError:
            raise
        except Exception as exc:  # damaged or truncated HDF5: keep it aside, rebuild
            aside = self.path.with_name(self.path.name + f".damaged-{int(time.time())}")
            os.replace(self.path, aside)
            log.warning("%s could not be read (%s); moved to %s, recomputing", self.path, exc, aside.name)
            return
        self._stored = {sha: i for i, sha in enumerate(shas)}

    def _scan_parts(self) -> None:
        if not self.parts_dir.is_dir():
            return
        for part in sorted(self.parts_dir.glob("part-*.npz")):
            try:
                with np.load(part) as data:
                    shas = data["sha256"].astype(str)
                    if data["embeddings"].shape[0] != len(shas):
                        raise ValueError("row count mismatch")
            except Exception as exc:
                log.warning("ignoring unreadable part %s (%s)", part.name, exc)
                part.unlink(missing_ok=True)
                continue
            for i, sha in enumerate(shas):
                self._parts.setdefault(sha, (part, i))

    def has(self, sha256: str) -> bool:
        return sha256 in self._stored or sha256 in self._parts

    @property
    def known(self) -> set[str]:
        return set(self._stored) | set(self._parts)

    # ----------------------------------------------------------------- writing
    def add_part(self, shas: list[str], embeddings: np.ndarray) -> Path:
        """Persist a block of new embeddings at once, atomically, as a part file."""
        self.parts_dir.mkdir(parents=True, exist_ok=True)
        name = f"part-{time.time_ns()}-{len(self._parts)}.npz"
        tmp = self.parts_dir / (name + ".tmp")
        with open(tmp, "wb") as handle:
            np.savez(handle, sha256=np.array(shas, dtype="S64"), embeddings=embeddings.astype(np.float32))
            handle.flush()
            os.fsync(handle.fileno())
        final = self.parts_dir / name
        os.replace(tmp, final)
        for i, sha in enumerate(shas):
            self._parts.setdefault(sha, (final, i))
        return final

    def listing_matches(self, rows: list[CacheRow]) -> bool:
        """True when the HDF5 file already holds exactly these rows, in this order (nothing to rewrite)."""
        if self._parts or not self.path.exists() or len(rows) != len(self._stored):
            return False
        with h5py.File(self.path, "r") as handle:
            columns = {c: handle[c][:].astype(str) for c in ("sha256", "path", "label", "split", "group")}
        return all(columns["sha256"][i] == r.sha256 and columns["path"][i] == r.path and
                   columns["label"][i] == r.label and columns["split"][i] == r.split and
                   columns["group"][i] == r.group for i, r in enumerate(rows))

    def write(self, rows: list[CacheRow], attrs: dict[str, object]) -> None:
        """Replace the HDF5 file with exactly ``rows`` (every sha must be known), then drop the parts."""
        missing = [r.sha256 for r in rows if not self.has(r.sha256)]
        if missing:
            raise RuntimeError(f"{len(missing)} rows have no embedding")
        dim = self._dimension()
        tmp = self.path.with_name(self.path.name + ".tmp")
        self.path.parent.mkdir(parents=True, exist_ok=True)
        created = self._attr("created") or now_iso()
        with h5py.File(tmp, "w") as out:
            embeddings = out.create_dataset("embeddings", shape=(len(rows), dim), dtype=np.float32,
                                            chunks=(min(max(len(rows), 1), 256), dim) if rows else None)
            out.create_dataset("sha256", data=np.array([r.sha256 for r in rows], dtype="S64"))
            for column in ("path", "label", "split", "group"):
                out.create_dataset(column, data=[getattr(r, column) for r in rows], dtype=_STR)
            for start in range(0, len(rows), _COPY_ROWS):
                block = rows[start:start + _COPY_ROWS]
                embeddings[start:start + len(block)] = self._gather([r.sha256 for r in block], dim)
            for key, value in {**attrs, **self.identity, "created": created, "updated": now_iso()}.items():
                out.attrs[key] = value if isinstance(value, (int, float, str)) else json.dumps(value)
        os.replace(tmp, self.path)
        for part in {p for p, _ in self._parts.values()}:
            part.unlink(missing_ok=True)
        if self.parts_dir.is_dir() and not any(self.parts_dir.iterdir()):
            self.parts_dir.rmdir()
        self._parts = {}
        self._stored = {r.sha256: i for i, r in enumerate(rows)}

    # ----------------------------------------------------------------- helpers
    def _attr(self, key: str) -> str | None:
        if not self.path.exists():
            return None
        with h5py.File(self.path, "r") as handle:
            value = handle.attrs.get(key)
        return None if value is None else str(value)

    def _dimension(self) -> int:
        if self._stored:
            with h5py.File(self.path, "r") as handle:
                return int(handle["embeddings"].shape[1])
        if self._parts:
            part, _ = next(iter(self._parts.values()))
            with np.load(part) as data:
                return int(data["embeddings"].shape[1])
        return 0

    def _gather(self, shas: Iterable[str], dim: int) -> np.ndarray:
        shas = list(shas)
        block = np.empty((len(shas), dim), dtype=np.float32)
        from_file = [(i, self._stored[s]) for i, s in enumerate(shas) if s not in self._parts]
        if from_file:
            with h5py.File(self.path, "r") as handle:
                source_rows = sorted({row for _, row in from_file})
                values = handle["embeddings"][source_rows]
                where = {row: k for k, row in enumerate(source_rows)}
                for i, row in from_file:
                    block[i] = values[where[row]]
        by_part: dict[Path, list[tuple[int, int]]] = {}
        for i, sha in enumerate(shas):
            if sha in self._parts:
                part, row = self._parts[sha]
                by_part.setdefault(part, []).append((i, row))
        for part, pairs in by_part.items():
            with np.load(part) as data:
                values = data["embeddings"]
                for i, row in pairs:
                    block[i] = values[row]
        return block


def _attrs(handle: h5py.File) -> dict[str, object]:
    return {k: (v.item() if hasattr(v, "item") else v) for k, v in handle.attrs.items()}


def read_cache_attrs(path: str | Path) -> dict[str, object]:
    """The attributes of a cache file only (no embeddings read)."""
    with h5py.File(path, "r") as handle:
        return _attrs(handle)


def read_cache(path: str | Path) -> tuple[np.ndarray, dict[str, np.ndarray], dict[str, object]]:
    """(embeddings, columns, attrs) of a cache file, for readers that need no extraction."""
    with h5py.File(path, "r") as handle:
        embeddings = handle["embeddings"][:]
        columns = {"sha256": handle["sha256"][:].astype(str)}
        for column in ("path", "label", "split", "group"):
            columns[column] = handle[column][:].astype(str)
        attrs = _attrs(handle)
    return embeddings, columns, attrs
