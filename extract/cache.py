"""The HDF5 embedding cache: one file per (dataset folder, backbone, input size, weights, image mask).

Layout of ``features/<dataset-id>/<backbone>-<size>-<weights16>[-<mask>].h5`` (README, "Feature cache"):

    /embeddings  float32 (N, D)   one row per image of the current listing, in the dataset's stable order
    /sha256      bytes   (N,)     sha256 of the image file's bytes (the identity a row is keyed on)
    /path        str     (N,)     path relative to the dataset root (UTF-8 text)
    /label       str     (N,)     class name (UTF-8 text)
    /split       str     (N,)     split folder or CSV split ("" when none)
    /group       str     (N,)     patient group ("" when none)
    attrs: backbone, input_size, preprocessing, view (the image mask's name: ``MASK_ATTR``), weights_sha256,
           onnx_sha256, onnx_max_relative_error, opset, versions (JSON), created, updated, dataset_root,
           failed (JSON list of skipped files)

Integrity: ``embeddings`` and ``sha256`` carry HDF5's fletcher32 checksum on every stored block, so flipped
bytes fail the read; on open every column must have N rows and every embedding must be finite. A file that
fails any of this is moved aside (``.damaged-<time>``) and rebuilt.

Crash safety: while a run computes, every flushed block of embeddings is written to its own ``.npz`` part
file next to the cache (``write_part``: ``core.io.atomic_write``; the Ray engine's workers write one part per
shard). The HDF5 file itself is only ever replaced whole, by a new file written beside it and renamed over it.
A ``kill -9`` at any moment therefore leaves the old cache intact plus the finished parts, and the next run
opens both and computes only what is missing; the half-written ``.tmp`` files such a kill leaves are removed
when the cache is opened. Callers hold the cache's lock (``core.locking.file_lock``) while a ``FeatureCache``
is open for writing: one writer per file.

Disk full: the new HDF5 file is built in memory, then the free space is checked and the bytes are written
with plain file I/O, so HDF5 never meets a full disk (its failed close crashed the process). A failed write
(ENOSPC) removes its temporary file and raises one ``CxrError`` naming the folder and the space needed; the
old cache and the finished parts stay.
"""
from __future__ import annotations

import io
import json
import logging
import os
import shutil
import time
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import h5py
import numpy as np

from cxr_transfer.core.errors import CxrError
from cxr_transfer.core.io import atomic_write, is_no_space, no_space_error, remove_leftovers
from cxr_transfer.core.record import now_iso

log = logging.getLogger(__name__)

MASK_ATTR = "view"
"""The attribute holding the ``extract.images.ImageMask``'s name ("full" when none). Its stored name is older
than the word "mask" and stays, so that existing caches keep opening (it is part of their identity)."""
IDENTITY_ATTRS = ("backbone", "input_size", "preprocessing", MASK_ATTR, "weights_sha256")
TEXT_COLUMNS = ("path", "label", "split", "group")
_STR = h5py.string_dtype(encoding="utf-8")
_COPY_ROWS = 512
_CHECK_ROWS = 4096
_SPACE_SLACK = 64 << 10


@dataclass(frozen=True)
class CacheRow:
    """The per-image columns stored beside each embedding."""

    sha256: str
    path: str
    label: str
    split: str
    group: str


class CacheDamagedError(ValueError):
    """A cache file whose shapes, checksums or values are wrong."""


def _text(dataset: h5py.Dataset) -> np.ndarray:
    """A string column as str, decoded as UTF-8 (h5py returns bytes, and numpy would decode them as ASCII)."""
    return np.array(dataset.asstr("utf-8")[()], dtype=str).reshape(-1) if len(dataset) else np.array([], str)


def _shas(dataset: h5py.Dataset) -> np.ndarray:
    return np.array(dataset.asstr("ascii")[()], dtype=str).reshape(-1) if len(dataset) else np.array([], str)


def check_file(handle: h5py.File, embeddings_read: np.ndarray | None = None) -> int:
    """Raise CacheDamagedError unless every column has the same row count and every embedding is finite.

    Reads every embedding block (so fletcher32 checksums are verified too), unless the caller already read
    them all (``embeddings_read``). Returns the row count.
    """
    names = ("embeddings", "sha256", *TEXT_COLUMNS)
    missing = [n for n in names if n not in handle]
    if missing:
        raise CacheDamagedError(f"missing column(s) {', '.join(missing)}")
    embeddings = handle["embeddings"]
    if embeddings.ndim != 2 or embeddings.dtype != np.float32:
        raise CacheDamagedError(f"embeddings of shape {embeddings.shape} and dtype {embeddings.dtype}")
    n = embeddings.shape[0]
    lengths = {name: handle[name].shape for name in names[1:]}
    wrong = {name: shape for name, shape in lengths.items() if shape != (n,)}
    if wrong:
        raise CacheDamagedError(f"{n} embeddings but columns of shape {wrong}")
    for start in range(0, n, _CHECK_ROWS):
        block = (embeddings if embeddings_read is None else embeddings_read)[start:start + _CHECK_ROWS]
        if not np.isfinite(block).all():
            bad = start + int(np.flatnonzero(~np.isfinite(block).all(axis=1))[0])
            raise CacheDamagedError(f"embedding row {bad} is not finite")
    return n


def write_part(parts_dir: Path, name: str, shas: list[str], embeddings: np.ndarray) -> Path:
    """Write one part file (``part-*.npz``: sha256 and float32 embeddings, finite rows only) atomically: a
    temporary file, fsync, rename. The same name written twice (a retried shard) is replaced whole."""
    embeddings = np.asarray(embeddings, dtype=np.float32)
    if embeddings.shape[0] != len(shas) or not np.isfinite(embeddings).all():
        raise ValueError(f"a part needs one finite embedding per sha256, got shape {embeddings.shape} "
                         f"for {len(shas)} rows instead")
    if not (name.startswith("part-") and name.endswith(".npz")):
        raise ValueError(f"part files are named part-*.npz, got {name!r} instead")
    final = parts_dir / name
    try:
        parts_dir.mkdir(parents=True, exist_ok=True)
        with atomic_write(final) as handle:
            np.savez(handle, sha256=np.array(shas, dtype="S64"), embeddings=embeddings)
    except OSError as exc:
        if is_no_space(exc):
            raise no_space_error(parts_dir, embeddings.nbytes + 64 * len(shas) + _SPACE_SLACK) from None
        raise
    return final


class FeatureCache:
    """Embeddings keyed by image sha256 for one model identity; see the module docstring for the layout."""

    def __init__(self, path: str | Path, identity: dict[str, object]) -> None:
        self.path = Path(path)
        self.parts_dir = self.path.with_name(self.path.name + ".parts")
        self.identity = {k: identity[k] for k in IDENTITY_ATTRS}
        self._stored: dict[str, int] = {}
        self._parts: dict[str, tuple[Path, int]] = {}
        self._clean_leftovers()
        self._open_existing()
        self._scan_parts()

    # ----------------------------------------------------------------- reading what is there
    def _clean_leftovers(self) -> None:
        """Remove what a killed writer leaves: half-written files and empty part folders (we hold the lock)."""
        remove_leftovers(self.path)
        for leftover in self.parts_dir.glob("*.npz.tmp") if self.parts_dir.is_dir() else []:
            try:                            # a part's temporary file (atomic_write), whatever part it was
                leftover.unlink()
                log.info("removed %s left by an interrupted run", leftover.name)
            except OSError as exc:          # read-only cache: nothing to tidy, nothing to write either
                log.debug("could not remove %s (%s)", leftover, exc)
        self._remove_empty_parts_dir()

    def _remove_empty_parts_dir(self) -> None:
        try:
            if self.parts_dir.is_dir() and not any(self.parts_dir.iterdir()):
                self.parts_dir.rmdir()
        except OSError as exc:
            log.debug("could not remove %s (%s)", self.parts_dir, exc)

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
                        name = "mask" if key == MASK_ATTR else key
                        raise CxrError(f"{self.path} holds features with {name}={value}, not {expected}: "
                                       f"refusing to mix them; delete the file or use another `cache_dir`")
                check_file(handle)
                shas = _shas(handle["sha256"])
        except CxrError:
            raise
        except Exception as exc:  # noqa: BLE001 - damaged, truncated or inconsistent HDF5: set aside, rebuild
            aside = self.path.with_name(self.path.name + f".damaged-{int(time.time())}")
            try:
                os.replace(self.path, aside)
            except OSError as move_error:
                raise CxrError(f"{self.path} is damaged ({exc}) and cannot be moved aside ({move_error}); "
                               f"delete it and run again") from None
            log.warning("%s could not be read (%s); moved to %s, recomputing", self.path, exc, aside.name)
            return
        self._stored = {sha: i for i, sha in enumerate(shas)}

    def _scan_parts(self) -> None:
        if not self.parts_dir.is_dir():
            return
        known = {p for p, _ in self._parts.values()}
        for part in sorted(self.parts_dir.glob("part-*.npz")):
            if part in known:
                continue
            try:
                with np.load(part) as data:
                    shas = data["sha256"].astype(str)
                    embeddings = data["embeddings"]
                    if embeddings.ndim != 2 or embeddings.shape[0] != len(shas):
                        raise ValueError("row count mismatch")
                    if not np.isfinite(embeddings).all():
                        raise ValueError("non-finite embeddings")
            except Exception as exc:  # noqa: BLE001 - any damage: the part is recomputed
                log.warning("ignoring unreadable part %s (%s)", part.name, exc)
                try:
                    part.unlink()
                except OSError:
                    pass
                continue
            for i, sha in enumerate(shas):
                self._parts.setdefault(sha, (part, i))

    def has(self, sha256: str) -> bool:
        return sha256 in self._stored or sha256 in self._parts

    @property
    def known(self) -> set[str]:
        return set(self._stored) | set(self._parts)

    def stored_rows(self) -> list[CacheRow]:
        """The rows the HDF5 file holds now, in its order (empty when there is no file)."""
        if not self._stored:
            return []
        with h5py.File(self.path, "r") as handle:
            columns = {"sha256": _shas(handle["sha256"]), **{c: _text(handle[c]) for c in TEXT_COLUMNS}}
        return [CacheRow(*(str(columns[c][i]) for c in ("sha256", *TEXT_COLUMNS)))
                for i in range(len(columns["sha256"]))]

    # ----------------------------------------------------------------- writing
    def add_part(self, shas: list[str], embeddings: np.ndarray) -> Path:
        """Persist a block of new embeddings at once, atomically, as a part file (finite rows only)."""
        final = write_part(self.parts_dir, f"part-{time.time_ns()}-{len(self._parts)}.npz", shas, embeddings)
        for i, sha in enumerate(shas):
            self._parts.setdefault(sha, (final, i))
        return final

    def adopt_parts(self) -> None:
        """Take up the part files other processes wrote into ``parts_dir`` while this cache was open (the
        Ray engine's workers, under this process's lock); unreadable ones are dropped as on open."""
        self._scan_parts()

    def listing_matches(self, rows: list[CacheRow]) -> bool:
        """True when the HDF5 file already holds exactly these rows, in this order, with checksums."""
        if self._parts or not self.path.exists() or len(rows) != len(self._stored):
            return False
        with h5py.File(self.path, "r") as handle:
            if not handle["embeddings"].fletcher32:     # written before checksums: rewrite once
                return False
        return self.stored_rows() == list(rows)

    def write(self, rows: list[CacheRow], attrs: dict[str, object]) -> None:
        """Replace the HDF5 file with exactly ``rows`` (every sha must be known), then drop the parts.

        The file is built in memory and written with plain file I/O: HDF5 itself never meets a full disk
        (its failed close on ENOSPC crashed the process), and a failed write leaves the old file as it was.
        """
        missing = [r.sha256 for r in rows if not self.has(r.sha256)]
        if missing:
            raise RuntimeError(f"{len(missing)} rows have no embedding")
        folder = self.path.parent
        folder.mkdir(parents=True, exist_ok=True)
        image = self._file_image(rows, attrs)
        needed = image.nbytes + _SPACE_SLACK
        if shutil.disk_usage(folder).free < needed:
            raise no_space_error(folder, needed)
        try:
            with atomic_write(self.path) as handle:
                handle.writelines(image[start:start + (1 << 24)] for start in range(0, image.nbytes, 1 << 24))
        except OSError as exc:
            if is_no_space(exc):
                raise no_space_error(folder, needed) from None
            raise
        finally:
            image.release()
        for part in {p for p, _ in self._parts.values()}:
            part.unlink(missing_ok=True)
        self._remove_empty_parts_dir()
        self._parts = {}
        self._stored = {r.sha256: i for i, r in enumerate(rows)}

    def _file_image(self, rows: list[CacheRow], attrs: dict[str, object]) -> memoryview:
        """The bytes of the HDF5 file holding ``rows``, built in memory."""
        dim = self._dimension()
        created = self._attr("created") or now_iso()
        n = len(rows)
        buffer = io.BytesIO()
        with h5py.File(buffer, "w") as out:
            checked = {"fletcher32": True, "chunks": (min(n, 256), dim)} if n and dim else {}
            embeddings = out.create_dataset("embeddings", shape=(n, dim), dtype=np.float32, **checked)
            out.create_dataset("sha256", data=np.array([r.sha256 for r in rows], dtype="S64"),
                               **({"fletcher32": True, "chunks": (min(n, 4096),)} if n else {}))
            for column in TEXT_COLUMNS:
                out.create_dataset(column, data=[getattr(r, column) for r in rows], dtype=_STR)
            for start in range(0, n, _COPY_ROWS):
                block = rows[start:start + _COPY_ROWS]
                embeddings[start:start + len(block)] = self._gather([r.sha256 for r in block], dim)
            for key, value in {**attrs, **self.identity, "created": created, "updated": now_iso()}.items():
                out.attrs[key] = value if isinstance(value, (int, float, str)) else json.dumps(value)
        return buffer.getbuffer()

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
    """(embeddings, columns, attrs) of a cache file, for readers that need no extraction.

    Columns are str arrays decoded as UTF-8. A damaged file (checksum, shapes, non-finite values) raises
    CxrError: run ``extract`` again, which moves it aside and rebuilds it.
    """
    try:
        with h5py.File(path, "r") as handle:
            embeddings = handle["embeddings"][()]
            check_file(handle, embeddings)
            columns = {"sha256": _shas(handle["sha256"])}
            for column in TEXT_COLUMNS:
                columns[column] = _text(handle[column])
            attrs = _attrs(handle)
    except (OSError, CacheDamagedError, UnicodeDecodeError, KeyError) as exc:
        raise CxrError(f"{path} is damaged ({exc}); run extract again to rebuild it") from None
    return embeddings, columns, attrs
